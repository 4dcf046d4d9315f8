from pathlib import Path

import pytest

from vfmkd.config import ConfigError, apply_overrides, load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_seed_config_parses_as_printed():
    config = load_config(ROOT / "configs/experiments/yolov8_sam2_coco.yaml")
    assert config.experiment_name == "yolov8_sam2_coco_detection"
    assert config.model.backbone == {"type": "yolov8", "config": "configs/backbones/yolov8.yaml"}
    assert config.model.heads["detection"]["num_classes"] == 80
    assert config.teachers["sam2"].feature_path == "teacher_features/sam2/"
    assert config.distillation.offline_ratio == 0.8
    assert config.distillation.losses["detection"].weight == 5.0
    assert config.distillation.losses["feature_mse"].teacher == "sam2"
    assert (config.data.dataset, config.data.batch_size, config.data.num_workers) == ("coco128", 16, 8)
    assert (config.train.epochs, config.train.lr, config.train.optimizer) == (100, 0.01, "adamw")


def test_every_shipped_experiment_config_parses():
    for path in sorted((ROOT / "configs/experiments").glob("*.yaml")):
        load_config(path)


def test_unknown_key_names_key_and_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\ndata:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message
    assert "train.epoch" in message and "'epochs'" in message
    assert "data.batch_sise" in message and "'batch_size'" in message


def test_unknown_key_inside_named_entries():
    with pytest.raises(ConfigError, match=r"teachers\.sam2\.feature_pth.*'feature_path'"):
        validate_config({"teachers": {"sam2": {"feature_pth": "x"}}})


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        validate_config({"train": {"optimizer": "adam"}})
    with pytest.raises(ConfigError, match=r"multiple of 32"):
        validate_config({"data": {"img_size": 100}})


def test_overrides_parse_values_and_validate():
    config = load_config(
        ROOT / "configs/experiments/yolov8_sam2_coco.yaml",
        ["train.lr=1e-3", "data.img_size=320", "model.backbone.scale=s", "train.grad_clip=null"],
    )
    assert config.train.lr == pytest.approx(1e-3)
    assert config.data.img_size == 320
    assert config.model.backbone["scale"] == "s"
    assert config.train.grad_clip is None
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+"):
        load_config(path)


def test_teacher_config_includes_are_merged_when_loading():
    config = load_config(ROOT / "configs/experiments/yolov8_sam2_dinov2_coco.yaml")
    dino = config.teachers["dino"]
    assert dino.config is None  # resolved: the loaded config holds every setting itself
    assert (dino.name, dino.image_size, dino.features, dino.normalize) == ("dinov2_vitb14", 518, ["patch"], True)


def test_teacher_include_keys_of_the_entry_win_and_errors_name_the_file(tmp_path):
    include = tmp_path / "teacher.yaml"
    include.write_text("name: dinov2_vits14\nimage_size: 224\nfeatures: [patch]\n")
    config = validate_config({"teachers": {"dino": {"config": str(include), "image_size": 448}}})
    assert (config.teachers["dino"].name, config.teachers["dino"].image_size) == ("dinov2_vits14", 448)
    assert config.teachers["dino"].features == ["patch"]

    include.write_text("name: dinov2_vits14\nimage_sise: 224\n")
    with pytest.raises(ConfigError, match=rf"(?s)teachers\.dino\.config: {include}: .*image_sise.*did you mean 'image_size'"):
        validate_config({"teachers": {"dino": {"config": str(include)}}})
    include.write_text("name: dinov2_vits14\nimage_size: 8\n")
    with pytest.raises(ConfigError, match=rf"{include}: invalid teacher config:\n  image_size"):
        validate_config({"teachers": {"dino": {"config": str(include)}}})
    with pytest.raises(ConfigError, match=r"teachers\.dino\.config: .*missing\.yaml' not found"):
        validate_config({"teachers": {"dino": {"config": str(tmp_path / "missing.yaml")}}})
