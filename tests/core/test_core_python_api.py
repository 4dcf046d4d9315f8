"""README's "Training from Python" example runs as printed (paths, size and length made small)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("#### Training from Python") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's 'Training from Python' section has no python block"
    return match.group(1)


@pytest.mark.slow
def test_readme_python_api_example_trains(synthetic_data_yaml: Path, tmp_path: Path, capsys) -> None:
    code = _example()
    for old, new in (
        ('"datasets/shapes/data.yaml"', repr(str(synthetic_data_yaml))),
        ("runs/python_api", str(tmp_path / "run")),
        ("(256)", "(64)"),
        ("epochs=5", "epochs=1"),
        ("batch_size=8", "batch_size=3"),
    ):
        assert old in code, f"the README example no longer contains {old}"
        code = code.replace(old, new)
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert 0.0 <= float(printed) <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"kind": "eval"') == 1
