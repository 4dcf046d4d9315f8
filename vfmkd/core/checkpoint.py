"""Training checkpoints: what a run needs to continue exactly, in a safe-to-load file.

A checkpoint holds only tensors and plain Python values (dicts, lists, numbers,
strings), so it loads with ``torch.load(weights_only=True)``: opening a checkpoint never
runs code from the file. Keys::

    format_version  int (2)
    model           state dict of the student
    model_config    the student's config dict (rebuilds the architecture)
    distiller       state dict of the distiller (adapters, loss parameters) or None
    ema             {"module": student state dict, "distiller": distiller state dict or
                    None, "updates": int} or None
    optimizer       optimizer state dict or None
    scheduler       the LR schedule's plain values or None
    scaler          GradScaler state dict or None
    step, epoch, batch_in_epoch, world_size   progress counters
    config          the resolved experiment config (plain dict)
    rng_state       per rank, python / numpy / torch / cuda generator states (plain values)
    best_fitness    float or None
    metrics         the latest evaluation metrics
    names           class name of each detector label (the data set's), or None
    category_ids    COCO category id of each label, or None

(``names`` and ``category_ids`` came later within format 2; older files have neither and
predict / export then read the classes from the config's data set.)

The student loads alone (eval, predict, export) from ``model`` or ``ema.module``. Format 1
kept the distiller's adapters inside the student's state under ``distill.``;
:func:`load_checkpoint` reads it as format 2.
"""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from vfmkd.distillation.distiller import build_distiller
from vfmkd.errors import TrainingDivergedError, UserError
from vfmkd.models import build_model
from vfmkd.utils.distributed import unwrap_model
from vfmkd.utils.io import atomic_torch_save
from vfmkd.utils.state_dict import state_dict_problems

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "load_distiller_from_checkpoint",
    "load_model_from_checkpoint",
    "load_training_state",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 2
# Format 1: the distiller's state inside the student's, under this prefix.
_FORMAT1_DISTILL_PREFIX = "distill."


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def capture_rng_state() -> dict[str, Any]:
    """The global generators' states as plain values (safe for ``weights_only`` loading).

    Returns:
        ``{"python": [...], "numpy": {...}, "torch": ByteTensor, "cuda": ByteTensor or None}``;
        ``cuda`` is the state of the current CUDA device.
    """
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [int(version), [int(value) for value in python_state], gauss],
        "numpy": {
            "kind": str(kind),
            "keys": [int(value) for value in keys],
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global generators from :func:`capture_rng_state`'s output."""
    version, python_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(value) for value in python_state), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            int(numpy_state["position"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    ema: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    step: int = 0,
    epoch: int = 0,
    config_dict: Mapping[str, Any] | None = None,
    rng_state: Any = None,
    best_fitness: float | None = None,
    metrics: Mapping[str, Any] | None = None,
    batch_in_epoch: int = 0,
    world_size: int = 1,
    names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
) -> Path:
    """Write a checkpoint atomically (readers see the old file or the complete new one).

    Args:
        path: destination, e.g. ``runs/exp/checkpoints/last.pt``.
        model: the trained model (a DDP wrapper is unwrapped): a
            :class:`~vfmkd.distillation.distiller.DistilledModel` (its ``student`` and
            ``distiller`` are saved apart) or a plain model.
        optimizer: its state is saved when given.
        scheduler_state: plain values describing the LR schedule.
        ema: the :class:`~vfmkd.core.ema.ModelEMA` of ``model``.
        scaler: the AMP gradient scaler.
        step: optimizer steps done.
        epoch: the epoch in progress (or the next one when ``batch_in_epoch == 0``).
        config_dict: the resolved experiment config as a plain dict.
        rng_state: generator states, e.g. one :func:`capture_rng_state` per rank; plain
            values and tensors only.
        best_fitness: best evaluation fitness so far.
        metrics: latest evaluation metrics.
        batch_in_epoch: micro-batches of ``epoch`` already consumed (per rank).
        world_size: processes of the run (the data order depends on it).
        names: class name of each label (predict and export read them).
        category_ids: COCO category id of each label (default ``label + 1``).

    Returns:
        ``path``.
    """
    module = unwrap_model(model)
    student, distiller = _student_and_distiller(module)
    checkpoint = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": student.state_dict(),
        "model_config": _plain_config(getattr(student, "config", None)),
        "distiller": distiller.state_dict() if distiller is not None else None,
        "ema": _ema_state(ema),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": dict(scheduler_state) if scheduler_state is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
        "world_size": int(world_size),
        "config": dict(config_dict) if config_dict is not None else None,
        "rng_state": rng_state,
        "best_fitness": None if best_fitness is None else float(best_fitness),
        "metrics": dict(metrics) if metrics is not None else None,
        "names": [str(name) for name in names] if names else None,
        "category_ids": [int(value) for value in category_ids] if names and category_ids else None,
    }
    _refuse_nonfinite_weights(checkpoint, Path(path))
    return atomic_torch_save(checkpoint, path)


