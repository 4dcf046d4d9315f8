"""Curves of a run over optimizer steps, drawn with matplotlib (Agg, no display needed).

Three figures of small multiples, one panel per series, from ``metrics.jsonl``'s records:
the loss terms (``loss/total``, each task loss, each distillation term), the evaluation
metrics (box mAP, mask AP, mIoU, fidelity cosine and NMSE per pair, fitness) and the
optimisation signals (learning rate, gradient norm, images/s, data-wait share).
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

from vfmkd.report.run_files import eval_scalars

__all__ = ["eval_figure", "loss_figure", "optimisation_figure", "series"]

#: The training record fields of the optimisation figure, with their panel titles.
OPTIMISATION_FIELDS = {
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "images_per_second": "images / s",
    "data_time_share": "data-wait share",
}
_COLUMNS = 3
_PANEL_SIZE = (4.2, 2.6)  # inches
_DPI = 90


def series(
    records: Sequence[Mapping[str, Any]], kind: str, names: Sequence[str] | None = None
) -> dict[str, tuple[list[int], list[float]]]:
    """Per field of the records of one ``kind``: its steps and values (finite numbers only).

    Args:
        records: ``metrics.jsonl``'s records.
        kind: ``train`` or ``eval``.
        names: the fields to take (default: every scalar metric of an ``eval`` record).
    """
    found: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        if record.get("kind") != kind:
            continue
        values = eval_scalars(record) if names is None else {name: record.get(name) for name in names}
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps, points = found.setdefault(name, ([], []))
                steps.append(int(record.get("step", 0)))
                points.append(float(value))
    return found


def _figure(panels: Mapping[str, tuple[list[int], list[float]]], *, log_scale: Sequence[str] = ()) -> bytes | None:
    """A grid of one panel per series as PNG bytes; None without a series."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not panels:
        return None
    rows = math.ceil(len(panels) / _COLUMNS)
    columns = min(_COLUMNS, len(panels))
    figure = Figure(figsize=(_PANEL_SIZE[0] * columns, _PANEL_SIZE[1] * rows), dpi=_DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (name, (steps, values)) in zip(axes, panels.items()):
        # NOTE: markers for short series (an evaluation every few epochs gives a handful of points).
        axis.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3, linewidth=1.4)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name in log_scale and min(values) > 0:
            axis.set_yscale("log")
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def loss_figure(records: Sequence[Mapping[str, Any]]) -> bytes | None:
    """One panel per loss term (``loss/...``), total first; None without training records."""
    names = sorted(
        {name for record in records if record.get("kind") == "train" for name in record if name.startswith("loss/")}
    )
    names.sort(key=lambda name: (name != "loss/total", not name.startswith("loss/distill"), name))
    panels = {name[len("loss/"):]: values for name, values in series(records, "train", names).items()}
    return _figure(panels, log_scale=list(panels))


def eval_figure(records: Sequence[Mapping[str, Any]]) -> bytes | None:
    """One panel per evaluation metric; None without evaluation records."""
    return _figure(dict(sorted(series(records, "eval").items(), key=lambda item: _metric_order(item[0]))))


def _metric_order(name: str) -> tuple[int, str]:
    for rank, prefix in enumerate(("mAP", "mask_mAP", "miou", "fidelity", "fitness")):
        if name.startswith(prefix):
            return rank, name
    return 9, name


def optimisation_figure(records: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Learning rate, gradient norm, images/s and data-wait share over steps."""
    found = series(records, "train", list(OPTIMISATION_FIELDS))
    return _figure({title: found[name] for name, title in OPTIMISATION_FIELDS.items() if name in found})
