"""The report's pictures in TensorBoard, after each evaluation of a training run.

:class:`TensorBoardPictures` is a trainer hook: whenever the
:class:`~vfmkd.core.hooks.EvalHook` has evaluated (a new ``trainer.metrics``), it draws
the first validation images as ``vfmkd report`` does (teacher vs student feature maps
per distillation pair, predictions beside the ground truth) with the evaluated weights
(the EMA's) and adds them to the run's TensorBoard (``images/features/...``,
``images/predictions/...``). ``vfmkd train`` and ``vfmkd demo`` add it with
``eval.tensorboard_images`` pictures (default 2); from Python::

    trainer = build_trainer(config, hooks=[TensorBoardPictures(2)])

It lives here, not in :mod:`vfmkd.core`, because the drawing is
:mod:`vfmkd.inference`'s, which itself builds on the core.
"""

from __future__ import annotations

import logging
from typing import Any

from vfmkd.core.checkpoint import capture_rng_state, restore_rng_state
from vfmkd.core.hooks import EvalHook, Hook
from vfmkd.utils.distributed import unwrap_model

__all__ = ["TensorBoardPictures"]

logger = logging.getLogger(__name__)


class TensorBoardPictures(Hook):
    """After each evaluation, the pictures of the first ``count`` validation images to TensorBoard (rank 0).

    Args:
        count: validation images drawn (0: none).
    """

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self._seen: Any = None

    def before_train(self) -> None:
        # NOTE: a resumed run starts with the checkpoint's metrics, which were drawn then.
        self._seen = self.trainer.metrics

    def after_epoch(self) -> None:
        self._draw_if_evaluated()

    def after_train(self) -> None:
        self._draw_if_evaluated()

    def _draw_if_evaluated(self) -> None:
        trainer = self.trainer
        if not self.count or not trainer.is_main or not trainer.metrics or trainer.metrics is self._seen:
            return
        self._seen = trainer.metrics
        evaluation = trainer.find_hook(EvalHook)
        if evaluation is None or evaluation.dataset is None:
            return
        from vfmkd.distillation.fidelity import FidelityEvaluator
        from vfmkd.report.pictures import log_pictures

        fidelity = next((item for item in evaluation.evaluators if isinstance(item, FidelityEvaluator)), None)
        # NOTE: loading samples draws from the global generators; the run (and its exact resume
        # from the checkpoint just written) must not see that.
        generators = capture_rng_state()
        try:
            log_pictures(
                lambda tag, image: trainer.metric_logger.log_image(tag, image, step=trainer.step),
                unwrap_model(trainer.evaluated_model),
                evaluation.dataset,
                count=self.count,
                device=trainer.device,
                fidelity=fidelity,
                collate_fn=evaluation.collate_fn,
            )
        except Exception as error:  # noqa: BLE001
            # NOTE: the pictures are a view on the run, never a reason to stop it.
            logger.warning("TensorBoard pictures are off for the rest of the run: %s: %s", type(error).__name__, error)
            self.count = 0
        finally:
            restore_rng_state(generators)
