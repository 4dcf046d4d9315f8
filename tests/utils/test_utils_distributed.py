import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from vfmkd.config import validate_config
from vfmkd.utils import distributed
from vfmkd.core.build import build_trainer
from vfmkd.core.trainer import Trainer
from vfmkd.geometry import Frame

SIZE = 16
WORLD_SIZE = 2
PER_RANK_BATCH = 2


def test_single_process_defaults():
    assert distributed.init_distributed().world_size == 1
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.is_main_process() and not distributed.is_distributed()
    value = torch.tensor([1.0, 3.0])
    assert torch.equal(distributed.all_reduce_mean(value), value)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.cleanup()
    wrapped = nn.DataParallel(nn.Linear(2, 2))
    assert isinstance(distributed.unwrap_model(wrapped), nn.Linear)


class _NoNormModel(nn.Module):
    """No BatchNorm: per-rank batch statistics would make DDP differ from one big batch."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"backbone": {"type": "tiny"}}
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 1))

    def forward(self, images: torch.Tensor) -> dict:
        return {"detection": [self.body(images)]}

    def predict(self, outputs: dict, **kwargs) -> list[dict]:
        return [
            {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "scores": torch.ones(1), "labels": torch.zeros(1).long()}
            for _ in range(outputs["detection"][0].shape[0])
        ]


class _Dataset(torch.utils.data.Dataset):
    names = ["thing"]
    eval_category_ids = [1]

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict:
        image = (torch.rand(3, SIZE, SIZE) * 255).to(torch.uint8)  # augmentation-like randomness
        return {"image": image, "target": torch.tensor([index / 16.0])}

    def coco_ground_truth(self) -> dict:
        return {
            "images": [{"id": i, "width": SIZE, "height": SIZE} for i in range(16)],
            "annotations": [
                {"id": i + 1, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 0}
                for i in range(16)
            ],
            "categories": [{"id": 1, "name": "thing"}],
        }


def _collate(samples: list[dict]) -> dict:
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "targets": {"value": torch.cat([s["target"] for s in samples])},
        "frames": [[Frame.identity(SIZE, SIZE)] for _ in samples],
    }


def _per_image_mean_loss(model, outputs, batch) -> dict:
    """A plain mean over images, so the mean of per-rank means equals the global-batch mean."""
    prediction = outputs["detection"][0].float().mean(dim=(1, 2, 3))
    return {"mse": (prediction - batch["targets"]["value"]).pow(2).mean()}


def _config(output_dir: str, name: str, batch_size: int):
    return validate_config(
        {
            "experiment_name": name,
            "data": {"batch_size": batch_size, "num_workers": 0, "img_size": 32},
            "train": {
                "epochs": 2, "optimizer": "sgd", "lr": 0.1, "warmup_steps": 1, "accumulate": 2, "amp": False,
                "ema_tau": 2.0, "grad_clip": 5.0, "log_interval": 1, "output_dir": output_dir, "device": "cpu",
            },
        }
    )


class _NanOnRankOne:
    """The per-image mean loss, but NaN on rank 1's second micro-batch only."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, outputs, batch) -> dict:
        self.calls += 1
        losses = _per_image_mean_loss(model, outputs, batch)
        if os.environ.get("RANK") == "1" and self.calls == 2:
            losses["mse"] = losses["mse"] * float("nan")
        return losses


def _train(output_dir: str, name: str, batch_size: int, loss_fn=_per_image_mean_loss) -> Trainer:
    torch.manual_seed(0)
    trainer = build_trainer(
        _config(output_dir, name, batch_size),
        model=_NoNormModel(),
        train_dataset=_Dataset(),
        val_dataset=_Dataset(),
        loss_fn=loss_fn,
        collate_fn=_collate,
    )
    trainer.train()
    return trainer


def _worker(rank: int, output_dir: str, port: int, with_nan: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    loss_fn = _NanOnRankOne() if with_nan else _per_image_mean_loss
    trainer = _train(output_dir, "ddp", PER_RANK_BATCH, loss_fn)
    torch.save(
        {
            "model": trainer.model.state_dict(),
            "ema": trainer.ema.module.state_dict(),
            "step": trainer.step,
            "skipped_steps": trainer.skipped_steps,
        },
        os.path.join(output_dir, f"rank{rank}.pt"),
    )


def _run_workers(output_dir, with_nan: bool) -> list[dict]:
    context = mp.start_processes(
        _worker, args=(str(output_dir), _free_port(), with_nan), nprocs=WORLD_SIZE, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish within 120 s")
    return [torch.load(output_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path):
    ranks = _run_workers(tmp_path, with_nan=False)
    single = _train(str(tmp_path), "single", PER_RANK_BATCH * WORLD_SIZE)
    assert ranks[0]["step"] == ranks[1]["step"] == single.step == 4
    for key in ("model", "ema"):
        reference = single.model.state_dict() if key == "model" else single.ema.module.state_dict()
        for name, value in reference.items():
            torch.testing.assert_close(ranks[0][key][name], ranks[1][key][name], rtol=0, atol=0)
            torch.testing.assert_close(ranks[0][key][name], value, rtol=1e-5, atol=1e-6)
    # rank 0 alone logs and writes checkpoints
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert (tmp_path / "ddp" / "checkpoints" / "last.pt").is_file()
    single_records = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    ddp_losses = [r["loss/total"] for r in records if r["kind"] == "train"]
    single_losses = [r["loss/total"] for r in single_records if r["kind"] == "train"]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)


@pytest.mark.slow
def test_ddp_non_finite_loss_on_one_rank_skips_the_step_on_all(tmp_path):
    ranks = _run_workers(tmp_path, with_nan=True)
    assert ranks[0]["skipped_steps"] == ranks[1]["skipped_steps"] == 1
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    for name, value in ranks[0]["model"].items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(ranks[1]["model"][name], value, rtol=0, atol=0)
