"""Logging set-up and the metric logger (JSON lines + TensorBoard).

Library code logs through ``logging.getLogger(__name__)`` (under the ``vfmkd`` logger);
:func:`setup_logging` is for entry points. Metrics go through :class:`MetricLogger`: one
JSON object per line in ``metrics.jsonl`` (the record that scripts read back) and, when
the ``tensorboard`` package is installed, the same scalars under ``tb/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = ["MetricLogger", "log_to_file", "setup_logging"]

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    level: int = logging.INFO,
    *,
    log_file: str | Path | None = None,
    rank: int = 0,
) -> logging.Logger:
    """Configure the ``vfmkd`` logger once per process.

    Args:
        level: level of the main process; other ranks log warnings and errors only.
        log_file: also append the records to this file (main process only).
        rank: distributed rank of this process.

    Returns:
        The ``vfmkd`` logger.
    """
    package_logger = logging.getLogger("vfmkd")
    package_logger.setLevel(level if rank == 0 else logging.WARNING)
    if not any(getattr(handler, "_vfmkd_console", False) for handler in package_logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        prefix = "" if rank == 0 else f"[rank {rank}] "
        console.setFormatter(logging.Formatter(prefix + LOG_FORMAT, datefmt="%H:%M:%S"))
        console._vfmkd_console = True  # type: ignore[attr-defined]
        package_logger.addHandler(console)
        # NOTE: without this, a root handler set by basicConfig would print every record twice.
        package_logger.propagate = False
    if log_file is not None and rank == 0:
        log_path = Path(log_file).resolve()
        known = {getattr(handler, "baseFilename", None) for handler in package_logger.handlers}
        if str(log_path) not in known:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(log_path, encoding="utf-8")
            file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            package_logger.addHandler(file_handler)
    return package_logger


@contextlib.contextmanager
def log_to_file(path: str | Path, level: int = logging.INFO) -> Iterator[None]:
    """Append the ``vfmkd`` logger's records at ``level`` and above to ``path`` meanwhile.

    The logger's level is lowered to ``level`` if needed (and restored afterwards), so the
    file gets the records even when no entry point configured logging.
    """
    package_logger = logging.getLogger("vfmkd")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    previous_level = package_logger.level
    if package_logger.getEffectiveLevel() > level:
        package_logger.setLevel(level)
    package_logger.addHandler(handler)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        handler.close()
        package_logger.setLevel(previous_level)


def _json_safe(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become numbers, NaN/inf become null."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)


def _flatten_scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"per_class": {"cat": 0.5}}`` -> ``{"per_class/cat": 0.5}``, scalars only."""
    scalars: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            scalars.update(_flatten_scalars(value, f"{name}/"))
            continue
        value = _json_safe(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[name] = float(value)
    return scalars


class MetricLogger:
    """Write metrics as JSON lines and TensorBoard scalars.

    Args:
        run_dir: the run folder; writes ``run_dir/metrics.jsonl`` and ``run_dir/tb/``.
        enabled: ``False`` makes every call a no-op (non-main ranks).
        tensorboard: also write TensorBoard event files when the package is installed.

    Example::

        metrics = MetricLogger("runs/demo")
        metrics.log({"loss/total": 1.5, "lr": 0.01}, step=10, kind="train", epoch=0)
        metrics.close()
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._writer = self._open_tensorboard()

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError) as error:
            logger.warning("TensorBoard logging is off (%s); install 'tensorboard' to enable it", error)
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def log(self, metrics: Mapping[str, Any], *, step: int, kind: str = "train", **fields: Any) -> None:
        """Append one record.

        Args:
            metrics: named values; nested dicts (e.g. per-class AP) are kept in the JSON line
                and flattened to ``outer/inner`` TensorBoard tags.
            step: global optimizer step, the x axis of every plot.
            kind: record kind (``train``, ``eval``); the TensorBoard tag prefix.
            fields: extra JSON-only fields (e.g. ``epoch``).
        """
        if not self.enabled or self._file is None:
            return
        record = {"kind": kind, "step": int(step), **_json_safe(dict(fields)), **_json_safe(dict(metrics))}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for tag, value in _flatten_scalars(metrics).items():
                self._writer.add_scalar(f"{kind}/{tag}", value, global_step=step)

    def log_image(self, tag: str, image: Any, *, step: int) -> None:
        """Add a picture (``[H, W, 3]`` uint8 RGB) to TensorBoard; a no-op without TensorBoard.

        Args:
            tag: its name, e.g. ``predictions/0`` (under ``images/``).
            image: the picture.
            step: global optimizer step.
        """
        if self.enabled and self._writer is not None:
            self._writer.add_image(f"images/{tag}", image, global_step=step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the files (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
