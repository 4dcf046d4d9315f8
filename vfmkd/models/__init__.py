"""Student models: backbones, necks, heads and the unified model built from config."""

from vfmkd.models.unified_model import UnifiedModel, build_model, load_weights

__all__ = ["UnifiedModel", "build_model", "load_weights"]
