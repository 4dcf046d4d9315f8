"""vfmkd: distil visual foundation models (SAM, SAM2, DINO) into small, fast students."""

__version__ = "0.1.0"
