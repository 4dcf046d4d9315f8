import json
import os
import random
import signal

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from vfmkd.config import validate_config
from vfmkd.core import Trainer, build_trainer
from vfmkd.core.checkpoint import load_checkpoint
from vfmkd.core.loader import ResumableSampler, SeededDataset
from vfmkd.core.trainer import TrainingDivergedError
from vfmkd.distillation.distiller import DistilledModel, task_loss_weights
from vfmkd.geometry import Frame

SIZE = 32
NUM_CLASSES = 2


class TinyDetector(nn.Module):
    """A conv net with BatchNorm, dropout (draws on torch's generator) and the model contract."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"backbone": {"type": "tiny"}}
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Dropout(0.2))
        self.head = nn.Conv2d(8, 4 + NUM_CLASSES, 1)

    def forward(self, images: torch.Tensor) -> dict:
        features = self.stem(images)
        return {"features": {"p3": features}, "detection": [self.head(features)]}

    def loss(self, outputs: dict, targets: dict, weights: dict | None = None) -> dict:
        prediction = outputs["detection"][0].float()
        box_target = targets["boxes"].mean() / SIZE
        weight = (weights or {}).get("detection", 1.0)
        return {
            "det/box": weight * (prediction[:, :4].mean() - box_target) ** 2,
            "det/cls": weight * prediction[:, 4:].pow(2).mean(),
            "det/dfl": weight * prediction.abs().mean() * 0.1,
        }

    def evaluator_names(self) -> list[str]:
        return ["coco_bbox"]

    def predict(self, outputs: dict, batch=None, *, conf_threshold: float, iou_threshold: float, max_det: int) -> list[dict]:
        batch_size = outputs["detection"][0].shape[0]
        box = torch.tensor([[4.0, 4.0, 20.0, 20.0]])
        return [
            {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])} for _ in range(batch_size)
        ]


class AugmentedDataset(torch.utils.data.Dataset):
    """Images whose content depends on all three global generators (like real augmentation)."""

    names = ["a", "b"]
    eval_category_ids = [0, 1]

    def __init__(self, length: int = 10) -> None:
        self.length = length
        self.ids = [str(index) for index in range(length)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        base = torch.full((3, SIZE, SIZE), index * 10, dtype=torch.int32)
        noise = torch.randint(0, 50, (3, SIZE, SIZE), dtype=torch.int32)
        shift = random.randint(0, 20) + int(np.random.randint(0, 20))
        image = (base + noise + shift).clamp(0, 255).to(torch.uint8)
        box = torch.tensor([[2.0 + shift / 4, 2.0, 20.0, 24.0]])
        return {"image": image, "boxes": box, "cls": torch.tensor([index % NUM_CLASSES]), "index": index}

    def coco_ground_truth(self) -> dict:
        images = [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"} for i in range(self.length)]
        annotations = [
            {"id": i + 1, "image_id": i, "category_id": i % NUM_CLASSES, "bbox": [4.0, 4.0, 16.0, 16.0],
             "area": 256.0, "iscrowd": 0}
            for i in range(self.length)
        ]
        categories = [{"id": i, "name": name} for i, name in enumerate(self.names)]
        return {"images": images, "annotations": annotations, "categories": categories}


def collate(samples: list[dict]) -> dict:
    boxes = torch.cat([s["boxes"] for s in samples])
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "targets": {
            "batch_idx": torch.cat([torch.full((len(s["boxes"]),), i) for i, s in enumerate(samples)]),
            "cls": torch.cat([s["cls"] for s in samples]),
            "boxes": boxes,
        },
        "frames": [[Frame.identity(SIZE, SIZE)] for _ in samples],
        "ids": [str(s["index"]) for s in samples],
    }


def make_config(tmp_path, name: str = "run", **train):
    settings = {
        "epochs": 2, "optimizer": "sgd", "lr": 0.05, "warmup_steps": 2, "accumulate": 2, "amp": True,
        "ema_tau": 3.0, "grad_clip": 1.0, "log_interval": 1, "output_dir": str(tmp_path), "device": "cpu",
    }
    settings.update(train)
    return validate_config(
        {
            "experiment_name": name,
            "data": {"batch_size": 2, "num_workers": 0, "img_size": 32},
            "distillation": {"losses": {"detection": {"weight": 5.0}}},
            "train": settings,
        }
    )


def make_trainer(config, trainer_class=Trainer, resume: bool = False, **kwargs):
    torch.manual_seed(123)
    return build_trainer(
        config,
        model=kwargs.pop("model", None) or TinyDetector(),
        train_dataset=kwargs.pop("train_dataset", None) or AugmentedDataset(),
        val_dataset=AugmentedDataset(4),
        collate_fn=collate,
        resume=resume,
        trainer_class=trainer_class,
        **kwargs,
    )


class StopAt(Trainer):
    stop_step = 0

    def after_step(self) -> None:
        if self.step == self.stop_step:
            self.request_stop()


def _assert_same_state(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("stop_step", [2, 3, 4])  # mid epoch, epoch boundary, after the boundary
def test_resume_continues_exactly(tmp_path, stop_step):
    # 10 samples / batch 2 = 5 micro-batches = 3 optimizer steps per epoch (2 + 2 + 1); 6 in all
    reference = make_trainer(make_config(tmp_path, "reference"))
    reference_result = reference.train()
    assert reference.step == 6 and reference.epoch == 2

    StopAt.stop_step = stop_step
    interrupted = make_trainer(make_config(tmp_path, "resumed"), StopAt)
    result = interrupted.train()
    assert result["interrupted"] and result["step"] == stop_step
    assert load_checkpoint(result["last"])["step"] == stop_step

    resumed = make_trainer(make_config(tmp_path, "resumed"), resume=True)
    assert resumed.step == stop_step
    resumed_result = resumed.train()
    assert resumed.step == 6 and not resumed_result["interrupted"]
    _assert_same_state(reference.model.state_dict(), resumed.model.state_dict())
    _assert_same_state(reference.ema.module.state_dict(), resumed.ema.module.state_dict())
    assert reference.ema.updates == resumed.ema.updates
    reference_momentum = [s["momentum_buffer"] for s in reference.optimizer.state_dict()["state"].values()]
    resumed_momentum = [s["momentum_buffer"] for s in resumed.optimizer.state_dict()["state"].values()]
    for first, second in zip(reference_momentum, resumed_momentum):
        torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    assert resumed_result["best_fitness"] == pytest.approx(reference_result["best_fitness"])


def test_sigterm_stops_with_a_checkpoint(tmp_path):
    class SignalAt(Trainer):
        def after_step(self) -> None:
            if self.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    result = make_trainer(make_config(tmp_path), SignalAt).train()
    assert result["interrupted"] and result["step"] == 1
    assert load_checkpoint(result["last"])["step"] == 1
    assert signal.getsignal(signal.SIGTERM) == previous


def test_run_outputs_logs_and_checkpoints(tmp_path):
    config = make_config(tmp_path, "outputs", max_steps=4, accumulate=1, save_interval=1)
    result = make_trainer(config).train()
    run_dir = tmp_path / "outputs"
    assert result["run_dir"] == str(run_dir) and result["step"] == 4
    assert result["last"] == str(run_dir / "checkpoints" / "last.pt")
    assert result["best"] == str(run_dir / "checkpoints" / "best.pt")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    first = train_records[0]
    for key in ("epoch", "lr", "loss/det/box", "loss/det/cls", "loss/det/dfl", "loss/total",
                "images_per_second", "data_time_share"):
        assert key in first, key
    assert 0.0 <= first["data_time_share"] <= 1.0
    assert {key for key in first if key.startswith("loss/")} == {"loss/det/box", "loss/det/cls", "loss/det/dfl", "loss/total"}
    eval_records = [r for r in records if r["kind"] == "eval"]
    assert eval_records and {"mAP", "mAP50", "mAP75", "per_class", "fitness"} <= set(eval_records[-1])
    assert list((run_dir / "tb").glob("events.*"))
    assert "training outputs" in (run_dir / "train.log").read_text()
    # 5 micro-batches per epoch, max_steps=4 < 5: the run ended mid-epoch with one final evaluation
    assert len(eval_records) == 1 and result["epoch"] == 0
    checkpoint = torch.load(result["last"], weights_only=True)
    assert checkpoint["batch_in_epoch"] == 4 and checkpoint["ema"]["updates"] == 4


def test_detection_weight_scales_task_losses():
    model = TinyDetector().eval()
    batch = collate([AugmentedDataset()[0], AugmentedDataset()[1]])
    batch = {**batch, "images": batch["images"].float() / 255}
    plain = DistilledModel(model)(batch)
    config = validate_config({"distillation": {"losses": {"detection": {"weight": 5.0}}}})
    assert task_loss_weights(config) == {"detection": 5.0}
    weighted = DistilledModel(model, task_weights=task_loss_weights(config))(batch)
    assert set(plain) == set(weighted) == {"det/box", "det/cls", "det/dfl"}
    for name in plain:
        torch.testing.assert_close(weighted[name], 5.0 * plain[name])
    assert task_loss_weights(validate_config({})) == {}
    assert DistilledModel(model, task_losses=False)(batch) == {}


def test_loss_terms_are_summed(tmp_path):
    seen = []

    def loss_fn(model, outputs, batch):
        assert batch["images"].dtype == torch.float32 and batch["images"].max() <= 1.0
        value = outputs["detection"][0].float().pow(2).mean()
        seen.append(float(value.detach()))
        return {"a": value, "b": 2 * value}

    config = make_config(tmp_path, "sum", max_steps=1, accumulate=1, amp=False)
    trainer = make_trainer(config, loss_fn=loss_fn)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "sum" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss/total"] == pytest.approx(3 * seen[0], rel=1e-6)


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    calls = {"count": 0}

    def sometimes_nan(model, outputs, batch):
        calls["count"] += 1
        value = outputs["detection"][0].float().mean()
        return {"a": value * float("nan") if calls["count"] == 2 else value}

    config = make_config(tmp_path, "skip", max_steps=3, accumulate=1, amp=False)
    trainer = make_trainer(config, loss_fn=sometimes_nan)
    result = trainer.train()
    assert result["skipped_steps"] == 1 and result["step"] == 3
    assert trainer.ema.updates == 2

    def always_nan(model, outputs, batch):
        return {"a": outputs["detection"][0].float().mean() * float("nan")}

    config = make_config(tmp_path, "diverged", max_steps=20, accumulate=1, amp=False)
    with pytest.raises(TrainingDivergedError, match="in a row"):
        make_trainer(config, loss_fn=always_nan).train()


def test_resume_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        make_trainer(make_config(tmp_path, "fresh"), resume=True)


def test_seeded_dataset_is_reproducible_and_keeps_main_process_rng():
    dataset = SeededDataset(AugmentedDataset(), seed=5)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    first = dataset[(1, 3)]["image"]
    assert torch.equal(torch.rand(1), expected_next)  # the trainer's stream is untouched
    assert torch.equal(dataset[(1, 3)]["image"], first)
    assert not torch.equal(dataset[(2, 3)]["image"], first)  # another epoch, another augmentation


def test_sampler_order_depends_on_epoch_and_skips_consumed_samples():
    dataset = AugmentedDataset(10)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=1)
    sampler.set_epoch(0)
    order = list(sampler)
    assert sorted(index for _, index in order) == list(range(10)) and all(epoch == 0 for epoch, _ in order)
    sampler.set_start(4)
    assert list(sampler) == order[4:] and len(sampler) == 6
    sampler.set_start(0)
    sampler.set_epoch(1)
    assert [index for _, index in sampler] != [index for _, index in order]
    halves = [ResumableSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=1) for rank in (0, 1)]
    assert sorted(index for half in halves for _, index in half) == list(range(10))


@pytest.mark.slow
def test_worker_processes_give_the_same_run(tmp_path):
    single = make_trainer(make_config(tmp_path, "workers0", max_steps=3))
    single.train()
    config = make_config(tmp_path, "workers2", max_steps=3)
    config.data.num_workers = 2
    workers = make_trainer(config)
    workers.train()
    _assert_same_state(single.model.state_dict(), workers.model.state_dict())


def test_a_run_shorter_than_the_log_interval_still_logs_its_last_step(tmp_path):
    config = make_config(tmp_path, "short", max_steps=3, accumulate=1, amp=False, log_interval=10)
    make_trainer(config).train()
    records = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if record["kind"] == "train"]
    assert [record["step"] for record in train] == [3] and "loss/total" in train[0]
