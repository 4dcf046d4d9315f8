"""Official teacher checkpoints: where they come from, how to fetch them, how to open them.

:data:`WEIGHTS` lists every official checkpoint, keyed by teacher registry name, with
its file name, URL, licence and, where the value is published and agrees across
independent copies, its size and SHA-256. :func:`download_weights` fetches one into
``weights/`` with resume (HTTP ``Range``), verification and an atomic rename, so
``weights/<file>`` only ever exists complete and verified. :func:`load_checkpoint_file`
opens a checkpoint without running code from it (``torch.load(weights_only=True)`` or
safetensors).

Sources:
    SAM: https://github.com/facebookresearch/segment-anything#model-checkpoints
        (the hex in each file name, e.g. ``4b8939``, is the start of the file's MD5,
        not of its SHA-256).
    SAM 2 / 2.1: https://github.com/facebookresearch/sam2#download-checkpoints
    DINO: https://github.com/facebookresearch/dino#pretrained-models
    DINOv2: https://github.com/facebookresearch/dinov2#pretrained-models
    DINOv3: https://github.com/facebookresearch/dinov3 (gated: request access at
        https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/).
"""

from __future__ import annotations

import http.client
import logging
import os
import pickle
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vfmkd.errors import UserError
from vfmkd.utils.hashing import file_sha256
from vfmkd.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_WEIGHTS_DIR",
    "WEIGHTS",
    "ChecksumMismatchError",
    "DownloadInterruptedError",
    "NoNetworkError",
    "UnsafeCheckpointError",
    "WeightsDownloadError",
    "WeightsEntry",
    "default_weights_path",
    "download_file",
    "download_weights",
    "load_checkpoint_file",
    "weights_entry",
]

DEFAULT_WEIGHTS_DIR = "weights"
CHUNK_BYTES = 1 << 20  # 1 MiB: the unit of reading and of download progress.

APACHE = "Apache-2.0"
DINOV3_LICENCE = "DINOv3 License"
_DINOV3_ACCESS = (
    "gated: request access at https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/, "
    "download the file with the link Meta sends, then pass --weights PATH (or place it at the default path)"
)


@dataclass(frozen=True)
class WeightsEntry:
    """One official checkpoint file.

    Attributes:
        name: teacher registry name (``sam_vit_h``, ``sam2.1_hiera_b+``, ``dinov2_vitb14``).
        file_name: the official file name, kept as published.
        url: official download URL; None for gated files that must be fetched by hand.
        size_bytes: file size when published and corroborated, else None.
        sha256: full SHA-256 hex digest when published and corroborated, else None.
        licence: licence of the weights.
        note: anything a user must know (gated access, what the file holds).
        sha256_prefix: leading hex digits of the SHA-256 when only those are published
            (checked when present; ignored when ``sha256`` is set).
    """

    name: str
    file_name: str
    url: str | None
    size_bytes: int | None
    sha256: str | None
    licence: str
    note: str = ""
    sha256_prefix: str | None = None


def _sam(variant: str, file_name: str, size_bytes: int, sha256: str, note: str) -> WeightsEntry:
    return WeightsEntry(
        name=f"sam_{variant}",
        file_name=file_name,
        url=f"https://dl.fbaipublicfiles.com/segment_anything/{file_name}",
        size_bytes=size_bytes,
        sha256=sha256,
        licence=APACHE,
        note=note,
    )


def _sam2(version: str, letter: str, size_word: str, size_bytes: int | None, sha256: str) -> WeightsEntry:
    folder = "072824" if version == "sam2" else "092824"
    file_name = f"{version}_hiera_{size_word}.pt"
    return WeightsEntry(
        name=f"{version}_hiera_{letter}",
        file_name=file_name,
        url=f"https://dl.fbaipublicfiles.com/segment_anything_2/{folder}/{file_name}",
        size_bytes=size_bytes,
        sha256=sha256,
        licence=APACHE,
        note=f"{'SAM 2' if version == 'sam2' else 'SAM 2.1'} Hiera-{letter.upper()} (image encoder, prompt "
        "encoder, mask decoder, memory)",
    )


def _dino(name: str, folder: str, note: str) -> WeightsEntry:
    file_name = f"{folder}.pth"
    return WeightsEntry(
        name=name,
        file_name=file_name,
        url=f"https://dl.fbaipublicfiles.com/dino/{folder}/{file_name}",
        size_bytes=None,
        sha256=None,
        licence=APACHE,
        note=note,
    )


