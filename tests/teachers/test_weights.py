"""Checkpoint table and downloads, against a local HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from vfmkd.teachers import weights as weights_module
from vfmkd.teachers.cli import download_models_main, download_sam_weights_main, format_weights_table
from vfmkd.teachers.weights import (
    WEIGHTS,
    ChecksumMismatchError,
    DownloadInterruptedError,
    NoNetworkError,
    WeightsDownloadError,
    WeightsEntry,
    default_weights_path,
    download_file,
    download_weights,
)

PAYLOAD = bytes(range(256)) * 12_289  # 3.1 MB: several 1 MiB chunks, not a multiple of one
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class ServerState:
    """What the test server does and what it saw."""

    cut_once: bool = False  # first full request: send half the bytes, then drop the connection
    ignore_range: bool = False  # answer 200 with the whole file even when a Range is asked
    wrong_range: bool = False  # answer 206 from byte 0 whatever Range is asked
    ranges: list[str | None] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        return

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        state = self.server.state  # type: ignore[attr-defined]
        requested = self.headers.get("Range")
        state.ranges.append(requested)
        if self.path != "/model.pth":
            self.send_error(404)
            return
        start = 0
        if requested and not state.ignore_range:
            start = 0 if state.wrong_range else int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.cut_once and start == 0:
            state.cut_once = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gives up mid-body (the tests make some) is expected here.
        return


@pytest.fixture()
def server() -> Iterator[tuple[str, ServerState]]:
    state = ServerState()
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/model.pth", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def test_entry(monkeypatch: pytest.MonkeyPatch) -> WeightsEntry:
    """A checkpoint entry whose published checksum is the test payload's."""
    entry = WeightsEntry("test_teacher", "test_teacher.pth", "http://127.0.0.1:9/unused.pth", len(PAYLOAD),
                         PAYLOAD_SHA256, "Apache-2.0", "test payload")
    monkeypatch.setitem(WEIGHTS, entry.name, entry)
    return entry


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/model.pth"


def test_interrupted_download_resumes_with_range(
    tmp_path: Path, server: tuple[str, ServerState], test_entry: WeightsEntry
) -> None:
    url, state = server
    state.cut_once = True
    part = tmp_path / "test_teacher.pth.part"
    with pytest.raises(DownloadInterruptedError, match="run the same command again to resume"):
        download_weights("test_teacher", weights_dir=tmp_path, url=url, progress=False)
    assert 0 < part.stat().st_size < len(PAYLOAD)
    assert not (tmp_path / "test_teacher.pth").exists()

    path = download_weights("test_teacher", weights_dir=tmp_path, url=url, progress=True)
    assert state.ranges[0] is None and state.ranges[1] is not None and state.ranges[1].startswith("bytes=")
    assert int(state.ranges[1].removeprefix("bytes=").rstrip("-")) > 0
    assert path == tmp_path / "test_teacher.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PAYLOAD_SHA256
    assert not part.exists()
    assert (tmp_path / "test_teacher.pth.sha256").read_text().split()[0] == PAYLOAD_SHA256

    # Present: no request at all.
    requests = len(state.ranges)
    assert download_weights("test_teacher", weights_dir=tmp_path, url=url, progress=False) == path
    assert len(state.ranges) == requests


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    state.ignore_range = True
    destination = tmp_path / "model.pth"
    (tmp_path / "model.pth.part").write_bytes(b"stale bytes from another file")
    digest = download_file(url, destination, sha256=PAYLOAD_SHA256, progress=False)
    assert state.ranges == ["bytes=29-"]
    assert digest == PAYLOAD_SHA256 and destination.read_bytes() == PAYLOAD


