"""build_teacher: names and aliases, weights files, refusing unsafe pickles, seeded random init."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from vfmkd.teachers import MissingWeightsError, build_teacher, canonical_teacher_name, teacher_names
from vfmkd.teachers.weights import UnsafeCheckpointError, load_checkpoint_file

NAME = "dinov2_vits14"
SIZE = 56  # 4 x 4 patches: fast


def _official_file(folder: Path, file_name: str = "dinov2_vits14_pretrain.pth") -> Path:
    """A DINOv2 ViT-S/14 checkpoint in the official layout (random values)."""
    import timm

    torch.manual_seed(3)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    state = {key: value + 0.01 * torch.randn_like(value) for key, value in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 384)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


class _RunsACommand:
    """Unpickling this would run a shell command that writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"echo pwned > {self.marker}",))


def test_names_and_aliases() -> None:
    names = teacher_names()
    assert {"dino", "sam", "sam2", "dinov2_vitb14", "sam_vit_h", "sam2.1_hiera_b+"} <= set(names)
    assert canonical_teacher_name("dino") == "dinov2_vitb14"
    assert canonical_teacher_name("sam2") == "sam2.1_hiera_b+"
    assert canonical_teacher_name("sam") == "sam_vit_h"
    with pytest.raises(KeyError, match="Known: .*dinov2_vitb14"):
        build_teacher("dinov9_vitz14", random_init=True)


def test_random_init_is_seeded_loud_and_leaves_the_global_stream(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING):
        first = build_teacher(NAME, random_init=True, seed=0, image_size=SIZE)
    assert torch.equal(torch.rand(3), expected_next)
    assert any(record.levelno == logging.WARNING and "RANDOM INIT" in record.getMessage()
               and "meaningless" in record.getMessage() for record in caplog.records)
    second = build_teacher(NAME, random_init=True, seed=0, image_size=SIZE)
    other = build_teacher(NAME, random_init=True, seed=1, image_size=SIZE)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    assert first.fingerprint() == second.fingerprint()
    assert first.weights_sha256 == second.weights_sha256 == first.state_dict_sha256()
    assert other.fingerprint() != first.fingerprint() and other.weights_sha256 != first.weights_sha256
    assert first.random_init and first.fingerprint_fields()["random_init"] is True
    assert not first.training and all(not parameter.requires_grad for parameter in first.parameters())


def test_alias_builds_the_owner() -> None:
    teacher = build_teacher("dino", random_init=True, image_size=28, features=["cls"])
    assert teacher.name == "dinov2_vitb14" and list(teacher.feature_specs) == ["cls"]


def test_missing_default_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError) as caught:
        build_teacher(NAME, weights_dir=tmp_path / "weights")
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert str(tmp_path / "weights" / "dinov2_vits14_pretrain.pth") in message
    assert "vfmkd weights download dinov2_vits14" in message and "--random-init" in message

    with pytest.raises(MissingWeightsError, match=r"python tools/download_sam_weights\.py --model vit_h"):
        build_teacher("sam", weights_dir=tmp_path)
    with pytest.raises(MissingWeightsError, match="request access.*--weights PATH"):
        build_teacher("dinov3_vits16", weights_dir=tmp_path)
    with pytest.raises(MissingWeightsError, match="not found: .*nowhere.pth"):
        build_teacher(NAME, weights=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="not both"):
        build_teacher(NAME, weights=tmp_path / "nowhere.pth", random_init=True)


def test_default_weights_file_is_loaded_hashed_and_frozen(tmp_path: Path) -> None:
    path = _official_file(tmp_path / "weights")
    teacher = build_teacher(NAME, weights_dir=tmp_path / "weights", image_size=SIZE)
    assert teacher.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert teacher.random_init is False
    assert not teacher.training and all(not parameter.requires_grad for parameter in teacher.parameters())
    state = torch.load(path, weights_only=True)
    assert torch.equal(teacher.model.blocks[0].ls1.gamma, state["blocks.0.ls1.gamma"])

    safetensors_path = _official_file(tmp_path, "copy.safetensors")
    copy = build_teacher(NAME, weights=safetensors_path, image_size=SIZE)
    pixels = torch.randn(1, 3, SIZE, SIZE)
    assert torch.equal(copy.extract(pixels)["patch"], teacher.extract(pixels)["patch"])
    assert copy.weights_sha256 == hashlib.sha256(safetensors_path.read_bytes()).hexdigest()
    assert copy.fingerprint() != teacher.fingerprint()  # same tensors, another file


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    payload = {"cls_token": torch.zeros(1, 1, 384), "evil": _RunsACommand(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as file:
            pickle.dump(payload, file, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        load_checkpoint_file(path)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        build_teacher(NAME, weights=path)
    assert not marker.exists()


def test_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    torch.save({"cls_token": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint_file(path)
