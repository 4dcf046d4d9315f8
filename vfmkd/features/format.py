"""The on-disk format of a feature store: layout, manifest, shard records and errors.

Layout of a store directory::

    manifest.json                     what is stored: teacher, fingerprint and its fields,
                                      codec, feature specs, statistics, sample count
    shards/rank0-000000.json          shard record (written last: commits the shard)
    shards/rank0-000000.embed.npy     [N, C, H, W] values of feature `embed`
    shards/rank0-000000.embed.scale.npy   [N, C] float32 (int8 codec only)

A shard is committed when its record is in place; the record lists the shard's sample
ids, each sample's teacher :class:`~vfmkd.geometry.Frame`, every file's byte size and
SHA-256, and per-channel sums for the statistics. Every file is written to a temporary
name and renamed, so a killed writer leaves only committed shards plus leftovers that
no record names; the next writer removes those and skips the committed ids.

The records are the truth: the reader builds its index (sample id -> shard, row) and the
statistics from them, so a manifest that is older than the last committed shard (a
writer killed before it rewrote the manifest) is still read correctly. The manifest
carries a checksum of its own content, so a hand-edited manifest is detected.

The writer is :mod:`vfmkd.features.writer`, the reader :mod:`vfmkd.features.store`.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vfmkd.errors import UserError
from vfmkd.features.codecs import Codec, get_codec
from vfmkd.teachers.base import FeatureSpec
from vfmkd.utils.hashing import file_sha256, json_sha256

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MIRROR_SUFFIX",
    "FeatureStoreError",
    "RecordProblem",
    "ShardRecord",
    "StoreCorruptError",
    "StoreHeader",
    "StoreMismatchError",
    "StoreNotFoundError",
    "describe_differences",
    "fingerprint_of",
    "manifest_checksum",
    "merge_statistics",
    "mirrored_id",
    "read_manifest",
    "read_shard_records",
]

FORMAT_NAME = "vfmkd-feature-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
LOCK_NAME = ".extract.lock"
RECORD_SUFFIX = ".json"
_SHARD_NAME = re.compile(r"^rank(\d+)-(\d+)$")
# Letters, digits and '_' in dot-separated parts (a model's named maps: ``backbone.p4``,
# ``detection.cls_p3``); not ending in ``.scale``, which names the int8 codec's scale files.
_FEATURE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
MAX_LISTED_PROBLEMS = 10
# A store extracted with ``fliplr`` also holds the teacher's maps of every image mirrored
# left-right, under the image's id plus this suffix, with the frame from the (unmirrored)
# original image (the flip composed in front of the teacher's preprocessing).
MIRROR_SUFFIX = "#fliplr"
REBUILD_HINT = (
    "re-run the extraction with the same command: it drops damaged shards and recomputes "
    "their samples"
)


# --------------------------------------------------------------------------- errors
class FeatureStoreError(UserError, RuntimeError):
    """A feature store cannot be used as asked; the message says why and what to do."""


class StoreNotFoundError(FeatureStoreError, FileNotFoundError):
    """No feature store at the given path."""


class StoreCorruptError(FeatureStoreError):
    """A store file is damaged, missing or edited by hand."""


class StoreMismatchError(FeatureStoreError):
    """The store holds other features than the caller asked for.

    Attributes:
        differences: one line per differing field, ``field: store X, asked Y``.
    """

    def __init__(self, message: str, differences: Sequence[str]) -> None:
        super().__init__(message)
        self.differences = list(differences)


# --------------------------------------------------------------------------- helpers
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


_ABSENT = object()


def _format_value(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def describe_differences(
    stored: Mapping[str, Any], asked: Mapping[str, Any], *, both_ways: bool = True, prefix: str = ""
) -> list[str]:
    """Field-by-field differences between two nested mappings.

    Args:
        stored: what the store holds.
        asked: what the caller wants.
        both_ways: also report keys the store has but the caller did not ask about
            (a writer must match exactly; a reader may ask about a subset, e.g. one
            feature of several).
        prefix: dotted path of ``stored`` inside the whole (for recursion).

    Returns:
        One line per difference, ``dotted.key: store X, asked Y`` (``(absent)`` for a
        missing key), in key order.
    """
    lines: list[str] = []
    keys = list(asked) + [key for key in stored if key not in asked] if both_ways else list(asked)
    for key in keys:
        path = f"{prefix}{key}"
        stored_value = stored.get(key, _ABSENT)
        asked_value = asked.get(key, _ABSENT)
        if isinstance(stored_value, Mapping) and isinstance(asked_value, Mapping):
            lines.extend(describe_differences(stored_value, asked_value, both_ways=both_ways, prefix=f"{path}."))
        elif _normalised(stored_value) != _normalised(asked_value):
            lines.append(f"{path}: store {_format_value(stored_value)}, asked {_format_value(asked_value)}")
    return lines


def _normalised(value: Any) -> Any:
    # Tuples and lists compare equal after a JSON round trip.
    if value is _ABSENT:
        return value
    return json.loads(json.dumps(value, sort_keys=True))


def fingerprint_of(fields: Mapping[str, Any]) -> str:
    """The fingerprint of fingerprint fields (as :meth:`BaseTeacher.fingerprint` hashes them)."""
    return json_sha256(fields)


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's content (every key but ``content_sha256``)."""
    content = {key: value for key, value in manifest.items() if key != "content_sha256"}
    return json_sha256(content)


