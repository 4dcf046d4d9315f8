import json
import logging

import torch

from vfmkd.utils.logging import MetricLogger, setup_logging


def test_metric_logger_writes_json_lines_and_tensorboard(tmp_path):
    with MetricLogger(tmp_path / "run") as metrics:
        metrics.log({"loss/total": torch.tensor(1.5), "lr": 0.01}, step=3, kind="train", epoch=0)
        metrics.log({"mAP": 0.5, "per_class": {"cat": float("nan"), "dog": 0.25}}, step=4, kind="eval")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"kind": "train", "step": 3, "epoch": 0, "loss/total": 1.5, "lr": 0.01}
    assert lines[1]["per_class"] == {"cat": None, "dog": 0.25}
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_disabled_metric_logger_writes_nothing(tmp_path):
    metrics = MetricLogger(tmp_path / "run", enabled=False)
    metrics.log({"a": 1.0}, step=1)
    metrics.close()
    assert not (tmp_path / "run").exists()


def test_setup_logging_is_idempotent_and_quiet_on_other_ranks(tmp_path):
    package_logger = setup_logging(log_file=tmp_path / "log.txt")
    handlers = len(package_logger.handlers)
    setup_logging(log_file=tmp_path / "log.txt")
    assert len(package_logger.handlers) == handlers
    logging.getLogger("vfmkd.core.test").info("hello")
    assert "hello" in (tmp_path / "log.txt").read_text()
    assert setup_logging(rank=1).level == logging.WARNING
    for handler in list(package_logger.handlers):
        package_logger.removeHandler(handler)
        handler.close()
    package_logger.propagate = True
    package_logger.setLevel(logging.NOTSET)
