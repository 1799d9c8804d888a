"""The run record: one self-describing `result.json` per run folder, written atomically at the end of the run.

Records are append-only facts about a run. The aggregator reads nothing else, so everything a leaderboard needs is
here: identity (model, task, variant, taxonomy, seed, lr), the task's primary metric and its direction, final and best
validation metrics, cost (parameters, step time, throughput, memory, wall time) and provenance (config, versions, git).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RECORD_NAME = "result.json"
STATUSES = ("ok", "failed", "diverged", "interrupted")


@dataclass
class RunRecord:
    status: str
    """`ok`; `failed` (raised; see `error`); `diverged` (the loss ran away: NaN/inf, or the rule of
    `trainer.divergence`); `interrupted` (stopped by a signal after saving a checkpoint: launching again resumes)."""
    model: str
    task: str
    variant: str
    seed: int
    lr: float
    name: str = "default"
    """The experiment/sweep name: the first folder under `runs/`."""
    taxonomy: str = ""
    tags: list[str] = field(default_factory=list)
    mergeable: bool | None = None
    primary_metric: str = ""
    direction: str = "max"
    """`max` or `min`: how the primary metric ranks, as the task declares it."""
    final: dict[str, float] = field(default_factory=dict)
    """Metrics at the end of training: the test evaluation's for tasks that have one (`final_source`), else the last
    validation's."""
    final_source: str = "validation"
    """`validation` (the last validation) or `test` (the task's final evaluation on its test subset: NLG tasks)."""
    best: dict[str, float] = field(default_factory=dict)
    """Validation metrics at the evaluation where the primary metric was best."""
    final_metric: float | None = None
    best_metric: float | None = None
    selection_metric: float | None = None
    """The primary metric on the selection split, when the task has one apart from the split it reports on: learning
    rates are chosen on this, results reported on `final_metric`, so the choice does not favour the noisiest."""
    selection: dict[str, float] = field(default_factory=dict)
    """Every metric on the selection split, at the end of training."""
    selection_source: str | None = None
    """Where `selection_metric` comes from: `held-out training examples` (`selection_samples` of the train split that
    no run trains on) or `validation` (tasks reported on a test set of their own: the last validation)."""
    selection_samples: int | None = None
    eval_examples: dict[str, list] = field(default_factory=dict)
    """Per example of the split `final` is measured on, `outputs` and `labels` from which the primary metric can be
    recomputed on any subset: predicted class or regressed value (classification, regression, option scoring), 1/0
    correct (exact match), BLEU's sufficient statistics (a row per example); a report bootstraps the metric over
    them. Empty when the metric is not made that way (held-out loss)."""
    best_step: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    """Every evaluation: {"step": ..., <metric>: ...}."""
    chance_metric: float | None = None
    """The primary metric of predicting the majority class (a constant for regression) on the evaluation set."""
    untuned: dict[str, float] = field(default_factory=dict)
    """Tasks with a test evaluation: its metrics for the model before training (no adapter)."""
    untuned_metric: float | None = None
    """The primary metric of `untuned`: what training must beat."""
    forgetting: float | None = None
    """Mean token cross-entropy on a fixed held-out text sample after training minus before (NLG tasks)."""
    heldout_ce: dict[str, float | None] = field(default_factory=dict)
    """That cross-entropy `before` and `after` training."""
    eval_cost: dict[str, float] = field(default_factory=dict)
    """The final evaluation's cost: `eval_s`, `generated_tokens`, `tokens_per_s` (generation), `merged` (1 when the
    adapters were merged for it), `untuned_eval_s`."""
    eval_details: dict[str, Any] = field(default_factory=dict)
    """What else the final evaluation found: `answer_rules` (GSM8K: how often each extraction rule applied),
    `samples` (a few prompts, outputs and references)."""
    trainable_params: int | None = None
    """All trainable parameters, task head included."""
    adapter_params: int | None = None
    """Trainable parameters the variant added (the variant's formula), at the end of training."""
    adapter_params_start: int | None = None
    """The same when training started (after any data-dependent init): differs for methods that grow or prune."""
    variant_summary: dict[str, Any] = field(default_factory=dict)
    """What the variant says of its own final state (`Variant.summary`): ranks per layer, phases, ..."""
    total_params: int | None = None
    steps: int | None = None
    train_samples: int | None = None
    eval_samples: int | None = None
    step_time_s: float | None = None
    """Median wall time of one training step (forward, backward, optimizer)."""
    throughput: float | None = None
    """Training examples per second over the whole training loop."""
    peak_memory_mb: float | None = None
    memory_kind: str | None = None
    """`rss` (peak resident memory of the process during training, CPU) or `cuda` (peak allocated)."""
    activation_mb: float | None = None
    """Tensors saved for the backward pass in one training step (the model's weights excluded): what the method
    costs in activations, independent of the process and allocator."""
    train_state_mb: float | None = None
    """Trainable parameters, their gradients and the optimizer's state: what the method costs besides activations."""
    wall_time_s: float | None = None
    """Wall time of the run, every attempt included (each up to the checkpoint the next one resumed from)."""
    resumed: int = 0
    """How many times the run resumed from a checkpoint."""
    device: str | None = None
    """The device slot the run held (`trainer.device_slots`): `gpu:<i>`, or `cpu:<cores>` it was pinned to."""
    world_size: int = 1
    """The devices (DDP ranks) the run trained on; records from before DDP trained on one."""
    global_batch: int | None = None
    """Training examples per optimizer step over all ranks: `task.batch_size`, which each of the `world_size` ranks
    takes an equal share of (null in records written before the field existed: see `config.task.batch_size`)."""
    rank_divergence: float | None = None
    """Runs on several devices: the largest difference between the ranks' adapters at the end of training, relative
    to each tensor's largest value (0: identical; above 1e-4 the run fails)."""
    data_note: str | None = None
    """Set when the splits differ from the published ones (e.g. carved from validation): not comparable to papers."""
    error: str | None = None
    run_dir: str = ""
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Build a record from JSON, ignoring unknown keys (written by a newer version) and validating the rest."""
        known = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        if record.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {record.status!r}")
        if record.direction not in ("max", "min"):
            raise ValueError(f"direction must be 'max' or 'min', got {record.direction!r}")
        return record


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a partial one (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it 0600: on a shared file system the group must read results
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(run_dir: str | os.PathLike, record: RunRecord) -> Path:
    path = Path(run_dir) / RECORD_NAME
    write_json_atomic(path, record.to_dict())
    return path


def read_record(path: str | os.PathLike) -> RunRecord:
    """Read `result.json` (or the one in a run folder). Raises ValueError/OSError on a missing or corrupt record."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return RunRecord.from_dict(data)
