"""GSM8K (Cobbe et al., 2021, arXiv 2110.14168): grade-school math word problems, trained with their worked
solutions (chain of thought ending in `#### <answer>`), scored by exact match of the final number.

The final number is extracted robustly (`text_metrics.extract_answer`: `\\boxed{}`, then `####`, then "The (final)
answer is", then the last number; commas, `$`, `%` stripped; fractions and decimals compared as numbers) and every
record says how often each rule applied: a model that never writes `####` but gets the last number right is visible
as such. The solutions' calculator annotations (`<<48/2=24>>`) are removed from the training targets: they are an
artefact of how the data was written, not reasoning. The test subset is a fixed seeded sample (generation costs about
3 s a question on 2 cores); `task.max_eval_samples=null` evaluates all 1,319.
"""

from __future__ import annotations

import re
from typing import Any

from lorafactory.tasks import TASKS
from lorafactory.tasks.causal import CausalLMTask
from lorafactory.tasks.data import Rows
from lorafactory.tasks.text_metrics import answer_matches, as_number, exact_match

_CALCULATOR = re.compile(r"<<[^<>]*>>")


class GSM8KTask(CausalLMTask):
    def examples(self, raw: dict[str, list[Any]], task_cfg: Any) -> list[dict[str, Any]]:
        out = []
        for question, answer in zip(raw["question"], raw["answer"], strict=True):
            final = answer.rsplit("####", 1)[1].strip()
            out.append(
                {"fields": {"question": question}, "targets": [_CALCULATOR.sub("", answer)], "references": [final]}
            )
        return out

    def score(self, predictions: list[str], rows: Rows) -> tuple[dict[str, float], dict[str, Any]]:
        accuracy, rules = exact_match(predictions, [refs[0] for refs in rows.columns["references"]])
        return {"exact_match": accuracy}, {"answer_rules": rules}

    def example_scores(self, predictions: list[str], rows: Rows) -> dict[str, list]:
        # Outputs: 1 for a correct final number, else 0 (exact match is their mean); labels: the reference answers,
        # as numbers, so that a report can tell two runs evaluated on different questions apart.
        answers = [refs[0] for refs in rows.columns["references"]]
        matches, _ = answer_matches(predictions, answers)
        return {"outputs": [float(m) for m in matches], "labels": [float(as_number(a) or 0) for a in answers]}


TASKS.register("math/gsm8k")(
    GSM8KTask(
        name="math/gsm8k",
        hub_id="openai/gsm8k",
        subset="main",
        num_labels=0,  # no classification head: the model's own LM head
        metrics=("exact_match",),
        primary_metric="exact_match",
        prompt_fields=("question",),
        train_split="train",
        test_split="test",
        validation_size=64,
    )
)
