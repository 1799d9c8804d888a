"""What every causal-LM task shares: prompt templates, prompt-masked training examples with EOS, carved validation and
test subsets, the tokenisation cache, and evaluation by generation, option scoring or held-out loss.

A family (`nlg.py`, `math_reasoning.py`, `commonsense.py`, `instruct.py`) says how a raw split becomes examples
(`examples`) and, for generation, how its outputs are scored (`score`). An example is a dict:

- `fields`: the values the task's prompt template (`task.prompt`) is formatted with;
- `targets`: the responses to train on (E2E has several per meaning representation: one training row each; the
  validation loss uses the first);
- `references`: what a generation is scored against (E2E: every human reference; GSM8K: the final number);
- `options`, `answer`: for multiple choice, the candidate responses and the index of the right one.

Training rows are `prompt + response + EOS`, the response formatted by `task.response`. The loss covers the response
and EOS only when `task.mask_prompt` is true (the default: the model is not trained to write prompts, as in
LLM-Adapters, Alpaca and PEFT's method comparison); false trains on every token. Prompt and response are tokenised
separately and concatenated, so the ids generation starts from are exactly the training prompt's. Sequences are
truncated to `task.max_length`; a training row left with no response token is dropped.

Forgetting (after minus before training, every record): the mean token cross-entropy on `task.forgetting_samples`
texts of AG News' test split (`fancyzhx/ag_news`, fixed seeded sample) — general news text none of the tasks trains
on, standing in for the Wikipedia sample PEFT's method comparison uses (not available offline).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorafactory.errors import ConfigError, DataMissingError
from lorafactory.tasks import Evaluation, Task
from lorafactory.tasks.data import SUBSET_SEED, Rows, load_split, source_stamp
from lorafactory.tasks.generation import greedy_generate, option_logliks, token_nll

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the cached example format changes
FORGETTING_SOURCE = ("fancyzhx/ag_news", None, "test", "text")
"""(dataset, subset, split, column) of the held-out text whose loss measures forgetting."""


@dataclass(frozen=True)
class Source:
    """A dataset to load with `data.load_split` (it needs a hub id and a subset)."""

    hub_id: str
    subset: str | None


@dataclass
class TestSet:
    """What the final evaluation runs on: the test examples and the held-out text for forgetting."""

    rows: Rows
    heldout: list[list[int]]


@dataclass(frozen=True)
class CausalLMTask(Task):
    """A task for a causal LM: trains on prompt → response, evaluates by `evaluation`."""

    head: str = "causal-lm"
    evaluation: str = "generate"
    """`generate` (greedy decoding, scored by `score`), `options` (the most likely option, no generation) or `loss`
    (held-out token loss and perplexity)."""
    test_split: str | None = "test"
    """The split of the final evaluation; None: a fixed `test_size` examples are carved from the train split."""
    test_size: int = 0
    validation_size: int = 64
    """Examples carved from the training data (fixed seed, never trained on) for the validation during training."""
    prompt_fields: tuple[str, ...] = ()
    """The placeholders an example fills in the prompt template (`task.prompt`), checked when the config is."""
    json_dir: bool = False
    """The dataset is a folder of `<split>.json` files (LLM-Adapters' layout), not the Hub's."""
    data_note: str | None = None
    """Said in every record when the splits differ from the published ones."""

    @property
    def split_note(self) -> str | None:
        return self.data_note

    # --- what a family provides ------------------------------------------------------------------------------------
    def examples(self, raw: dict[str, list[Any]], task_cfg: Any) -> list[dict[str, Any]]:
        """The split's examples (see the module docstring) from its columns, as the task's config shapes them."""
        raise NotImplementedError

    def score(self, predictions: list[str], rows: Rows) -> tuple[dict[str, float], dict[str, Any]]:
        """Metrics of generated `predictions` against `rows` (columns `references`, ...), and details to record."""
        raise NotImplementedError

    def example_scores(self, predictions: list[str], rows: Rows) -> dict[str, list]:
        """Per example, `outputs` and `labels` from which `score`'s primary metric can be recomputed on any subset of
        the examples (`Evaluation.examples`); empty when it cannot."""
        return {}

    # --- data ------------------------------------------------------------------------------------------------------
    def splits(self, tokenizer: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None) -> tuple[Rows, Rows]:
        train, validation, _ = self._carve(tokenizer, task_cfg, cache_dir, data_dir)
        train_rows = self._rows(train, task_cfg, every_target=True)
        cap = task_cfg.max_train_samples
        if cap is not None and cap < len(train_rows):
            keep = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(SUBSET_SEED))[:cap]
            train_rows = Rows({k: [v[i] for i in sorted(keep.tolist())] for k, v in train_rows.columns.items()})
        return train_rows, self._rows(validation, task_cfg, every_target=False)

    def selection_set(self, tokenizer: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None) -> None:
        """None: these tasks have a test set of their own, so learning rates are chosen on validation (the record's
        `selection_metric` is the last validation's) and results reported on test."""
        return None

    def test_set(self, tokenizer: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None) -> TestSet:
        *_, test = self._carve(tokenizer, task_cfg, cache_dir, data_dir)
        cap = task_cfg.max_eval_samples
        if cap is not None and cap < len(test):
            keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(SUBSET_SEED))[:cap]
            test = [test[i] for i in sorted(keep.tolist())]
        return TestSet(self._rows(test, task_cfg, every_target=False), heldout_texts(tokenizer, task_cfg, data_dir))

    def collator(self, tokenizer: Any) -> CausalCollator:
        return CausalCollator(tokenizer.pad_token_id)

    def _carve(
        self, tokenizer: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None
    ) -> tuple[list[dict], list[dict], list[dict]]:
        """(train, validation, test) tokenised examples: validation (and, without a test split, test) carved from the
        train split with a fixed seed, the same for every run."""
        pool = self._encoded(self.train_split, tokenizer, task_cfg, cache_dir, data_dir)
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(SUBSET_SEED)).tolist()
        n_test = 0 if self.test_split else self.test_size
        if self.validation_size + n_test >= len(pool):
            raise ConfigError(f"task {self.name}: its train split has {len(pool)} examples, too few to carve from")
        validation = [pool[i] for i in sorted(order[: self.validation_size])]
        test_ids = order[self.validation_size : self.validation_size + n_test]
        train = [pool[i] for i in sorted(order[self.validation_size + n_test :])]
        if self.test_split:
            test = self._encoded(self.test_split, tokenizer, task_cfg, cache_dir, data_dir)
        else:
            test = [pool[i] for i in sorted(test_ids)]
        return train, validation, test

    def _rows(self, examples: list[dict], task_cfg: Any, every_target: bool) -> Rows:
        """Model-ready rows: `input_ids` (prompt + response + EOS, truncated) and `labels` (-100 on the prompt when it
        is masked), one per target when training; evaluation rows keep the first target for the loss and carry the
        prompt, references and options for `evaluate`."""
        max_length, masked = task_cfg.max_length, task_cfg.mask_prompt
        columns: dict[str, list[Any]] = {"input_ids": [], "labels": []}
        if not every_target:
            columns |= {"prompt_ids": [], "references": [], "option_ids": [], "answer": []}
        for ex in examples:
            prompt = ex["prompt_ids"]
            for target in ex["target_ids"] if every_target else ex["target_ids"][:1]:
                ids = (prompt + target)[:max_length]
                labels = ([-100] * len(prompt) if masked else list(prompt)) + target
                labels = labels[:max_length]
                if every_target and all(t == -100 for t in labels[1:]):
                    continue  # the prompt filled max_length: nothing left to learn from this row
                columns["input_ids"].append(ids)
                columns["labels"].append(labels)
                if not every_target:
                    columns["prompt_ids"].append(prompt)
                    columns["references"].append(ex["references"])
                    columns["option_ids"].append(ex["option_ids"])
                    columns["answer"].append(ex["answer"])
        return Rows(columns)

    def _encoded(
        self, split: str, tokenizer: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None
    ) -> list[dict[str, Any]]:
        """The split's examples with the prompt, every target and every option tokenised; cached on disk, keyed by
        the templates, the tokenizer and the data files."""
        import datasets

        templates = {k: task_cfg.get(k) for k in ("prompt", "prompt_no_input", "response", "answers")}
        spec = {
            "v": CACHE_VERSION,
            "task": self.name,
            "split": split,
            "source": source_stamp(self, data_dir),
            "templates": templates,
            "tokenizer": [type(tokenizer).__name__, str(tokenizer.name_or_path), len(tokenizer), tokenizer.eos_token],
        }
        key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir / "tokenized" / self.name.replace("/", "__") / f"{split}-{key}"
        if path.is_dir():
            return datasets.load_from_disk(str(path)).to_list()
        examples = self.examples(self._raw(split, data_dir), task_cfg)
        encoded = self._tokenise(examples, tokenizer, task_cfg)
        dataset = datasets.Dataset.from_list(encoded)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, path)  # atomic: a concurrent run sees no cache or a complete one
        except OSError:  # another process won the race; its copy is identical
            pass
        log.info("Tokenised %s/%s (%d examples), cached at %s", self.name, split, len(encoded), path)
        return encoded

    def _tokenise(self, examples: list[dict], tokenizer: Any, task_cfg: Any) -> list[dict[str, Any]]:
        eos = tokenizer.eos_token_id

        def ids(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

        prompts = ids([prompt_text(task_cfg, ex["fields"]) for ex in examples])
        out = []
        for ex, prompt in zip(examples, prompts, strict=True):
            targets = ids([task_cfg.response.format(target=t) for t in ex["targets"]])
            options = ids([task_cfg.response.format(target=o) for o in ex.get("options", [])])
            out.append(
                {
                    "prompt_ids": prompt,
                    "target_ids": [t + [eos] for t in targets],  # EOS: the model learns to stop
                    "references": list(ex["references"]),
                    "option_ids": options,
                    "answer": int(ex.get("answer", -1)),
                }
            )
        return out

    def _raw(self, split: str, data_dir: Path | None) -> dict[str, list[Any]]:
        if not self.json_dir:
            return load_split(self, split, data_dir)[:]
        path = (data_dir / self.hub_id / f"{split}.json") if data_dir else None
        if path is None or not path.is_file():
            where = f"{path} does not exist" if path else "LORAFACTORY_DATA_DIR is not set"
            raise DataMissingError(
                f"dataset {self.hub_id} (split '{split}') is not available: {where}. It is LLM-Adapters' JSON "
                f"(github.com/AGI-Edgerunners/LLM-Adapters, dataset/<name>/{split}.json); point LORAFACTORY_DATA_DIR "
                "(or paths.data_dir) at a mirror that holds it, e.g. ../shared/data"
            )
        rows = json.loads(path.read_text())
        return {key: [row.get(key, "") for row in rows] for key in rows[0]}

    # --- evaluation ------------------------------------------------------------------------------------------------
    def validation_outputs(self, output: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        # The logits (batch × length × vocabulary) are far too big to keep: the token-weighted loss is all we need.
        tokens = (batch["labels"][:, 1:] != -100).sum()
        loss = output.loss.detach().float()
        return {"loss_sum": (loss * tokens if tokens > 0 else loss.new_zeros(())), "count": tokens}

    def validation_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        loss = float(outputs["loss_sum"].sum() / outputs["count"].sum().clamp_min(1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def validation_chance(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        return {}

    def evaluate(self, model: Any, tokenizer: Any, examples: Any, task_cfg: Any, stage: str) -> Evaluation | None:
        start = time.perf_counter()
        if stage == "validation":
            n = min(task_cfg.val_samples, len(examples))
            if self.evaluation == "loss" or n == 0:
                return None  # the validation loop measured the loss already
            result = self._measure(model, tokenizer, examples.head(n), task_cfg)
        else:
            measure = stage == "test" or task_cfg.eval_untuned
            result = self._measure(model, tokenizer, examples.rows, task_cfg) if measure else Evaluation({})
            if examples.heldout:
                total, count = token_nll(
                    model, tokenizer.pad_token_id, examples.heldout, None, task_cfg.eval_batch_size
                )
                result.heldout_ce = total / max(count, 1)
        result.cost["eval_s"] = time.perf_counter() - start
        return result

    def _measure(self, model: Any, tokenizer: Any, rows: Rows, task_cfg: Any) -> Evaluation:
        columns, batch_size = rows.columns, task_cfg.eval_batch_size
        if self.evaluation == "generate":
            out = greedy_generate(
                model, tokenizer, columns["prompt_ids"], task_cfg.max_new_tokens, list(task_cfg.stop), batch_size
            )
            metrics, details = self.score(out.texts, rows)
            details["samples"] = [
                {"prompt": tokenizer.decode(p, skip_special_tokens=True), "output": o, "references": r[:3]}
                for p, o, r in list(zip(columns["prompt_ids"], out.texts, columns["references"], strict=True))[:3]
            ]
            cost = {"generated_tokens": float(sum(out.tokens)), "tokens_per_s": out.tokens_per_s}
            return Evaluation(metrics, cost=cost, details=details, examples=self.example_scores(out.texts, rows))
        if self.evaluation == "options":
            scores = option_logliks(
                model, tokenizer.pad_token_id, columns["prompt_ids"], columns["option_ids"], batch_size
            )
            # Per character of the scored response, as lm-evaluation-harness's acc_norm divides by the continuation's
            # length (here the whole response, its shared "the correct answer is " included).
            if task_cfg.get("option_norm") == "chars":
                scores = [
                    [s / max(len(tokenizer.decode(o)), 1) for s, o in zip(row, opts, strict=True)]
                    for row, opts in zip(scores, columns["option_ids"], strict=True)
                ]
            picks = [max(range(len(s)), key=s.__getitem__) for s in scores]
            answers = columns["answer"]
            accuracy = sum(p == a for p, a in zip(picks, answers, strict=True)) / len(answers)
            majority = max(answers.count(a) for a in set(answers)) / len(answers)
            return Evaluation(
                {"accuracy": accuracy}, chance={"accuracy": majority}, examples={"outputs": picks, "labels": answers}
            )
        total, count = token_nll(model, tokenizer.pad_token_id, columns["input_ids"], columns["labels"], batch_size)
        loss = total / max(count, 1)
        return Evaluation({"loss": loss, "perplexity": math.exp(min(loss, 50.0))})


def prompt_text(task_cfg: Any, fields: dict[str, Any]) -> str:
    """The prompt for an example: `task.prompt_no_input` when the task has one and the example's `input` is empty
    (Alpaca's two templates), else `task.prompt`."""
    template = task_cfg.prompt
    if task_cfg.get("prompt_no_input") and not str(fields.get("input", "")).strip():
        template = task_cfg.prompt_no_input
    return template.format(**fields)


def heldout_texts(tokenizer: Any, task_cfg: Any, data_dir: Path | None) -> list[list[int]]:
    """The fixed held-out text sample for forgetting, tokenised (at most `task.max_length` tokens each)."""
    n = task_cfg.get("forgetting_samples") or 0
    if n == 0:
        return []
    hub_id, subset, split, column = FORGETTING_SOURCE
    texts = load_split(Source(hub_id, subset), split, data_dir)[column]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SUBSET_SEED)).tolist()[:n]
    encoded = tokenizer([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    return [ids[: task_cfg.max_length] for ids in encoded]


class CausalCollator:
    """Right-pads prompt + response rows for teacher-forced training and validation (to a multiple of 8): padding is
    masked out of attention and of the loss."""

    def __init__(self, pad_id: int, multiple: int = 8):
        self.pad_id = pad_id
        self.multiple = multiple

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
