"""Hybrid distillation (and write-back) under DDP.

Hybrid distillation under DDP equals one process on the same global batches.

Two gloo processes on the CPU with a per-rank batch of 2 against one process with a
batch of 4. ``ResumableSampler`` shuffles with ``(seed, epoch)`` whatever the world size
and hands rank ``r`` positions ``r, r + 2, ...`` of that order, so each optimizer step of
the 2-rank run covers exactly the samples of the same step of the 1-rank run, and every
sample is augmented, and drawn offline or online, from its own ``(seed, epoch, index)``
seeds in both runs.

What makes the comparison exact (up to float summation order):

- the images are square and of one size, and geometric augmentation (mosaic, scale,
  translate) is off, so every sample's validity mask is the same (all cells) whether its
  teacher map comes from the store (warped) or from the live teacher; the feature losses
  divide by the micro-batch's valid-cell count, which is then a fixed number per sample,
  so the mean over ranks of per-rank means equals the mean over the global batch;
- the detection loss is normalised by the micro-batch's target-score sum, which does not
  split over ranks; its entry stays in the config (the head runs, its loss is computed
  and logged, its parameters take part in DDP's all-reduce) with weight 0, so it adds
  exactly nothing to the gradient in both runs. The ``unlabelled`` case reads the same
  images as a plain folder: distillation alone, the heads get an exact zero gradient
  (without it DDP fails at the second step on parameters that got no gradient);
- YOLOv8's BatchNorm layers normalise with per-rank batch statistics (the trainer does
  not use SyncBatchNorm), so the student's BatchNorm layers are swapped for per-sample
  GroupNorm before training, in both runs;
- SGD (AdamW would turn float noise in near-zero gradients into full-size steps), no
  gradient clipping (it could hide a gradient that is twice too large), fp32, no EMA.

The test fails if DDP did not average the gradients: both ranks must end with identical
weights, and those must match the single-process weights (and have moved away from the
initial ones).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from tests.helpers.covariant_teacher import CovariantTeacher  # noqa: F401  (registers covariant_probe)
from vfmkd.config import validate_config
from vfmkd.core.build import build_trainer
from vfmkd.core.trainer import Trainer
from vfmkd.datasets import build_dataset
from vfmkd.distillation.sources import OFFLINE_KEY
from vfmkd.features.extract import extract_features
from vfmkd.features.store import FeatureStore
from vfmkd.teachers import build_teacher

WORLD_SIZE = 2
PER_RANK_BATCH = 2
NUM_IMAGES = 8
IMAGE_SIDE = 96
STEPS = 4  # two epochs of two steps
TERMS = ("distill/probe/embed<-p4", "distill/probe/embed<-p3")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU two threads contend and run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_square_data(root: Path, num_train: int = NUM_IMAGES) -> Path:
    """A YOLO data set of square images with one labelled box each."""
    rng = np.random.default_rng(7)
    for split, count in (("train", num_train), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for index in range(count):
            pixels = np.full((IMAGE_SIDE, IMAGE_SIDE, 3), rng.integers(0, 256, 3), dtype=np.uint8)
            x0, y0 = (int(value) for value in rng.integers(4, IMAGE_SIDE // 2, 2))
            side = int(rng.integers(16, IMAGE_SIDE // 2))
            pixels[y0 : y0 + side, x0 : x0 + side] = rng.integers(0, 256, 3)
            pixels = np.clip(pixels + rng.integers(0, 40, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{index:03d}.png")
            centre = (x0 + side / 2) / IMAGE_SIDE, (y0 + side / 2) / IMAGE_SIDE
            (root / "labels" / split / f"{index:03d}.txt").write_text(
                f"0 {centre[0]:.6f} {centre[1]:.6f} {side / IMAGE_SIDE:.6f} {side / IMAGE_SIDE:.6f}\n"
            )
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: square}\n")
    return root / "data.yaml"


def _config(root: Path, name: str, batch_size: int, labelled: bool):
    # an unlabelled run reads the same images as a plain folder
    dataset = root / "data.yaml" if labelled else root / "images"
    return validate_config(
        {
            "experiment_name": name,
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"detection": {"type": "yolo_head", "num_classes": 1}}},
            "teachers": {"probe": {"name": "covariant_probe", "feature_path": str(root / "store"),
                                   "allow_random_init": True, "image_size": 64, "offline_ratio": 0.5}},
            "distillation": {"losses": {"probe_p4": {"type": "cos_l1", "teacher": "probe", "student": "p4"},
                                        "probe_p3": {"type": "mse", "teacher": "probe", "student": "p3",
                                                     "align_to": "student"},
                                        "detection": {"weight": 0.0}}},
            "data": {"dataset": str(dataset), "img_size": 64, "batch_size": batch_size,
                     "num_workers": 0,
                     "augment": {"mosaic": 0.0, "scale": 0.0, "translate": 0.0, "fliplr": 0.5}},
            "train": {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "warmup_steps": 0, "grad_clip": None,
                      "amp": False, "ema": False, "log_interval": 1, "eval_interval": 100, "save_interval": 100,
                      "output_dir": str(root / "runs"), "device": "cpu"},
        }
    )


class _Trainer(Trainer):
    """No evaluation: these tests compare training."""

    def evaluate(self):
        return None


def _group_norm_student(config) -> nn.Module:
    from vfmkd.models import build_model

    model = build_model(config.to_dict()["model"])
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, nn.GroupNorm(1, child.num_features, eps=child.eps))
    return model


def _train(root: Path, name: str, batch_size: int, labelled: bool) -> dict:
    torch.manual_seed(0)
    config = _config(root, name, batch_size, labelled)
    trainer = build_trainer(config, model=_group_norm_student(config), trainer_class=_Trainer)
    initial = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    served = {"offline": 0, "online": 0}
    targets = trainer.model.distiller.teachers.teacher_targets

    def counting(batch, device, teachers=None):
        record = batch[OFFLINE_KEY].get("probe")
        offline = 0 if record is None else len(record["samples"])
        served["offline"] += offline
        served["online"] += batch["images"].shape[0] - offline
        return targets(batch, device, teachers)

    trainer.model.distiller.teachers.teacher_targets = counting
    trainer.train()
    return {"model": trainer.model.state_dict(), "initial": initial, "step": trainer.step, "served": served}


def _worker(rank: int, root: str, port: int, labelled: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    result = _train(Path(root), "ddp", PER_RANK_BATCH, labelled)
    torch.save(result, Path(root) / f"rank{rank}.pt")


def _run(worker, args: tuple) -> None:
    context = mp.start_processes(worker, args=args, nprocs=WORLD_SIZE, join=False, start_method="fork")
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish within 180 s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_losses(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
def test_hybrid_distillation_under_ddp_matches_one_process(tmp_path, labelled):
    data_yaml = _write_square_data(tmp_path)
    teacher = build_teacher("covariant_probe", random_init=True, image_size=64)
    dataset = build_dataset({"dataset": str(data_yaml), "img_size": 64}, "train", train=False)
    extract_features(teacher, dataset, tmp_path / "store", batch_size=4, num_workers=0, progress=False, split="train")

    _run(_worker, (str(tmp_path), _free_port(), labelled))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    single = _train(tmp_path, "single", PER_RANK_BATCH * WORLD_SIZE, labelled)

    assert ranks[0]["step"] == ranks[1]["step"] == single["step"] == STEPS
    # both sources ran, in the same mix
    assert single["served"]["offline"] > 0 and single["served"]["online"] > 0
    for key in ("offline", "online"):
        assert ranks[0]["served"][key] + ranks[1]["served"][key] == single["served"][key]
    moved = 0
    for name, value in single["model"].items():
        torch.testing.assert_close(ranks[0]["model"][name], ranks[1]["model"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["model"][name], value, rtol=1e-5, atol=1e-6)
        moved += int(not torch.allclose(value, single["initial"][name], rtol=0, atol=1e-6))
    assert moved > len(single["model"]) // 2
    # the logged per-step losses (rank means, averaged over ranks) equal the global-batch values
    ddp_records, single_records = _train_losses(tmp_path / "runs" / "ddp"), _train_losses(tmp_path / "runs" / "single")
    assert [record["step"] for record in ddp_records] == list(range(1, STEPS + 1))
    for name in TERMS:
        ddp_values = [record[f"loss/{name}"] for record in ddp_records]
        single_values = [record[f"loss/{name}"] for record in single_records]
        assert ddp_values == pytest.approx(single_values, rel=1e-5)


def _write_back_worker(rank: int, root: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    config = _config(Path(root), "write_back", PER_RANK_BATCH, labelled=True)
    config.teachers["probe"].write_back = True
    config.train.epochs = 1
    build_trainer(config, trainer_class=_Trainer).train()


@pytest.mark.slow
def test_write_back_under_ddp_stores_every_image_once(tmp_path):
    """Each rank writes its own shards; the image the sampler repeats to pad 7 samples to
    2 x 4 reaches both ranks and is written once; the values are extraction's."""
    data_yaml = _write_square_data(tmp_path, num_train=7)
    _run(_write_back_worker, (str(tmp_path), _free_port()))
    dataset = build_dataset({"dataset": str(data_yaml), "img_size": 64}, "train", train=False)
    reference = extract_features(build_teacher("covariant_probe", random_init=True, image_size=64), dataset,
                                 tmp_path / "reference", num_workers=0, progress=False, split="train")
    store = FeatureStore.open(tmp_path / "store", verify=True)
    records = [json.loads(path.read_text()) for path in sorted((tmp_path / "store" / "shards").glob("rank*.json"))]
    assert sorted(sample_id for record in records for sample_id in record["ids"]) == sorted(dataset.ids)
    assert {record["name"].split("-")[0] for record in records} == {"rank0", "rank1"}
    assert store.fingerprint == reference.fingerprint and store.manifest["num_samples"] == len(dataset)
    written, expected = store.read_many(dataset.ids), reference.read_many(dataset.ids)
    np.testing.assert_allclose(written["embed"], expected["embed"], rtol=2e-3, atol=2e-3)
