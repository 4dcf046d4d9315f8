"""The autocast setting of a device (mixed precision for training and inference)."""

from __future__ import annotations

import logging

import torch

__all__ = ["resolve_amp"]

logger = logging.getLogger(__name__)


def resolve_amp(device: torch.device, amp: bool, amp_dtype: str = "auto") -> tuple[bool, torch.dtype]:
    """The autocast setting of a device.

    Args:
        device: where the model runs.
        amp: mixed precision on or off.
        amp_dtype: ``auto`` (bf16 on CPU, fp16 on CUDA), ``bf16`` or ``fp16``.

    Returns:
        ``(enabled, dtype)``. CPU autocast always uses bf16; CUDA bf16 falls back to fp16
        (with a warning) on GPUs without bf16.
    """
    if not amp:
        return False, torch.float32
    if device.type == "cuda":
        if amp_dtype == "bf16":
            if torch.cuda.is_bf16_supported():
                return True, torch.bfloat16
            logger.warning("train.amp_dtype=bf16 but this GPU has no bf16 support; using fp16")
        return True, torch.float16
    if device.type == "cpu":
        if amp_dtype == "fp16":
            logger.warning("train.amp_dtype=fp16 is not used on CPU; CPU autocast runs in bf16")
        return True, torch.bfloat16
    logger.warning("mixed precision is not supported on device '%s'; running in fp32", device)
    return False, torch.float32
