"""E2E NLG (Novikova, Dušek & Rieser, SIGDIAL 2017): a restaurant's meaning representation (`name[The Eagle],
food[French], ...`) → a one- or two-sentence description. Scored as the E2E challenge scores it: BLEU against all the
human references of each meaning representation, lowercased (primary), and ROUGE-L.

Offline, the mirror (`tuetschek/e2e_nlg`) has the validation and test splits only: the task trains on the validation
split (every (meaning representation, reference) pair, minus 32 meaning representations held out for validation
during training) and evaluates on the test meaning representations, with all their references. Anchor: the LoRA
paper's E2E table (GPT-2 Medium, LoRA, BLEU 70.4, trained on the 42k-pair train split); ours is a 135M model trained
on a tenth of that data, so its BLEU is not comparable (the records say so).
"""

from __future__ import annotations

import zlib
from typing import Any

from lorafactory.tasks import TASKS
from lorafactory.tasks.causal import CausalLMTask
from lorafactory.tasks.data import Rows
from lorafactory.tasks.text_metrics import bleu, bleu_statistics, rouge_l


class E2ETask(CausalLMTask):
    def examples(self, raw: dict[str, list[Any]], task_cfg: Any) -> list[dict[str, Any]]:
        # One example per meaning representation, with all its references (first-seen order: the same every time).
        groups: dict[str, list[str]] = {}
        for mr, ref in zip(raw["meaning_representation"], raw["human_reference"], strict=True):
            groups.setdefault(mr, []).append(ref)
        return [{"fields": {"mr": mr}, "targets": refs, "references": refs} for mr, refs in groups.items()]

    def score(self, predictions: list[str], rows: Rows) -> tuple[dict[str, float], dict[str, Any]]:
        references = rows.columns["references"]
        return {"bleu": bleu(predictions, references), "rouge_l": rouge_l(predictions, references)}, {}

    def example_scores(self, predictions: list[str], rows: Rows) -> dict[str, list]:
        # Outputs: BLEU's sufficient statistics per meaning representation (the BLEU of any subset is that of their
        # sum); labels: a checksum of its references, so that a report can tell different evaluation sets apart.
        references = rows.columns["references"]
        labels = [zlib.crc32("\n".join(refs).encode()) for refs in references]
        return {"outputs": bleu_statistics(predictions, references), "labels": labels}


TASKS.register("nlg/e2e")(
    E2ETask(
        name="nlg/e2e",
        hub_id="tuetschek/e2e_nlg",
        subset=None,
        num_labels=0,  # no classification head: the model's own LM head
        metrics=("bleu", "rouge_l"),
        primary_metric="bleu",
        prompt_fields=("mr",),
        train_split="validation",
        test_split="test",
        validation_size=32,
        data_note=(
            "no train split available offline: trained on the validation split (32 meaning representations held out "
            "for validation), evaluated on test; not comparable to published numbers"
        ),
    )
)
