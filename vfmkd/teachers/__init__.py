"""Teachers: frozen foundation models behind one contract (:class:`BaseTeacher`).

Importing this package registers every teacher in :data:`vfmkd.registry.TEACHERS`
(SAM ``sam_vit_{b,l,h}``, SAM 2 / 2.1 ``sam2[.1]_hiera_{t,s,b+,l}``, DINO ``dino_vit*``,
DINOv2 ``dinov2_vit*14[_reg]``, DINOv3 ``dinov3_vit*16*``; aliases ``sam``, ``sam2``,
``dino``; ``vfmkd``: a vfmkd checkpoint or Ultralytics YOLOv8 state dict; ``timm``: any
timm model with intermediate features, named by ``timm_model``). The teacher modules import ``segment_anything`` / ``sam2`` / ``timm`` only
when a teacher is built. :func:`build_teacher` is the one way to get a ready teacher:
official weights (or an explicit, seeded random init), hashed, on a device, frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from vfmkd.config import ConfigError, TeacherConfig
from vfmkd.registry import TEACHERS
from vfmkd.teachers import dino_teacher, sam2_teacher, sam_teacher, timm_teacher, vfmkd_teacher  # noqa: F401  (registers the teachers)
from vfmkd.teachers.base import BaseTeacher, FeatureSpec
from vfmkd.teachers.weights import (
    DEFAULT_WEIGHTS_DIR,
    WEIGHTS,
    WeightsEntry,
    default_weights_path,
    load_checkpoint_file,
)
from vfmkd.utils.hashing import file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "build_teacher_from_config",
    "BaseTeacher",
    "FeatureSpec",
    "MissingWeightsError",
    "build_teacher",
    "canonical_teacher_name",
    "teacher_names",
]

_SAM_DOWNLOAD_MODELS = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h"}


class MissingWeightsError(FileNotFoundError):
    """A teacher's checkpoint is not where it was looked for; the message says how to get it."""


def teacher_names() -> list[str]:
    """Every registered teacher name, aliases included, sorted."""
    return TEACHERS.names()


def canonical_teacher_name(name: str) -> str:
    """The registry name that owns ``name``'s official checkpoint (``sam2`` -> ``sam2.1_hiera_b+``).

    A name with its own :data:`~vfmkd.teachers.weights.WEIGHTS` entry is returned as is;
    an alias resolves to the one name in that table registered with the same factory.
    An unknown name raises ``KeyError`` listing the known ones.
    """
    factory = TEACHERS.get(name)
    if name in WEIGHTS:
        return name
    owners = [other for other in TEACHERS.names() if other in WEIGHTS and TEACHERS.get(other) is factory]
    return owners[0] if len(owners) == 1 else name


