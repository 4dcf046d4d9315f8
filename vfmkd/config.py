"""The experiment YAML as typed, validated data.

One file describes an experiment: ``experiment_name``, ``model``, ``teachers``,
``distillation``, ``data``, ``train`` and ``eval``. Loading checks every key before any
work starts; an unknown key is an error that names the file, the key and the closest
valid key. ``--set a.b.c=value`` overrides go through the same checks.

Example (the seed's ``configs/experiments/yolov8_sam2_coco.yaml``)::

    experiment_name: yolov8_sam2_coco_detection
    model:
      backbone: {type: yolov8, config: configs/backbones/yolov8.yaml}
      heads: {detection: {type: yolo_head, num_classes: 80}}
    teachers:
      sam2: {enabled: true, offline: true, model_path: weights/sam2.1_hiera_base_plus.pt,
             feature_path: teacher_features/sam2/}
    distillation:
      offline_ratio: 0.8
      losses:
        feature_mse: {weight: 1.0, teacher: sam2}
        detection: {weight: 5.0}
    data: {dataset: coco128, batch_size: 16, num_workers: 8}
    train: {epochs: 100, lr: 0.01, optimizer: adamw}
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vfmkd.errors import UserError
from vfmkd.utils.io import atomic_write_text
from vfmkd.utils.paths import find_project_file


_ModelT = TypeVar("_ModelT", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message says where and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The student: ``backbone -> neck -> heads``.

    ``backbone``, ``neck`` and each head are ``{type: <registered name>, ...kwargs}``; the
    kwargs are checked against the registered class when the model is built.
    """

    backbone: dict[str, Any] = Field(default_factory=lambda: {"type": "yolov8", "scale": "n"})
    neck: dict[str, Any] | None = None
    heads: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"detection": {"type": "yolo_head", "num_classes": 80}}
    )
    weights: str | None = None

    @field_validator("backbone")
    @classmethod
    def _backbone_has_type(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "type" not in value and "config" not in value:
            raise ValueError("model.backbone needs a 'type' (e.g. yolov8) or a 'config' file")
        return value


class TeacherConfig(_Strict):
    """One teacher.

    ``name`` is the registry name (default: the entry's key, so ``sam2`` means
    ``sam2.1_hiera_b+``). ``offline: false`` runs the teacher live on every sample;
    otherwise ``offline_ratio`` (default ``distillation.offline_ratio``) of the samples read
    the store at ``feature_path``. ``config`` names a YAML file of these keys (the entry's
    own keys win). ``val_feature_path`` (a store of the validation split) lets the
    feature-fidelity evaluation of an all-offline teacher run without loading it.
    ``write_back: true`` adds each training image missing from the store at
    ``feature_path`` (creating the store when absent), computed from the clean image as
    extraction would, so the first epoch fills the cache and the next ones read it
    (:mod:`vfmkd.distillation.write_back`). ``timm_model`` names the architecture of a
    ``name: timm`` teacher (:mod:`vfmkd.teachers.timm_teacher`).
    """

    name: str | None = None
    timm_model: str | None = None
    enabled: bool = True
    offline: bool = True
    model_path: str | None = None
    feature_path: str | None = None
    val_feature_path: str | None = None
    features: list[str] | None = None
    image_size: int | None = Field(default=None, ge=32)
    offline_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    write_back: bool = False
    allow_random_init: bool = False
    random_init_seed: int = 0
    normalize: bool = False
    config: str | None = None


class LossConfig(_Strict):
    """One loss term. ``detection`` / ``segmentation`` entries weight the task losses."""

    type: str | None = None
    weight: float = 1.0
    teacher: str | None = None
    feature: str | None = None
    student: Union[str, list[str], None] = None
    align_to: Literal["teacher", "student"] = "teacher"
    adapter: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class DistillationConfig(_Strict):
    """How teachers are mixed. ``teacher_dropout`` drops each teacher's terms for a whole
    step with that probability (never all teachers at once)."""

    offline_ratio: float = Field(default=0.8, ge=0.0, le=1.0)
    teacher_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    losses: dict[str, LossConfig] = Field(default_factory=dict)


class AugmentConfig(_Strict):
    """Training augmentation. Probabilities and ranges as in YOLOv8's defaults."""

    mosaic: float = Field(default=1.0, ge=0.0, le=1.0)
    fliplr: float = Field(default=0.5, ge=0.0, le=1.0)
    scale: float = Field(default=0.5, ge=0.0, lt=1.0)
    translate: float = Field(default=0.1, ge=0.0, le=0.5)
    hsv_h: float = Field(default=0.015, ge=0.0, le=0.5)
    hsv_s: float = Field(default=0.7, ge=0.0, le=1.0)
    hsv_v: float = Field(default=0.4, ge=0.0, le=1.0)
    close_mosaic: int = Field(default=10, ge=0)


class DataConfig(_Strict):
    """The data set. ``unlabeled``: image folders, globs or data sets whose labels are
    ignored, mixed into training (distillation terms only); ``unlabeled_ratio``: share of
    unlabelled samples in each batch of ``batch_size`` (None: the natural proportion), or
    ``unlabeled_batch_size``: unlabelled samples added to each batch of ``batch_size``
    labelled ones (at most one of the two); ``label_fraction``:
    keep the labels of only that share of the labelled set, chosen with ``train.seed``, or
    with ``label_seed`` when set (the same labelled images for runs of different seeds; see
    :mod:`vfmkd.datasets.mixed`)."""

    dataset: str = "shapes"
    images: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = Field(default=640, ge=32)
    batch_size: int = Field(default=16, ge=1)
    num_workers: int = Field(default=8, ge=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    load_masks: bool = False
    cache_images: bool = False
    unlabeled: list[str] = Field(default_factory=list)
    unlabeled_ratio: float | None = Field(default=None, gt=0.0, lt=1.0)
    unlabeled_batch_size: int | None = Field(default=None, ge=1)
    label_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    label_seed: int | None = None

    @field_validator("unlabeled", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("unlabeled")
    @classmethod
    def _unlabeled_images_exist(cls, value: list[str]) -> list[str]:
        from vfmkd.datasets.mixed import unlabeled_entry_problem

        for position, entry in enumerate(value):
            problem = unlabeled_entry_problem(entry)
            if problem:
                raise ValueError(
                    f"data.unlabeled[{position}] '{entry}': {problem}; give image folders, globs "
                    "(e.g. 'photos/**/*.jpg') or data yamls"
                )
        return value

    @model_validator(mode="after")
    def _mix_needs_unlabeled(self) -> "DataConfig":
        if self.unlabeled_ratio is not None and self.unlabeled_batch_size is not None:
            raise ValueError(
                "data.unlabeled_ratio and data.unlabeled_batch_size are both set: keep one (a share of "
                "each batch, or unlabelled samples on top of each batch of data.batch_size labelled ones)"
            )
        for key in ("unlabeled_ratio", "unlabeled_batch_size"):
            if getattr(self, key) is not None and not self.unlabeled and self.label_fraction >= 1.0:
                raise ValueError(
                    f"data.{key} is set but there are no unlabelled images: "
                    "add data.unlabeled or a data.label_fraction below 1, or remove it"
                )
        return self

    @property
    def train_batch_size(self) -> int:
        """Samples per training micro-batch: ``batch_size`` plus ``unlabeled_batch_size``."""
        return self.batch_size + (self.unlabeled_batch_size or 0)

    @field_validator("img_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"data.img_size must be a multiple of 32 (the largest stride), got {value}")
        return value


class TrainConfig(_Strict):
    epochs: int = Field(default=100, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(default=0.01, gt=0.0)
    momentum: float = Field(default=0.937, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=5e-4, ge=0.0)
    scheduler: Literal["cosine", "linear"] = "cosine"
    final_lr_ratio: float = Field(default=0.01, ge=0.0, le=1.0)
    warmup_epochs: float = Field(default=3.0, ge=0.0)
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_bias_lr: float | None = Field(default=None, ge=0.0)  # None: 0.1 for SGD, 0 for AdamW
    ema: bool = True
    ema_decay: float = Field(default=0.9999, gt=0.0, lt=1.0)
    ema_tau: float = Field(default=2000.0, gt=0.0)
    grad_clip: float | None = Field(default=10.0, gt=0.0)
    # Optimizer steps in a row skipped for a non-finite loss or gradient before the run stops.
    max_bad_steps: int = Field(default=10, ge=1)
    accumulate: int = Field(default=1, ge=1)
    amp: bool = True
    amp_dtype: Literal["auto", "bf16", "fp16"] = "auto"
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    log_interval: int = Field(default=10, ge=1)
    eval_interval: int = Field(default=1, ge=1)
    save_interval: int = Field(default=1, ge=1)
    output_dir: str = "runs"


class EvalConfig(_Strict):
    conf_threshold: float = Field(default=0.001, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.7, gt=0.0, le=1.0)
    max_det: int = Field(default=300, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    # Validation images drawn to TensorBoard after each evaluation (feature maps, predictions) by
    # `vfmkd train` / `vfmkd demo` (the hook vfmkd.report.TensorBoardPictures); 0: none.
    tensorboard_images: int = Field(default=2, ge=0)


class ExperimentConfig(_Strict):
    experiment_name: str = "experiment"
    model: ModelConfig = Field(default_factory=ModelConfig)
    teachers: dict[str, TeacherConfig] = Field(default_factory=dict)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.experiment_name


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation such as ``X``, ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_class(arg)
        if found is not None and get_origin(annotation) is not dict:
            return found
    return None


def _dict_value_class(annotation: Any) -> type[BaseModel] | None:
    """The value class of ``dict[str, X]`` (possibly ``| None``) when X is a BaseModel."""
    if get_origin(annotation) is dict:
        value = get_args(annotation)[1]
        return value if isinstance(value, type) and issubclass(value, BaseModel) else None
    for arg in get_args(annotation):
        found = _dict_value_class(arg)
        if found is not None:
            return found
    return None


def _unknown_keys(data: Any, schema: type[BaseModel], path: str) -> list[str]:
    """Every key in ``data`` the schema does not know, with the closest valid key."""
    if not isinstance(data, dict):
        return []
    problems = []
    fields = schema.model_fields
    for key, value in data.items():
        where = f"{path}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"unknown key '{where}'{hint} (valid keys: {', '.join(fields)})")
            continue
        annotation = fields[key].annotation
        nested = _model_class(annotation)
        if nested is not None:
            problems += _unknown_keys(value, nested, f"{where}.")
            continue
        value_class = _dict_value_class(annotation)
        if value_class is not None and isinstance(value, dict):
            for name, entry in value.items():
                problems += _unknown_keys(entry, value_class, f"{where}.{name}.")
    return problems


def _format_validation_error(error: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()]


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (``1e-3`` -> float, ``[p3, p4]`` -> list, ``null``)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)
    return value


def _looks_like_float(text: str) -> bool:
    # NOTE: YAML 1.1 reads "1e-3" as a string; users mean a number.
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config dict (returns a new dict)."""
    data = copy.deepcopy(data)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"{source} '{override}': expected key=value, e.g. train.lr=0.001")
        dotted, text = override.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"{source} '{override}': empty key")
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source} '{override}': '{key}' holds a value, not a section")
            node = child
        node[keys[-1]] = parse_value(text)
    return data


def load_teacher_config(path: str | Path) -> TeacherConfig:
    """A teacher YAML file (``configs/teachers/sam2.yaml``) as a :class:`TeacherConfig`.

    Raises:
        ConfigError: naming the file: not found, not YAML, not a mapping, an unknown key
            (with the closest valid one) or a bad value.
    """
    found = find_project_file(path)
    if found is None:
        raise ConfigError(f"teacher config file '{path}' not found (looked in the working directory and the checkout)")
    loaded = read_yaml(found)
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{found}: a teacher config must be a mapping of teacher keys, got {type(loaded).__name__}")
    if "config" in loaded:
        raise ConfigError(f"{found}: 'config' inside a teacher config file is not supported (one level of include)")
    return _validated(TeacherConfig, loaded, f"{found}: invalid teacher config")


def _resolve_teacher_includes(data: dict[str, Any]) -> dict[str, Any]:
    """Each ``teachers.<key>.config`` file merged under the entry's own keys (which win)."""
    teachers = data.get("teachers")
    if not isinstance(teachers, dict) or not any(
        isinstance(entry, dict) and entry.get("config") for entry in teachers.values()
    ):
        return data
    data = dict(data)
    data["teachers"] = dict(teachers)
    for key, entry in teachers.items():
        if not isinstance(entry, dict) or not entry.get("config"):
            continue
        try:
            included = load_teacher_config(entry["config"]).model_dump(exclude_unset=True)
        except ConfigError as error:
            raise ConfigError(f"teachers.{key}.config: {error}") from None
        explicit = {name: value for name, value in entry.items() if name != "config"}
        data["teachers"][key] = {**included, **explicit}
    return data


def validate_config(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Validate a raw dict into an :class:`ExperimentConfig`, naming every problem.

    Teacher ``config:`` files are merged in here (the entry's own keys win), so the result
    holds every teacher's settings and no include.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        data = _resolve_teacher_includes(data)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return _validated(ExperimentConfig, data, f"{source}: invalid config")


def _validated(schema: type[_ModelT], data: dict[str, Any], heading: str) -> _ModelT:
    """``data`` as ``schema``; every unknown key (with the closest valid one) or bad value named."""
    problems = _unknown_keys(data, schema, "")
    if not problems:
        try:
            return schema.model_validate(data)
        except ValidationError as error:
            problems = _format_validation_error(error)
    raise ConfigError(f"{heading}:\n  " + "\n  ".join(problems))


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file; a syntax error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(error, 'problem', error)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment YAML (or the defaults when ``path`` is None) and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        if data is None:
            data = {}
        data = apply_overrides(data, overrides)
    return validate_config(data, source)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
