"""The TensorBoard pictures hook leaves the run untouched: the same weights, bit for bit, as
a run without it, the global generators where they would be (it loads samples, which draw
from them, after the evaluation's checkpoint has captured them), and the training model
back in training mode."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.report.conftest import tiny_config
from vfmkd.config import validate_config
from vfmkd.core.build import build_trainer
from vfmkd.report import TensorBoardPictures


def _train(tmp_path, data_yaml, name: str, hooks: list) -> tuple[dict[str, torch.Tensor], tuple]:
    raw = tiny_config(data_yaml)
    raw["experiment_name"] = name
    raw["train"].update({"output_dir": str(tmp_path / "runs"), "ema": False})  # pictures of the live model
    trainer = build_trainer(validate_config(raw), hooks=hooks)
    trainer.train()
    assert trainer.model.training
    generators = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    return {key: value.clone() for key, value in trainer.model.state_dict().items()}, generators


@pytest.mark.slow  # two tiny runs
def test_pictures_do_not_change_the_run(tmp_path, synthetic_data_yaml):
    drawn, drawn_generators = _train(tmp_path, synthetic_data_yaml, "drawn", [TensorBoardPictures(2)])
    plain, plain_generators = _train(tmp_path, synthetic_data_yaml, "plain", [])
    assert (tmp_path / "runs" / "drawn" / "tb").is_dir()
    assert drawn.keys() == plain.keys()
    for key, value in drawn.items():
        torch.testing.assert_close(value, plain[key], rtol=0, atol=0, msg=key)
    # The global generators end where they would without the pictures (what a resumed run restores).
    assert torch.equal(drawn_generators[0], plain_generators[0])
    assert drawn_generators[1] == plain_generators[1]
    np.testing.assert_array_equal(drawn_generators[2], plain_generators[2])
