"""How feature values are stored on disk: float16, bfloat16, float32 or int8.

Every codec turns float32 maps ``[N, C, H, W]`` into one stored array of the same shape
(and, for ``int8``, a per-sample per-channel scale ``[N, C]``) and back into float32, or
into float16 for readers that train in half precision (:data:`DECODE_DTYPES`): the
``float16`` codec then copies its stored bytes as they are; the others decode and cast
(values beyond +-65504 become +-inf, precision is float16's).

- ``float16`` (default): IEEE half; values beyond +-65504 cannot be stored (the writer
  refuses them and names ``bfloat16``).
- ``bfloat16``: the upper 16 bits of the float32 value, rounded to nearest even, kept as
  ``uint16`` (numpy has no bfloat16); decoding shifts them back into a float32.
- ``float32``: the values as they are.
- ``int8``: symmetric per-sample per-channel quantisation, ``scale = max|x| / 127`` over
  the channel's ``H x W`` values, ``x ~ round(x / scale) * scale``.

Decoding goes through torch, whose half / bfloat16 to float32 conversion is vectorised
(numpy's float16 cast is about ten times slower and would dominate a store read).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import DTypeLike

__all__ = [
    "CODEC_NAMES",
    "Codec",
    "DECODE_DTYPES",
    "FLOAT16_MAX",
    "bfloat16_bits_to_float32",
    "decode_dtype",
    "float32_to_bfloat16_bits",
    "get_codec",
]

CODEC_NAMES = ("float16", "bfloat16", "float32", "int8")
# What stored maps can be decoded into.
DECODE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
FLOAT16_MAX = float(np.finfo(np.float16).max)
INT8_LEVELS = 127
# A quiet NaN in bfloat16 bits (sign 0, exponent all ones, top mantissa bit set).
_BFLOAT16_NAN = np.uint16(0x7FC0)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the bits.

    Args:
        values: float32 array of any shape.

    Returns:
        uint16 array of the same shape: the upper half of each rounded float32.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds to nearest, ties to even; finite
    # values that round past the largest bfloat16 become infinity as they should.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    result = rounded.astype(np.uint16)
    not_a_number = np.isnan(values)
    if not_a_number.any():
        result[not_a_number] = _BFLOAT16_NAN
    return result


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 bits (exact).

    Args:
        bits: uint16 array of any shape.

    Returns:
        float32 array of the same shape.
    """
    return _to_float32_torch(bits, bfloat16=True)


_readonly_warning_consumed = False


