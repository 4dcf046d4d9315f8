"""``vfmkd report`` on a tiny run, opened in headless Chromium; the same pictures in TensorBoard.

The run (``conftest.tiny_run``) is trained by ``vfmkd demo --config``, whose last step
writes the report and prints its path. Checked: the page is one self-contained file
(pictures as data URIs, no URL) with its PNGs beside it; Chromium's DOM has every
section, the random-teacher banner and every picture; its screenshot is not blank, shows
the banner's red at the top and the feature and prediction pictures pixel for pixel as
written; TensorBoard got the feature and prediction pictures at each evaluation.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it). Without it the
browser tests are skipped with the command to install it, except under ``CI=true``
where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfmkd.cli import main
from vfmkd.report.page import SECTION_IDS

WINDOW = (1280, 4000)
BANNER_RED = np.array([0xC6, 0x28, 0x28])
INSTALL = "apt-get install -y --no-install-recommends chromium"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; checked before the tiny run is trained, so a skip costs nothing."""
    path = shutil.which("chromium")
    if path:
        return path
    message = f"Debian's chromium is not installed, so the report is not opened in a browser; install it: {INSTALL}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _browse(chromium: str, report: Path, profile: Path, *arguments: str) -> str:
    """Run headless Chromium on the report (no network needed: the page has no URL); its stdout."""
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
        "--no-first-run", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *arguments,
        report.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow  # the tiny run: about 5 s
def test_the_demo_writes_a_self_contained_report_and_prints_its_path(tiny_run):
    assert tiny_run.report == tiny_run.run_dir / "report.html" and tiny_run.report.is_file()
    text = tiny_run.report.read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', text)
    without_pictures = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"https?:|ftp:|file:|url\(|//[a-z]|@import", without_pictures), "the page names a URL"
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    pictures = sorted(path.name for path in (tiny_run.run_dir / "report_files").iterdir())
    # 3 curve figures, 3 validation images x 1 pair of features, 3 prediction strips.
    assert len(sources) == len(pictures) == 9
    assert {"curves_losses.png", "curves_eval.png", "curves_optimisation.png", "predictions_0.png"} <= set(pictures)
    for section in SECTION_IDS:
        assert f'id="{section}"' in text
    assert "experiment</th><td>tiny_report" in text and "4 of 4" in text
    assert "probe.embed 8x8x8 s16" in text  # the alignment table


@pytest.mark.slow  # the tiny run and two Chromium starts
def test_chromium_shows_every_section_and_the_pictures(chromium, tiny_run, tmp_path):
    dom = _browse(chromium, tiny_run.report, tmp_path / "dom", "--dump-dom")
    positions = [dom.find(f'id="{section}"') for section in SECTION_IDS]
    assert -1 not in positions and positions == sorted(positions), dict(zip(SECTION_IDS, positions))
    assert 'id="random-teacher-banner"' in dom and "RANDOM TEACHER WEIGHTS" in dom
    assert dom.find("random-teacher-banner") < positions[0]
    assert dom.count('src="data:image/png;base64,') == 9
    assert "embed&lt;-p4" in dom and "box AP" in dom

    screenshot = tmp_path / "page.png"
    _browse(chromium, tiny_run.report, tmp_path / "shot", f"--screenshot={screenshot}")
    with Image.open(screenshot) as opened:
        page = np.asarray(opened.convert("RGB")).astype(np.int16)
    assert page.shape[:2] == (WINDOW[1], WINDOW[0])
    ink = (np.abs(page - 255).sum(axis=2) > 30)  # pixels that are not (near) white
    assert ink.mean() > 0.05 and page.std() > 20, "the screenshot is blank"
    # The page fills most of the window: ink in most 500-px bands, not only at the top.
    bands = [ink[top : top + 500].mean() for top in range(0, WINDOW[1], 500)]
    assert sum(share > 0.01 for share in bands) >= 6, bands
    # The banner: a wide block of its red near the top, and nowhere else.
    red = np.abs(page - BANNER_RED).sum(axis=2) < 12
    assert red[:400].sum() > 200 * 40 and red[400:].sum() < red[:400].sum() / 10
    for name in ("features_probe_embed_from_p4_0.png", "predictions_0.png"):
        with Image.open(tiny_run.run_dir / "report_files" / name) as picture:
            assert _shown_at(page, np.asarray(picture.convert("RGB")).astype(np.int16)), f"{name} is not on the page"


def _shown_at(page: np.ndarray, picture: np.ndarray, tolerance: int = 2) -> tuple[int, int] | None:
    """Where ``picture`` appears in the screenshot pixel for pixel (within ``tolerance``), or None."""
    height, width = picture.shape[:2]
    corner = picture[:8, :8]
    candidates = np.argwhere(np.abs(page - picture[0, 0]).max(axis=2) <= tolerance)
    for top, left in candidates:
        if top + height > page.shape[0] or left + width > page.shape[1]:
            continue
        if np.abs(page[top : top + 8, left : left + 8] - corner).max() > tolerance:
            continue
        if np.abs(page[top : top + height, left : left + width] - picture).max() <= tolerance:
            return int(top), int(left)
    return None


@pytest.mark.slow  # the tiny run: about 5 s
def test_tensorboard_gets_the_pictures_at_each_evaluation(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run.run_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    expected = {f"images/features/probe/embed<-p4/{k}" for k in range(2)} | {f"images/predictions/{k}" for k in range(2)}
    assert tags == expected
    for tag in expected:
        assert [event.step for event in events.Images(tag)] == [2, 4]  # an evaluation after each epoch


def test_report_of_a_run_without_checkpoint_and_a_folder_that_is_no_run(tmp_path, capsys):
    run_dir = tmp_path / "crashed"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "loss/total": 2.0, "loss/det/box": 1.0}\n'
        '{"kind": "train", "step": 2, "loss/total": 1.5, "loss/det/box": 0.7}\n{"kind": "tr'  # a torn last line
    )
    out = tmp_path / "page" / "crashed.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    text = out.read_text(encoding="utf-8")
    assert "no checkpoint in" in text and 'id="random-teacher-banner"' not in text
    assert [path.name for path in (tmp_path / "page" / "crashed_files").iterdir()] == ["curves_losses.png"]

    assert main(["report", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "not a run directory" in error and len(error.strip().splitlines()) == 1


def test_a_report_onto_a_full_disk_is_one_line(tmp_path, capsys):
    from tests.utils.test_utils_write_errors import small_disk

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [f'{{"kind": "train", "step": {step}, "loss/total": {2.0 / step}}}' for step in range(1, 40)]
    (run_dir / "metrics.jsonl").write_text("\n".join(records) + "\n")
    with small_disk(tmp_path, 16) as disk:
        if disk is None:
            pytest.skip("no tmpfs can be mounted here (needs root); tests/utils covers the patched writer")
        assert main(["report", str(run_dir), "--out", str(disk / "report.html")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: could not write ") and "bytes needed" in error and "Traceback" not in error