def _dinov2(size: str, registers: bool, note: str) -> WeightsEntry:
    suffix = "_reg4" if registers else ""
    file_name = f"dinov2_vit{size}14{suffix}_pretrain.pth"
    return WeightsEntry(
        name=f"dinov2_vit{size}14{'_reg' if registers else ''}",
        file_name=file_name,
        url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{file_name}",
        size_bytes=None,
        sha256=None,
        licence=APACHE,
        note=note + (" with 4 registers" if registers else ""),
    )


def _dinov3(name: str, file_name: str, note: str) -> WeightsEntry:
    return WeightsEntry(
        name=name, file_name=file_name, url=None, size_bytes=None, sha256=None,
        licence=DINOV3_LICENCE, note=f"{note}; {_DINOV3_ACCESS}",
    )


# NOTE: sizes and SHA-256 values are those that several independent public copies of
# the official files agree on; Meta publishes none. Values that could not be
# corroborated stay None, and a download then logs the SHA-256 it computed.
_ENTRIES = [
    _sam("vit_b", "sam_vit_b_01ec64.pth", 375_042_383,
         "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "SAM ViT-B (91 M image encoder)"),
    _sam("vit_l", "sam_vit_l_0b3195.pth", 1_249_524_607,
         "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "SAM ViT-L (308 M image encoder)"),
    _sam("vit_h", "sam_vit_h_4b8939.pth", 2_564_550_879,
         "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "SAM ViT-H (636 M image encoder)"),
    _sam2("sam2", "t", "tiny", 155_906_050, "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125"),
    _sam2("sam2", "s", "small", 184_309_650, "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3"),
    _sam2("sam2", "b+", "base_plus", None, "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071"),
    _sam2("sam2", "l", "large", 897_952_466, "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b"),
    _sam2("sam2.1", "t", "tiny", 156_008_466, "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"),
    _sam2("sam2.1", "s", "small", 184_416_285, "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38"),
    _sam2("sam2.1", "b+", "base_plus", 323_606_802, "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5"),
    _sam2("sam2.1", "l", "large", 898_083_611, "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318"),
    _dino("dino_vits16", "dino_deitsmall16_pretrain", "DINO ViT-S/16 backbone"),
    _dino("dino_vitb16", "dino_vitbase16_pretrain", "DINO ViT-B/16 backbone"),
    _dino("dino_vits8", "dino_deitsmall8_pretrain", "DINO ViT-S/8 backbone"),
    _dino("dino_vitb8", "dino_vitbase8_pretrain", "DINO ViT-B/8 backbone"),
    *[
        _dinov2(size, registers, f"DINOv2 ViT-{size.upper()}/14 backbone")
        for registers in (False, True)
        for size in ("s", "b", "l", "g")
    ],
    _dinov3("dinov3_vits16", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", "DINOv3 ViT-S/16 (LVD-1689M)"),
    _dinov3("dinov3_vits16plus", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth", "DINOv3 ViT-S+/16 (LVD-1689M)"),
    _dinov3("dinov3_vitb16", "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", "DINOv3 ViT-B/16 (LVD-1689M)"),
    _dinov3("dinov3_vitl16", "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", "DINOv3 ViT-L/16 (LVD-1689M)"),
    _dinov3("dinov3_vith16plus", "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth", "DINOv3 ViT-H+/16 (LVD-1689M)"),
]

WEIGHTS: dict[str, WeightsEntry] = {entry.name: entry for entry in _ENTRIES}


# ------------------------------------------------------------------------- errors
class WeightsDownloadError(UserError, RuntimeError):
    """A checkpoint download failed; the message says why and what to do."""


class NoNetworkError(WeightsDownloadError):
    """The server could not be reached at all (no route, DNS failure, refused, timeout)."""


class DownloadInterruptedError(WeightsDownloadError):
    """The transfer stopped partway; the ``.part`` file is kept for resuming."""


class ChecksumMismatchError(WeightsDownloadError):
    """The downloaded file is not the expected one (size or SHA-256); nothing was kept."""


class UnsafeCheckpointError(UserError, ValueError):
    """A checkpoint file holds pickled objects that could run code when loaded."""


# ------------------------------------------------------------------------ lookups
def weights_entry(name: str) -> WeightsEntry:
    """The official checkpoint of teacher ``name``; an unknown name lists the known ones."""
    try:
        return WEIGHTS[name]
    except KeyError:
        raise KeyError(
            f"no official checkpoint is known for '{name}'. Known: {', '.join(sorted(WEIGHTS))}"
        ) from None


def default_weights_path(name: str, weights_dir: str | Path = DEFAULT_WEIGHTS_DIR) -> Path:
    """Where ``build_teacher`` looks for teacher ``name``'s checkpoint: ``<weights_dir>/<file>``."""
    return Path(weights_dir) / weights_entry(name).file_name


# ----------------------------------------------------------------------- download
def download_weights(
    name: str,
    *,
    weights_dir: str | Path = DEFAULT_WEIGHTS_DIR,
    url: str | None = None,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """Download teacher ``name``'s official checkpoint to ``<weights_dir>/<file>``.

    An existing final file is kept as it is. An interrupted download leaves
    ``<file>.part``, which the next call resumes. The file appears under its final
    name only once complete and verified (size and SHA-256 where known); its SHA-256
    is written beside it as ``<file>.sha256``.

    Args:
        name: teacher registry name (a key of :data:`WEIGHTS`).
        weights_dir: folder of the checkpoints.
        url: a mirror of the same file (default: the official URL).
        progress: show a progress bar (bytes) on stderr.
        timeout: seconds to wait for the server on connect and on each read.

    Returns:
        The path of the complete file.
    """
    entry = weights_entry(name)
    destination = Path(weights_dir) / entry.file_name
    if destination.is_file():
        logger.info("%s: %s is already present, not downloading", name, destination)
        return destination
    source = url or entry.url
    if source is None:
        raise WeightsDownloadError(
            f"'{name}' has no public download URL ({entry.licence}): {entry.note}. "
            f"Expected file: {destination}"
        )
    sha256 = download_file(
        source,
        destination,
        sha256=entry.sha256,
        sha256_prefix=entry.sha256_prefix,
        size_bytes=entry.size_bytes,
        progress=progress,
        timeout=timeout,
    )
    atomic_write_text(destination.with_name(destination.name + ".sha256"), f"{sha256}  {entry.file_name}\n")
    if entry.sha256 is None:
        logger.info("%s: no published SHA-256 to check; downloaded file has SHA-256 %s", name, sha256)
    return destination


def download_file(
    url: str,
    destination: str | Path,
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    size_bytes: int | None = None,
    progress: bool = True,
    timeout: float = 30,
) -> str:
    """Download ``url`` to ``destination`` through ``<destination>.part``, resuming it.

    A present ``.part`` is continued with ``Range: bytes=N-``; a server that answers
    ``200`` instead of ``206`` sends the whole file, which then replaces the part.

    Args:
        url: HTTP(S) (or ``file://``) address.
        destination: final path; written only when the file is complete and verified.
        sha256: expected full SHA-256 hex digest (None: not checked).
        sha256_prefix: expected leading SHA-256 hex digits (checked when ``sha256`` is None).
        size_bytes: expected size (None: not checked).
        progress: show a tqdm progress bar in bytes.
        timeout: seconds to wait on connect and on each read.

    Returns:
        The SHA-256 hex digest of the downloaded file.

    Raises:
        NoNetworkError: the server cannot be reached.
        DownloadInterruptedError: the transfer stopped; run again to resume.
        ChecksumMismatchError: the file is not the expected one; nothing is left behind.
        WeightsDownloadError: the server refused the request (HTTP error).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if size_bytes is not None and offset > size_bytes:
        logger.warning("%s is larger than the expected %d bytes; starting over", part, size_bytes)
        part.unlink()
        offset = 0
    if size_bytes is None or offset < size_bytes:
        _fetch(url, destination, part, offset, progress=progress, timeout=timeout)
    digest = _verify(part, destination, url, sha256=sha256, sha256_prefix=sha256_prefix, size_bytes=size_bytes)
    os.replace(part, destination)
    _fsync_folder(destination.parent)
    logger.info("downloaded %s (SHA-256 %s)", destination, digest)
    return digest


def _fetch(url: str, destination: Path, part: Path, offset: int, *, progress: bool, timeout: float) -> None:
    """Write the bytes of ``url`` from ``offset`` on into ``part``."""
    headers = {"User-Agent": "vfmkd-weights/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # NOTE: "range not satisfiable" for a resumed file means the part already
            # holds every byte; verification decides whether it is the right file.
            logger.info("%s: the server has no bytes after %d; verifying the part file", url, offset)
            return
        raise WeightsDownloadError(
            f"downloading {url} failed: the server answered HTTP {error.code} {error.reason}. "
            f"Check the URL, or download the file by hand and place it at {destination}"
        ) from error
    except (urllib.error.URLError, OSError) as error:
        raise NoNetworkError(_no_network_message(url, destination, error)) from error

    with response:
        status = getattr(response, "status", None) or response.getcode()
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if not offset or start != offset:
                part.unlink(missing_ok=True)
                raise WeightsDownloadError(
                    f"downloading {url}: the server sent bytes from {start} when asked for {offset}; "
                    f"the partial file {part} was removed: run the same command again to start over"
                )
            mode = "ab"
            logger.info("resuming %s at byte %d", destination.name, offset)
        else:
            if offset:
                logger.info("the server ignored the resume request (HTTP %s); downloading %s from the start",
                            status, destination.name)
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else None
        with open(part, mode) as file:
            written = _copy_stream(response, file, offset=offset, total=total, name=destination.name,
                                   progress=progress, url=url, part=part)
    if total is not None and offset + written < total:
        raise DownloadInterruptedError(
            f"downloading {url} stopped after {offset + written} of {total} bytes; "
            f"{part} is kept: run the same command again to resume"
        )


def _copy_stream(
    response: Any, file: BinaryIO, *, offset: int, total: int | None, name: str, progress: bool, url: str, part: Path
) -> int:
    from tqdm import tqdm

    written = 0
    with tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
              desc=name, disable=not progress) as bar:
        try:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                file.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        except (http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout) as error:
            file.flush()
            raise DownloadInterruptedError(
                f"downloading {url} stopped after {offset + written} bytes ({error.__class__.__name__}: "
                f"{error}); {part} is kept: run the same command again to resume"
            ) from error
    return written


def _verify(
    part: Path, destination: Path, url: str, *, sha256: str | None, sha256_prefix: str | None, size_bytes: int | None
) -> str:
    """Check the part file; on a mismatch delete it and raise."""
    actual_size = part.stat().st_size
    problem = None
    digest = ""
    if size_bytes is not None and actual_size != size_bytes:
        problem = f"size {actual_size} bytes, expected {size_bytes}"
    else:
        digest = file_sha256(part)
        if sha256 is not None and digest != sha256.lower():
            problem = f"SHA-256 {digest}, expected {sha256.lower()}"
        elif sha256 is None and sha256_prefix is not None and not digest.startswith(sha256_prefix.lower()):
            problem = f"SHA-256 {digest}, expected one starting with {sha256_prefix.lower()}"
    if problem is not None:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"the file downloaded from {url} is not the expected one ({problem}); it was deleted and "
            f"{destination} was not written. Check the URL (a mirror must serve the identical file) "
            "and download again"
        )
    return digest


def _content_range_start(value: str | None) -> int | None:
    """First byte of a ``Content-Range: bytes START-END/TOTAL`` header, None when absent or odd."""
    if not value or not value.startswith("bytes "):
        return None
    start = value[len("bytes "):].split("-", 1)[0].strip()
    return int(start) if start.isdigit() else None


def _no_network_message(url: str, destination: Path, error: BaseException) -> str:
    reason = getattr(error, "reason", error)
    return (
        f"cannot reach {url} ({reason}): this machine has no network access to the download server. "
        f"Download the file on a machine that has, and place it at {destination.resolve()} "
        f"(e.g. `curl -L -o {destination.resolve()} {url}`), then run again"
    )


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


# -------------------------------------------------------------------------- load
def load_checkpoint_file(path: str | Path) -> Any:
    """Open a checkpoint on the CPU without running code from it.

    ``.safetensors`` files go through ``safetensors.torch.load_file``; everything else
    through ``torch.load(map_location='cpu', weights_only=True)``, which only rebuilds
    tensors and plain containers. A pickle that would construct arbitrary objects (and
    so could run code) is refused.

    Args:
        path: the checkpoint file.

    Returns:
        What the file holds: a state dict, or a dict around one (e.g. ``{"model": ...}``).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file would need arbitrary unpickling.
        ValueError: the file is truncated or not a checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError type
            raise ValueError(f"cannot read {path} as safetensors ({error}); the file may be truncated") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled Python objects beyond tensors and plain "
            f"containers, and unpickling them could run code ({str(error).splitlines()[0]}). "
            "Official checkpoints do not need this: check that the file is the official one, or "
            "re-save just its state dict (torch.save(model.state_dict(), ...)) from a trusted session"
        ) from error
    except (RuntimeError, EOFError) as error:
        raise ValueError(
            f"cannot read checkpoint {path} ({error}); the file may be truncated or not a PyTorch "
            "checkpoint: download it again"
        ) from error
