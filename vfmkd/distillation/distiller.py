"""From the experiment config to loss terms: alignment, adapters, teachers, stores.

:func:`plan_distillation` reads ``teachers`` and ``distillation.losses`` and resolves every
pairing of a student level with a named teacher feature (channels, strides, grid, loss,
weight), failing before training with a message that names the config key when a pair
cannot work. :class:`Distiller` is then the trainer's ``loss_fn``: task losses plus one
``distill/<teacher>/<feature><-<level>`` term per pair. With ``write_back: true`` on a
teacher, it also fills that teacher's store during training
(:mod:`vfmkd.distillation.write_back`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from vfmkd.config import ConfigError, ExperimentConfig, TeacherConfig, read_yaml
from vfmkd.utils.distributed import all_gather_object, barrier, get_rank
from vfmkd.distillation.sources import (
    OFFLINE_KEY,
    WRITE_BACK_KEY,
    OfflinePlan,
    offline_features,
    online_features,
)
from vfmkd.teachers.base import FeatureSpec
from vfmkd.utils.paths import find_project_file

logger = logging.getLogger(__name__)

TASK_TERMS = {"detection": "det/", "segmentation": "seg/"}
# NOTE: the seed names its loss `feature_mse`; a `feature_` prefix before a loss name
# means that loss when no `type` is given.
LOSS_NAME_PREFIX = "feature_"
# An image to check that the teacher's light CPU preprocessing copy matches the teacher.
_PROBE_IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


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
    entry: str
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


def _merged_teacher_config(key: str, teacher: TeacherConfig) -> TeacherConfig:
    if teacher.config is None:
        return teacher
    path = find_project_file(teacher.config)
    if path is None:
        raise ConfigError(f"teachers.{key}.config: file '{teacher.config}' not found")
    loaded = read_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a teacher config must be a mapping of teacher keys")
    explicit = teacher.model_dump(exclude_unset=True)
    explicit.pop("config", None)
    try:
        return TeacherConfig.model_validate({**loaded, **explicit})
    except Exception as error:  # pydantic's ValidationError, reported with the file
        raise ConfigError(f"{path} (teachers.{key}.config): {error}") from None


def build_configured_teacher(key: str, plan_config: TeacherConfig, registry_name: str, features: list[str] | None, device: torch.device | str = "cpu") -> Any:
    """The teacher of a config entry: its weights, or seeded random ones when allowed.

    ``allow_random_init: true`` uses random weights only when ``model_path`` is not a file.
    """
    from vfmkd.teachers import build_teacher

    weights = plan_config.model_path
    random_init = plan_config.allow_random_init and (weights is None or not Path(weights).is_file())
    try:
        return build_teacher(
            registry_name,
            weights=None if random_init else weights,
            random_init=random_init,
            seed=plan_config.random_init_seed,
            features=features,
            image_size=plan_config.image_size,
            device=device,
        )
    except FileNotFoundError as error:
        raise ConfigError(f"teachers.{key}: {error} (or set allow_random_init: true for a smoke run)") from None


def expected_store_fields(key: str, teacher: TeacherConfig, registry_name: str) -> dict[str, Any]:
    """What a store must hold for this teacher entry, known without loading the teacher.

    The teacher's name, the input size when configured, and the weights: real ones
    (their SHA-256) when ``model_path`` is a file, and no random weights unless
    ``allow_random_init`` is set.
    """
    from vfmkd.teachers import canonical_teacher_name
    from vfmkd.teachers.weights import file_sha256

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


def plan_distillation(config: ExperimentConfig, student_dims: Mapping[str, int], student_strides: Mapping[str, int]) -> tuple[dict[str, TeacherPlan], list[TermPlan]]:
    """Resolve teachers and loss terms; every problem is a :class:`ConfigError`.

    Args:
        config: the experiment.
        student_dims: channels of each student level (``model.feature_dims``).
        student_strides: stride of each student level.
    """
    from vfmkd.registry import LOSSES, TEACHERS
    import vfmkd.distillation.losses  # noqa: F401  (registers the losses)
    import vfmkd.teachers  # noqa: F401

    losses = {name: entry for name, entry in config.distillation.losses.items() if name not in TASK_TERMS}
    used = {entry.teacher for entry in losses.values()}
    teachers: dict[str, TeacherPlan] = {}
    for key, raw_teacher in config.teachers.items():
        if not raw_teacher.enabled or key not in used:
            continue
        teacher = _merged_teacher_config(key, raw_teacher)
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
            prebuilt = build_configured_teacher(
                key, teacher, registry_name, list(store.specs) if store is not None else teacher.features
            )
            specs = dict(store.specs) if store is not None else dict(prebuilt.feature_specs)
        elif ratio > 0.0:
            store = _open_store(key, teacher, registry_name, config)
            specs = dict(store.specs)
        else:
            # Every sample is online: the teacher is needed anyway, and declares its specs.
            prebuilt = build_configured_teacher(key, teacher, registry_name, teacher.features)
            specs = dict(prebuilt.feature_specs)
        teachers[key] = TeacherPlan(key, registry_name, teacher, specs, ratio, store, prebuilt)

    terms: list[TermPlan] = []
    for entry_name, entry in losses.items():
        where = f"distillation.losses.{entry_name}"
        if entry.teacher is None:
            raise ConfigError(f"{where}: names no 'teacher' (one of: {', '.join(config.teachers) or 'none configured'})")
        if entry.teacher not in config.teachers:
            raise ConfigError(f"{where}.teacher: '{entry.teacher}' is not in 'teachers' ({', '.join(config.teachers)})")
        if entry.teacher not in teachers:
            continue  # the teacher is disabled: its terms are off too
        plan = teachers[entry.teacher]
        loss_type = entry.type or (entry_name[len(LOSS_NAME_PREFIX):] if entry_name.startswith(LOSS_NAME_PREFIX) else entry_name)
        if loss_type not in LOSSES:
            raise ConfigError(f"{where}.type: unknown loss '{loss_type}'; known: {', '.join(LOSSES.names())}")
        feature = entry.feature or next(iter(plan.specs))
        if feature not in plan.specs:
            raise ConfigError(f"{where}.feature: teacher '{entry.teacher}' has no feature '{feature}' "
                              f"(available: {', '.join(plan.specs)})")
        spec = plan.specs[feature]
        levels = [entry.student] if isinstance(entry.student, str) else list(entry.student or [])
        if not levels:
            levels = [_closest_level(spec.stride, student_strides)]
        for level in levels:
            if level not in student_dims:
                raise ConfigError(f"{where}.student: the student has no level '{level}' (levels: {', '.join(student_dims)})")
            if spec.stride == 0 and entry.align_to == "teacher" and loss_type in ("cwd", "fgd", "mgd"):
                raise ConfigError(f"{where}: '{loss_type}' needs a spatial map; '{feature}' is a global vector")
            adapter = entry.adapter or "conv1x1"
            # NOTE: mgd's own generator maps student channels to teacher channels.
            generative = loss_type == "mgd"
            if adapter in ("none", "identity") and student_dims[level] != spec.channels and not generative:
                raise ConfigError(
                    f"{where}.adapter: '{adapter}' needs equal channels, but {level} has {student_dims[level]} "
                    f"and {entry.teacher}.{feature} has {spec.channels}; use conv1x1, conv_norm_conv or mlp"
                )
            terms.append(
                TermPlan(
                    name=f"distill/{entry.teacher}/{feature}<-{level}",
                    entry=entry_name,
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


def _open_store(
    key: str, teacher: TeacherConfig, registry_name: str, config: ExperimentConfig, *, missing_ok: bool = False
) -> Any:
    """The teacher's store at ``feature_path``, checked against the config (None if absent and ``missing_ok``)."""
    from vfmkd.features.format import StoreMismatchError
    from vfmkd.features.store import FeatureStore

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
        grid_stride = _grid_stride(term)
        grid = "1x1" if grid_stride == 0 else f"{image_size // grid_stride}x{image_size // grid_stride} (s{grid_stride}, {term.align_to})"
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


