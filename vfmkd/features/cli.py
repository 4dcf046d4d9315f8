"""The ``vfmkd features`` commands.

::

    vfmkd features extract --teacher NAME (--weights PATH | --random-init) --data DATA --out DIR
        [--split train] [--dtype float16|bfloat16|float32|int8] [--features embed,...]
        [--image-size N] [--timm-model NAME] [--unlabeled PATH ...] [--batch-size B] [--limit N]
        [--num-workers N] [--device auto] [--seed S] [--shard-size N] [--verify-existing] [--fliplr]
        [--no-progress]
    vfmkd features extract --config EXPERIMENT --teacher KEY [--split S] [--data DATA] [--out DIR] ...
    vfmkd features info DIR
    vfmkd features verify DIR [--num N] [--weights PATH] [--device auto]

``extract`` resumes when DIR exists (re-run the same command after an interruption);
under ``torchrun`` every rank computes its share. ``--teacher`` also accepts the name of
a shipped teacher config (``sam2`` -> ``configs/teachers/sam2.yaml``), whose name, weights
path, features and image size are the defaults. With ``--config``, ``--teacher`` is a key
of the experiment's ``teachers`` and the store is the one training reads
(:func:`extract_teacher_entry`, also what ``vfmkd demo`` runs). The seed's
``tools/prepare_teacher_features.py --teacher sam2 --dataset coco128 --output DIR`` takes
the same options (``--dataset`` = ``--data``, ``--output`` = ``--out``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from vfmkd.config import ConfigError, ExperimentConfig, TeacherConfig, load_config, load_teacher_config
from vfmkd.errors import run_with_user_errors
from vfmkd.features.codecs import CODEC_NAMES
from vfmkd.features.format import FeatureStoreError, StoreMismatchError, describe_differences
from vfmkd.features.info import format_store_info
from vfmkd.features.store import FeatureStore
from vfmkd.teachers import build_teacher_from_config
from vfmkd.utils.distributed import resolve_device

__all__ = [
    "ExtractionOptions",
    "TeacherSettings",
    "add_extract_arguments",
    "add_features_commands",
    "extract_teacher_entry",
    "format_store_info",
    "load_teacher",
    "main",
    "seed_prepare_main",
    "teacher_settings",
]

logger = logging.getLogger(__name__)

DATASET_IMAGE_SIZE = 64  # unused by extraction (it reads original images), needed to build the set


# --------------------------------------------------------------------------- teachers
def load_teacher(
    name: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
    device: str = "cpu",
    timm_model: str | None = None,
) -> Any:
    """Build a teacher by name (:func:`vfmkd.teachers.build_teacher`); ``timm_model`` names
    the architecture of the ``timm`` teacher."""
    from vfmkd.teachers import build_teacher

    return build_teacher(
        name,
        weights=weights,
        random_init=random_init,
        seed=seed,
        features=list(features) if features is not None else None,
        image_size=image_size,
        device=device,
        options={"timm_model": timm_model} if timm_model else None,
    )


@dataclass(frozen=True)
class TeacherSettings:
    """A teacher as the command line names it, after the shipped config's defaults.

    Attributes:
        name: registry name.
        weights: checkpoint path (None: the teacher's default location, or random init).
        features: feature names (None: all).
        image_size: input size (None: the teacher's default).
        timm_model: the timm architecture of the ``timm`` teacher (None for the others).
    """

    name: str
    weights: str | None
    features: list[str] | None
    image_size: int | None
    timm_model: str | None = None


def teacher_settings(
    name: str,
    *,
    weights: str | None,
    random_init: bool,
    features: Sequence[str] | None,
    image_size: int | None,
    timm_model: str | None = None,
) -> TeacherSettings:
    """Resolve ``--teacher``: a registry name, or a shipped ``configs/teachers/<name>.yaml``.

    Options given on the command line win over the config's ``model_path`` (used when
    the file exists), ``features``, ``image_size`` and ``timm_model``; with
    ``--random-init`` no weights are used.
    """
    from vfmkd.utils.paths import find_project_file

    config: dict[str, Any] = {}
    if "/" not in name and not name.endswith((".yaml", ".yml")):
        config_file = find_project_file(f"configs/teachers/{name}.yaml")
    else:
        config_file = find_project_file(name)
    if config_file is not None:
        # NOTE: the same reader as a training config's `teachers.<key>.config:` include.
        config = load_teacher_config(config_file).model_dump(exclude_unset=True)
        logger.info("teacher `%s`: defaults from %s", name, config_file)
    resolved_weights = weights
    if weights is None and not random_init and config.get("model_path"):
        # NOTE: a config's checkpoint that is not there is left to the teacher factory,
        # whose error gives the expected path and the download command.
        found = find_project_file(config["model_path"])
        resolved_weights = str(found) if found is not None else None
    if resolved_weights is not None:
        resolved_weights = str(Path(resolved_weights).expanduser().resolve())
    return TeacherSettings(
        name=str(config.get("name") or name),
        weights=resolved_weights,
        features=list(features) if features is not None else (list(config["features"]) if config.get("features") else None),
        image_size=image_size if image_size is not None else config.get("image_size"),
        timm_model=timm_model or config.get("timm_model"),
    )


# --------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class ExtractionOptions:
    """How an extraction runs: the ``features extract`` options that pick neither teacher nor data.

    Attributes:
        dtype: storage codec (``float16``, ``bfloat16``, ``float32``, ``int8``).
        batch_size: images per teacher forward.
        num_workers: loader processes.
        limit: only the first N samples of the split (None: all).
        shard_size: samples per shard (None: about 256 MB).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``.
        progress: show a progress bar.
        verify_existing: hash every committed shard before resuming.
        fliplr: also store every image's mirror image (see :func:`~vfmkd.features.extract.extract_features`).
    """

    dtype: str = "float16"
    batch_size: int = 8
    num_workers: int = 2
    limit: int | None = None
    shard_size: int | None = None
    device: str = "auto"
    progress: bool = True
    verify_existing: bool = False
    fliplr: bool = False


def extract_teacher_entry(
    config: ExperimentConfig,
    key: str,
    *,
    split: str | None = None,
    data: str | None = None,
    out: str | Path | None = None,
    options: ExtractionOptions = ExtractionOptions(),
    unlabeled: Sequence[str] = (),
) -> FeatureStore:
    """Fill (or finish) the store of an experiment's ``teachers.<key>`` entry, as training will read it.

    The teacher is the entry's (:func:`vfmkd.teachers.build_teacher_from_config`: its
    ``model_path``, or seeded random weights under ``allow_random_init``, its
    ``features`` and ``image_size``), so the store matches what the planner expects.

    Args:
        config: the validated experiment.
        key: the entry's key in ``config.teachers``.
        split: the split to extract (default ``data.train_split``; the training split
            includes the ``data.unlabeled`` images, under their namespaced ids).
        data: the data set (default ``data.dataset``, with ``data.images``).
        out: the store (default the entry's ``feature_path``, or ``val_feature_path`` for
            ``data.val_split``).
        options: how to run it.
        unlabeled: images to extract besides the split, in place of ``data.unlabeled``
            (their ids as training gives the entries in this order).

    Returns:
        The store, opened.

    Raises:
        ConfigError: no such entry, or no store path for the split.
    """
    if key not in config.teachers:
        raise ConfigError(f"teachers.{key}: no such entry (entries: {', '.join(config.teachers) or 'none'})")
    teacher_config = config.teachers[key]
    split = split or config.data.train_split
    out = out or _store_path(key, teacher_config, split, config)
    data_config = {"dataset": data} if data else {"dataset": config.data.dataset, "images": config.data.images}
    if split == config.data.train_split and not data:
        # Training reads the unlabelled images from the same store, under their namespaced ids.
        data_config["unlabeled"] = list(config.data.unlabeled)
    if unlabeled:
        data_config["unlabeled"] = list(unlabeled)
    teacher = build_teacher_from_config(key, teacher_config, device=resolve_device(options.device))
    model_path = teacher_config.model_path
    build_args = {
        "teacher": teacher_config.name or key,
        "weights": None if teacher.random_init or not model_path else str(Path(model_path).expanduser().resolve()),
        "random_init": bool(teacher.random_init),
        "seed": teacher_config.random_init_seed if teacher.random_init else 0,
        "features": list(teacher_config.features) if teacher_config.features else None,
        "image_size": teacher_config.image_size or None,
        "timm_model": teacher_config.timm_model,
    }
    return _extract(teacher, build_args, data_config, split, out, options)


def _store_path(key: str, teacher: TeacherConfig, split: str, config: ExperimentConfig) -> str:
    """The entry's store of ``split``: ``feature_path`` (training split) or ``val_feature_path``."""
    if split == config.data.train_split and teacher.feature_path:
        return teacher.feature_path
    if split == config.data.val_split and teacher.val_feature_path:
        return teacher.val_feature_path
    raise ConfigError(
        f"teachers.{key}: no store for split '{split}' ('feature_path' holds split "
        f"'{config.data.train_split}', 'val_feature_path' split '{config.data.val_split}'); set it, or pass --out DIR"
    )