def mirrored_id(sample_id: str) -> str:
    """The id of ``sample_id``'s mirrored record (see :data:`MIRROR_SUFFIX`)."""
    return sample_id + MIRROR_SUFFIX


# --------------------------------------------------------------------------- header
@dataclass(frozen=True)
class StoreHeader:
    """What a writer is about to store; becomes the manifest.

    Attributes:
        teacher: teacher name.
        fingerprint_fields: the teacher's :meth:`~vfmkd.teachers.base.BaseTeacher.fingerprint_fields`
            (weights sha256, random-init flag, preprocessing, feature specs).
        codec: one of ``float16``, ``bfloat16``, ``float32``, ``int8``.
        specs: the stored features, by name.
        split: data split the samples came from.
        data_source: the data set as the user named it (``coco128``, a folder, ...).
        data_resolved: the resolved data set file or folder (absolute).
        build_args: how to rebuild the teacher (``teacher``, ``weights``,
            ``random_init``, ``seed``, ``features``, ``image_size``).
        requested_samples: how many samples the extraction covers when complete.
    """

    teacher: str
    fingerprint_fields: dict[str, Any]
    codec: str
    specs: dict[str, FeatureSpec]
    split: str | None = None
    data_source: str | None = None
    data_resolved: str | None = None
    build_args: dict[str, Any] = field(default_factory=dict)
    requested_samples: int | None = None

    def __post_init__(self) -> None:
        get_codec(self.codec)
        for name in self.specs:
            if not _FEATURE_NAME.match(name) or name.endswith(".scale"):
                raise ValueError(
                    f"feature name '{name}' must be letters, digits and '_', in parts joined by '.', "
                    "and not end in '.scale' (it names files)"
                )

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the fingerprint fields."""
        return fingerprint_of(self.fingerprint_fields)

    def identity(self) -> dict[str, Any]:
        """The fields that must match for two writers to share one store."""
        return {"fingerprint_fields": self.fingerprint_fields, "codec": self.codec, "split": self.split}

    def manifest(self, records: Sequence["ShardRecord"], created: str | None = None) -> dict[str, Any]:
        """The manifest of a store holding ``records``, checksum included."""
        stats = merge_statistics(records, self.specs)
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "teacher": self.teacher,
            "fingerprint": self.fingerprint,
            "fingerprint_fields": self.fingerprint_fields,
            "random_init": bool(self.fingerprint_fields.get("random_init", False)),
            "weights_path": self.build_args.get("weights"),
            "seed": self.build_args.get("seed"),
            "build_args": self.build_args,
            "codec": self.codec,
            "features": {name: spec.to_dict() for name, spec in self.specs.items()},
            "stats": {
                name: {"mean": mean.tolist(), "std": std.tolist()} for name, (mean, std) in stats.items()
            },
            "num_samples": sum(len(record.ids) for record in records),
            "num_shards": len(records),
            "requested_samples": self.requested_samples,
            "split": self.split,
            "data_source": self.data_source,
            "data_resolved": self.data_resolved,
            "created": created or _now(),
            "updated": _now(),
        }
        manifest["content_sha256"] = manifest_checksum(manifest)
        return manifest

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "StoreHeader":
        """The header a manifest was written from."""
        return cls(
            teacher=manifest["teacher"],
            fingerprint_fields=dict(manifest["fingerprint_fields"]),
            codec=manifest["codec"],
            specs={name: FeatureSpec.from_dict(spec) for name, spec in manifest["features"].items()},
            split=manifest.get("split"),
            data_source=manifest.get("data_source"),
            data_resolved=manifest.get("data_resolved"),
            build_args=dict(manifest.get("build_args") or {}),
            requested_samples=manifest.get("requested_samples"),
        )


# --------------------------------------------------------------------------- records
@dataclass
class ShardRecord:
    """A committed shard.

    Attributes:
        name: ``rank<r>-<k>`` (writer rank and its shard counter).
        fingerprint: fingerprint of the teacher that computed it.
        codec: codec of its arrays.
        ids: sample ids, one per row.
        frames: each sample's teacher frame as :meth:`Frame.to_dict`.
        files: per feature, ``{"data": entry, "scale": entry}`` (scale for int8 only);
            an entry holds ``file``, ``bytes``, ``sha256``, ``shape``, ``dtype``.
        stats: per feature, per-channel ``sum`` and ``sumsq`` of the values and the
            ``count`` of values per channel.
    """

    name: str
    fingerprint: str
    codec: str
    ids: list[str]
    frames: list[dict[str, Any]]
    files: dict[str, dict[str, dict[str, Any]]]
    stats: dict[str, dict[str, Any]]

    @property
    def rank(self) -> int:
        """The writer rank from the name."""
        return int(_SHARD_NAME.match(self.name).group(1))  # type: ignore[union-attr]

    @property
    def index(self) -> int:
        """The writer's shard counter from the name."""
        return int(_SHARD_NAME.match(self.name).group(2))  # type: ignore[union-attr]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able record (what ``shards/<name>.json`` holds)."""
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "codec": self.codec,
            "count": len(self.ids),
            "ids": self.ids,
            "frames": self.frames,
            "files": self.files,
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str) -> "ShardRecord":
        """Parse a record; raises ``ValueError`` naming what is wrong."""
        missing = [key for key in ("fingerprint", "codec", "ids", "frames", "files", "stats") if key not in data]
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        if data.get("name", name) != name:
            raise ValueError(f"names shard '{data.get('name')}' but is the record of '{name}'")
        ids, frames = list(data["ids"]), list(data["frames"])
        if len(ids) != len(frames) or len(ids) != int(data.get("count", len(ids))):
            raise ValueError(f"{len(ids)} ids, {len(frames)} frames, count {data.get('count')}")
        return cls(name, str(data["fingerprint"]), str(data["codec"]), ids, frames, dict(data["files"]), dict(data["stats"]))

    def file_entries(self) -> Iterable[dict[str, Any]]:
        """Every file entry of the shard (data and scale of each feature)."""
        for entries in self.files.values():
            yield from entries.values()


