"""What a run directory tells without running anything: config, metrics, log times.

A run directory (``train.output_dir/experiment_name``) holds ``config.yaml`` (the
resolved experiment), ``metrics.jsonl`` (one record per line: ``kind`` train / eval /
data, ``step``, ``loss/<term>``, ``images_per_second``, ``data_time_share``, evaluation
metrics and per-class AP), ``train.log`` and ``checkpoints/``. :func:`read_run` reads
them; the functions below turn them into the report's tables.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import yaml

from vfmkd.errors import UserError

__all__ = [
    "RunDirError",
    "RunFiles",
    "best_metrics",
    "eval_scalars",
    "per_class_rows",
    "random_teachers",
    "read_run",
    "summary_rows",
]

logger = logging.getLogger(__name__)

#: Record fields that are no metric.
RECORD_FIELDS = frozenset({"kind", "step", "epoch"})
#: Evaluation record fields that count things (``num_detections``, ``num_masks``), no metric.
COUNT_PREFIX = "num_"
#: Evaluation metrics where lower is better (the rest: higher is better).
LOWER_IS_BETTER = ("/nmse",)
_LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"


class RunDirError(UserError, FileNotFoundError):
    """A folder that is no run directory; the message says what is missing."""


@dataclass
class RunFiles:
    """The files of a run directory, read.

    Attributes:
        run_dir: the folder.
        config: ``config.yaml`` as a plain dict (empty when absent).
        config_text: its text.
        records: ``metrics.jsonl``'s records in order (unreadable lines skipped).
        log_times: the first and last timestamps of ``train.log`` (None when absent).
    """

    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    log_times: tuple[datetime, datetime] | None = None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """The records of one kind (``train``, ``eval``, ``data``)."""
        return [record for record in self.records if record.get("kind") == kind]

    @property
    def checkpoint(self) -> Path | None:
        """``checkpoints/best.pt``, else ``last.pt``, else None."""
        for name in ("best.pt", "last.pt"):
            path = self.run_dir / "checkpoints" / name
            if path.is_file():
                return path
        return None


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory.

    Raises:
        RunDirError: no such folder, or it has neither ``config.yaml`` nor ``metrics.jsonl``.
    """
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not run_dir.is_dir() or not (config_path.is_file() or metrics_path.is_file()):
        raise RunDirError(
            f"{run_dir}: not a run directory (no config.yaml or metrics.jsonl); give the folder training wrote, "
            "e.g. runs/<experiment_name>"
        )
    run = RunFiles(run_dir)
    if config_path.is_file():
        run.config_text = config_path.read_text(encoding="utf-8")
        run.config = yaml.safe_load(run.config_text) or {}
    if metrics_path.is_file():
        run.records = _read_records(metrics_path)
    run.log_times = _log_times(run_dir / "train.log")
    return run


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # NOTE: a run killed mid-write leaves a torn last line; the rest is still good.
            logger.warning("%s:%d: not a JSON record, skipped", path, number)
    return records


def _log_times(path: Path) -> tuple[datetime, datetime] | None:
    """The first and last timestamps of a ``train.log`` (``2026-01-31 09:00:48,696 INFO ...`` lines)."""
    if not path.is_file():
        return None
    times = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            times.append(datetime.strptime(line[:23], _LOG_TIME_FORMAT))
        except ValueError:
            continue  # a continuation line (a table, a traceback)
    return (times[0], times[-1]) if times else None


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def eval_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation record's scalar metrics (per-class tables and counts left out)."""
    scalars = {}
    for name, value in record.items():
        number = _scalar(value)
        if name not in RECORD_FIELDS and number is not None and not name.startswith(COUNT_PREFIX):
            scalars[name] = number
    return scalars


