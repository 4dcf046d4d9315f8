"""Feature distillation losses; importing this package registers them in ``vfmkd.registry.LOSSES``.

Every loss follows :class:`~vfmkd.distillation.losses.base.FeatureLoss`: built as
``LOSSES.build(name, student_channels=Cs, teacher_channels=Ct, **params)`` and called as
``loss(student [B, C, H, W], teacher [B, C, H, W], valid [B, 1, H, W], targets=None)``
on maps already aligned to one grid. Registered names: ``mse``, ``smooth_l1``,
``cosine``, ``cos_l1`` (:mod:`.pointwise`), ``kl``, ``cwd`` (:mod:`.distribution`),
``pkd``, ``mgd``, ``fgd``, ``bce`` (:mod:`.logits`, on logit maps).
"""

from vfmkd.distillation.losses.base import FeatureLoss, masked_softmax, samples_with_content, valid_cell_count
from vfmkd.distillation.losses.distribution import ChannelKLLoss, ChannelWiseDistillationLoss
from vfmkd.distillation.losses.fgd import FocalGlobalLoss, GlobalContextBlock, foreground_background_masks
from vfmkd.distillation.losses.logits import SoftBinaryCrossEntropyLoss
from vfmkd.distillation.losses.mgd import MaskedGenerativeLoss
from vfmkd.distillation.losses.pkd import PearsonFeatureLoss, standardise_per_sample
from vfmkd.distillation.losses.pointwise import (
    CosineFeatureLoss,
    CosineSmoothL1FeatureLoss,
    MSEFeatureLoss,
    SmoothL1FeatureLoss,
)

__all__ = [
    "ChannelKLLoss",
    "ChannelWiseDistillationLoss",
    "CosineFeatureLoss",
    "CosineSmoothL1FeatureLoss",
    "FeatureLoss",
    "FocalGlobalLoss",
    "GlobalContextBlock",
    "MSEFeatureLoss",
    "MaskedGenerativeLoss",
    "PearsonFeatureLoss",
    "SoftBinaryCrossEntropyLoss",
    "SmoothL1FeatureLoss",
    "foreground_background_masks",
    "masked_softmax",
    "samples_with_content",
    "standardise_per_sample",
    "valid_cell_count",
]
