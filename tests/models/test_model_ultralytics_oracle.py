"""Parity with the Ultralytics implementation, used only as a test oracle (never imported by vfmkd)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.ultralytics_oracle import import_ultralytics  # noqa: E402

ultralytics_tasks = import_ultralytics("ultralytics.nn.tasks")
ultralytics_loss = import_ultralytics("ultralytics.utils.loss")

from vfmkd.models import build_model  # noqa: E402
from vfmkd.models.heads import YOLOHead  # noqa: E402
from vfmkd.models.ultralytics_compat import convert_ultralytics_state_dict  # noqa: E402


def _oracle(num_classes: int = 80) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ultralytics_tasks.DetectionModel("yolov8n.yaml", nc=num_classes, verbose=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm statistics so that eval-mode parity means something
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
    return model.eval()


def _config(num_classes: int = 80) -> dict:
    return {
        "backbone": {"type": "yolov8", "scale": "n"},
        "heads": {"detection": {"type": "yolo_head", "num_classes": num_classes}},
    }


def _compare_with_oracle(oracle: torch.nn.Module, model: torch.nn.Module) -> None:
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        oracle.model[index].register_forward_hook(lambda _m, _i, out, index=index: captured.__setitem__(index, out))
        for index in (15, 18, 21)
    ]
    with torch.no_grad():
        _, raw = oracle(images)
        outputs = model.eval()(images)
    for hook in hooks:
        hook.remove()
    for level, index in (("p3", 15), ("p4", 18), ("p5", 21)):
        torch.testing.assert_close(outputs["features"][level], captured[index], atol=1e-4, rtol=0)
    maps = outputs["detection"]
    ours_boxes = torch.cat([m[:, :64].flatten(2) for m in maps], dim=2)
    ours_scores = torch.cat([m[:, 64:].flatten(2) for m in maps], dim=2)
    torch.testing.assert_close(ours_boxes, raw["boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_scores, raw["scores"], atol=1e-4, rtol=0)


def test_forward_matches_ultralytics_with_converted_weights() -> None:
    oracle = _oracle()
    model = build_model(_config())
    model.load_state_dict(convert_ultralytics_state_dict(oracle.state_dict()), strict=True)
    _compare_with_oracle(oracle, model)


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_ultralytics_state_dict_file_loads_through_build_model(tmp_path: Path, wrapper: str | None) -> None:
    oracle = _oracle()
    path = tmp_path / "yolov8n_state_dict.pt"
    state_dict = oracle.state_dict()
    torch.save(state_dict if wrapper is None else {wrapper: state_dict}, path)
    model = build_model({**_config(), "weights": str(path)})
    _compare_with_oracle(oracle, model)


def test_ultralytics_weights_for_other_class_count_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "nc3.pt"
    torch.save(_oracle(num_classes=3).state_dict(), path)
    with pytest.raises(ValueError, match="class_branches"):
        build_model({**_config(num_classes=80), "weights": str(path)})


def _random_outputs(num_classes: int, batch_size: int, size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for stride in (8, 16, 32):
        grid = size // stride
        level = torch.randn(batch_size, 64 + num_classes, grid, grid, generator=generator)
        level[:, :64] *= 2.0
        level[:, 64:] -= 1.0
        outputs.append(level)
    return outputs


def _random_targets(batch_size: int, size: int, seed: int, num_classes: int) -> dict[str, torch.Tensor]:
    # Integer corners and sides >= 16 px: exact through the oracle's normalised-xywh input, and
    # clear of its small-box enlargement (a later addition not in YOLOv8's assigner).
    generator = torch.Generator().manual_seed(seed)
    count = 7
    batch_idx = torch.tensor([0, 0, 0, 1, 1, 1, 1])[:count] % batch_size
    sizes = torch.randint(16, 64, (count, 2), generator=generator).float()
    corners = (torch.rand(count, 2, generator=generator) * (size - sizes)).floor()
    boxes = torch.cat((corners, corners + sizes), dim=1)
    classes = torch.randint(0, num_classes, (count,), generator=generator)
    return {"batch_idx": batch_idx, "cls": classes, "boxes": boxes}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_ultralytics_v8_detection_loss(seed: int) -> None:
    num_classes, batch_size, size = 4, 2, 128
    oracle = ultralytics_tasks.DetectionModel("yolov8n.yaml", nc=num_classes, verbose=False)
    oracle.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    criterion = ultralytics_loss.v8DetectionLoss(oracle)

    head = YOLOHead({"p3": 64, "p4": 128, "p5": 256}, {"p3": 8, "p4": 16, "p5": 32}, num_classes=num_classes)
    outputs = _random_outputs(num_classes, batch_size, size, seed)
    targets = _random_targets(batch_size, size, seed, num_classes)
    ours = head.loss(outputs, targets)

    boxes = targets["boxes"]
    xywh = torch.cat(((boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]), dim=1) / size
    batch = {"batch_idx": targets["batch_idx"].float(), "cls": targets["cls"].float().view(-1, 1), "bboxes": xywh}
    preds = {
        "boxes": torch.cat([o[:, :64].flatten(2) for o in outputs], dim=2),
        "scores": torch.cat([o[:, 64:].flatten(2) for o in outputs], dim=2),
        "feats": outputs,
    }
    _, detached = criterion(preds, batch)
    theirs = list(detached.values()) if isinstance(detached, dict) else list(detached)
    assert ours["det/box"] > 0 and ours["det/dfl"] > 0
    for name, expected in zip(("det/box", "det/cls", "det/dfl"), theirs):
        torch.testing.assert_close(ours[name].detach(), expected.float(), rtol=1e-4, atol=1e-6, msg=name)