def _refuse_nonfinite_weights(checkpoint: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`TrainingDivergedError` when the weights to save hold NaN or infinity."""
    parts = {"model": checkpoint["model"], "distiller": checkpoint["distiller"]}
    if checkpoint["ema"] is not None:
        parts.update({"ema": checkpoint["ema"]["module"], "ema distiller": checkpoint["ema"]["distiller"]})
    broken = [
        f"{part}.{name}"
        for part, state in parts.items()
        for name, value in (state or {}).items()
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if broken:
        kept = f"{path} on disk is unchanged (the last good state)" if path.is_file() else f"{path} was not written"
        raise TrainingDivergedError(
            f"refusing to save non-finite weights ({len(broken)} tensor(s), first: {', '.join(broken[:3])}); {kept}. "
            "Lower train.lr, set train.grad_clip, or train in fp32 (train.amp=false)."
        )


def _student_and_distiller(module: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """A training model's student and distiller (a plain model is its own student)."""
    student = getattr(module, "student", None)
    if isinstance(student, nn.Module):
        return student, getattr(module, "distiller", None)
    return module, None


def _ema_state(ema: Any | None) -> dict[str, Any] | None:
    """The EMA's averaged student and distiller, saved apart like the live ones."""
    if ema is None:
        return None
    student, distiller = _student_and_distiller(ema.module)
    return {
        "module": student.state_dict(),
        "distiller": distiller.state_dict() if distiller is not None else None,
        "updates": int(ema.updates),
    }


def load_training_state(model: nn.Module, ema: Any | None, checkpoint: Mapping[str, Any]) -> bool:
    """Load a checkpoint's student, distiller and EMA into a training model and its EMA.

    Args:
        model: what :func:`save_checkpoint` was given (a distilled model or a plain one).
        ema: its :class:`~vfmkd.core.ema.ModelEMA`, or None.
        checkpoint: :func:`load_checkpoint`'s result.

    Returns:
        Whether the EMA was restored (False: the checkpoint has none).

    Raises:
        CheckpointError: the checkpoint's distiller does not fit the model's (another
            distillation config).
    """
    student, distiller = _student_and_distiller(unwrap_model(model))
    student.load_state_dict(checkpoint["model"])
    _load_distiller(distiller, checkpoint.get("distiller"))
    ema_state = checkpoint.get("ema")
    if ema is None or not ema_state:
        return False
    ema_student, ema_distiller = _student_and_distiller(ema.module)
    ema_student.load_state_dict(ema_state["module"])
    _load_distiller(ema_distiller, ema_state.get("distiller"))
    ema.updates = int(ema_state["updates"])
    return True


def _load_distiller(distiller: nn.Module | None, state: Mapping[str, Any] | None) -> None:
    if distiller is None:
        return
    if not state:
        raise CheckpointError(
            "the checkpoint has no distillation adapters, but this config distils; resume with the config the "
            "run was trained with (its run directory's config.yaml)"
        )
    problems = state_dict_problems(distiller.state_dict(), state)
    if problems:
        raise CheckpointError(
            "the checkpoint's distillation adapters do not fit the config's distillation terms "
            f"({problems.describe(limit=4)}); use the config the run was trained with (its run directory's "
            "config.yaml)"
        )
    distiller.load_state_dict(state, strict=True)


def _upgrade_format1(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: the ``distill.`` entries of the student's states become the distiller's."""

    def split(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        student = {key: value for key, value in state.items() if not key.startswith(_FORMAT1_DISTILL_PREFIX)}
        distiller = {
            key[len(_FORMAT1_DISTILL_PREFIX):]: value
            for key, value in state.items()
            if key.startswith(_FORMAT1_DISTILL_PREFIX)
        }
        return student, distiller or None

    checkpoint["model"], checkpoint["distiller"] = split(checkpoint["model"])
    ema = checkpoint.get("ema")
    if ema:
        ema["module"], ema["distiller"] = split(ema["module"])
    checkpoint["format_version"] = CHECKPOINT_FORMAT_VERSION
    return checkpoint


def _check_torch_file(path: Path) -> None:
    """Refuse a file that is no ``torch.save`` output at all (a zip archive, or a legacy pickle)."""
    with open(path, "rb") as file:
        head = file.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this file starts "
            f"with {head!r}); pass a checkpoint written by training, e.g. runs/<run>/checkpoints/last.pt"
        )


def _plain_config(config: Any) -> dict[str, Any] | None:
    """A model config as a plain dict (pydantic models are dumped)."""
    if config is None:
        return None
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return dict(config)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Args:
        path: checkpoint file.
        map_location: where tensors go (default CPU).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file holds objects that need unpickling code (not written by
            :func:`save_checkpoint`), or is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_torch_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refusing to load: the file holds Python objects that need unpickling code "
            f"({str(error).splitlines()[0] if str(error) else 'unsupported object'}). vfmkd checkpoints "
            "hold tensors and plain values only. If you trust this file, load it with "
            "torch.load(path, weights_only=False) and re-save its state dicts with save_checkpoint."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(
            f"{path}: not a vfmkd checkpoint (expected a dict with a 'model' state dict, got "
            f"{type(checkpoint).__name__}{' with keys ' + str(sorted(checkpoint)) if isinstance(checkpoint, dict) else ''})"
        )
    version = checkpoint.get("format_version", 0)
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this vfmkd understands "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade vfmkd"
        )
    if version < 2:
        checkpoint = _upgrade_format1(checkpoint)
    return checkpoint


def load_model_from_checkpoint(path: str | Path | Mapping[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint and load its EMA weights (else its raw weights).

    Args:
        path: checkpoint file written by :func:`save_checkpoint`, or the checkpoint
            :func:`load_checkpoint` read from one.
        device: where the model goes.

    Returns:
        The model in eval mode on ``device``.
    """
    checkpoint, path = _read(path)
    model_config = checkpoint.get("model_config")
    if model_config is None:
        model_config = (checkpoint.get("config") or {}).get("model")
    if model_config is None:
        raise CheckpointError(f"{path}: no model config stored; cannot rebuild the architecture")
    model = build_model(model_config)
    ema_state = checkpoint.get("ema")
    model.load_state_dict(ema_state["module"] if ema_state else checkpoint["model"])
    logger.info("loaded %s weights from %s", "EMA" if ema_state else "model", path)
    return model.to(device).eval()


def _read(source: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """A checkpoint and a name for messages, from a path or an already loaded checkpoint."""
    if isinstance(source, Mapping):
        return source, str(source.get("path", "the checkpoint"))
    return load_checkpoint(source), str(source)


def load_distiller_from_checkpoint(config: Any, path: str | Path | Mapping[str, Any], student: nn.Module) -> Any | None:
    """The distiller a checkpoint trained, rebuilt from ``config`` for ``student``, with its weights.

    The EMA's adapters when the checkpoint has an EMA (matching the EMA student that
    :func:`load_model_from_checkpoint` gives), else the raw ones. Nothing is written back
    to any store. None (and the reason, logged) when the config has no distillation term
    or the checkpoint has no adapters; the plan's errors (a missing store or teacher
    weights) propagate.

    Raises:
        CheckpointError: the checkpoint's adapters do not fit this config's terms.
    """
    checkpoint, path = _read(path)
    ema = checkpoint.get("ema")
    state = ema.get("distiller") if ema else checkpoint.get("distiller")
    if not state:
        logger.info("%s has no distillation adapters (a run without distillation)", path)
        return None
    distiller = build_distiller(config, student, write_back=False)
    if distiller is None:
        return None
    try:
        _load_distiller(distiller, state)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return distiller