def _record_paths(shards: Path) -> list[Path]:
    if not shards.is_dir():
        return []
    return sorted(
        path for path in shards.glob(f"rank*{RECORD_SUFFIX}") if _SHARD_NAME.match(path.stem)
    )


def _check_record(
    record: ShardRecord, shards: Path, specs: Mapping[str, FeatureSpec], codec: Codec, *, verify: bool
) -> list[str]:
    """Problems of one shard (missing feature, size or checksum mismatch)."""
    problems = []
    for name, spec in specs.items():
        entries = record.files.get(name)
        if entries is None or "data" not in entries:
            problems.append(f"{record.name}: no `{name}` array in its record")
            continue
        expected = [len(record.ids), spec.channels, spec.height, spec.width]
        if list(entries["data"].get("shape", [])) != expected:
            problems.append(f"{record.name}: `{name}` has shape {entries['data'].get('shape')}, expected {expected}")
        if codec.has_scale and "scale" not in entries:
            problems.append(f"{record.name}: no `{name}` scale array in its record (int8 codec)")
    for entry in record.file_entries():
        path = shards / entry["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        if size != entry["bytes"]:
            problems.append(f"{path} is {size} bytes, its record says {entry['bytes']} (truncated or damaged)")
        elif verify and file_sha256(path) != entry["sha256"]:
            problems.append(f"{path} does not match the SHA-256 in its record (damaged)")
    return problems


@dataclass(frozen=True)
class RecordProblem:
    """A shard record that cannot be used.

    Attributes:
        path: the record file.
        message: what is wrong, naming the file.
        foreign: the shard was written by another extraction (other teacher or codec),
            not damaged.
    """

    path: Path
    message: str
    foreign: bool = False


def read_shard_records(
    root: str | Path,
    specs: Mapping[str, FeatureSpec],
    codec: str,
    fingerprint: str,
    *,
    verify: bool = False,
) -> tuple[list[ShardRecord], list[RecordProblem]]:
    """Read and check every shard record of a store.

    Args:
        root: the store directory.
        specs: the features every shard must hold.
        codec: the codec every shard must use.
        fingerprint: the fingerprint every shard must carry.
        verify: also compare each file's SHA-256 (reads every byte).

    Returns:
        The usable records (sorted by name, no sample id twice) and one problem per
        damaged or conflicting record.
    """
    shards = Path(root) / SHARDS_DIR
    codec_object = get_codec(codec)
    records: list[ShardRecord] = []
    problems: list[RecordProblem] = []
    seen: dict[str, str] = {}
    for path in _record_paths(shards):
        try:
            record = ShardRecord.from_dict(json.loads(path.read_text(encoding="utf-8")), path.stem)
        except (OSError, ValueError, TypeError, KeyError) as error:
            problems.append(RecordProblem(path, f"{path} cannot be read as a shard record ({error})"))
            continue
        if record.fingerprint != fingerprint or record.codec != codec:
            problems.append(
                RecordProblem(
                    path,
                    f"{path} belongs to another extraction (fingerprint {record.fingerprint[:12]}, codec "
                    f"{record.codec}; expected {fingerprint[:12]}, {codec})",
                    foreign=True,
                )
            )
            continue
        record_problems = _check_record(record, shards, specs, codec_object, verify=verify)
        if record_problems:
            problems.append(RecordProblem(path, "; ".join(record_problems)))
            continue
        duplicated = next((sample_id for sample_id in record.ids if sample_id in seen), None)
        if duplicated is not None:
            problems.append(RecordProblem(path, f"{path} repeats sample '{duplicated}' of shard {seen[duplicated]}"))
            continue
        if len(set(record.ids)) != len(record.ids):
            problems.append(RecordProblem(path, f"{path} lists a sample id twice"))
            continue
        seen.update((sample_id, record.name) for sample_id in record.ids)
        records.append(record)
    return records, problems


def merge_statistics(
    records: Sequence[ShardRecord], specs: Mapping[str, FeatureSpec]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and std of each feature over all records (float64 sums).

    Returns:
        Per feature, ``(mean [C], std [C])`` float32 (zeros when nothing is stored).
    """
    result = {}
    for name, spec in specs.items():
        total = np.zeros(spec.channels, dtype=np.float64)
        total_squares = np.zeros(spec.channels, dtype=np.float64)
        count = 0
        for record in records:
            stats = record.stats.get(name)
            if stats is None:
                continue
            total += np.asarray(stats["sum"], dtype=np.float64)
            total_squares += np.asarray(stats["sumsq"], dtype=np.float64)
            count += int(stats["count"])
        mean = total / max(count, 1)
        variance = np.maximum(total_squares / max(count, 1) - mean * mean, 0.0)
        result[name] = (mean.astype(np.float32), np.sqrt(variance).astype(np.float32))
    return result


# --------------------------------------------------------------------------- manifest
def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, checksum checked; raises StoreNotFoundError / StoreCorruptError."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise StoreNotFoundError(
            f"no feature store at {root} (no {MANIFEST_NAME}); create one with "
            "`vfmkd features extract --teacher NAME --data DATA --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StoreCorruptError(f"{path} cannot be read ({error}); {REBUILD_HINT}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreCorruptError(f"{path} is not a vfmkd feature store manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreCorruptError(
            f"{path} has store format version {manifest.get('format_version')}; this vfmkd reads "
            f"version {FORMAT_VERSION}. Re-extract the features into a new folder"
        )
    if manifest.get("content_sha256") != manifest_checksum(manifest):
        raise StoreCorruptError(
            f"{path} was edited by hand or damaged (its content no longer matches its checksum); "
            f"{REBUILD_HINT} (it rewrites the manifest from the shard records)"
        )
    try:
        fingerprint_ok = manifest["fingerprint"] == fingerprint_of(manifest["fingerprint_fields"])
        get_codec(manifest["codec"])
        {name: FeatureSpec.from_dict(spec) for name, spec in manifest["features"].items()}
    except (KeyError, TypeError, ValueError) as error:
        raise StoreCorruptError(f"{path} lacks or garbles a required field ({error}); {REBUILD_HINT}") from error
    if not fingerprint_ok:
        raise StoreCorruptError(f"{path}: the fingerprint does not match its fingerprint fields; {REBUILD_HINT}")
    return manifest
