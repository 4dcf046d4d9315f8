"""The ``vfmkd report`` sub-command::

    vfmkd report RUN_DIR [--out FILE.html] [--images N] [--device auto] [--conf 0.25]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_report_command"]


def add_report_command(commands: Any) -> None:
    """Register ``report`` on the ``vfmkd`` sub-command parser."""
    report = commands.add_parser(
        "report", help="one self-contained HTML page of a run: curves, feature maps, predictions, per-class AP"
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run directory, e.g. runs/<experiment_name>")
    report.add_argument("--out", default=None, help="the HTML file (default RUN_DIR/report.html; PNGs beside it)")
    report.add_argument("--images", type=int, default=4, help="validation images to draw (default 4; 0: none)")
    report.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    report.add_argument("--conf", type=float, default=0.25, help="score floor of drawn detections (default 0.25)")
    report.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from vfmkd.report import write_report

    path = write_report(args.run_dir, args.out, images=args.images, device=args.device, conf=args.conf)
    sys.stdout.write(f"report: {path}\n")
    sys.stdout.flush()
    return 0
