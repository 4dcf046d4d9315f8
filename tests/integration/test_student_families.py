"""Every student family's experiment config trains a few steps with SAM2 distillation.

The shipped `configs/experiments/{vit,repvit,mamba}_sam2_coco.yaml` are used as written,
with the sizes turned down for a CPU test: the smallest backbone of each family, 64 px
images, the SAM2.1 Hiera-T teacher at random init and 64 px, and the built-in data.
"""

from pathlib import Path

import pytest

from vfmkd.config import load_config
from vfmkd.core.build import build_trainer
from vfmkd.datasets import build_dataset
from vfmkd.features.extract import extract_features
from vfmkd.teachers import build_teacher

ROOT = Path(__file__).resolve().parents[2]
SMALL_BACKBONE = {
    "vit": ["model.backbone.size=tiny", "model.backbone.img_size=64"],
    "repvit": ["model.backbone.variant=m0_9"],
    "mamba": ["model.backbone.size=nano"],
}


@pytest.fixture(scope="module")
def sam2_store(tmp_path_factory, synthetic_data_yaml):
    root = tmp_path_factory.mktemp("families")
    data_yaml = synthetic_data_yaml
    teacher = build_teacher("sam2.1_hiera_t", random_init=True, image_size=64, features=["embed"])
    dataset = build_dataset({"dataset": str(data_yaml), "img_size": 64}, "train", train=False)
    extract_features(teacher, dataset, root / "sam2", batch_size=4, num_workers=0, progress=False, split="train")
    return root, data_yaml


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(SMALL_BACKBONE))
def test_family_config_trains_with_sam2_distillation(sam2_store, family, monkeypatch):
    root, data_yaml = sam2_store
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(root / "cache"))
    config = load_config(
        ROOT / f"configs/experiments/{family}_sam2_coco.yaml",
        [
            *SMALL_BACKBONE[family],
            "model.heads.detection.num_classes=6",
            "teachers.sam2.name=sam2.1_hiera_t",
            "teachers.sam2.image_size=64",
            "teachers.sam2.allow_random_init=true",
            f"teachers.sam2.feature_path={root / 'sam2'}",
            f"data.dataset={data_yaml}",
            "data.img_size=64", "data.batch_size=2", "data.num_workers=0",
            "train.max_steps=2", "train.log_interval=1", "train.eval_interval=100",
            f"train.output_dir={root / 'runs'}",
        ],
    )
    result = build_trainer(config).train()
    assert result["step"] == 2
    log = (Path(result["run_dir"]) / "metrics.jsonl").read_text()
    assert "distill/sam2/embed<-p4" in log and "det/box" in log


DETR_CONFIGS = {
    "yolov8s_rtdetr_sam2_coco": ["model.backbone.scale=n"],
    "repvit_rtdetr_sam2_coco": SMALL_BACKBONE["repvit"],
    "vit_rtdetr_coco": SMALL_BACKBONE["vit"],
}


@pytest.mark.parametrize("name", sorted(DETR_CONFIGS))
def test_detr_head_configs_train(sam2_store, name, monkeypatch):
    """The RT-DETR head configs train a few steps as written (sizes turned down), with SAM2
    distillation where the config has it, and evaluate (box mAP keys)."""
    root, data_yaml = sam2_store
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(root / "cache"))
    overrides = [
        *DETR_CONFIGS[name],
        "model.heads.detection.num_classes=6",
        "model.heads.detection.hidden_dim=32", "model.heads.detection.num_queries=20",
        "model.heads.detection.num_denoising=10", "model.heads.detection.ffn_dim=64",
        "model.heads.detection.num_heads=4", "model.heads.detection.aifi_heads=4",
        "model.heads.detection.aifi_ffn_dim=64",
        f"data.dataset={data_yaml}",
        "data.img_size=64", "data.batch_size=2", "data.num_workers=0",
        "train.max_steps=2", "train.log_interval=1", "train.eval_interval=2",
        f"train.output_dir={root / 'runs'}",
    ]
    if "sam2" in name:
        overrides += [
            "teachers.sam2.name=sam2.1_hiera_t", "teachers.sam2.image_size=64", "teachers.sam2.allow_random_init=true",
            f"teachers.sam2.feature_path={root / 'sam2'}",
        ]
    result = build_trainer(load_config(ROOT / f"configs/experiments/{name}.yaml", overrides)).train()
    assert result["step"] == 2 and "mAP50" in result["metrics"]
    log = (Path(result["run_dir"]) / "metrics.jsonl").read_text()
    assert "det/giou" in log and "det/cls_dn" in log
    assert ("distill/sam2/embed<-p4" in log) == ("sam2" in name)