def test_server_sending_another_range_is_not_appended(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    state.wrong_range = True
    (tmp_path / "model.pth.part").write_bytes(PAYLOAD[:1000])
    with pytest.raises(WeightsDownloadError, match="sent bytes from 0 when asked for 1000"):
        download_file(url, tmp_path / "model.pth", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_complete_part_is_verified_without_new_bytes(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, state = server
    (tmp_path / "model.pth.part").write_bytes(PAYLOAD)
    download_file(url, tmp_path / "model.pth", sha256=PAYLOAD_SHA256, progress=False)  # server answers 416
    assert (tmp_path / "model.pth").read_bytes() == PAYLOAD
    download_file(url, tmp_path / "other.pth", size_bytes=len(PAYLOAD), sha256_prefix=PAYLOAD_SHA256[:8],
                  progress=False)
    assert (tmp_path / "other.pth").read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    "expected",
    [
        {"sha256": "0" * 64},
        {"sha256_prefix": "00000000"},
        {"size_bytes": len(PAYLOAD) + 1},
    ],
)
def test_wrong_checksum_leaves_no_file(tmp_path: Path, server: tuple[str, ServerState], expected: dict) -> None:
    url, _ = server
    with pytest.raises(ChecksumMismatchError, match="not the expected one"):
        download_file(url, tmp_path / "model.pth", progress=False, **expected)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_says_no_network_and_where_to_put_the_file(tmp_path: Path) -> None:
    url = _closed_port_url()
    with pytest.raises(NoNetworkError) as caught:
        download_file(url, tmp_path / "weights" / "model.pth", progress=False, timeout=5)
    message = str(caught.value)
    assert "no network access" in message
    assert str((tmp_path / "weights" / "model.pth").resolve()) in message and url in message
    assert not (tmp_path / "weights" / "model.pth").exists()


def test_http_error_is_reported(tmp_path: Path, server: tuple[str, ServerState]) -> None:
    url, _ = server
    with pytest.raises(WeightsDownloadError, match="HTTP 404"):
        download_file(url.replace("model.pth", "missing.pth"), tmp_path / "model.pth", progress=False)


def test_table_covers_every_official_checkpoint() -> None:
    expected = {
        "sam_vit_b", "sam_vit_l", "sam_vit_h",
        *(f"{version}_hiera_{size}" for version in ("sam2", "sam2.1") for size in ("t", "s", "b+", "l")),
        "dino_vits16", "dino_vitb16", "dino_vits8", "dino_vitb8",
        *(f"dinov2_vit{size}14{suffix}" for size in "sblg" for suffix in ("", "_reg")),
        "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus",
    }
    assert expected <= set(WEIGHTS)
    assert WEIGHTS["sam_vit_h"].url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    assert WEIGHTS["sam2.1_hiera_b+"].url == (
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt")
    assert WEIGHTS["sam2_hiera_t"].url == "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_tiny.pt"
    assert WEIGHTS["dino_vits16"].url == (
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth")
    assert WEIGHTS["dinov2_vitb14_reg"].url == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth")
    for name, entry in WEIGHTS.items():
        assert entry.name == name
        assert entry.sha256 is None or len(entry.sha256) == 64
        if name.startswith("dinov3"):
            assert entry.url is None and "--weights PATH" in entry.note and entry.licence == "DINOv3 License"
        else:
            assert entry.url is not None and entry.url.endswith("/" + entry.file_name)
            assert entry.licence == "Apache-2.0"
    assert default_weights_path("sam2.1_hiera_b+") == Path("weights/sam2.1_hiera_base_plus.pt")
    with pytest.raises(KeyError, match="Known:"):
        default_weights_path("sam3")


def test_gated_checkpoint_download_explains(tmp_path: Path) -> None:
    with pytest.raises(WeightsDownloadError, match="request access"):
        download_weights("dinov3_vitb16", weights_dir=tmp_path, progress=False)


def test_cli_list_and_seed_scripts(tmp_path: Path, server: tuple[str, ServerState],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = server
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    table = format_weights_table(tmp_path)
    line = next(row for row in table.splitlines() if row.startswith("sam_vit_b "))
    assert line.split()[-1] == "yes" and "375.0 MB" in line and "Apache-2.0" in line
    assert next(row for row in table.splitlines() if row.startswith("sam_vit_h ")).split()[-1] == "no"

    out: list[str] = []
    errors: list[str] = []
    assert download_sam_weights_main(["--model", "vit_b", "--dir", str(tmp_path)], write=out.append,
                                     error=errors.append) == 0
    assert "already present" in out[-1]
    # The seed's default set, served locally (entries without a published checksum).
    for name in ("sam2.1_hiera_b+", "dinov2_vitb14"):
        monkeypatch.setitem(WEIGHTS, name, WeightsEntry(name, WEIGHTS[name].file_name, url, None, None, "Apache-2.0"))
    assert download_models_main(["--dir", str(tmp_path / "w"), "--quiet"], write=out.append, error=errors.append) == 0
    assert (tmp_path / "w" / "sam2.1_hiera_base_plus.pt").read_bytes() == PAYLOAD
    assert (tmp_path / "w" / "dinov2_vitb14_pretrain.pth").read_bytes() == PAYLOAD
    assert download_models_main(["--models", "sam2,dino", "--dir", str(tmp_path / "w")], write=out.append,
                                error=errors.append) == 0
    assert sum("already present" in line for line in out) == 3
    assert download_models_main(["--models", "sam3"], write=out.append, error=errors.append) == 2
    assert "sam3" in errors[-2]


def test_weights_commands_wire_into_a_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from vfmkd.teachers.cli import add_weights_commands

    out: list[str] = []
    errors: list[str] = []
    parser = argparse.ArgumentParser(prog="vfmkd")
    add_weights_commands(parser.add_subparsers(dest="command", required=True), write=out.append, error=errors.append)
    args = parser.parse_args(["weights", "list", "--dir", str(tmp_path)])
    assert args.handler(args) == 0 and "sam2.1_hiera_b+" in out[-1]
    monkeypatch.setitem(WEIGHTS, "sam_vit_b", WeightsEntry("sam_vit_b", "sam_vit_b_01ec64.pth", _closed_port_url(),
                                                           None, None, "Apache-2.0"))
    args = parser.parse_args(["weights", "download", "sam_vit_b", "--dir", str(tmp_path), "--quiet"])
    assert args.handler(args) == 1
    assert "no network access" in errors[-1]
    assert weights_module.DEFAULT_WEIGHTS_DIR == "weights"
