"""The teacher side of distillation at run time: teacher maps for a batch, and write-back.

A :class:`TeacherRuntime` serves every (teacher, feature, grid) map the distillation
terms need for a batch, in the student's frame: offline samples from the store rows the
data loader workers read and warped, online samples from a live teacher pass on the
augmented images. Teachers are built on first use and never become module children, so
their weights reach neither the optimizer nor a checkpoint. With ``write_back: true`` on
a teacher, it also fills that teacher's store during training
(:mod:`vfmkd.distillation.write_back`); :meth:`TeacherRuntime.end_epoch` and
:meth:`TeacherRuntime.end_training` commit what was written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from vfmkd.config import ConfigError, ExperimentConfig
from vfmkd.datasets import resolve_dataset
from vfmkd.distillation.plan import TeacherPlan, TermPlan, term_grid_stride
from vfmkd.distillation.mask_kd import MaskTermPlan
from vfmkd.distillation.mask_prompts import DecoderRecord
from vfmkd.distillation.sources import (
    OFFLINE_KEY,
    WRITE_BACK_KEY,
    OfflinePlan,
    offline_features,
    online_features,
    student_input_region,
)
from vfmkd.distillation.write_back import StoreWriteBack
from vfmkd.features.extract import cpu_preprocessor
from vfmkd.features.format import FeatureStoreError, StoreHeader, describe_differences
from vfmkd.features.store import FeatureStore
from vfmkd.geometry import Frame
from vfmkd.ops.prompt_decoder import DECODER_FEATURES, PromptDecoder, prompt_family
from vfmkd.teachers import build_teacher_from_config
from vfmkd.utils.distributed import all_gather_object, barrier, get_rank

logger = logging.getLogger(__name__)

__all__ = ["TeacherRuntime", "start_write_backs"]

# An image to check that the teacher's light CPU preprocessing copy matches the teacher.
_PROBE_IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def _grid_size(stride: int, height: int, width: int) -> tuple[int, int]:
    """The student grid of a term at ``stride`` (1 x 1 for global vectors, stride 0)."""
    return (1, 1) if stride == 0 else (height // stride, width // stride)


class TeacherRuntime:
    """Teacher maps for the distillation terms, offline or online, and the write-back lifecycle.

    Shared, never copied: a deep copy (the EMA model's) returns this same object, since it
    holds open stores, live teachers and store locks.

    Args:
        teachers: resolved teachers from :func:`~vfmkd.distillation.plan.plan_distillation`.
        terms: resolved terms (which features, on which grids).
        mask_terms: resolved ``mask_kd`` terms (their teachers' decoder inputs are read too).
    """

    def __init__(
        self, teachers: Mapping[str, TeacherPlan], terms: list[TermPlan], mask_terms: Sequence[MaskTermPlan] = ()
    ) -> None:
        self.teacher_plans = dict(teachers)
        self.terms = list(terms)
        self.mask_terms = list(mask_terms)
        self._online: dict[str, Any] = {}
        self._decoders: dict[str, PromptDecoder] = {}
        # The last batch's online teacher pass per teacher: (images, rows, features, frames).
        self._online_pass: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[Frame]]] = {}
        self._statistics: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._write_backs = {key: plan.write_back for key, plan in teachers.items() if plan.write_back is not None}

    def __deepcopy__(self, memo: dict[int, Any]) -> "TeacherRuntime":
        return self

    # ------------------------------------------------------------------ data side
    def offline_plans(self) -> list[OfflinePlan]:
        """What the data loader workers read (and prepare for write-back), per teacher with a store."""
        plans = []
        for key, plan in self.teacher_plans.items():
            if plan.store is None or (plan.offline_ratio == 0.0 and plan.write_back is None):
                continue
            features = tuple(sorted(self.features_of(key)))
            preprocess = None
            if plan.write_back is not None:
                teacher = plan.teacher if plan.teacher is not None else self._online[key]
                preprocess = cpu_preprocessor(teacher, _PROBE_IMAGE)
            plans.append(OfflinePlan(key, str(plan.config.feature_path), features, plan.offline_ratio, preprocess))
        return plans

    def features_of(self, key: str) -> set[str]:
        """The features of teacher ``key`` that the terms use (mask terms: the decoder's inputs)."""
        features = {term.feature for term in self.terms if term.teacher == key}
        for term in self.mask_terms:
            if term.teacher == key:
                features.update(term.features)
        return features

    # --------------------------------------------------------------- teacher side
    def online_teacher(self, key: str, device: torch.device) -> Any:
        """The teacher for online samples, built (and its weights loaded) on first use."""
        teacher = self._online.get(key)
        if teacher is None:
            plan = self.teacher_plans[key]
            features = sorted(self.features_of(key))
            teacher = plan.teacher
            if teacher is None:
                teacher = build_teacher_from_config(key, plan.config, features=features)
            teacher = teacher.to(device)
            if plan.store is not None:
                _check_store_matches(key, plan.store, teacher)
            # NOTE: the runtime is no module, so teacher weights never reach the optimizer,
            # the EMA or a checkpoint.
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
                needed.setdefault(term.teacher, set()).add((term.feature, term_grid_stride(term)))
        offline = batch.get(OFFLINE_KEY, {})
        targets = {}
        for teacher, requests in needed.items():
            grids = {request: _grid_size(request[1], height, width) for request in sorted(requests)}
            results, online_rows = self._offline_targets(teacher, offline.get(teacher), grids, batch_size, device)
            if len(online_rows):
                teacher_model = self.online_teacher(teacher, device)
                requests_list = [(feature, grid, stride) for (feature, stride), grid in grids.items()]
                computed = online_features(
                    teacher_model,
                    images[online_rows],
                    [batch["frames"][row] for row in online_rows.tolist()],
                    requests_list,
                    computed=self._teacher_pass(teacher, teacher_model, images, online_rows),
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

    def _offline_targets(
        self,
        teacher: str,
        record: dict[str, Any] | None,
        grids: dict[tuple[str, int], tuple[int, int]],
        batch_size: int,
        device: torch.device,
    ) -> tuple[dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per (feature, grid stride): ``[B, C, Hg, Wg]`` maps and valid masks holding the
        batch's offline rows (zeros elsewhere), and the rows left to the live teacher."""
        spec_of = self.teacher_plans[teacher].specs
        rows = record["samples"].to(device) if record is not None else torch.zeros(0, dtype=torch.int64, device=device)
        warped: list[tuple[torch.Tensor, torch.Tensor]] = []
        if len(rows):
            requests = [(feature, spec_of[feature].stride, grid, stride) for (feature, stride), grid in grids.items()]
            rows, warped = offline_features(record, requests, batch_size, device)  # type: ignore[arg-type]
        if len(rows) == batch_size:  # all offline: rows are 0..B-1 in order
            return dict(zip(grids, warped)), rows[:0]
        results = {}
        for (feature, stride), grid in grids.items():
            maps = torch.zeros((batch_size, spec_of[feature].channels, *grid), dtype=torch.float32, device=device)
            results[(feature, stride)] = (maps, torch.zeros((batch_size, 1, *grid), dtype=torch.bool, device=device))
        for request, (maps, valid) in zip(grids, warped):
            results[request][0][rows], results[request][1][rows] = maps, valid
        online = torch.ones(batch_size, dtype=torch.bool, device=device)
        online[rows] = False
        return results, online.nonzero().flatten()

    def _teacher_pass(
        self, key: str, teacher: Any, images: torch.Tensor, rows: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], list[Frame]]:
        """The teacher's features and frames on images ``rows`` (student inputs), once per batch."""
        cached = self._online_pass.get(key)
        if cached is not None and cached[0] is images and torch.equal(cached[1], rows):
            return cached[2], cached[3]
        pixels, frames = teacher.preprocess_tensor(images[rows])
        features = teacher.extract(pixels)
        self._online_pass[key] = (images, rows, features, frames)
        return features, frames

    def prompt_decoder(self, key: str, device: torch.device) -> PromptDecoder:
        """Teacher ``key``'s prompt encoder and mask decoder.

        Loaded alone from ``model_path`` (the image encoder never built) unless the live
        teacher exists already or has random weights (then its own decoder).
        """
        decoder = self._decoders.get(key)
        if decoder is None:
            plan = self.teacher_plans[key]
            family = prompt_family(plan.registry_name)
            weights = plan.config.model_path
            live = self._online.get(key) or plan.teacher
            if live is None and weights and Path(weights).is_file():
                embed = plan.specs["embed"]
                image_size = max(embed.height, embed.width) * embed.stride
                decoder = PromptDecoder.from_checkpoint(family, weights, image_size=image_size).to(device)
                logger.info("teachers.%s: prompt encoder and mask decoder loaded from %s (no image encoder)", key, weights)
            else:
                decoder = (live if live is not None else self.online_teacher(key, device)).to(device).prompt_decoder()
            self._decoders[key] = decoder
        return decoder

    def decoder_records(self, batch: dict[str, Any], device: torch.device, key: str) -> list[list[DecoderRecord]]:
        """Per batch image, its source images as teacher ``key`` saw them, with the decoder's input features.

        Offline images: one record per stored source image (a mosaic's tiles), read from
        the batch's store rows; online images: one record from the live teacher's pass on
        the augmented image (shared with :meth:`teacher_targets` in the same step).
        """
        names = sorted(self.features_of(key) & set(DECODER_FEATURES[prompt_family(self.teacher_plans[key].registry_name)]))
        images = batch["images"]
        records: list[list[DecoderRecord]] = [[] for _ in range(images.shape[0])]
        record = batch.get(OFFLINE_KEY, {}).get(key)
        offline_rows: set[int] = set()
        if record is not None:
            offline_rows = set(record["samples"].tolist())
            for tile, row in enumerate(record["tile_sample"].tolist()):
                features = {name: record["features"][name][tile : tile + 1].to(device).float() for name in names}
                records[row].append(DecoderRecord(features, record["teacher_frames"][tile], record["student_frames"][tile]))
        online = torch.tensor([row for row in range(images.shape[0]) if row not in offline_rows], dtype=torch.int64, device=device)
        if len(online):
            with torch.no_grad():
                features, frames = self._teacher_pass(key, self.online_teacher(key, device), images, online)
            height, width = images.shape[-2:]
            for position, row in enumerate(online.tolist()):
                student_frame = Frame.identity(height, width).then(
                    np.eye(2, 3), (height, width), valid=student_input_region(batch["frames"][row])
                )
                maps = {name: features[name][position : position + 1].float() for name in names}
                records[row].append(DecoderRecord(maps, frames[position], student_frame))
        return records

    def __call__(
        self, batch: dict[str, Any], device: torch.device, teachers: set[str] | None = None
    ) -> dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]]:
        """Write back what the batch offers, then :meth:`teacher_targets` (no gradient)."""
        self._online_pass.clear()
        if WRITE_BACK_KEY in batch and self._write_backs:
            self._write_back(batch[WRITE_BACK_KEY], device)
        with torch.no_grad():
            return self.teacher_targets(batch, device, teachers)

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



def _check_store_matches(key: str, store: Any, teacher: Any) -> None:
    """A store made with other weights, preprocessing or specs than the live teacher is refused."""

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


def start_write_backs(config: ExperimentConfig, teachers: Mapping[str, TeacherPlan]) -> None:
    """Open (or create) the store of every teacher with ``write_back`` for writing.

    A store that does not exist yet is made as ``vfmkd features extract`` would make it for
    the training split: float16, the teacher's features and fingerprint.
    """

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

    try:
        return str(resolve_dataset(dataset).source.resolve())
    except Exception:  # noqa: BLE001 - only a manifest field; the trainer reports data problems
        return None

