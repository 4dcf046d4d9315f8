"""Shared helpers for the teacher tests: a non-square test image and weights that can fail a test."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn


def _randomise_constant_parameters(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Add noise to every parameter that is initialised to a constant.

    Official models start some tensors at zero or one (SAM's ``pos_embed`` and relative
    position tables, Hiera's position embeddings, norm weights and biases) and rely on the
    checkpoint for their values; a comparison at that init could not see them mishandled.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() < 2:
                continue
            low, high = torch.aminmax(parameter.detach())
            if bool(low == high):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def _max_abs_error(first: torch.Tensor, second: torch.Tensor) -> float:
    assert first.shape == second.shape, (tuple(first.shape), tuple(second.shape))
    return float((first.float() - second.float()).abs().max())


@pytest.fixture(scope="session")
def randomise_constant_parameters() -> Callable[..., None]:
    """``randomise(model, seed=0, scale=0.2)``: noise on every constant-initialised parameter."""
    return _randomise_constant_parameters


@pytest.fixture(scope="session")
def max_abs_error() -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``max_abs_error(first, second)``: largest absolute difference of two same-shaped tensors."""
    return _max_abs_error


@pytest.fixture(scope="session")
def non_square_image() -> np.ndarray:
    """An RGB uint8 ``[150, 230, 3]`` image: smooth gradients plus noise, wider than tall."""
    rng = np.random.default_rng(0)
    height, width = 150, 230
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    columns = np.linspace(0.0, 1.0, width)[None, :, None]
    base = 255.0 * np.concatenate([rows * np.ones((1, width, 1)), columns * np.ones((height, 1, 1)),
                                   0.5 * (rows + columns)], axis=2)
    noisy = base + rng.normal(0.0, 25.0, size=(height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.fixture
def cached_features(tmp_path: Path) -> Callable[..., dict[str, torch.Tensor]]:
    """``cached_features(teacher, image)``: the teacher's features of ``image`` written to a float32
    feature store (``vfmkd features extract``'s path) and read back, ``[1, C, h, w]`` each."""
    from PIL import Image

    from vfmkd.datasets import build_dataset
    from vfmkd.features.extract import extract_features

    def read_back(teacher: Any, image: np.ndarray) -> dict[str, torch.Tensor]:
        folder = tmp_path / "images"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / "image.png")
        dataset = build_dataset({"dataset": str(folder), "img_size": 64}, "train", train=False)
        store = extract_features(
            teacher, dataset, tmp_path / "store", dtype="float32", num_workers=0, progress=False, split="train"
        )
        return {name: torch.from_numpy(value)[None] for name, value in store.read("image").items()}

    return read_back
