"""Distillation: teacher feature sources (offline / online), the distiller and the feature losses.

Importing :mod:`vfmkd.distillation.losses` registers the losses in ``vfmkd.registry.LOSSES``.
"""
