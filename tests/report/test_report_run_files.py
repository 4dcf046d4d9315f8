"""What the report reads from a run directory: random teachers, best metrics, per-class AP,
the run at a glance (wall time from train.log, speed, data wait), and the curves' figures."""

from __future__ import annotations

import json

from vfmkd.report.curves import eval_figure, loss_figure, optimisation_figure
from vfmkd.report.run_files import best_metrics, per_class_rows, random_teachers, read_run, summary_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_random_teachers_from_the_config_and_from_the_store(tmp_path):
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"weights")
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"build_args": {"random_init": True}}))
    teachers = {
        "real": {"model_path": str(weights), "allow_random_init": True},
        "missing": {"model_path": str(tmp_path / "absent.pt"), "allow_random_init": True},
        "store": {"model_path": str(weights), "feature_path": str(store)},
        "off": {"allow_random_init": True, "enabled": False},
    }
    found = random_teachers({"teachers": teachers})
    assert [entry.split(" ")[0] for entry in found] == ["missing", "store"]
    assert "absent.pt" in found[0] and "random init" in found[1]


def _records() -> list[dict]:
    return [
        {"kind": "train", "step": 1, "loss/total": 3.0, "loss/det/box": 2.0, "loss/distill/t/embed<-p4": 1.0,
         "images_per_second": 10.0, "data_time_share": 0.2, "lr": 0.01, "grad_norm": 5.0},
        {"kind": "eval", "step": 2, "mAP": 0.1, "mAP50": 0.2, "fidelity/t/embed<-p4/cosine": 0.5,
         "fidelity/t/embed<-p4/nmse": 0.4, "per_class": {"cat": 0.1, "dog": None}, "num_detections": 7},
        {"kind": "train", "step": 3, "loss/total": 2.0, "loss/det/box": 1.5, "loss/distill/t/embed<-p4": 0.5,
         "images_per_second": 30.0, "data_time_share": 0.4, "lr": 0.005, "grad_norm": 4.0},
        {"kind": "data", "step": 3, "samples/labeled": 4},
        {"kind": "eval", "step": 4, "mAP": 0.05, "mAP50": 0.3, "fidelity/t/embed<-p4/cosine": 0.7,
         "fidelity/t/embed<-p4/nmse": 0.6, "per_class": {"cat": 0.2, "dog": None},
         "mask_per_class": {"cat": 0.15, "dog": None}},
    ]


def test_best_metrics_and_the_last_per_class_ap():
    best = best_metrics(_records())
    assert best["mAP"] == (0.1, 2) and best["mAP50"] == (0.3, 4)
    assert best["fidelity/t/embed<-p4/cosine"] == (0.7, 4)
    assert best["fidelity/t/embed<-p4/nmse"] == (0.4, 2)  # lower is better
    assert "num_detections" not in best and "per_class" not in best
    assert per_class_rows(_records()) == (4, [("cat", 0.2, 0.15), ("dog", None, None)])


def test_the_run_at_a_glance(tmp_path):
    run_dir = tmp_path / "exp"
    run_dir.mkdir()
    config = {"experiment_name": "exp", "model": {"backbone": {"type": "yolov8", "scale": "n"},
              "heads": {"detection": {"type": "yolo_head"}}},
              "teachers": {"sam2": {"name": "sam2.1_hiera_t", "model_path": "w.pt", "offline_ratio": 0.8}},
              "data": {"dataset": "shapes", "img_size": 256, "batch_size": 16}, "train": {"max_steps": 3}}
    (run_dir / "config.yaml").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in _records()))
    (run_dir / "train.log").write_text(
        "2026-01-31 09:00:48,696 INFO vfmkd.core.trainer: training exp\n"
        "student  adapter\n"  # a table's continuation line
        "2026-01-31 10:02:50,100 INFO vfmkd.core.hooks: done\n"
    )
    rows = dict(summary_rows(read_run(run_dir)))
    assert rows["experiment"] == "exp" and rows["steps"] == "3 of 3"
    assert rows["student"] == "yolov8 n; heads: detection (yolo_head)"
    assert rows["teachers"] == "sam2: sam2.1_hiera_t (w.pt; 80% offline)"
    assert rows["wall time"].startswith("1h 02m 01s")
    assert rows["images/s"].startswith("20.0") and rows["data-wait share"].startswith("30%")
    assert rows["best mAP"] == "0.1000 (step 2)" and rows["best fidelity/t/embed<-p4/cosine"] == "0.7000 (step 4)"


def test_curves_are_png_figures_and_absent_without_records():
    for figure in (loss_figure, eval_figure, optimisation_figure):
        assert figure(_records()).startswith(PNG_SIGNATURE)
        assert figure([]) is None
