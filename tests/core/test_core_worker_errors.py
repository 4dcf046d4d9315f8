"""Data loading failures end the run with one clear error, never a hang: a sample whose
loading raises is named with the cause; a killed loader worker is named with its pid and signal."""

from __future__ import annotations

import os
import signal

import pytest
from torch.utils.data import get_worker_info

from tests.core.test_core_trainer import AugmentedDataset, make_config, make_trainer
from vfmkd.errors import DataLoadingError

BROKEN_INDEX = 3


class BrokenSample(AugmentedDataset):
    def __getitem__(self, index: int) -> dict:
        if index == BROKEN_INDEX:
            raise ValueError("corrupt label row 7")
        return super().__getitem__(index)


class KilledWorker(AugmentedDataset):
    def __getitem__(self, index: int) -> dict:
        if index == BROKEN_INDEX and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failing_sample_is_named_with_its_cause(tmp_path, workers):
    config = make_config(tmp_path, f"broken{workers}", max_steps=20, accumulate=1, amp=False)
    config.data.num_workers = workers
    trainer = make_trainer(config, train_dataset=BrokenSample())
    with pytest.raises(DataLoadingError) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith(f"training sample '{BROKEN_INDEX}' (index {BROKEN_INDEX}, epoch 0) could not be loaded")
    assert message.endswith("ValueError: corrupt label row 7") and "Traceback" not in message


def test_a_killed_worker_is_named_with_its_pid_and_signal(tmp_path):
    config = make_config(tmp_path, "killed", max_steps=20, accumulate=1, amp=False)
    config.data.num_workers = 1
    trainer = make_trainer(config, train_dataset=KilledWorker())
    with pytest.raises(DataLoadingError, match=r"a data loader worker died \((pid \d+ killed by SIGKILL|DataLoader worker \(pid.*killed by signal).*lower data.num_workers"):
        trainer.train()
