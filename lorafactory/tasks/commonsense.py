"""Commonsense multiple choice in LLM-Adapters' format (Hu et al., EMNLP 2023, arXiv 2304.01933): BoolQ, ARC-Easy,
ARC-Challenge, OpenBookQA. Each question is an instruction that lists its options and ends with the answer format
(`Answer format: answer1/answer2/answer3/answer4`, or `true/false`); the response is `the correct answer is answer2`.

Trained on the response; evaluated without generation, as lm-evaluation-harness scores multiple choice: each option
is the response with that answer (`the correct answer is answer1`, ...), the set taken from the example's own answer
format, and the prediction is the option with the highest log-likelihood given the prompt. Accuracy; the chance level
is the share of the most frequent right answer.
"""

from __future__ import annotations

import re
from typing import Any

from lorafactory.tasks import TASKS
from lorafactory.tasks.causal import CausalLMTask

_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


class CommonsenseTask(CausalLMTask):
    def examples(self, raw: dict[str, list[Any]]) -> list[dict[str, Any]]:
        out = []
        for instruction, inp, output, answer in zip(
            raw["instruction"], raw["input"], raw["output"], raw["answer"], strict=True
        ):
            found = _FORMAT.search(instruction.strip())
            assert found, f"{self.name}: no 'Answer format:' line in {instruction[-80:]!r}"
            choices = found.group(1).split("/")
            assert answer in choices and output.endswith(answer), f"{self.name}: answer {answer!r} not in {choices}"
            prefix = output[: -len(answer)]  # "the correct answer is "
            out.append(
                {
                    "fields": {"instruction": instruction, "input": inp},
                    "targets": [output],
                    "references": [answer],
                    "options": [prefix + c for c in choices],
                    "answer": choices.index(answer),
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