def build_teacher_from_config(
    key: str,
    teacher: TeacherConfig,
    *,
    features: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> BaseTeacher:
    """The teacher of an experiment config's ``teachers.<key>`` entry, the one path from config to teacher.

    Its registry name is ``name`` (default: the key); ``model_path`` gives the weights, and
    with ``allow_random_init: true`` seeded random weights (``random_init_seed``) replace
    them when that file is absent.

    Args:
        key: the entry's key (for messages).
        teacher: the entry (``config:`` includes already merged by the config loader).
        features: features to extract (default: the entry's ``features``, else all).
        device: where the teacher goes.

    Raises:
        ConfigError: the weights file is missing (with the download command).
    """
    weights = teacher.model_path
    random_init = teacher.allow_random_init and (weights is None or not Path(weights).is_file())
    if teacher.timm_model and canonical_teacher_name(teacher.name or key) != "timm":
        raise ConfigError(
            f"teachers.{key}.timm_model: only a 'name: timm' teacher takes it ('{teacher.name or key}' is not one); "
            "remove it or set name: timm"
        )
    try:
        return build_teacher(
            teacher.name or key,
            weights=None if random_init else weights,
            random_init=random_init,
            seed=teacher.random_init_seed,
            features=list(features) if features is not None else teacher.features,
            image_size=teacher.image_size,
            device=device,
            options={"timm_model": teacher.timm_model} if teacher.timm_model else None,
        )
    except FileNotFoundError as error:
        raise ConfigError(f"teachers.{key}: {error} (or set allow_random_init: true for a smoke run)") from None


def build_teacher(
    name: str,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    weights_dir: str | Path = DEFAULT_WEIGHTS_DIR,
    options: Mapping[str, Any] | None = None,
) -> BaseTeacher:
    """Build a frozen teacher with its official weights (or, when asked, seeded random ones).

    Args:
        name: registry name or alias (``sam2``, ``sam_vit_h``, ``dinov2_vitb14``, ``dino``).
        weights: checkpoint file (``.pth`` / ``.pt`` / ``.safetensors``); default
            ``<weights_dir>/<official file name>``.
        random_init: use the official architecture at random init instead of weights
            (for tests and smoke runs: the features mean nothing).
        seed: the seed of the random init; the same seed gives the same weights and
            fingerprint.
        features: features to extract (default: all the teacher has).
        image_size: teacher input size (default: the teacher's official one).
        device: where the teacher runs.
        weights_dir: folder searched when ``weights`` is None.
        options: further keyword arguments of the teacher's factory (``timm_model`` of
            the ``timm`` teacher).

    Returns:
        The teacher in eval mode with gradients off, ``weights_sha256`` set (the file's
        SHA-256, or the state dict's hash at random init) and ``random_init`` set.

    Raises:
        KeyError: unknown teacher name (the message lists the known ones).
        MissingWeightsError: no weights file; the message gives the expected path and the
            download command.
        UnsafeCheckpointError: the file would need arbitrary unpickling.
    """
    factory = TEACHERS.get(name)
    canonical = canonical_teacher_name(name)
    if random_init and weights is not None:
        raise ValueError(f"teacher '{name}': pass either weights ({weights}) or random_init, not both")
    if random_init:
        teacher = _build_random(factory, canonical, seed=seed, features=features, image_size=image_size, options=options)
    else:
        path = Path(weights) if weights is not None else _default_path(name, canonical, weights_dir)
        if not path.is_file():
            raise MissingWeightsError(_missing_message(name, canonical, path, explicit=weights is not None))
        logger.info("teacher %s: loading %s", canonical, path)
        checkpoint = load_checkpoint_file(path)
        teacher = factory(checkpoint=checkpoint, features=features, image_size=image_size, **dict(options or {}))
        del checkpoint
        teacher.weights_sha256 = file_sha256(path)
        teacher.random_init = False
        _check_official_hash(canonical, path, teacher.weights_sha256)
    teacher.to(device)
    teacher.freeze()
    return teacher


def _build_random(
    factory: Callable[..., BaseTeacher],
    name: str,
    *,
    seed: int,
    features: Sequence[str] | None,
    image_size: int | None,
    options: Mapping[str, Any] | None = None,
) -> BaseTeacher:
    logger.warning(
        "teacher %s: RANDOM INIT (seed %d) -- no pretrained weights are loaded, so its features are "
        "meaningless; use this only for tests and smoke runs, never for real distillation",
        name, seed,
    )
    # NOTE: forking the CPU generator keeps the caller's random stream untouched, and
    # seeding inside the fork makes the same command build the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = factory(checkpoint=None, features=features, image_size=image_size, **dict(options or {}))
    teacher.random_init = True
    teacher.weights_sha256 = teacher.state_dict_sha256()
    return teacher


def _default_path(name: str, canonical: str, weights_dir: str | Path) -> Path:
    if canonical not in WEIGHTS:
        raise MissingWeightsError(
            f"teacher '{name}' has no official checkpoint on record; pass --weights PATH, "
            "or --random-init for a smoke run (its features mean nothing)"
        )
    return default_weights_path(canonical, weights_dir)


def _missing_message(name: str, canonical: str, path: Path, *, explicit: bool) -> str:
    entry: WeightsEntry | None = WEIGHTS.get(canonical)
    label = name if name == canonical else f"{name} ({canonical})"
    lines = [f"weights for teacher '{label}' not found: {path}"]
    if entry is not None and entry.url is not None:
        commands = [f"vfmkd weights download {canonical}"]
        if canonical in _SAM_DOWNLOAD_MODELS:
            commands.append(f"python tools/download_sam_weights.py --model {_SAM_DOWNLOAD_MODELS[canonical]}")
        where = "" if explicit else f" (it saves to {path})"
        lines.append(f"download it with `{'` or `'.join(commands)}`{where}, or fetch {entry.url} by hand")
    elif entry is not None:
        lines.append(f"{entry.file_name}: {entry.note}")
    lines.append("or pass --weights PATH to an official checkpoint, or --random-init for a smoke run "
                 "(random weights, meaningless features)")
    return "; ".join(lines)


def _check_official_hash(name: str, path: Path, sha256: str) -> None:
    entry = WEIGHTS.get(name)
    if entry is not None and entry.sha256 is not None and sha256 != entry.sha256:
        logger.warning(
            "teacher %s: %s has SHA-256 %s, not the official %s's %s; fine for your own fine-tuned "
            "weights, otherwise the file is damaged or a different release",
            name, path, sha256, entry.file_name, entry.sha256,
        )
