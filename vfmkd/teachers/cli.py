"""Command-line layer for teacher checkpoints (the one place here that writes to stdout).

``vfmkd weights list`` and ``vfmkd weights download NAME`` come from
:func:`add_weights_commands`; the seed's scripts ``tools/download_sam_weights.py`` and
``tools/download_models.py`` call :func:`download_sam_weights_main` and
:func:`download_models_main`. Handlers return exit codes: 0 done, 1 a download failed,
2 a wrong name.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from vfmkd.teachers import canonical_teacher_name
from vfmkd.teachers.weights import DEFAULT_WEIGHTS_DIR, WEIGHTS, WeightsDownloadError, download_weights

__all__ = [
    "DEFAULT_MODELS",
    "SAM_MODELS",
    "add_weights_commands",
    "download_models_main",
    "download_sam_weights_main",
    "format_weights_table",
]

Writer = Callable[[str], None]

# The seed's workflow: distil SAM 2.1 B+ and DINOv2 B/14.
DEFAULT_MODELS = ("sam2.1_hiera_b+", "dinov2_vitb14")
SAM_MODELS = {"vit_b": "sam_vit_b", "vit_l": "sam_vit_l", "vit_h": "sam_vit_h"}


def _stdout(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _size_text(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} B"


def format_weights_table(weights_dir: str | Path = DEFAULT_WEIGHTS_DIR) -> str:
    """The table of ``vfmkd weights list``: name, file, size, licence, present in ``weights_dir``."""
    weights_dir = Path(weights_dir)
    header = ("name", "file", "size", "licence", "present")
    rows = [
        (
            entry.name,
            entry.file_name,
            _size_text(entry.size_bytes),
            entry.licence + ("" if entry.url else " (gated)"),
            "yes" if (weights_dir / entry.file_name).is_file() else "no",
        )
        for entry in WEIGHTS.values()
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.append(f"(present: found in {weights_dir}/)")
    return "\n".join(lines)


def _resolve(name: str) -> str:
    """A teacher name or alias -> its key in WEIGHTS; unknown names raise KeyError listing them."""
    if name in WEIGHTS:
        return name
    canonical = canonical_teacher_name(name)
    if canonical not in WEIGHTS:
        raise KeyError(f"no official checkpoint is known for '{name}'. Known: {', '.join(WEIGHTS)}")
    return canonical


def _download_one(name: str, *, weights_dir: str | Path, url: str | None, progress: bool,
                  write: Writer, error: Writer) -> int:
    try:
        canonical = _resolve(name)
    except KeyError as failure:
        error(f"error: {failure.args[0]}")
        return 2
    entry = WEIGHTS[canonical]
    destination = Path(weights_dir) / entry.file_name
    if destination.is_file():
        write(f"{canonical}: {destination} is already present")
        return 0
    try:
        path = download_weights(canonical, weights_dir=weights_dir, url=url, progress=progress)
    except WeightsDownloadError as failure:
        error(f"error: {canonical}: {failure}")
        return 1
    write(f"{canonical}: downloaded {path}")
    return 0


def _cmd_list(args: argparse.Namespace, write: Writer) -> int:
    write(format_weights_table(args.dir))
    return 0


def _cmd_download(args: argparse.Namespace, write: Writer, error: Writer) -> int:
    return _download_one(args.name, weights_dir=args.dir, url=args.url, progress=not args.quiet,
                         write=write, error=error)


def add_weights_commands(
    subparsers: argparse._SubParsersAction,
    *,
    write: Writer | None = None,
    error: Writer | None = None,
) -> argparse.ArgumentParser:
    """Add ``weights list`` and ``weights download NAME [--dir D] [--url U]`` to a CLI.

    Each sub-command stores its handler as ``handler(args) -> exit code``.

    Args:
        subparsers: the ``add_subparsers()`` object of the ``vfmkd`` parser.
        write: where normal output goes (default: stdout).
        error: where error messages go (default: stderr).

    Returns:
        The ``weights`` parser.
    """
    write = write or _stdout
    error = error or _stderr
    weights = subparsers.add_parser("weights", help="official teacher checkpoints: list, download")
    commands = weights.add_subparsers(dest="weights_command", required=True)

    listing = commands.add_parser("list", help="every official checkpoint and whether it is in weights/")
    listing.add_argument("--dir", default=DEFAULT_WEIGHTS_DIR, help="weights folder (default: weights)")
    listing.set_defaults(handler=partial(_cmd_list, write=write))

    download = commands.add_parser("download", help="download one checkpoint (resumes, verifies)")
    download.add_argument("name", help="teacher name or alias, e.g. sam2.1_hiera_b+, sam_vit_h, dinov2_vitb14")
    download.add_argument("--dir", default=DEFAULT_WEIGHTS_DIR, help="weights folder (default: weights)")
    download.add_argument("--url", default=None, help="a mirror serving the identical file")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(handler=partial(_cmd_download, write=write, error=error))
    return weights


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def download_sam_weights_main(argv: Sequence[str] | None = None, *, write: Writer | None = None,
                              error: Writer | None = None) -> int:
    """``python tools/download_sam_weights.py --model vit_h [--dir weights] [--url URL]``."""
    parser = argparse.ArgumentParser(prog="tools/download_sam_weights.py",
                                     description="download an official SAM checkpoint")
    parser.add_argument("--model", choices=sorted(SAM_MODELS), default="vit_h", help="SAM size (default vit_h)")
    parser.add_argument("--dir", default=DEFAULT_WEIGHTS_DIR, help="weights folder (default: weights)")
    parser.add_argument("--url", default=None, help="a mirror serving the identical file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    _setup_logging()
    return _download_one(SAM_MODELS[args.model], weights_dir=args.dir, url=args.url, progress=not args.quiet,
                         write=write or _stdout, error=error or _stderr)


def download_models_main(argv: Sequence[str] | None = None, *, write: Writer | None = None,
                         error: Writer | None = None) -> int:
    """``python tools/download_models.py [--models a,b | --all] [--dir weights]``.

    Downloads the seed workflow's teachers (SAM 2.1 B+ and DINOv2 B/14) by default,
    skipping files already present; ``--all`` takes every checkpoint with a public URL.
    """
    write = write or _stdout
    error = error or _stderr
    parser = argparse.ArgumentParser(prog="tools/download_models.py",
                                     description="download the official teacher checkpoints")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--models", default=None,
                        help=f"comma-separated teacher names (default: {','.join(DEFAULT_MODELS)})")
    choice.add_argument("--all", action="store_true", help="every checkpoint with a public URL")
    parser.add_argument("--dir", default=DEFAULT_WEIGHTS_DIR, help="weights folder (default: weights)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    _setup_logging()
    if args.all:
        names = [name for name, entry in WEIGHTS.items() if entry.url is not None]
        gated = [name for name, entry in WEIGHTS.items() if entry.url is None]
        write(f"skipping gated checkpoints (fetch by hand, pass --weights PATH): {', '.join(gated)}")
    elif args.models:
        names = [name.strip() for name in args.models.split(",") if name.strip()]
    else:
        names = list(DEFAULT_MODELS)
    failed = []
    for name in names:
        code = _download_one(name, weights_dir=args.dir, url=None, progress=not args.quiet, write=write, error=error)
        if code:
            failed.append((name, code))
    if failed:
        error(f"{len(failed)} of {len(names)} failed: {', '.join(name for name, _ in failed)}")
        return max(code for _, code in failed)
    write(f"all {len(names)} checkpoint(s) are in {args.dir}/")
    return 0
