"""vfmkd: distil visual foundation models (SAM, SAM2, DINO) into small, fast students."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Prediction", "Predictor", "predict"]

# NOTE: loaded on first use (PEP 562): `import vfmkd` and the `vfmkd` command stay light.
_LAZY = {"Prediction": "vfmkd.inference", "Predictor": "vfmkd.inference", "predict": "vfmkd.inference"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vfmkd' has no attribute '{name}'")
