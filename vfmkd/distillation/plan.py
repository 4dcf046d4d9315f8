"""From the experiment config to a distillation plan: teachers, stores and loss terms.

:func:`plan_distillation` reads ``teachers`` and ``distillation.losses`` and resolves every
pairing of a student map with a named teacher feature (channels, strides, grid, loss,
weight), failing before training with a message that names the config key when a pair
cannot work. The plan is data (:class:`TeacherPlan`, :class:`TermPlan`); the runtime
that serves teacher maps is :mod:`vfmkd.distillation.teacher_runtime`, the module that
turns them into losses :mod:`vfmkd.distillation.distiller`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from vfmkd.config import ConfigError, ExperimentConfig, TeacherConfig
from vfmkd.distillation import losses as _losses  # noqa: F401  (registers the losses)
from vfmkd.distillation.mask_kd import MaskTermPlan
from vfmkd.registry import LOSSES, TEACHERS
from vfmkd.features.format import StoreMismatchError
from vfmkd.features.store import FeatureStore
from vfmkd.ops.prompt_decoder import DECODER_FEATURES, prompt_family
from vfmkd.teachers import build_teacher_from_config, canonical_teacher_name
from vfmkd.teachers.base import FeatureSpec
from vfmkd.utils.hashing import file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "task_entry_names",
    "TeacherPlan",
    "TermPlan",
    "alignment_table",
    "expected_store_fields",
    "term_grid_stride",
    "plan_distillation",
    "plan_mask_terms",
]

# NOTE: the seed names its loss `feature_mse`; a `feature_` prefix before a loss name
# means that loss when no `type` is given.
LOSS_NAME_PREFIX = "feature_"


@dataclass
class TeacherPlan:
    """A resolved teacher entry.

    ``store`` is its opened feature store (None when it has none), ``teacher`` a teacher
    built while planning (handed to the distiller on first use), ``write_back`` this
    rank's :class:`~vfmkd.distillation.write_back.StoreWriteBack` when the config's
    ``write_back`` is on.
    """

    key: str
    registry_name: str
    config: TeacherConfig
    specs: dict[str, FeatureSpec]
    offline_ratio: float
    store: Any = None
    teacher: Any = None
    write_back: Any = None


@dataclass
class TermPlan:
    """One distillation term: a student level matched to a teacher feature."""

    name: str
    teacher: str
    feature: str
    level: str
    loss_type: str
    weight: float
    align_to: str
    adapter: str
    student_channels: int
    student_stride: int
    teacher_channels: int
    teacher_stride: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def module_key(self) -> str:
        # ModuleDict keys may not contain dots.
        return f"{self.teacher}__{self.feature}__{self.level}".replace(".", "_")


def expected_store_fields(key: str, teacher: TeacherConfig, registry_name: str) -> dict[str, Any]:
    """What a store must hold for this teacher entry, known without loading the teacher.

    The teacher's name, the input size when configured, and the weights: real ones
    (their SHA-256) when ``model_path`` is a file, and no random weights unless
    ``allow_random_init`` is set.
    """

    expected: dict[str, Any] = {"teacher": canonical_teacher_name(registry_name)}
    if teacher.image_size is not None:
        expected["preprocessing"] = {"image_size": teacher.image_size}
    weights_file = Path(teacher.model_path) if teacher.model_path else None
    if weights_file is not None and weights_file.is_file():
        expected["random_init"] = False
        expected["weights_sha256"] = _cached_sha256(weights_file, file_sha256)
    elif not teacher.allow_random_init:
        expected["random_init"] = False
    return expected


def _cached_sha256(path: Path, compute: Any) -> str:
    # NOTE: downloads write `<file>.sha256`; trust it when it is newer than the file.
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file() and sidecar.stat().st_mtime >= path.stat().st_mtime:
        text = sidecar.read_text().split()
        if text and len(text[0]) == 64:
            return text[0]
    return compute(path)


def task_entry_names(config: ExperimentConfig) -> set[str]:
    """``distillation.losses`` entries that weight a head's task losses: the model's head names.

    The seed's ``distillation.losses.detection.weight`` scales the ``detection`` head's
    losses; a ``segmentation`` head is weighted by a ``segmentation`` entry, and so on.
    """
    return set(config.model.heads)


def plan_distillation(
    config: ExperimentConfig, student_dims: Mapping[str, int], student_strides: Mapping[str, int]
) -> tuple[dict[str, TeacherPlan], list[TermPlan]]:
    """Resolve teachers and feature loss terms (mask terms: :func:`plan_mask_terms`); problems are :class:`ConfigError`.

    Args:
        config: the experiment.
        student_dims: channels of each named student map (``model.map_dims``: neck levels
            ``p3``.., backbone stages ``backbone.p4``.., head maps ``<head>.<map>``); a
            term's ``student:`` names one, by default the neck level closest in stride.
        student_strides: stride of each named map.
    """
    tasks = task_entry_names(config)
    losses = {name: entry for name, entry in config.distillation.losses.items() if name not in tasks}
    used = {entry.teacher for entry in losses.values()}
    teachers = {
        key: _plan_teacher(key, teacher, config)
        for key, teacher in config.teachers.items()
        if teacher.enabled and key in used
    }

    terms: list[TermPlan] = []
    for entry_name, entry in losses.items():
        where = f"distillation.losses.{entry_name}"
        _check_teacher_named(where, entry, config)
        if entry.teacher not in teachers:
            continue  # the teacher is disabled: its terms are off too
        plan = teachers[entry.teacher]
        loss_type = _loss_type(entry_name, entry)
        if loss_type not in LOSSES:
            raise ConfigError(f"{where}.type: unknown loss '{loss_type}'; known: {', '.join(LOSSES.names())}")
        loss_class = LOSSES.get(loss_type)  # declares what it needs (FeatureLoss.needs_spatial_map, ...)
        if getattr(loss_class, "prompt_in_the_loop", False):
            continue  # plan_mask_terms
        feature = entry.feature or next(iter(plan.specs))
        if feature not in plan.specs:
            raise ConfigError(f"{where}.feature: teacher '{entry.teacher}' has no feature '{feature}' "
                              f"(available: {', '.join(plan.specs)})")
        spec = plan.specs[feature]
        levels = [entry.student] if isinstance(entry.student, str) else list(entry.student or [])
        if not levels:
            # NOTE: by default a neck level (a name without a dot), not a backbone stage or head map.
            neck_strides = {name: stride for name, stride in student_strides.items() if "." not in name}
            levels = [_closest_level(spec.stride, neck_strides or student_strides)]
        for level in levels:
            if level not in student_dims:
                raise ConfigError(f"{where}.student: the student has no map '{level}' (maps: {', '.join(student_dims)})")
            adapter = entry.adapter or "conv1x1"
            _check_pairing(where, entry, loss_type, plan, feature, level, student_dims[level], adapter)
            terms.append(
                TermPlan(
                    name=f"distill/{entry.teacher}/{feature}<-{level}",
                    teacher=entry.teacher,
                    feature=feature,
                    level=level,
                    loss_type=loss_type,
                    weight=entry.weight,
                    align_to=entry.align_to,
                    adapter=adapter,
                    student_channels=student_dims[level],
                    student_stride=student_strides[level],
                    teacher_channels=spec.channels,
                    teacher_stride=spec.stride,
                    params=dict(entry.params),
                )
            )
    names = [term.name for term in terms]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"distillation.losses: the same pairing appears twice: {', '.join(duplicates)}")
    return teachers, terms


def _check_pairing(
    where: str, entry: Any, loss_type: str, plan: TeacherPlan, feature: str, level: str, channels: int, adapter: str
) -> None:
    """What the loss class declares it needs (:class:`~vfmkd.distillation.losses.FeatureLoss`), against this pair."""
    loss_class = LOSSES.get(loss_type)
    spec = plan.specs[feature]
    if loss_class.needs_raw_teacher and plan.config.normalize:
        raise ConfigError(
            f"{where}: '{loss_type}' reads the teacher's raw logits, but teachers.{entry.teacher}.normalize "
            "standardises them; set normalize: false (or give these maps their own teacher entry)"
        )
    if spec.stride == 0 and entry.align_to == "teacher" and loss_class.needs_spatial_map:
        raise ConfigError(f"{where}: '{loss_type}' needs a spatial map; '{feature}' is a global vector")
    if adapter in ("none", "identity") and channels != spec.channels and not loss_class.maps_channels:
        raise ConfigError(
            f"{where}.adapter: '{adapter}' needs equal channels, but {level} has {channels} "
            f"and {entry.teacher}.{feature} has {spec.channels}; use conv1x1, conv_norm_conv or mlp"
        )


def _check_teacher_named(where: str, entry: Any, config: ExperimentConfig) -> None:
    """A distillation entry must name a configured teacher."""
    if entry.teacher is None:
        raise ConfigError(
            f"{where}: names no 'teacher' (one of: {', '.join(config.teachers) or 'none configured'}); "
            f"an entry weighting a head's task losses takes the head's name ({', '.join(config.model.heads) or 'no heads'})"
        )
    if entry.teacher not in config.teachers:
        raise ConfigError(f"{where}.teacher: '{entry.teacher}' is not in 'teachers' ({', '.join(config.teachers)})")


def _loss_type(entry_name: str, entry: Any) -> str:
    """An entry's loss: its ``type``, else its name without the seed's ``feature_`` prefix."""
    if entry.type:
        return entry.type
    return entry_name[len(LOSS_NAME_PREFIX) :] if entry_name.startswith(LOSS_NAME_PREFIX) else entry_name


def plan_mask_terms(
    config: ExperimentConfig, teachers: Mapping[str, TeacherPlan], heads: Mapping[str, Any]
) -> list[MaskTermPlan]:
    """Resolve the prompt-in-the-loop entries (``type: mask_kd``); every problem is a :class:`ConfigError`.

    Args:
        config: the experiment.
        teachers: the planned teachers (:func:`plan_distillation`).
        heads: the student's heads by name; ``student:`` names a promptable mask head (one
            with ``decode_prompts``), by default the only one.
    """
    tasks = task_entry_names(config)
    promptable = [name for name, head in heads.items() if hasattr(head, "decode_prompts")]
    terms: list[MaskTermPlan] = []
    for entry_name, entry in config.distillation.losses.items():
        loss_type = _loss_type(entry_name, entry)
        if entry_name in tasks or loss_type not in LOSSES or not getattr(LOSSES.get(loss_type), "prompt_in_the_loop", False):
            continue
        where = f"distillation.losses.{entry_name}"
        if entry.teacher not in teachers:
            continue  # a disabled teacher (a missing one is reported by plan_distillation)
        plan = teachers[entry.teacher]
        family = prompt_family(plan.registry_name)
        if family is None:
            raise ConfigError(f"{where}.teacher: '{loss_type}' needs a SAM or SAM 2 teacher; '{entry.teacher}' is {plan.registry_name}")
        head = entry.student if isinstance(entry.student, str) else None
        if head is None:
            if len(promptable) != 1:
                raise ConfigError(
                    f"{where}.student: name the promptable mask head to train ({', '.join(promptable) or 'the model has none: add a sam_mask_head'})"
                )
            head = promptable[0]
        if head not in promptable:
            raise ConfigError(f"{where}.student: '{head}' is not a promptable mask head (heads: {', '.join(heads) or 'none'})")
        features = DECODER_FEATURES[family]
        missing = [name for name in features if name not in plan.specs]
        if missing:
            source = f"the store at '{plan.config.feature_path}'" if plan.store is not None else f"teachers.{entry.teacher}.features"
            raise ConfigError(f"{where}: the teacher's decoder needs {list(features)}; {source} lacks {missing}")
        try:
            LOSSES.build(loss_type, **entry.params)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}.params: {error}") from None
        terms.append(
            MaskTermPlan(
                name=f"distill/{entry.teacher}/masks<-{head}",
                teacher=entry.teacher,
                head=head,
                family=family,
                features=features,
                weight=entry.weight,
                params=dict(entry.params),
            )
        )
    return terms


def _plan_teacher(key: str, teacher: TeacherConfig, config: ExperimentConfig) -> TeacherPlan:
    """One used teacher entry: its store (opened and checked), specs, offline share, and
    the teacher itself when planning needs it (online only, or write-back)."""
    registry_name = teacher.name or key
    try:
        TEACHERS.get(registry_name)
    except KeyError as error:
        raise ConfigError(f"teachers.{key}: {error.args[0]}") from None
    if teacher.offline:
        ratio = teacher.offline_ratio if teacher.offline_ratio is not None else config.distillation.offline_ratio
    else:
        ratio = 0.0
    store = None
    prebuilt = None
    specs: dict[str, FeatureSpec]
    if teacher.write_back:
        if not teacher.offline or not teacher.feature_path:
            raise ConfigError(
                f"teachers.{key}.write_back: fills the store at 'feature_path' that offline samples read; "
                "it needs 'feature_path' and offline: true (offline_ratio 0 fills the store without reading it)"
            )
        store = _open_store(key, teacher, registry_name, config, missing_ok=True)
        if teacher.normalize and (store is None or len(store) == 0):
            raise ConfigError(
                f"teachers.{key}.normalize needs the statistics of a filled store, and '{teacher.feature_path}' "
                "is empty; fill it first (extract it, or train once with write_back and normalize off)"
            )
        # NOTE: the teacher computes every stored feature, so that what it writes back
        # is a whole store row; the specs of a store that does not exist yet are its own.
        features = list(store.specs) if store is not None else teacher.features
        prebuilt = build_teacher_from_config(key, teacher, features=features)
        specs = dict(store.specs) if store is not None else dict(prebuilt.feature_specs)
    elif ratio > 0.0:
        store = _open_store(key, teacher, registry_name, config)
        specs = dict(store.specs)
    else:
        # Every sample is online: the teacher is needed anyway, and declares its specs. A
        # store is still opened for its statistics when the maps are normalised.
        if teacher.normalize and teacher.feature_path:
            store = _open_store(key, teacher, registry_name, config, missing_ok=True)
            if store is None or len(store) == 0:
                raise ConfigError(
                    f"teachers.{key}.normalize standardises with the statistics of the store at "
                    f"'{teacher.feature_path}', which holds none; extract it first, or set normalize: false"
                )
        prebuilt = build_teacher_from_config(key, teacher, features=teacher.features)
        specs = dict(prebuilt.feature_specs)
    return TeacherPlan(key, registry_name, teacher, specs, ratio, store, prebuilt)


def _open_store(
    key: str, teacher: TeacherConfig, registry_name: str, config: ExperimentConfig, *, missing_ok: bool = False
) -> Any:
    """The teacher's store at ``feature_path``, checked against the config (None if absent and ``missing_ok``)."""

    if not teacher.feature_path:
        raise ConfigError(
            f"teachers.{key}: offline distillation needs 'feature_path' (a feature store made with "
            f"`vfmkd features extract --teacher {registry_name} ...`), or set 'offline: false'"
        )
    try:
        return FeatureStore.open(teacher.feature_path, expect=expected_store_fields(key, teacher, registry_name))
    except StoreMismatchError as error:
        raise ConfigError(
            f"teachers.{key}.feature_path: the store at '{teacher.feature_path}' was made with another "
            "teacher set-up:\n  " + "\n  ".join(error.differences)
            + "\nre-extract it for this config, or point feature_path elsewhere"
        ) from None
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(
            f"teachers.{key}.feature_path: no feature store at '{teacher.feature_path}'; make it with "
            f"`python tools/prepare_teacher_features.py --teacher {key} --dataset {config.data.dataset} "
            f"--output {teacher.feature_path}` (or set offline: false, or write_back: true to fill it while training)"
        ) from None