def _torch_view(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` that keeps quiet about read-only memory maps.

    NOTE: store arrays are read-only memory maps; torch warns once per process that it
    cannot protect them from writes (nothing here writes to them). That one warning is
    consumed under ``catch_warnings`` on the first call, so later calls need no
    (thread-unsafe) filter changes.
    """
    global _readonly_warning_consumed
    if not _readonly_warning_consumed and not array.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        _readonly_warning_consumed = True
        return tensor
    return torch.from_numpy(array)


def _stored_tensor(stored: np.ndarray, *, bfloat16: bool = False) -> torch.Tensor:
    """A torch view of stored values (bfloat16 bits viewed as ``torch.bfloat16``)."""
    stored = np.asarray(stored)
    if bfloat16:
        return _torch_view(stored.view(np.int16)).view(torch.bfloat16)
    return _torch_view(stored)


def _to_float32_torch(stored: np.ndarray, *, bfloat16: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    output = np.empty(np.shape(stored), dtype=np.float32) if out is None else out
    torch.from_numpy(output).copy_(_stored_tensor(stored, bfloat16=bfloat16))
    return output


def decode_dtype(dtype: DTypeLike) -> np.dtype:
    """``dtype`` as a numpy dtype, if maps can be decoded into it (float32 or float16)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in DECODE_DTYPES:
        raise ValueError(f"stored features decode to float32 or float16 (numpy dtypes), not {dtype!r}")
    return resolved


@dataclass(frozen=True)
class Codec:
    """One storage format.

    Attributes:
        name: one of :data:`CODEC_NAMES`.
        storage_dtype: numpy dtype of the stored array.
        has_scale: whether a per-sample per-channel float32 scale ``[N, C]`` is stored too.
    """

    name: str
    storage_dtype: np.dtype
    has_scale: bool

    @property
    def bytes_per_value(self) -> int:
        """Stored bytes per feature value (the scale of ``int8`` not counted)."""
        return int(np.dtype(self.storage_dtype).itemsize)

    def bytes_per_sample(self, channels: int, height: int, width: int) -> int:
        """Stored bytes of one sample's ``[C, H, W]`` map, scale included."""
        scale_bytes = channels * 4 if self.has_scale else 0
        return channels * height * width * self.bytes_per_value + scale_bytes

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Encode float32 maps.

        Args:
            values: float32 ``[N, C, H, W]``, finite.

        Returns:
            The stored array ``[N, C, H, W]`` (``storage_dtype``) and, for ``int8``, the
            float32 scale ``[N, C]`` (None otherwise).
        """
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self.name == "float32":
            return values, None
        if self.name == "float16":
            return values.astype(np.float16), None
        if self.name == "bfloat16":
            return float32_to_bfloat16_bits(values), None
        # int8: symmetric, one scale per sample and channel.
        maximum = np.abs(values).max(axis=(2, 3)) if values.size else np.zeros(values.shape[:2], np.float32)
        scale = (maximum / INT8_LEVELS).astype(np.float32)
        safe_scale = np.where(scale > 0, scale, np.float32(1.0))
        quantised = np.rint(values / safe_scale[:, :, None, None])
        np.clip(quantised, -INT8_LEVELS, INT8_LEVELS, out=quantised)
        return quantised.astype(np.int8), scale

    def decode(
        self, stored: np.ndarray, scale: np.ndarray | None = None, dtype: DTypeLike = np.float32
    ) -> np.ndarray:
        """Decode stored maps.

        Args:
            stored: ``[..., C, H, W]`` in ``storage_dtype`` (e.g. one memory-mapped row).
            scale: ``[..., C]`` float32, for ``int8`` only.
            dtype: float32 (default) or float16 (see :meth:`decode_into`).

        Returns:
            A new array of the same shape as ``stored``.
        """
        return self.decode_into(stored, np.empty(np.shape(stored), dtype=decode_dtype(dtype)), scale)

    def decode_into(self, stored: np.ndarray, out: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Decode stored maps into ``out``.

        A float16 ``out`` gets the stored bytes copied as they are from the ``float16``
        codec (a plain memcpy); the other codecs decode and cast to float16, so values
        beyond +-65504 become +-inf.

        Args:
            stored: ``[..., C, H, W]`` in ``storage_dtype``.
            out: float32 or float16 array of the same shape (written; returned).
            scale: ``[..., C]`` float32, for ``int8`` only.

        Returns:
            ``out``.
        """
        if out.shape != np.shape(stored) or out.dtype not in DECODE_DTYPES:
            raise ValueError(f"out must be float32 or float16 {np.shape(stored)}, got {out.dtype} {out.shape}")
        if self.name == "int8" and scale is None:
            raise ValueError("the int8 codec needs the per-channel scale to decode")
        if out.dtype == np.float16:
            if self.name == "float16":
                np.copyto(out, stored)
            elif self.name == "int8":
                torch.from_numpy(out).copy_(torch.from_numpy(self.decode(stored, scale)))
            else:
                # NOTE: torch casts bfloat16 / float32 to half directly (and vectorised).
                torch.from_numpy(out).copy_(_stored_tensor(stored, bfloat16=self.name == "bfloat16"))
            return out
        _to_float32_torch(stored, bfloat16=self.name == "bfloat16", out=out)
        if self.name == "int8":
            out *= np.asarray(scale, dtype=np.float32)[..., None, None]
        return out


_CODECS = {
    "float16": Codec("float16", np.dtype(np.float16), False),
    "bfloat16": Codec("bfloat16", np.dtype(np.uint16), False),
    "float32": Codec("float32", np.dtype(np.float32), False),
    "int8": Codec("int8", np.dtype(np.int8), True),
}


def get_codec(name: str) -> Codec:
    """The codec called ``name``; an unknown name lists the known ones."""
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(f"unknown feature codec '{name}'; known: {', '.join(CODEC_NAMES)}") from None
