"""The training loop: plain PyTorch with AMP, DDP, EMA, gradient accumulation and exact resume.

:class:`Trainer` takes built objects and runs optimizer steps; what happens around them
(LR schedule, close-mosaic, logging, evaluation, checkpoints, teacher write-back) is a
list of :mod:`~vfmkd.core.hooks`. The trained module returns the loss dict of a batch
(``model(batch) -> {name: loss}``, e.g. a
:class:`~vfmkd.distillation.distiller.DistilledModel`: the student's task losses and the
distillation terms); the trainer sums, backpropagates and logs them.

From a config (what ``vfmkd train`` does)::

    from vfmkd.config import load_config
    from vfmkd.core import build_trainer

    config = load_config("configs/experiments/yolov8n_shapes_detection.yaml", ["train.epochs=3"])
    result = build_trainer(config).train()      # or build_trainer(config, resume=True)
    print(result["metrics"]["mAP"], result["last"])

From Python objects, see README ("Training from Python").

Under ``torchrun --nproc_per_node=N`` the same code trains with DistributedDataParallel;
rank 0 logs, evaluates and writes checkpoints.

Reproducibility: every sample's augmentation draws from generators seeded by
``(seed, epoch, index)``, the sampler's order is a function of ``(seed, epoch)``, and the
learning rate is a function of the optimizer step, so a run resumed from ``last.pt``
continues exactly as the uninterrupted run would have (:mod:`vfmkd.core.loader`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from vfmkd.config import TrainConfig
from vfmkd.core.checkpoint import CheckpointError, load_checkpoint, load_training_state, restore_rng_state
from vfmkd.core.ema import ModelEMA
from vfmkd.core.guards import divergence_advice, nonfinite_names
from vfmkd.core.hooks import CheckpointHook, Hook
from vfmkd.core.loader import BatchMix, build_train_loader, release_workers, worker_failure
from vfmkd.datasets.collate import batch_to_device, collate_samples
from vfmkd.errors import TrainingDivergedError
from vfmkd.utils import distributed
from vfmkd.utils.amp import resolve_amp
from vfmkd.utils.logging import MetricLogger, log_to_file

__all__ = ["LossFunction", "LossFunctionModel", "ProcessContext", "Trainer", "TrainingDivergedError"]

logger = logging.getLogger(__name__)

LossFunction = Callable[[nn.Module, Any, dict[str, Any]], dict[str, torch.Tensor]]
HookType = TypeVar("HookType", bound=Hook)

# NOTE: SIGTERM is what schedulers (SLURM, Kubernetes) send before preempting a job;
# SIGUSR1 is SLURM's configurable early warning. Both end the run at the next step with a
# last.pt to resume from.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class ProcessContext:
    """This process's place in the run: rank, world size, device, and whether it owns the process group.

    Built by :func:`vfmkd.core.build.setup_process` (which also seeds and sets the
    determinism flags, before the model is built).
    """

    def __init__(self, dist_info: distributed.DistributedInfo, device: torch.device, owns_process_group: bool) -> None:
        self.dist_info = dist_info
        self.device = device
        self.owns_process_group = owns_process_group

    @classmethod
    def current(cls, device: str = "auto") -> ProcessContext:
        """Join the ``torchrun`` process group when there is one; pick the device."""
        owns = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        info = distributed.init_distributed()
        return cls(info, distributed.resolve_device(device, info.local_rank), owns)


class LossFunctionModel(nn.Module):
    """A student and a loss function trained as one: ``forward(batch) -> {name: loss}``.

    Args:
        student: the model; ``student(images)`` gives its outputs.
        loss_fn: ``loss_fn(student, outputs, batch) -> {name: scalar}``; an ``nn.Module``
            becomes a child (moved with the student, its parameters optimised with it;
            checkpoints keep the student only).
    """

    def __init__(self, student: nn.Module, loss_fn: LossFunction) -> None:
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss dict of a batch on the device."""
        return self.loss_fn(self.student, self.student(batch["images"]), batch)


