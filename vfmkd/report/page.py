"""The report as one self-contained HTML page: inline CSS, pictures as ``data:`` URIs, no URL.

:func:`render_html` lays out a :class:`ReportContent`; every text is escaped. Sections,
each with a stable ``id`` (tests and links find them): ``summary`` (and the
``random-teacher-banner`` above it when a teacher had random weights), ``alignment``,
``config``, ``curves``, ``features``, ``predictions``, ``per-class-ap``.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["Picture", "ReportContent", "SECTION_IDS", "render_html"]

#: The ``id`` of every section, top to bottom.
SECTION_IDS = ("summary", "alignment", "config", "curves", "features", "predictions", "per-class-ap")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px 32px;
       color: #1d1d1f; background: #ffffff; max-width: 1400px; }
h1 { font-size: 26px; margin: 0 0 4px 0; }
h2 { font-size: 20px; border-bottom: 2px solid #d0d7de; padding-bottom: 4px; margin-top: 32px; }
h3 { font-size: 15px; margin: 18px 0 6px 0; }
table { border-collapse: collapse; font-size: 14px; }
td, th { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 10px; font-size: 12px; overflow-x: auto; }
.banner { background: #c62828; color: #ffffff; font-size: 22px; font-weight: 700; padding: 18px 22px;
          margin: 14px 0; border: 4px solid #7f0000; }
.banner p { font-size: 15px; font-weight: 400; margin: 6px 0 0 0; }
.notes { color: #8a4b00; font-size: 14px; }
.subtitle { color: #57606a; font-size: 14px; margin: 0; }
figure { margin: 8px 0 16px 0; }
figcaption { font-size: 13px; color: #57606a; margin-top: 2px; }
.columns { display: flex; gap: 4px; font-size: 12px; font-weight: 600; color: #57606a; }
.columns span { flex: 1; }
img { image-rendering: pixelated; }
img.curve { image-rendering: auto; max-width: 100%; }
"""


@dataclass
class Picture:
    """A PNG of the report (written beside the page and embedded in it).

    Attributes:
        file_name: its file in the report's picture folder.
        png: the encoded PNG.
        caption: what it shows.
        width: its width in pixels (for the column titles above it).
    """

    file_name: str
    png: bytes
    caption: str
    width: int = 0


@dataclass
class ReportContent:
    """Everything the page shows (see :func:`vfmkd.report.write_report`)."""

    title: str
    summary: list[tuple[str, str]]
    random_teachers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alignment: str = ""
    config_text: str = ""
    curves: list[Picture] = field(default_factory=list)
    features: dict[str, list[Picture]] = field(default_factory=dict)
    feature_columns: Sequence[str] = ()
    predictions: list[Picture] = field(default_factory=list)
    prediction_columns: Sequence[str] = ()
    per_class_step: int | None = None
    per_class: list[tuple[str, float | None, float | None]] = field(default_factory=list)


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _image(picture: Picture, css_class: str = "") -> str:
    data = base64.b64encode(picture.png).decode("ascii")
    width = f' width="{picture.width}"' if picture.width else ""
    klass = f' class="{css_class}"' if css_class else ""
    return f'<img{klass}{width} src="data:image/png;base64,{data}" alt="{_text(picture.caption)}">'


def _figure(picture: Picture, columns: Sequence[str] = (), css_class: str = "") -> str:
    heading = ""
    if columns:
        style = f' style="width:{picture.width}px"' if picture.width else ""
        heading = f'<div class="columns"{style}>' + "".join(f"<span>{_text(c)}</span>" for c in columns) + "</div>"
    return f"<figure>{heading}{_image(picture, css_class)}<figcaption>{_text(picture.caption)}</figcaption></figure>"