def _extract(
    teacher: Any,
    build_args: dict[str, Any],
    data_config: dict[str, Any],
    split: str,
    out: str | Path,
    options: ExtractionOptions,
) -> FeatureStore:
    """Run ``teacher`` over ``split`` of the data set into the store ``out``; ``build_args`` rebuild it."""
    from vfmkd.datasets import resolve_dataset
    from vfmkd.datasets.mixed import build_train_dataset
    from vfmkd.features.extract import extract_features

    dataset = build_train_dataset({**data_config, "img_size": DATASET_IMAGE_SIZE}, split, train=False)
    return extract_features(
        teacher,
        dataset,
        out,
        dtype=options.dtype,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        limit=options.limit,
        shard_size=options.shard_size,
        device=resolve_device(options.device),
        progress=options.progress,
        data_source=data_config["dataset"],
        data_resolved=str(resolve_dataset(data_config["dataset"]).source.resolve()),
        split=split,
        build_args=build_args,
        verify_existing=options.verify_existing,
        fliplr=options.fliplr,
    )


# --------------------------------------------------------------------------- arguments
def add_extract_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``features extract`` (also the seed's ``prepare_teacher_features.py``)."""
    parser.add_argument(
        "--teacher", required=True,
        help="teacher name (sam2.1_hiera_t, dinov2_vits14, sam2, ...); with --config, a key of its 'teachers'",
    )
    parser.add_argument(
        "--config", help="experiment YAML: the teacher entry, data set and store path that training uses"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", help="official checkpoint file (default: the teacher's usual location)")
    source.add_argument(
        "--random-init", action="store_true", help="no weights: the official architecture at random init (tests)"
    )
    parser.add_argument(
        "--data", "--dataset", dest="data",
        help="data set: shapes, coco128, a data yaml, a COCO json or an image folder (default: the config's)",
    )
    parser.add_argument("--split", help="split (default train; with --config its data.train_split)")
    parser.add_argument(
        "--out", "--output", dest="out", help="store directory (default: the config entry's feature_path)"
    )
    parser.add_argument("--dtype", default="float16", choices=CODEC_NAMES, help="storage codec (default float16)")
    parser.add_argument("--features", type=_comma_list, help="features to store, e.g. embed,hires_s8 (default all)")
    parser.add_argument("--image-size", type=int, help="teacher input size (default: the teacher's)")
    parser.add_argument(
        "--timm-model", help="the timm architecture of --teacher timm (e.g. convnext_tiny, vit_base_patch16_clip_224)"
    )
    parser.add_argument(
        "--unlabeled", action="append", default=[], metavar="PATH",
        help="also extract these images (folder, glob or data set; repeatable), under the ids training gives "
        "data.unlabeled entries in this order (with --config: in place of its data.unlabeled)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    parser.add_argument("--limit", type=int, help="only the first N samples of the split")
    parser.add_argument("--num-workers", type=int, default=2, help="loader processes (default 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random-init teacher (default 0)")
    parser.add_argument("--shard-size", type=int, help="samples per shard (default: about 256 MB)")
    parser.add_argument(
        "--verify-existing", action="store_true",
        help="hash every committed shard before resuming (finds silently damaged shards)",
    )
    parser.add_argument(
        "--fliplr", action="store_true",
        help="also store each image mirrored left-right, for training samples the augmentation flips (2x time/size)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_features_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``features extract | info | verify`` to a ``vfmkd`` sub-command parser set."""
    features = subparsers.add_parser("features", help="teacher feature store: extract, info, verify")
    commands = features.add_subparsers(dest="features_command", required=True)
    extract = commands.add_parser("extract", help="compute a teacher's features into a store (resumable)")
    add_extract_arguments(extract).set_defaults(handler=_guarded(_cmd_extract))
    info = commands.add_parser("info", help="what a store holds")
    info.add_argument("dir", help="store directory")
    info.set_defaults(handler=_guarded(_cmd_info))
    verify = commands.add_parser("verify", help="check checksums and recompute random samples")
    verify.add_argument("dir", help="store directory")
    verify.add_argument("--num", type=int, default=8, help="samples to recompute (default 8)")
    verify.add_argument("--weights", help="checkpoint file (default: the one the store was made with)")
    verify.add_argument("--device", default="auto")
    verify.add_argument("--seed", type=int, default=0, help="seed of the sample choice")
    verify.add_argument("--batch-size", type=int, default=4)
    verify.add_argument("--min-cosine", type=float, default=0.999, help="pass threshold (default 0.999)")
    verify.set_defaults(handler=_guarded(_cmd_verify))
    return features


# --------------------------------------------------------------------------- handlers
def _say(text: str) -> None:
    # NOTE: command output goes to stdout; library code logs.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _build_teacher(settings: TeacherSettings, *, random_init: bool, seed: int, device: str) -> Any:
    try:
        return load_teacher(
            settings.name,
            weights=settings.weights,
            random_init=random_init,
            seed=seed,
            features=settings.features,
            image_size=settings.image_size,
            device=device,
            timm_model=settings.timm_model,
        )
    except (KeyError, ValueError) as error:
        raise FeatureStoreError(f"cannot build teacher `{settings.name}`: {error.args[0] if error.args else error}") from error


def _cmd_extract(args: argparse.Namespace) -> int:
    from vfmkd.utils.distributed import cleanup, init_distributed

    info = init_distributed()
    if info.rank != 0:
        # Under torchrun only rank 0 reports progress; the others speak up on problems.
        logging.getLogger("vfmkd").setLevel(logging.WARNING)
    options = ExtractionOptions(
        dtype=args.dtype,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        limit=args.limit,
        shard_size=args.shard_size,
        device=args.device,
        progress=not args.no_progress,
        verify_existing=args.verify_existing,
        fliplr=args.fliplr,
    )
    try:
        if args.config:
            store = extract_teacher_entry(
                _experiment_for_extraction(args), args.teacher, split=args.split, data=args.data, out=args.out,
                options=options, unlabeled=args.unlabeled,
            )
        else:
            store = _extract_named_teacher(args, options)
    finally:
        cleanup()
    if info.rank == 0:
        _say(format_store_info(store))
    return 0


def _experiment_for_extraction(args: argparse.Namespace) -> ExperimentConfig:
    """The ``--config`` experiment; the teacher options it sets itself are refused on the command line."""
    given = [
        flag
        for flag, value in (("--weights", args.weights), ("--random-init", args.random_init),
                            ("--features", args.features), ("--image-size", args.image_size),
                            ("--timm-model", args.timm_model))
        if value
    ]
    if given:
        raise ConfigError(
            f"features extract --config: {', '.join(given)} would contradict teachers.{args.teacher} in "
            f"{args.config}; set model_path, allow_random_init, features, image_size or timm_model there"
        )
    return load_config(args.config)


def _extract_named_teacher(args: argparse.Namespace, options: ExtractionOptions) -> FeatureStore:
    """``--teacher NAME --data DATA --out DIR``: a teacher named on the command line."""
    if not args.data or not args.out:
        raise ConfigError(
            "features extract: --data and --out are needed (or --config EXPERIMENT, whose data set and "
            "teachers.<key>.feature_path are the defaults)"
        )
    settings = teacher_settings(
        args.teacher,
        weights=args.weights,
        random_init=args.random_init,
        features=args.features,
        image_size=args.image_size,
        timm_model=args.timm_model,
    )
    device = resolve_device(options.device)
    teacher = _build_teacher(settings, random_init=args.random_init, seed=args.seed, device=str(device))
    build_args = {
        "teacher": settings.name, "weights": settings.weights, "random_init": bool(args.random_init), "seed": args.seed,
        "features": settings.features, "image_size": settings.image_size, "timm_model": settings.timm_model,
    }
    data_config = {"dataset": args.data, "unlabeled": list(args.unlabeled)}
    return _extract(teacher, build_args, data_config, args.split or "train", args.out, options)


def _cmd_info(args: argparse.Namespace) -> int:
    _say(format_store_info(FeatureStore.open(args.dir)))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from vfmkd.datasets import build_dataset
    from vfmkd.features.extract import verify_against_teacher
    from vfmkd.features.format import StoreCorruptError
    from vfmkd.utils.distributed import resolve_device

    try:
        store = FeatureStore.open(args.dir, verify=True)
    except StoreCorruptError as error:
        _say(f"checksums: FAILED\n{error}")
        return 1
    _say(f"checksums: every file of the {store.num_shards} shard(s) in {args.dir} matches its record")
    build = dict(store.manifest.get("build_args") or {})
    settings = TeacherSettings(
        name=build.get("teacher", store.teacher),
        weights=args.weights or build.get("weights"),
        features=list(store.specs),
        image_size=build.get("image_size"),
        timm_model=build.get("timm_model"),
    )
    device = resolve_device(args.device)
    random_init = bool(build.get("random_init")) and not args.weights
    teacher = _build_teacher(settings, random_init=random_init, seed=int(build.get("seed") or 0), device=str(device))
    differences = describe_differences(store.fingerprint_fields, teacher.fingerprint_fields())
    if differences:
        raise StoreMismatchError(
            f"the rebuilt teacher differs from the one that wrote {args.dir}:\n  " + "\n  ".join(differences)
            + "\nPass the checkpoint it was made with: --weights PATH",
            differences,
        )
    data = store.manifest.get("data_resolved")
    if not data or not Path(data).exists():
        data = store.manifest.get("data_source")
    dataset = build_dataset(
        {"dataset": data, "img_size": DATASET_IMAGE_SIZE}, store.manifest.get("split") or "train", train=False
    )
    report = verify_against_teacher(
        store, teacher, dataset, num=args.num, seed=args.seed, batch_size=args.batch_size, device=device
    )
    _say(f"recomputed {report['samples']} sample(s); frames equal: {report['frames_equal']}/{report['samples']}")
    _say(f"{'feature':<12}  {'max abs error':>14}  {'min cosine':>11}  {'mean cosine':>11}")
    passed = report["frames_equal"] == report["samples"] and report["samples"] > 0
    for name, values in report["features"].items():
        _say(
            f"{name:<12}  {values['max_abs_error']:>14.6g}  {values['min_cosine']:>11.6f}  {values['mean_cosine']:>11.6f}"
        )
        passed = passed and values["min_cosine"] >= args.min_cosine
    _say("verify: OK" if passed else f"verify: FAILED (min cosine below {args.min_cosine} or frames differ)")
    return 0 if passed else 1


# --------------------------------------------------------------------------- entry points
def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``handler`` with store errors and interruptions turned into a message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except FeatureStoreError as error:
            sys.stderr.write(f"error: {error}\n")
            return 2
        except KeyboardInterrupt:
            sys.stderr.write("interrupted; re-run the same command to continue (committed shards are kept)\n")
            return 130

    return run


def _run_handler(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    return run_with_user_errors(lambda: handler(args))


def _basic_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``vfmkd features ...`` on its own: ``main(["features", "info", DIR])``."""
    parser = argparse.ArgumentParser(prog="vfmkd", description="vfmkd teacher feature store")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_features_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    _basic_logging(args.verbose)
    return _run_handler(args.handler, args)


def seed_prepare_main(argv: Sequence[str] | None = None) -> int:
    """``python tools/prepare_teacher_features.py --teacher sam2 --dataset coco128 --output DIR``."""
    parser = argparse.ArgumentParser(
        prog="tools/prepare_teacher_features.py", description="compute a teacher's features into a store"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_extract_arguments(parser)
    args = parser.parse_args(argv)
    _basic_logging(args.verbose)
    return _run_handler(_guarded(_cmd_extract), args)
