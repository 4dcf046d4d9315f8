"""Feature maps as pictures: three principal directions of the teacher's map as RGB.

A teacher map and the student's adapted map of the same image are coloured with one
:class:`FeatureProjection`, fitted on the teacher alone (its valid cells): the same
mean, the same three directions and the same colour range. Where the student's map
looks like the teacher's, so do the pictures; where it differs, the student's colours
drift or saturate. The per-cell cosine between the two maps goes through a fixed
red-yellow-green colour map from -1 to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["FeatureProjection", "INVALID_COLOUR", "colour_cosine", "cosine_map", "enlarge"]

#: Colour of cells without a teacher value (padding, outside the teacher's view).
INVALID_COLOUR = (128, 128, 128)
# A direction whose spread is below this fraction of the first one's is noise, not structure.
_RELATIVE_RANK_TOLERANCE = 1e-6
# The colour range spans these quantiles of the teacher's values (robust to a few extreme cells).
_RANGE_QUANTILES = (0.005, 0.995)


def _cells(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[C, H, W]`` -> ``[H * W, C]`` float64."""
    array = features.detach().float().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    if array.ndim != 3:
        raise ValueError(f"a feature map must be [C, H, W], got shape {list(array.shape)}")
    return array.reshape(array.shape[0], -1).T.astype(np.float64)


def _valid_cells(valid: torch.Tensor | np.ndarray | None, count: int) -> np.ndarray:
    """A flat bool mask of ``count`` cells (all valid when None)."""
    if valid is None:
        return np.ones(count, dtype=bool)
    mask = valid.detach().cpu().numpy() if torch.is_tensor(valid) else np.asarray(valid)
    mask = mask.reshape(-1).astype(bool)
    if mask.size != count:
        raise ValueError(f"the valid mask has {mask.size} cells, the map {count}")
    return mask


@dataclass(frozen=True)
class FeatureProjection:
    """A map's cells -> RGB in [0, 1], fitted on a teacher map.

    Attributes:
        mean: ``[C]`` the teacher's mean vector.
        components: ``[3, C]`` its three principal directions (a zero row where the
            teacher has no spread: that colour channel stays at 0.5).
        low: ``[3]`` value of each direction that maps to colour 0.
        high: ``[3]`` value that maps to colour 1.
    """

    mean: np.ndarray
    components: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def fit(cls, teacher: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray | None = None) -> FeatureProjection:
        """Fit on the valid cells of a teacher map.

        Args:
            teacher: ``[C, H, W]``.
            valid: ``[H, W]`` (or ``[1, H, W]``) bool; None: every cell.
        """
        cells = _cells(teacher)
        kept = cells[_valid_cells(valid, len(cells))]
        channels = cells.shape[1]
        components = np.zeros((3, channels))
        mean = kept.mean(axis=0) if len(kept) else np.zeros(channels)
        if len(kept) >= 2:
            centred = kept - mean
            _, spreads, directions = np.linalg.svd(centred, full_matrices=False)
            for index in range(min(3, len(spreads))):
                if spreads[index] > spreads[0] * _RELATIVE_RANK_TOLERANCE and spreads[0] > 0:
                    direction = directions[index]
                    # NOTE: an SVD direction's sign is arbitrary; fixing it keeps colours stable between calls.
                    components[index] = direction * np.sign(direction[np.argmax(np.abs(direction))])
        projected = (kept - mean) @ components.T if len(kept) else np.zeros((1, 3))
        low, high = np.quantile(projected, _RANGE_QUANTILES, axis=0, method="nearest")
        return cls(mean=mean, components=components, low=low, high=high)

    def project(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Colours of a map's cells: ``[C, H, W]`` -> ``[H, W, 3]`` float in [0, 1].

        A direction without spread in the teacher gives 0.5; values beyond the teacher's
        range saturate at 0 or 1.
        """
        cells = _cells(features)
        if cells.shape[1] != self.mean.shape[0]:
            raise ValueError(f"the map has {cells.shape[1]} channels, the projection was fitted on {self.mean.shape[0]}")
        projected = (cells - self.mean) @ self.components.T
        span = self.high - self.low
        flat = np.abs(span) <= 1e-12
        colours = (projected - self.low) / np.where(flat, 1.0, span)
        colours[:, flat] = 0.5
        height, width = features.shape[-2:]
        return np.clip(colours, 0.0, 1.0).reshape(height, width, 3)

    def to_rgb(self, features: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        """``[H, W, 3]`` uint8 colours of a map, :data:`INVALID_COLOUR` where ``valid`` is False."""
        colours = np.rint(self.project(features) * 255).astype(np.uint8)
        height, width = colours.shape[:2]
        colours.reshape(-1, 3)[~_valid_cells(valid, height * width)] = INVALID_COLOUR
        return colours


def cosine_map(student: torch.Tensor, teacher: torch.Tensor) -> np.ndarray:
    """Per-cell cosine similarity of two ``[C, H, W]`` maps: ``[H, W]`` float in [-1, 1]."""
    similarity = torch.nn.functional.cosine_similarity(student.float(), teacher.float(), dim=0, eps=1e-8)
    return similarity.detach().cpu().numpy()


def colour_cosine(cosine: np.ndarray, valid: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """``[H, W]`` cosines -> ``[H, W, 3]`` uint8 (red -1, yellow 0, green 1; invalid cells grey)."""
    from matplotlib import colormaps

    colours = colormaps["RdYlGn"]((np.clip(cosine, -1.0, 1.0) + 1.0) / 2.0)[..., :3]
    rgb = np.rint(colours * 255).astype(np.uint8)
    rgb.reshape(-1, 3)[~_valid_cells(valid, cosine.size)] = INVALID_COLOUR
    return rgb


def enlarge(picture: np.ndarray, height: int) -> np.ndarray:
    """A ``[h, w, 3]`` uint8 picture scaled to ``height`` rows (aspect kept; nearest for small maps)."""
    source = Image.fromarray(picture)
    width = max(1, round(picture.shape[1] * height / picture.shape[0]))
    upscale = height >= picture.shape[0]
    resample = Image.Resampling.NEAREST if upscale else Image.Resampling.BILINEAR
    return np.asarray(source.resize((width, height), resample))