def _closest_level(stride: int, student_strides: Mapping[str, int]) -> str:
    if stride == 0:
        return max(student_strides, key=lambda level: student_strides[level])
    return min(student_strides, key=lambda level: abs(math.log2(student_strides[level] / stride)))


def alignment_table(terms: list[TermPlan], teachers: Mapping[str, TeacherPlan], image_size: int) -> str:
    """The start-of-run table: student level -> adapter -> teacher feature, grid, loss."""
    rows = [("student", "adapter", "teacher feature", "grid", "loss", "weight", "source")]
    for term in terms:
        plan = teachers[term.teacher]
        student_cells = image_size // term.student_stride
        spec = plan.specs[term.feature]
        stride = term_grid_stride(term)
        grid = "1x1" if stride == 0 else f"{image_size // stride}x{image_size // stride} (s{stride}, {term.align_to})"
        teacher_shape = f"{spec.channels}x{spec.height}x{spec.width}" if spec.stride else f"{spec.channels} (global)"
        rows.append(
            (
                f"{term.level} {term.student_channels}x{student_cells}x{student_cells} s{term.student_stride}",
                f"{term.adapter} {term.student_channels}->{term.teacher_channels}",
                f"{term.teacher}.{term.feature} {teacher_shape} s{spec.stride}",
                grid,
                term.loss_type,
                f"{term.weight:g}",
                f"{plan.offline_ratio:.0%} offline",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def term_grid_stride(term: TermPlan) -> int:
    """Stride, in student input pixels, of the grid the pair is compared on."""
    if term.teacher_stride == 0:
        return 0
    return term.teacher_stride if term.align_to == "teacher" else term.student_stride