def _grid_stride(term: TermPlan) -> int:
    """Stride, in student input pixels, of the grid the pair is compared on."""
    if term.teacher_stride == 0:
        return 0
    return term.teacher_stride if term.align_to == "teacher" else term.student_stride


class Distiller(nn.Module):
    """The trainer's ``loss_fn``: task losses plus every planned distillation term.

    Adapters and parameterised losses live in ``model.distill`` (so they are optimised,
    saved with the student and moved with it); the teachers are loaded only when a
    sample needs an online pass, and never reach the optimizer.

    Args:
        config: the experiment.
        model: the student (:class:`~vfmkd.models.unified_model.UnifiedModel`); its
            ``distill`` ModuleDict is filled here, before the optimizer is built.
        teachers: resolved teachers from :func:`plan_distillation`.
        terms: resolved terms.
        task_weights: prefix -> weight for the task losses (``det/`` -> 5.0).
        task_losses: False for training data without labels: distillation alone.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        model: nn.Module,
        teachers: dict[str, TeacherPlan],
        terms: list[TermPlan],
        task_weights: Mapping[str, float],
        task_losses: bool = True,
    ) -> None:
        super().__init__()
        from vfmkd.models.adapters import build_adapter
        from vfmkd.registry import LOSSES

        self.config = config
        self.teacher_plans = teachers
        self.terms = terms
        self.task_weights = dict(task_weights)
        self.task_losses = task_losses
        self.image_size = config.data.img_size
        adapters = nn.ModuleDict()
        losses = nn.ModuleDict()
        for term in terms:
            passthrough = term.adapter in ("none", "identity")
            adapted_channels = term.student_channels if passthrough else term.teacher_channels
            adapters[term.module_key] = build_adapter(term.adapter, term.student_channels, adapted_channels)
            losses[term.module_key] = LOSSES.build(
                term.loss_type, student_channels=adapted_channels, teacher_channels=term.teacher_channels, **term.params
            )
        model.distill = nn.ModuleDict({"adapters": adapters, "losses": losses})
        self._online: dict[str, Any] = {}
        self._statistics: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.dropout = config.distillation.teacher_dropout
        self._write_backs = {key: plan.write_back for key, plan in teachers.items() if plan.write_back is not None}

    # ------------------------------------------------------------------ data side
    def offline_plans(self) -> list[OfflinePlan]:
        """What the data loader workers read (and prepare for write-back), per teacher with a store."""
        from vfmkd.features.extract import cpu_preprocessor

        plans = []
        for key, plan in self.teacher_plans.items():
            if plan.store is None or (plan.offline_ratio == 0.0 and plan.write_back is None):
                continue
            features = tuple(sorted({term.feature for term in self.terms if term.teacher == key}))
            preprocess = None
            if plan.write_back is not None:
                teacher = plan.teacher if plan.teacher is not None else self._online[key]
                preprocess = cpu_preprocessor(teacher, _PROBE_IMAGE)
            plans.append(OfflinePlan(key, str(plan.config.feature_path), features, plan.offline_ratio, preprocess))
        return plans

    # --------------------------------------------------------------- teacher side
    def online_teacher(self, key: str, device: torch.device) -> Any:
        """The teacher for online samples, built (and its weights loaded) on first use."""
        teacher = self._online.get(key)
        if teacher is None:
            plan = self.teacher_plans[key]
            features = sorted({term.feature for term in self.terms if term.teacher == key})
            teacher = plan.teacher
            if teacher is None:
                teacher = build_configured_teacher(key, plan.config, plan.registry_name, features)
            teacher = teacher.to(device)
            if plan.store is not None:
                _check_store_matches(key, plan.store, teacher)
            # NOTE: kept out of this module's children, so teacher weights never reach the
            # optimizer or the student's checkpoint.
            self._online[key] = teacher
            plan.teacher = None
        return teacher

    def _teacher_statistics(self, teacher: str, feature: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (teacher, feature)
        if key not in self._statistics:
            plan = self.teacher_plans[teacher]
            if plan.store is None:
                raise ConfigError(f"teachers.{teacher}.normalize needs the store's statistics (feature_path)")
            mean, std = plan.store.stats(feature)
            self._statistics[key] = (
                torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                torch.as_tensor(std, dtype=torch.float32, device=device).clamp(min=1e-6).view(1, -1, 1, 1),
            )
        return self._statistics[key]

    def teacher_targets(
        self, batch: dict[str, Any], device: torch.device, teachers: set[str] | None = None
    ) -> dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]]:
        """Every (teacher, feature, grid stride) map the terms need, for the whole batch.

        Args:
            batch: the collated batch (float images on ``device``, offline records).
            device: where the maps go.
            teachers: only these teachers (default: all).

        Returns:
            key -> (``[B, C, Hg, Wg]`` float32 teacher maps in the student frame,
            ``[B, 1, Hg, Wg]`` bool valid mask).
        """
        images = batch["images"]
        batch_size, _, height, width = images.shape
        needed: dict[str, set[tuple[str, int]]] = {}
        for term in self.terms:
            if teachers is None or term.teacher in teachers:
                needed.setdefault(term.teacher, set()).add((term.feature, _grid_stride(term)))
        offline = batch.get(OFFLINE_KEY, {})
        targets = {}
        for teacher, requests in needed.items():
            spec_of = self.teacher_plans[teacher].specs
            record = offline.get(teacher)
            offline_rows = record["samples"].to(device) if record is not None else torch.zeros(0, dtype=torch.int64, device=device)
            online_mask = torch.ones(batch_size, dtype=torch.bool, device=device)
            online_mask[offline_rows] = False
            online_rows = online_mask.nonzero().flatten()
            results: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
            for feature, grid_stride in requests:
                grid = (1, 1) if grid_stride == 0 else (height // grid_stride, width // grid_stride)
                channels = spec_of[feature].channels
                maps = torch.zeros((batch_size, channels, *grid), dtype=torch.float32, device=device)
                valid = torch.zeros((batch_size, 1, *grid), dtype=torch.bool, device=device)
                if len(offline_rows):
                    rows, warped, warped_valid = offline_features(
                        record, feature, spec_of[feature].stride, grid, grid_stride, batch_size, device
                    )
                    maps[rows], valid[rows] = warped, warped_valid
                results[(feature, grid_stride)] = (maps, valid)
            if len(online_rows):
                teacher_model = self.online_teacher(teacher, device)
                requests_list = [
                    (feature, (1, 1) if stride == 0 else (height // stride, width // stride), stride)
                    for feature, stride in requests
                ]
                computed = online_features(
                    teacher_model,
                    images[online_rows],
                    [batch["frames"][row] for row in online_rows.tolist()],
                    requests_list,
                )
                for (feature, grid, stride), (maps, valid) in computed.items():
                    results[(feature, stride)][0][online_rows] = maps
                    results[(feature, stride)][1][online_rows] = valid
            for (feature, stride), (maps, valid) in results.items():
                if self.teacher_plans[teacher].config.normalize:
                    mean, std = self._teacher_statistics(teacher, feature, device)
                    maps = (maps - mean) / std
                targets[(teacher, feature, stride)] = (maps, valid)
        return targets

    # ---------------------------------------------------------------- the loss fn
    def forward(self, model: nn.Module, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Task losses (weighted) and one term per planned pair."""
        if WRITE_BACK_KEY in batch and self._write_backs:
            self._write_back(batch[WRITE_BACK_KEY], batch["images"].device)
        losses: dict[str, torch.Tensor] = {}
        heads = [name for name in outputs if name != "features"]
        task_run = self.task_losses and batch.get("targets") is not None and bool(heads)
        if task_run:
            for name, value in model.loss(outputs, batch["targets"]).items():
                weight = next((w for prefix, w in self.task_weights.items() if name.startswith(prefix)), 1.0)
                losses[name] = value * weight if weight != 1.0 else value
        device = batch["images"].device
        with torch.no_grad():
            targets = self.teacher_targets(batch, device)
        dropped = self._dropped_teachers()
        loss_modules = model.distill["losses"]
        for term in self.terms:
            student, teacher_maps, valid = self.aligned_pair(model, term, outputs["features"], targets)
            loss_targets = self._loss_targets(batch, _grid_stride(term))
            value = loss_modules[term.module_key](student, teacher_maps, valid, loss_targets)
            if term.teacher in dropped:
                value = value * 0.0
            losses[term.name] = value * term.weight
        if heads and not task_run and self.terms:
            # NOTE: without task losses the heads (and neck parts only they use) would get no
            # gradient, which DDP (find_unused_parameters=False) refuses at the next step; a
            # zero-weighted tie gives them an exact zero gradient instead.
            first = self.terms[0].name
            losses[first] = losses[first] + 0.0 * _finite_sum([outputs[name] for name in heads])
        return losses

    # ---------------------------------------------------------------- write-back
    def _write_back(self, pending: Mapping[str, Mapping[str, Any]], device: torch.device) -> None:
        """Add the batch's primary images missing from write-back stores (each id once over all ranks).

        Args:
            pending: teacher -> ``ids``, ``pixels [N, 3, S, S]``, ``frames`` (see
                :func:`~vfmkd.distillation.sources.collate_with_teacher_features`).
            device: where the teacher runs.
        """
        # NOTE: one small all-gather per step under DDP, on every rank whatever it holds,
        # so that the ranks agree on who writes an id both of them met.
        offered = {key: list(pending[key]["ids"]) if key in pending else [] for key in self._write_backs}
        gathered = all_gather_object(offered)
        for key, write_back in self._write_backs.items():
            rows = write_back.claim([entry[key] for entry in gathered])
            if rows:
                record = pending[key]
                write_back.add(
                    self.online_teacher(key, device),
                    [record["ids"][row] for row in rows],
                    record["pixels"][rows],
                    [record["frames"][row] for row in rows],
                )

    def end_epoch(self) -> None:
        """Commit the features written back this epoch and rewrite the stores' manifests.

        Every rank calls this at the same point, after its last step of the epoch; the data
        loader workers reopen the stores when the next epoch starts and read these samples.
        """
        # NOTE: every rank knows every claim, so all skip together once a store is full.
        if not any(write_back.changed for write_back in self._write_backs.values()):
            return
        for write_back in self._write_backs.values():
            write_back.commit()
        barrier()
        if get_rank() == 0:
            for write_back in self._write_backs.values():
                write_back.finalize()

    def end_training(self, synchronize: bool = True) -> None:
        """Commit what was written back, rewrite the manifests and release the stores.

        Args:
            synchronize: every rank calls this at the same point (a run that ended
                normally); False after an error: this rank only commits and releases.
        """
        if not self._write_backs:
            return
        try:
            changed = any(write_back.changed for write_back in self._write_backs.values())
            for write_back in self._write_backs.values():
                write_back.commit()
            if synchronize and changed:
                barrier()
                if get_rank() == 0:
                    for write_back in self._write_backs.values():
                        write_back.finalize()
        except Exception as error:
            if synchronize:
                raise
            logger.warning("write-back: could not commit the last features (%s)", error)
        finally:
            for write_back in self._write_backs.values():
                write_back.release()

    @staticmethod
    def aligned_pair(
        model: nn.Module,
        term: TermPlan,
        features: Mapping[str, torch.Tensor],
        targets: Mapping[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adapted student map and the teacher map of one term, on one grid.

        Returns:
            student ``[B, Ct, Hg, Wg]`` float32, teacher ``[B, Ct, Hg, Wg]``, valid
            ``[B, 1, Hg, Wg]`` bool (global vectors: ``Hg = Wg = 1``, the student pooled).
        """
        student = model.distill["adapters"][term.module_key](features[term.level]).float()
        teacher_maps, valid = targets[(term.teacher, term.feature, _grid_stride(term))]
        if term.teacher_stride == 0:
            student = student.mean(dim=(2, 3), keepdim=True)
        elif student.shape[-2:] != teacher_maps.shape[-2:]:
            student = nn.functional.interpolate(student, size=teacher_maps.shape[-2:], mode="bilinear", align_corners=False)
        return student, teacher_maps, valid

    @staticmethod
    def _loss_targets(batch: dict[str, Any], grid_stride: int) -> dict[str, Any] | None:
        targets = batch.get("targets")
        if targets is None:
            return None
        return {**targets, "stride": max(grid_stride, 1)}

    def _dropped_teachers(self) -> set[str]:
        if not self.training or self.dropout == 0.0 or len(self.teacher_plans) < 2:
            return set()
        # NOTE: python's random is seeded by the trainer; at least one teacher stays.
        dropped = {key for key in self.teacher_plans if random.random() < self.dropout}
        return dropped if len(dropped) < len(self.teacher_plans) else set()


def _finite_sum(values: Any) -> torch.Tensor:
    """Sum of every tensor in nested lists / tuples / dicts, non-finite entries as 0 (a float32 scalar)."""
    if torch.is_tensor(values):
        return values.float().nan_to_num(0.0, 0.0, 0.0).sum()
    sums = [_finite_sum(item) for item in (values.values() if isinstance(values, Mapping) else values)]
    return torch.stack(sums).sum() if sums else torch.zeros(())


def _check_store_matches(key: str, store: Any, teacher: Any) -> None:
    """A store made with other weights, preprocessing or specs than the live teacher is refused."""
    from vfmkd.features.format import describe_differences

    stored = store.fingerprint_fields
    asked = teacher.fingerprint_fields()
    # NOTE: the live teacher may serve a subset of the stored features.
    asked["features"] = {name: spec for name, spec in asked["features"].items() if name in stored.get("features", {})}
    differences = describe_differences(stored, asked, both_ways=False)
    if differences:
        raise ConfigError(
            f"teachers.{key}: the live teacher differs from the one that made the store at "
            f"'{store.path}':\n  " + "\n  ".join(differences)
        )


def _start_write_backs(config: ExperimentConfig, teachers: Mapping[str, TeacherPlan]) -> None:
    """Open (or create) the store of every teacher with ``write_back`` for writing.

    A store that does not exist yet is made as ``vfmkd features extract`` would make it for
    the training split: float16, the teacher's features and fingerprint.
    """
    from vfmkd.distillation.write_back import StoreWriteBack
    from vfmkd.features.format import FeatureStoreError, StoreHeader
    from vfmkd.features.store import FeatureStore

    started: list[StoreWriteBack] = []
    try:
        for key, plan in teachers.items():
            if not plan.config.write_back:
                continue
            teacher, teacher_config = plan.teacher, plan.config
            weights = teacher_config.model_path
            random_init = teacher_config.allow_random_init and (weights is None or not Path(weights).is_file())
            new_store = StoreHeader(
                teacher=teacher.name,
                fingerprint_fields=teacher.fingerprint_fields(),
                codec="float16",
                specs=dict(teacher.feature_specs),
                split=config.data.train_split,
                data_source=config.data.dataset,
                data_resolved=_resolved_data(config.data.dataset),
                build_args={
                    "teacher": plan.registry_name,
                    "weights": str(Path(weights).resolve()) if weights and not random_init else None,
                    "random_init": bool(random_init),
                    "seed": teacher_config.random_init_seed,
                    "features": teacher_config.features,
                    "image_size": teacher_config.image_size,
                },
            )
            try:
                plan.write_back = StoreWriteBack.open(key, teacher_config.feature_path, teacher, new_store)
            except FeatureStoreError as error:
                raise ConfigError(
                    f"teachers.{key}.write_back: {error}\n(or set write_back: false to train without filling the store)"
                ) from None
            started.append(plan.write_back)
            if plan.store is None:
                plan.store = FeatureStore.open(teacher_config.feature_path)
    except BaseException:
        for write_back in started:
            write_back.release()
        raise


def _resolved_data(dataset: str) -> str | None:
    """The data set's resolved file or folder (for ``vfmkd features verify``), None if it cannot be resolved."""
    from vfmkd.datasets import resolve_dataset

    try:
        return str(resolve_dataset(dataset).source.resolve())
    except Exception:  # noqa: BLE001 - only a manifest field; the trainer reports data problems
        return None


def build_distiller(config: ExperimentConfig, model: nn.Module, *, has_labels: bool = True) -> Distiller | None:
    """The distiller for ``config``, or None when it has no distillation term.

    ``has_labels=False`` (an unlabelled image folder) trains the distillation terms alone.

    Prints the alignment table (through logging) and attaches adapters to ``model``.
    """
    if not any(name not in TASK_TERMS for name in config.distillation.losses):
        return None
    teachers, terms = plan_distillation(config, model.feature_dims, model.strides)
    if not terms:
        logger.warning("distillation: every configured teacher is disabled; training the task losses only")
        return None
    task_weights = {
        prefix: config.distillation.losses[task].weight
        for task, prefix in TASK_TERMS.items()
        if task in config.distillation.losses
    }
    _start_write_backs(config, teachers)
    distiller = Distiller(config, model, teachers, terms, task_weights, task_losses=has_labels)
    if not has_labels:
        logger.info("the training data has no labels: distillation terms only, no task losses")
    logger.info("distillation alignment:\n%s", alignment_table(terms, teachers, config.data.img_size))
    return distiller
