"""Commonsense multiple choice in LLM-Adapters' format (Hu et al., EMNLP 2023, arXiv 2304.01933): BoolQ, ARC-Easy,
ARC-Challenge, OpenBookQA. Each question is an instruction that lists its options (`Answer1: ... Answer2: ...`) and
ends with the answer format (`Answer format: answer1/answer2/answer3/answer4`, or `true/false`); LLM-Adapters' response
is `the correct answer is answer2`.

Trained on the response; evaluated without generation, as lm-evaluation-harness scores multiple choice: each option
is the response with that answer, the set taken from the example's own answer format, and the prediction is the option
with the highest log-likelihood given the prompt. Accuracy; the chance level is the share of the most frequent right
answer.

`task.answers` says what the response names: `label` is LLM-Adapters' `answer2` (comparable with the papers that
train LLaMA-7B on their data), `text` the option itself (`the correct answer is roots may be split`), what
lm-evaluation-harness scores for ARC and OpenBookQA. A label asks the model to point at an option it read in the
prompt, which a 135M model does not learn in a short run: at the default budget SmolLM2-135M stayed at chance on
ARC-Easy with labels (0.232 untuned → 0.240 tuned, 4 options, majority 0.276), and moved with the option's text
(0.266 → 0.410, 500 test questions). So ARC and OpenBookQA default to `text`, scored per character
of the response (`task.option_norm=chars`, as the harness's `acc_norm` divides by the continuation's length; the
response's shared `the correct answer is ` counts too): a sum of log-probabilities favours short options. BoolQ's
options, `true` and `false`, are text either way. Every option is listed in the prompt, so the untuned model's text
likelihoods favour none of them much: its score sits near chance in both formats.
"""

from __future__ import annotations

import re
from typing import Any

from lorafactory.tasks import TASKS
from lorafactory.tasks.causal import CausalLMTask

_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")
_OPTION = re.compile(r"Answer(\d+):\s*(.*?)(?=\s*Answer\d+:|\s*$)", re.DOTALL)


def option_texts(instruction: str) -> dict[str, str]:
    """`{"answer1": text, ...}` from the paragraph of an instruction that lists the options (`Answer1: ...`)."""
    listing = instruction.strip().rsplit("Answer format:", 1)[0].strip().rsplit("\n\n", 1)[-1]
    return {f"answer{k}": text.strip() for k, text in _OPTION.findall(listing)}


class CommonsenseTask(CausalLMTask):
    def examples(self, raw: dict[str, list[Any]], task_cfg: Any) -> list[dict[str, Any]]:
        as_text = task_cfg.get("answers", "label") == "text"
        out = []
        for instruction, inp, output, answer in zip(
            raw["instruction"], raw["input"], raw["output"], raw["answer"], strict=True
        ):
            found = _FORMAT.search(instruction.strip())
            assert found, f"{self.name}: no 'Answer format:' line in {instruction[-80:]!r}"
            choices = found.group(1).split("/")
            assert answer in choices and output.endswith(answer), f"{self.name}: answer {answer!r} not in {choices}"
            prefix = output[: -len(answer)]  # "the correct answer is "
            named = choices
            if as_text and choices[0].startswith("answer"):  # BoolQ's true / false are text already
                texts = option_texts(instruction)
                assert list(texts) == choices, f"{self.name}: options {list(texts)} listed, format says {choices}"
                named = [texts[c] for c in choices]
            right = choices.index(answer)
            out.append(
                {
                    "fields": {"instruction": instruction, "input": inp},
                    "targets": [prefix + named[right]],
                    "references": [answer],
                    "options": [prefix + c for c in named],
                    "answer": right,
                }
            )
        return out


def _commonsense(name: str, folder: str, validation_size: int = 64) -> None:
    TASKS.register(f"commonsense/{name}")(
        CommonsenseTask(
            name=f"commonsense/{name}",
            hub_id=f"llm-adapters/{folder}",
            subset=None,
            num_labels=0,  # no classification head: the model's own LM head
            metrics=("accuracy",),
            primary_metric="accuracy",
            evaluation="options",
            prompt_fields=("instruction", "input"),
            train_split="train",
            test_split="test",
            validation_size=validation_size,
            json_dir=True,
        )
    )


_commonsense("boolq", "boolq")
_commonsense("arc_easy", "ARC-Easy")
_commonsense("arc_challenge", "ARC-Challenge")
_commonsense("openbookqa", "openbookqa")
