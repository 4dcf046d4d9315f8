"""The planner reads what a loss needs from the loss class, never from its name."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytest
import torch

from tests.helpers.covariant_teacher import CHANNELS, CovariantTeacher
from vfmkd.config import ConfigError, validate_config
from vfmkd.distillation.losses import FeatureLoss
from vfmkd.distillation.plan import TermPlan, plan_distillation
from vfmkd.registry import LOSSES, TEACHERS
from vfmkd.teachers.base import FeatureSpec

STUDENT_DIMS = {"p3": 16, "p4": 32, "p5": 64}
STUDENT_STRIDES = {"p3": 8, "p4": 16, "p5": 32}
GLOBAL_TEACHER = "global_probe"


class GlobalProbeTeacher(CovariantTeacher):
    """The covariant probe plus a global vector ``cls`` (stride 0); only its specs are used here."""

    name = GLOBAL_TEACHER

    @property
    def available_specs(self) -> dict[str, FeatureSpec]:
        return {**super().available_specs, "cls": FeatureSpec("cls", CHANNELS, 0, 1, 1, "mean of embed")}


def global_probe(*, checkpoint: Any = None, features: Sequence[str] | None = None,
                 image_size: int | None = None) -> GlobalProbeTeacher:
    return GlobalProbeTeacher(features, image_size or 64)


class _SquaredError(FeatureLoss):
    def compute(self, student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor,
                targets: Mapping[str, Any] | None) -> torch.Tensor:
        return (student - teacher).square().mean()


class SpatialTestLoss(_SquaredError):
    needs_spatial_map = True


class ChannelMappingTestLoss(_SquaredError):
    maps_channels = True


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # NOTE: monkeypatch removes the registrations after each test.
    monkeypatch.setitem(TEACHERS._entries, GLOBAL_TEACHER, global_probe)
    monkeypatch.setitem(LOSSES._entries, "test_spatial", SpatialTestLoss)
    monkeypatch.setitem(LOSSES._entries, "test_maps_channels", ChannelMappingTestLoss)


def _plan(**entry: Any) -> list[TermPlan]:
    config = validate_config(
        {
            "teachers": {"probe": {"name": GLOBAL_TEACHER, "offline": False, "allow_random_init": True}},
            "distillation": {"losses": {"probe_term": {"teacher": "probe", "student": "p5", **entry}}},
        }
    )
    _, terms = plan_distillation(config, STUDENT_DIMS, STUDENT_STRIDES)
    return terms


@pytest.mark.parametrize("loss", ["test_spatial", "cwd", "fgd", "mgd"])
def test_a_loss_that_needs_a_spatial_map_is_refused_on_a_global_vector(loss: str) -> None:
    with pytest.raises(ConfigError, match=rf"probe_term: '{loss}' needs a spatial map; 'cls' is a global vector"):
        _plan(type=loss, feature="cls", adapter="conv1x1")


@pytest.mark.parametrize("loss", ["test_spatial", "mse"])
def test_global_vectors_are_fine_on_the_student_grid_or_for_pointwise_losses(loss: str) -> None:
    align_to = "student" if loss == "test_spatial" else "teacher"
    (term,) = _plan(type=loss, feature="cls", align_to=align_to)
    assert term.teacher_stride == 0 and term.loss_type == loss


@pytest.mark.parametrize("loss", ["test_maps_channels", "mgd"])
def test_a_loss_that_maps_channels_takes_adapter_none_with_unequal_channels(loss: str) -> None:
    (term,) = _plan(type=loss, feature="embed", adapter="none")
    assert (term.student_channels, term.teacher_channels, term.adapter) == (STUDENT_DIMS["p5"], CHANNELS, "none")


@pytest.mark.parametrize("loss", ["test_spatial", "cos_l1"])
def test_adapter_none_with_unequal_channels_is_refused_otherwise(loss: str) -> None:
    with pytest.raises(ConfigError, match=r"probe_term\.adapter: 'none' needs equal channels"):
        _plan(type=loss, feature="embed", adapter="none")


def test_a_loss_on_raw_logits_refuses_a_normalised_teacher() -> None:
    config = validate_config(
        {
            "teachers": {"probe": {"name": GLOBAL_TEACHER, "offline": False, "allow_random_init": True,
                                   "normalize": True}},
            "distillation": {"losses": {"probe_term": {"teacher": "probe", "student": "p5", "type": "bce",
                                                       "feature": "embed"}}},
        }
    )
    with pytest.raises(ConfigError, match=r"probe_term: 'bce' reads the teacher's raw logits.*normalize: false"):
        plan_distillation(config, STUDENT_DIMS, STUDENT_STRIDES)


def test_builtin_losses_declare_what_they_need() -> None:
    spatial = {name for name in LOSSES.names() if getattr(LOSSES.get(name), "needs_spatial_map", False)}
    assert [name for name in LOSSES.names() if getattr(LOSSES.get(name), "prompt_in_the_loop", False)] == ["mask_kd"]
    assert {"cwd", "fgd", "mgd"} <= spatial and not {"mse", "cos_l1", "kl", "pkd"} & spatial
    assert [name for name in ("mgd", "fgd", "cwd", "mse") if LOSSES.get(name).maps_channels] == ["mgd"]
    assert [name for name in ("mgd", "fgd", "cwd", "mse") if LOSSES.get(name).uses_boxes] == ["fgd"]
    assert [name for name in LOSSES.names() if getattr(LOSSES.get(name), "needs_raw_teacher", False)] == ["bce"]