def _banner(teachers: Sequence[str]) -> str:
    if not teachers:
        return ""
    return (
        '<div id="random-teacher-banner" class="banner">RANDOM TEACHER WEIGHTS: this run distilled noise'
        f"<p>{_text('; '.join(teachers))}. Its features mean nothing, so neither do the student's fidelity and "
        "maps below; the run only shows that the flow works. For real distillation download the weights "
        "(<code>vfmkd weights list</code>, <code>vfmkd weights download NAME</code>) and train again.</p></div>"
    )


def _summary(content: ReportContent) -> str:
    rows = "".join(f"<tr><th>{_text(label)}</th><td>{_text(value)}</td></tr>" for label, value in content.summary)
    notes = "".join(f"<li>{_text(note)}</li>" for note in content.notes)
    notes_html = f'<ul class="notes">{notes}</ul>' if notes else ""
    return f'<section id="summary"><h2>Run at a glance</h2><table>{rows}</table>{notes_html}</section>'


def _alignment_and_config(content: ReportContent) -> str:
    alignment = _text(content.alignment) if content.alignment else "no distillation pair (or the plan could not be rebuilt)"
    lines = content.config_text.count("\n")
    return (
        f'<section id="alignment"><h2>Alignment</h2><pre>{alignment}</pre></section>'
        f'<section id="config"><h2>Resolved config</h2><details><summary>config.yaml ({lines} lines)</summary>'
        f"<pre>{_text(content.config_text)}</pre></details></section>"
    )


def _curves(content: ReportContent) -> str:
    body = "".join(_figure(picture, css_class="curve") for picture in content.curves) or "<p>no records in metrics.jsonl</p>"
    return f'<section id="curves"><h2>Curves</h2>{body}</section>'


def _features(content: ReportContent) -> str:
    parts = []
    for pair, pictures in content.features.items():
        parts.append(f"<h3>{_text(pair)}</h3>" + "".join(_figure(p, content.feature_columns) for p in pictures))
    body = "".join(parts) or "<p>no feature pictures (see the notes above)</p>"
    intro = (
        '<p class="subtitle">Per distillation pair, on validation images: the teacher map and the student\'s adapted '
        "map in one PCA colouring fitted on the teacher (same colours: same features), and their per-cell cosine; "
        "grey cells have no teacher value.</p>"
    )
    return f'<section id="features"><h2>Teacher vs student features</h2>{intro}{body}</section>'


def _predictions(content: ReportContent) -> str:
    body = "".join(_figure(p, content.prediction_columns) for p in content.predictions) or "<p>no prediction pictures</p>"
    return f'<section id="predictions"><h2>Predictions</h2>{body}</section>'


def _number(value: float | None) -> str:
    return "&mdash;" if value is None else f"{value:.4f}"


def _per_class(content: ReportContent) -> str:
    if not content.per_class:
        return '<section id="per-class-ap"><h2>Per-class AP</h2><p>no per-class AP recorded</p></section>'
    rows = "".join(
        f"<tr><td>{_text(name)}</td><td class=\"number\">{_number(box)}</td><td class=\"number\">{_number(mask)}</td></tr>"
        for name, box, mask in content.per_class
    )
    return (
        f'<section id="per-class-ap"><h2>Per-class AP</h2><p class="subtitle">the evaluation at step '
        f"{content.per_class_step}; &mdash;: no ground truth of the class in the split, or no mask head</p>"
        f"<table><tr><th>class</th><th>box AP</th><th>mask AP</th></tr>{rows}</table></section>"
    )


def render_html(content: ReportContent) -> str:
    """The page's HTML text (UTF-8, no external resource)."""
    sections = [
        _banner(content.random_teachers),
        _summary(content),
        _alignment_and_config(content),
        _curves(content),
        _features(content),
        _predictions(content),
        _per_class(content),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_text(content.title)}</title><style>{_STYLE}</style></head><body>"
        f'<h1>{_text(content.title)}</h1><p class="subtitle">written by <code>vfmkd report</code></p>'
        + "".join(sections)
        + "</body></html>\n"
    )