def best_metrics(records: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Each evaluation metric's best value over the run and its step (``nmse``: the lowest)."""
    best: dict[str, tuple[float, int]] = {}
    for record in records:
        if record.get("kind") != "eval":
            continue
        for name, value in eval_scalars(record).items():
            lower = name.endswith(LOWER_IS_BETTER)
            if name not in best or (value < best[name][0] if lower else value > best[name][0]):
                best[name] = (value, int(record.get("step", 0)))
    return best


def random_teachers(config: Mapping[str, Any]) -> list[str]:
    """The enabled teachers that had random weights, with the reason, e.g. ``sam2 (no weights/x.pt)``.

    A teacher is random when ``allow_random_init`` is on and its ``model_path`` is not a
    file here, or when its feature store says it was extracted at random init.
    """
    found = []
    for key, teacher in (config.get("teachers") or {}).items():
        teacher = teacher or {}
        if not teacher.get("enabled", True):
            continue
        weights = teacher.get("model_path")
        if teacher.get("allow_random_init") and not (weights and Path(weights).is_file()):
            found.append(f"{key} ({'no ' + str(weights) if weights else 'no model_path'}: random init)")
        elif _store_random(teacher.get("feature_path")):
            found.append(f"{key} (its store {teacher.get('feature_path')} was extracted at random init)")
    return found


def _store_random(feature_path: str | None) -> bool:
    manifest = Path(feature_path) / "manifest.json" if feature_path else None
    if manifest is None or not manifest.is_file():
        return False
    try:
        return bool((json.loads(manifest.read_text(encoding="utf-8")).get("build_args") or {}).get("random_init"))
    except (OSError, json.JSONDecodeError):
        return False


def _describe_student(model: Mapping[str, Any]) -> str:
    backbone = model.get("backbone") or {}
    name = " ".join(str(backbone[key]) for key in ("type", "scale") if backbone.get(key)) or "?"
    heads = ", ".join(f"{key} ({(head or {}).get('type', '?')})" for key, head in (model.get("heads") or {}).items())
    return f"{name}; heads: {heads or 'none'}"


def _describe_teachers(config: Mapping[str, Any]) -> str:
    parts = []
    distillation = config.get("distillation") or {}
    for key, teacher in (config.get("teachers") or {}).items():
        teacher = teacher or {}
        if not teacher.get("enabled", True):
            continue
        ratio = teacher.get("offline_ratio")
        ratio = distillation.get("offline_ratio", 0.0) if ratio is None else ratio
        ratio = ratio if teacher.get("offline", True) else 0.0
        weights = teacher.get("model_path") or "no weights file"
        parts.append(f"{key}: {teacher.get('name') or key} ({weights}; {ratio:.0%} offline)")
    return "; ".join(parts) or "none (task losses only)"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {rest:02d}s" if hours else f"{minutes}m {rest:02d}s"


def summary_rows(run: RunFiles) -> list[tuple[str, str]]:
    """The run at a glance: (label, value) rows."""
    config = run.config
    data = config.get("data") or {}
    train = config.get("train") or {}
    train_records = run.of_kind("train")
    steps = max((int(record.get("step", 0)) for record in train_records), default=0)
    planned = f"of {train['max_steps']}" if train.get("max_steps") else f"({train.get('epochs', '?')} epochs planned)"
    rows = [
        ("experiment", str(config.get("experiment_name", run.run_dir.name))),
        ("run directory", str(run.run_dir)),
        ("student", _describe_student(config.get("model") or {})),
        ("teachers", _describe_teachers(config)),
        ("data", f"{data.get('dataset', '?')} ({data.get('train_split', 'train')} / {data.get('val_split', 'val')}), "
                 f"{data.get('img_size', '?')} px, batch {data.get('batch_size', '?')}"),
        ("steps", f"{steps} {planned}"),
    ]
    if run.log_times is not None:
        rows.append(("wall time", _duration((run.log_times[1] - run.log_times[0]).total_seconds()) + " (train.log)"))
    speeds = [value for record in train_records if (value := _scalar(record.get("images_per_second"))) is not None]
    waits = [value for record in train_records if (value := _scalar(record.get("data_time_share"))) is not None]
    if speeds:
        rows.append(("images/s", f"{statistics.median(speeds):.1f} (median of {len(speeds)} logged intervals)"))
    if waits:
        rows.append(("data-wait share", f"{statistics.mean(waits):.0%} of the step time waiting for batches"))
    best = best_metrics(run.records)
    for name in _headline(best):
        value, step = best[name]
        rows.append((f"best {name}", f"{value:.4f} (step {step})"))
    return rows


def _headline(best: Mapping[str, tuple[float, int]]) -> list[str]:
    """The metrics worth a line of their own: mAP, mask AP, mIoU, fidelity cosine, fitness."""
    wanted = ("mAP", "mAP50", "mask_mAP", "mask_mAP50", "fitness")
    names = [name for name in wanted if name in best]
    names += sorted(name for name in best if name.startswith("miou") or name.endswith("/cosine"))
    return names


def per_class_rows(records: list[dict[str, Any]]) -> tuple[int | None, list[tuple[str, float | None, float | None]]]:
    """The last evaluation's per-class AP: its step and ``(class, box AP, mask AP)`` rows (None: no value)."""
    for record in reversed(records):
        if record.get("kind") == "eval" and (record.get("per_class") or record.get("mask_per_class")):
            boxes = record.get("per_class") or {}
            masks = record.get("mask_per_class") or {}
            names = list(dict.fromkeys([*boxes, *masks]))
            rows = [(name, _scalar(boxes.get(name)), _scalar(masks.get(name))) for name in names]
            return int(record.get("step", 0)), rows
    return None, []
