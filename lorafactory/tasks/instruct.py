"""Alpaca instruction tuning (Taori et al., 2023) on the mirror's fixed 5,000-example sample of the 52k set: trained on
the responses, evaluated by the loss and perplexity of held-out responses (lower is better). The sample has one
split: 100 examples are carved for validation during training and 400 for the final evaluation, with a fixed seed, so
every run sees the same split (the records say so)."""

from __future__ import annotations

from typing import Any

from lorafactory.tasks import TASKS
from lorafactory.tasks.causal import CausalLMTask


class AlpacaTask(CausalLMTask):
    def examples(self, raw: dict[str, list[Any]], task_cfg: Any) -> list[dict[str, Any]]:
        return [
            {"fields": {"instruction": ins, "input": inp}, "targets": [out], "references": [out]}
            for ins, inp, out in zip(raw["instruction"], raw["input"], raw["output"], strict=True)
        ]


TASKS.register("instruct/alpaca")(
    AlpacaTask(
        name="instruct/alpaca",
        hub_id="tatsu-lab/alpaca",
        subset=None,
        num_labels=0,  # no classification head: the model's own LM head
        metrics=("perplexity", "loss"),
        primary_metric="perplexity",
        evaluation="loss",
        prompt_fields=("instruction", "input"),
        train_split="train",
        test_split=None,
        test_size=400,
        validation_size=100,
        data_note="a fixed split of a 5,000-example sample of Alpaca: 4,500 train, 100 validation, 400 test",
    )
)