class Trainer:
    """Runs optimizer steps over a training set, calling hooks around them.

    Args:
        model: the trained module, ``model(batch) -> {name: scalar loss}``, with the
            evaluated network as ``model.student``; moved to the device here.
        train_dataset: map-style training data set.
        optimizer: over ``model``'s parameters.
        settings: the ``train`` section (length, accumulation, AMP, EMA, clipping, seed).
        batch_size: micro-batch size per process.
        collate_fn: batches samples; default :func:`~vfmkd.datasets.collate.collate_samples`.
        num_workers: loader processes (capped to the CPU count).
        hooks: called around the steps, in this order (see :mod:`vfmkd.core.hooks`).
        process: rank, device and process group; default the current process
            (:meth:`ProcessContext.current`).
        run_dir: where ``train.log`` and ``metrics.jsonl`` go.
        batch_mix: unlabelled samples per batch (``data.unlabeled_ratio`` or ``unlabeled_batch_size``;
            ``batch_size`` counts both kinds); None: the data set's natural proportion.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        train_dataset: Dataset,
        optimizer: torch.optim.Optimizer,
        settings: TrainConfig,
        batch_size: int,
        collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None,
        num_workers: int = 0,
        hooks: Sequence[Hook] = (),
        process: ProcessContext | None = None,
        run_dir: str | Path = "runs/experiment",
        batch_mix: BatchMix | None = None,
    ) -> None:
        self.settings = settings
        self.process = process or ProcessContext.current(settings.device)
        self.rank = self.process.dist_info.rank
        self.world_size = self.process.dist_info.world_size
        self.is_main = self.rank == 0
        self.device = self.process.device
        self.run_dir = Path(run_dir)
        self.model: nn.Module = model.to(self.device)
        self.optimizer = optimizer
        self.autocast_enabled, self.autocast_dtype = resolve_amp(self.device, settings.amp, settings.amp_dtype)
        use_scaler = self.autocast_enabled and self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.ema = ModelEMA(self.model, settings.ema_decay, settings.ema_tau) if settings.ema else None

        self.train_dataset = train_dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn or collate_samples
        self.num_workers = min(num_workers, os.cpu_count() or 1)
        self.batch_mix = batch_mix
        self.sampler, self.train_loader, self.batches_per_epoch = self._build_loader()
        self.accumulate = settings.accumulate
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulate)
        self.total_steps = settings.max_steps or settings.epochs * self.steps_per_epoch

        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_fitness: float | None = None
        self.metrics: dict[str, Any] = {}
        self.skipped_steps = 0
        self.interrupted = False
        # Written by hooks: the evaluation hook sets evaluated / improved, the LR hook learning_rates.
        self.evaluated = self.improved = False
        self.learning_rates: dict[str, float] = {}
        self.step_values: dict[str, float] = {}
        self.step_images = self.step_labeled_images = 0
        self.step_data_time = 0.0
        self.metric_logger: Any = None
        self._consecutive_nonfinite = 0
        self._last_finite_loss: tuple[int, float] | None = None
        self._epoch_iterator: Any = None
        self._stop_requested = False

        self.train_model: nn.Module = self.model
        if self.world_size > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
            )
            # NOTE: same initial weights on every rank (seeded before the model was built), but
            # each rank gets its own stream afterwards, e.g. for dropout.
            torch.manual_seed(settings.seed + self.rank)
        self.hooks: list[Hook] = []
        for hook in hooks:
            hook.register(self)
            self.hooks.append(hook)

    # ----------------------------------------------------------------- accessors
    @property
    def finished(self) -> bool:
        """Whether the run has taken all its optimizer steps."""
        return self.step >= self.total_steps

    @property
    def evaluated_model(self) -> nn.Module:
        """The training model whose weights are evaluated: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def collective_device(self) -> torch.device:
        """Where tensors for collectives live (the GPU under NCCL)."""
        return self.device if self.process.dist_info.backend == "nccl" else torch.device("cpu")

    def find_hook(self, kind: type[HookType]) -> HookType | None:
        """The first registered hook of a type, or None."""
        return next((hook for hook in self.hooks if isinstance(hook, kind)), None)

    @property
    def last_path(self) -> Path | None:
        """``last.pt`` of the checkpoint hook (None without one)."""
        hook = self.find_hook(CheckpointHook)
        return hook.last_path if hook is not None else None

    @property
    def best_path(self) -> Path | None:
        """``best.pt`` of the checkpoint hook (None without one)."""
        hook = self.find_hook(CheckpointHook)
        return hook.best_path if hook is not None else None

    def rebuild_loader(self) -> None:
        """Build the training loader again (after the data set's transform changed)."""
        self.sampler, self.train_loader, _ = self._build_loader()

    def _build_loader(self) -> tuple[Any, Any, int]:
        return build_train_loader(
            self.train_dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            seed=self.settings.seed,
            rank=self.rank,
            world_size=self.world_size,
            pin_memory=self.device.type == "cuda",
            mix=self.batch_mix,
        )

    def _call(self, method: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, method)(*args)

    # ------------------------------------------------------------------- resume
    def resume(self, path: str | Path | None = None) -> dict[str, Any]:
        """Restore weights, optimizer, scaler, EMA, counters and generators from a checkpoint.

        Args:
            path: the checkpoint; default the checkpoint hook's ``last.pt``.

        Returns:
            The loaded checkpoint dict.
        """
        path = Path(path) if path is not None else self.last_path
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"resume: no checkpoint at {path}; train without --resume to start this run, "
                f"or set experiment_name / train.output_dir to the run you want to continue"
            )
        checkpoint = load_checkpoint(path, map_location=self.device)
        try:
            ema_restored = load_training_state(self.model, self.ema, checkpoint)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        if checkpoint.get("optimizer") is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None and not ema_restored:
            logger.warning("%s has no EMA weights; the EMA restarts from the current weights", path)
            self.ema = ModelEMA(self.model, self.settings.ema_decay, self.settings.ema_tau)
        self._restore_counters(checkpoint)
        self._call("load_state", checkpoint)
        rng_states = checkpoint.get("rng_state") or []
        if rng_states:
            restore_rng_state(rng_states[self.rank] if len(rng_states) == self.world_size else rng_states[0])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)
        return checkpoint

    def _restore_counters(self, checkpoint: Mapping[str, Any]) -> None:
        self.step = int(checkpoint["step"])
        self.epoch = int(checkpoint["epoch"])
        self.batch_in_epoch = int(checkpoint.get("batch_in_epoch", 0))
        saved_world_size = int(checkpoint.get("world_size", 1))
        if saved_world_size != self.world_size and self.batch_in_epoch:
            consumed = self.batch_in_epoch * saved_world_size
            self.batch_in_epoch = (consumed // self.world_size) // self.accumulate * self.accumulate
            logger.warning(
                "resuming with %d processes instead of %d: the rest of epoch %d sees a different data order",
                self.world_size,
                saved_world_size,
                self.epoch,
            )
        self.best_fitness = checkpoint.get("best_fitness")
        self.metrics = dict(checkpoint.get("metrics") or {})

    # --------------------------------------------------------------------- control
    def request_stop(self) -> None:
        """End the run after the current optimizer step, writing ``last.pt`` to resume from."""
        self._stop_requested = True

    def after_step(self) -> None:
        """Called after every optimizer step on every rank, before the hooks; subclasses add behaviour here."""

    def _handle_stop_signal(self, signal_number: int, frame: Any) -> None:
        logger.warning("received %s: stopping after this step and writing last.pt", signal.Signals(signal_number).name)
        self._stop_requested = True

    @contextlib.contextmanager
    def _stop_signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                number = getattr(signal, name)
                previous[number] = signal.signal(number, self._handle_stop_signal)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.collective_device)
        return bool(distributed.all_reduce_max(flag).item())

    # ------------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        """Run to ``epochs`` epochs or ``max_steps`` optimizer steps.

        ``max_steps``, when set, decides the length alone (epochs continue as needed).
        SIGTERM / SIGUSR1 or :meth:`request_stop` end the run after the current step
        (``trainer.interrupted``); the hooks then write ``last.pt``.

        Returns:
            ``run_dir``, ``last`` and ``best`` (checkpoint paths or None), ``metrics``
            (latest evaluation), ``best_fitness``, ``step``, ``epoch``, ``interrupted``,
            ``skipped_steps`` and ``is_main``.
        """
        try:
            return self._train()
        except (RuntimeError, OSError) as error:
            # NOTE: a sample that cannot be loaded, or a dead worker (PyTorch's SIGCHLD handler
            # raises wherever the process is, also in the clean-up): one clear error.
            failure = worker_failure(error, self._epoch_iterator)
            if failure is None:
                raise
            raise failure from None

    def _train(self) -> dict[str, Any]:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metric_logger = MetricLogger(self.run_dir, enabled=self.is_main)
        completed = False
        log_file = log_to_file(self.run_dir / "train.log") if self.is_main else contextlib.nullcontext()
        try:
            with log_file, self._stop_signal_handlers():
                self._call("before_train")
                self._log_start()
                self._run()
                self._call("after_train")
            completed = True
        finally:
            try:
                self._call("close", completed)
            finally:
                self.metric_logger.close()
                release_workers(getattr(self, "train_loader", None))
                if self.process.owns_process_group:
                    distributed.cleanup()
        last, best = self.last_path, self.best_path
        return {
            "run_dir": str(self.run_dir),
            "last": str(last) if last is not None and last.is_file() else None,
            "best": str(best) if best is not None and best.is_file() else None,
            "metrics": self.metrics,
            "best_fitness": self.best_fitness,
            "step": self.step,
            "epoch": self.epoch,
            "interrupted": self.interrupted,
            "skipped_steps": self.skipped_steps,
            "is_main": self.is_main,
        }

    def _run(self) -> None:
        while not self.finished:
            epoch_done = self._train_epoch()
            if epoch_done:
                self.epoch += 1
                self.batch_in_epoch = 0
                # NOTE: before the stop check, so a run stopped at an epoch boundary has done
                # what the uninterrupted run does there.
                self._call("after_epoch")
            if self.finished:
                break
            if self._should_stop():
                self.interrupted = True
                break

    def _log_start(self) -> None:
        parameters = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "training %s: %.2fM parameters on %s (x%d), %s, %d steps (%d per epoch, %d micro-batches "
            "of %d, accumulate %d), run dir %s",
            self.run_dir.name,
            parameters / 1e6,
            self.device,
            self.world_size,
            f"autocast {str(self.autocast_dtype).replace('torch.', '')}" if self.autocast_enabled else "fp32",
            self.total_steps,
            self.steps_per_epoch,
            self.batches_per_epoch,
            self.batch_size,
            self.accumulate,
            self.run_dir,
        )

    def _train_epoch(self) -> bool:
        """Train until the epoch ends, the run ends or a stop is requested; True if the epoch ended."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._call("before_epoch")
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.batch_in_epoch * self.batch_size)
        self.train_model.train()
        progress = tqdm(
            total=self.batches_per_epoch,
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}",
            disable=True if not self.is_main else None,
            leave=False,
            dynamic_ncols=True,
        )
        # NOTE: log lines go through tqdm.write while the bar is shown, so they do not break it.
        consoles = [
            candidate
            for candidate in (logging.getLogger(), logging.getLogger("vfmkd"))
            if any(type(handler) is logging.StreamHandler for handler in candidate.handlers)
        ]
        redirect = logging_redirect_tqdm(loggers=consoles) if consoles and not progress.disable else contextlib.nullcontext()
        try:
            with redirect:
                return self._run_epoch_steps(progress)
        finally:
            progress.close()

    def _run_epoch_steps(self, progress: Any) -> bool:
        iterator = self._epoch_iterator = iter(self.train_loader)
        started = time.perf_counter()
        images = 0
        while self.batch_in_epoch < self.batches_per_epoch:
            group_size = min(self.accumulate, self.batches_per_epoch - self.batch_in_epoch)
            self._call("before_step")
            self.step_values = self._optimizer_step(iterator, group_size, progress)
            self.after_step()
            self._call("after_step")
            images += self.step_images
            if not progress.disable:
                elapsed = max(time.perf_counter() - started, 1e-9)
                shown = {k: f"{v:.3g}" for k, v in self.step_values.items() if k not in ("bias_lr", "grad_norm")}
                shown["img/s"] = f"{images * self.world_size / elapsed:.1f}"
                progress.set_postfix(shown)
            if self.batch_in_epoch >= self.batches_per_epoch:
                return True
            if self.finished or self._should_stop():
                return False
        return True

    def _optimizer_step(self, iterator: Iterator[dict[str, Any]], group_size: int, progress: Any) -> dict[str, float]:
        """Forward/backward ``group_size`` micro-batches, then one optimizer step.

        Returns:
            Loss terms averaged over the group's micro-batches, plus ``total``, the
            learning rates and ``grad_norm``.
        """
        distributed_run = isinstance(self.train_model, nn.parallel.DistributedDataParallel)
        group_finite = True
        bad_terms: list[str] = []
        sums: dict[str, float] = {}
        self.step_images, self.step_labeled_images, self.step_data_time = 0, 0, 0.0
        for micro_batch in range(group_size):
            waited = time.perf_counter()
            batch = next(iterator)
            self.step_data_time += time.perf_counter() - waited
            self.step_labeled_images += _labeled_count(batch)
            batch = batch_to_device(batch, self.device)
            last_micro_batch = micro_batch == group_size - 1
            sync = self.train_model.no_sync() if distributed_run and not last_micro_batch else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_enabled):
                    losses = self.train_model(batch)
                total = sum(value.float() for value in losses.values())
                # NOTE: one device sync per micro-batch, for the finiteness check and the logs.
                reported = torch.stack([total.detach(), *(value.detach().float() for value in losses.values())]).tolist()
                finite = math.isfinite(reported[0])
                if distributed_run:
                    # every rank must take the same branch, or the gradient all-reduce hangs
                    flag = torch.tensor([float(finite)], device=self.collective_device)
                    finite = bool(distributed.all_reduce_min(flag).item())
                if finite:
                    self.scaler.scale(total / group_size).backward()
                else:
                    group_finite = False
                    # NOTE: "total" alone when the terms are finite but their sum is not, or under
                    # DDP when another rank's loss was the non-finite one.
                    bad_terms = [name for name, value in zip(losses, reported[1:]) if not math.isfinite(value)] or [
                        "total"
                    ]
            for name, value in zip(["total", *losses], reported):
                sums[name] = sums.get(name, 0.0) + value
            self.batch_in_epoch += 1
            self.step_images += batch["images"].shape[0]
            progress.update(1)
        values = {name: total_value / group_size for name, total_value in sums.items()}
        if group_finite:
            self._last_finite_loss = (self.step + 1, values["total"])
        grad_norm = self._apply_gradients(group_finite, "loss (" + ", ".join(bad_terms) + ")")
        self.step += 1
        values.update({key: self.learning_rates[key] for key in ("lr", "bias_lr") if key in self.learning_rates})
        values["grad_norm"] = grad_norm
        return values

    def _apply_gradients(self, finite: bool, bad_terms: str) -> float:
        """Unscale, clip and step (unless the loss or the gradient is not finite); the gradient norm.

        An fp16 grad scaler skips its own overflowing steps while it calibrates; those are
        normal and not counted. A step that leaves non-finite weights stops the run at once
        (before the EMA or a checkpoint sees them), as does a forward pass that leaves
        non-finite batch-norm statistics.
        """
        stepped = False
        grad_norm = float("nan")
        what = bad_terms
        if finite:
            self.scaler.unscale_(self.optimizer)
            max_norm = self.settings.grad_clip or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
            if self.scaler.is_enabled() or math.isfinite(grad_norm):
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = True
            else:
                what = "gradients of " + ", ".join(nonfinite_names(self.model, gradients=True))
        self.optimizer.zero_grad(set_to_none=True)
        # NOTE: also after a skipped step: the forward pass alone updates batch-norm statistics.
        broken = nonfinite_names(self.model, gradients=False)
        if broken:
            raise TrainingDivergedError(
                f"step {self.step + 1}: weights or statistics became non-finite ({', '.join(broken)}); they were "
                f"not saved. {self._divergence_advice()}"
            )
        if stepped:
            self._consecutive_nonfinite = 0
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            self._skip_step(what)
        return grad_norm

    def _skip_step(self, what: str) -> None:
        self.skipped_steps += 1
        self._consecutive_nonfinite += 1
        logger.warning(
            "step %d (epoch %d): non-finite %s; optimizer step skipped (%d in a row, %d in total)",
            self.step + 1, self.epoch, what, self._consecutive_nonfinite, self.skipped_steps,
        )
        if self._consecutive_nonfinite >= self.settings.max_bad_steps:
            raise TrainingDivergedError(
                f"{self._consecutive_nonfinite} optimizer steps in a row (train.max_bad_steps) were skipped, "
                f"the last for non-finite {what} (step {self.step + 1}, epoch {self.epoch}). "
                f"{self._divergence_advice()}"
            )

    def _divergence_advice(self) -> str:
        return divergence_advice(
            self._last_finite_loss, self.learning_rates.get("lr", self.settings.lr), self.settings.grad_clip,
            self.autocast_enabled, self.last_path,
        )


def _labeled_count(batch: Mapping[str, Any]) -> int:
    """Samples of a (CPU) batch with labels: ``targets["has_labels"]``, all when absent."""
    flags = (batch.get("targets") or {}).get("has_labels")
    return int(flags.sum()) if flags is not None else int(batch["images"].shape[0])

