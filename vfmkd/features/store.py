"""The teacher feature store: features computed once, read back fast during training.

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

Reading: :meth:`FeatureStore.open` validates the store (manifest checksum, each shard
file's byte size, optionally its SHA-256, and the fingerprint fields the caller expects)
and :meth:`FeatureStore.read` returns float32 maps (or float16 ones, ``dtype=np.float16``:
from a float16 store a plain copy of the stored bytes) from memory-mapped arrays that are
opened once per shard and process.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import DTypeLike

from vfmkd.features.codecs import FLOAT16_MAX, Codec, decode_dtype, get_codec
from vfmkd.geometry import Frame
from vfmkd.teachers.base import FeatureSpec
from vfmkd.utils.io import atomic_write, atomic_write_text

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FeatureStore",
    "FeatureStoreError",
    "RecordProblem",
    "ShardRecord",
    "ShardWriter",
    "StoreCorruptError",
    "StoreHeader",
    "StoreLock",
    "StoreMismatchError",
    "StoreNotFoundError",
    "describe_differences",
    "finalize_store",
    "manifest_checksum",
    "prepare_store_for_writing",
    "read_shard_records",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "vfmkd-feature-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
LOCK_NAME = ".extract.lock"
RECORD_SUFFIX = ".json"
_SHARD_NAME = re.compile(r"^rank(\d+)-(\d+)$")
_FEATURE_NAME = re.compile(r"^[A-Za-z0-9_]+$")
MAX_LISTED_PROBLEMS = 10
REBUILD_HINT = (
    "re-run the extraction with the same command: it drops damaged shards and recomputes "
    "their samples"
)
HASH_CHUNK_BYTES = 8 << 20


# --------------------------------------------------------------------------- errors
class FeatureStoreError(RuntimeError):
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
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's content (every key but ``content_sha256``)."""
    content = {key: value for key, value in manifest.items() if key != "content_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingFile:
    """Forwards writes to a file and hashes and counts the bytes on the way."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += view.nbytes
        self.file.write(view)
        return view.nbytes


def _write_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write ``array`` as ``.npy`` atomically; return its file entry for a record."""
    result: dict[str, Any] = {}

    def write(file: IO[bytes]) -> None:
        hashing = _HashingFile(file)
        np.lib.format.write_array(hashing, np.ascontiguousarray(array), allow_pickle=False)
        result.update(bytes=hashing.size, sha256=hashing.digest.hexdigest())

    atomic_write(path, write)
    return {
        "file": path.name,
        "bytes": result["bytes"],
        "sha256": result["sha256"],
        "shape": list(array.shape),
        "dtype": np.dtype(array.dtype).str,
    }


def _shard_name(rank: int, index: int) -> str:
    return f"rank{rank}-{index:06d}"


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
            if not _FEATURE_NAME.match(name):
                raise ValueError(f"feature name '{name}' must be letters, digits and '_' (it names files)")

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
def _read_manifest(root: Path) -> dict[str, Any]:
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


def _remove_leftovers(shards: Path, records: Sequence[ShardRecord], ranks: Iterable[int] | None) -> int:
    """Remove temporary files and arrays that no committed record names.

    Args:
        ranks: only touch files of these writer ranks (None: all).

    Returns:
        How many files were removed.
    """
    keep = {entry["file"] for record in records for entry in record.file_entries()}
    keep.update(f"{record.name}{RECORD_SUFFIX}" for record in records)
    rank_set = set(ranks) if ranks is not None else None
    removed = 0
    for path in shards.iterdir() if shards.is_dir() else ():
        if path.name in keep or not path.is_file():
            continue
        match = re.match(r"^\.?rank(\d+)-", path.name)
        if match is None or (rank_set is not None and int(match.group(1)) not in rank_set):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def prepare_store_for_writing(
    root: str | Path, header: StoreHeader, *, verify_existing: bool = False
) -> list[ShardRecord]:
    """Create a store or make an existing one ready to resume (the main writer only).

    Refuses a store that holds other features (teacher fingerprint, codec, features or
    split differ: :class:`StoreMismatchError` naming each field). Drops damaged shards
    (wrong byte size, or wrong SHA-256 with ``verify_existing``) and shards that repeat
    committed ids, so their samples are computed again; removes uncommitted leftovers;
    writes the manifest.

    Args:
        root: the store directory.
        header: what this extraction writes.
        verify_existing: hash every committed shard file (slow for big stores).

    Returns:
        The committed shard records that stay.
    """
    root = Path(root)
    shards = root / SHARDS_DIR
    shards.mkdir(parents=True, exist_ok=True)
    created = None
    try:
        manifest = _read_manifest(root)
    except StoreNotFoundError:
        manifest = None
    except StoreCorruptError as error:
        logger.warning("%s; rebuilding it from the shard records", error)
        manifest = None
    if manifest is not None:
        stored = StoreHeader.from_manifest(manifest)
        differences = describe_differences(stored.identity(), header.identity())
        if differences:
            raise StoreMismatchError(
                f"the feature store at {root} holds other features than this extraction would write:\n  "
                + "\n  ".join(differences)
                + f"\nWrite to another --out folder, or delete {root} to start over",
                differences,
            )
        if stored.data_source != header.data_source:
            logger.warning(
                "%s was extracted from data `%s`, this run reads `%s`; sample ids must name the same images",
                root, stored.data_source, header.data_source,
            )
        created = manifest.get("created")
    records, problems = read_shard_records(
        root, header.specs, header.codec, header.fingerprint, verify=verify_existing
    )
    foreign = [problem.message for problem in problems if problem.foreign]
    if foreign and manifest is None:
        raise StoreMismatchError(
            f"{root} holds shards of another extraction and no valid manifest:\n  "
            + "\n  ".join(foreign[:MAX_LISTED_PROBLEMS])
            + f"\nWrite to another --out folder, or delete {root} to start over",
            foreign,
        )
    for problem in problems:
        logger.warning("dropping shard %s: %s; its samples are computed again", problem.path.stem, problem.message)
        problem.path.unlink(missing_ok=True)
    removed = _remove_leftovers(shards, records, ranks=None)
    if removed:
        logger.info("removed %d uncommitted file(s) left by an interrupted extraction", removed)
    atomic_write_text(root / MANIFEST_NAME, json.dumps(header.manifest(records, created), indent=1))
    return records


def finalize_store(root: str | Path, header: StoreHeader) -> dict[str, Any]:
    """Rewrite the manifest from every committed shard (the main writer, after all ranks).

    Returns:
        The manifest written.
    """
    root = Path(root)
    created = None
    try:
        created = _read_manifest(root).get("created")
    except FeatureStoreError:
        pass
    records, problems = read_shard_records(root, header.specs, header.codec, header.fingerprint)
    if problems:
        raise StoreCorruptError(
            "damaged shard(s) after extraction:\n  "
            + "\n  ".join(problem.message for problem in problems[:MAX_LISTED_PROBLEMS])
        )
    manifest = header.manifest(records, created)
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1))
    return manifest


# --------------------------------------------------------------------------- writer
class ShardWriter:
    """Encodes batches of one writer rank and commits them as shards.

    Not thread-safe: one thread calls :meth:`add` and :meth:`close`.

    Args:
        root: the store directory (prepared by :func:`prepare_store_for_writing`).
        header: what is stored.
        rank: this writer's rank (names its shards ``rank<rank>-<k>``).
        shard_size: samples per shard.
        start_index: the first ``k`` to use (one past this rank's last committed shard).
    """

    def __init__(self, root: str | Path, header: StoreHeader, *, rank: int, shard_size: int, start_index: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.shards = Path(root) / SHARDS_DIR
        self.header = header
        self.codec = get_codec(header.codec)
        self.fingerprint = header.fingerprint
        self.rank = rank
        self.shard_size = shard_size
        self.next_index = start_index
        self.committed_samples = 0
        self.committed_shards = 0
        self._ids: list[str] = []
        self._frames: list[dict[str, Any]] = []
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {name: [] for name in header.specs}
        self._sums: dict[str, list[np.ndarray]] = {name: [] for name in header.specs}
        self._squares: dict[str, list[np.ndarray]] = {name: [] for name in header.specs}

    @property
    def pending(self) -> int:
        """Samples added but not yet committed."""
        return len(self._ids)

    def add(self, ids: Sequence[str], frames: Sequence[dict[str, Any]], features: Mapping[str, np.ndarray]) -> None:
        """Encode one batch and commit full shards.

        Args:
            ids: B sample ids.
            frames: B teacher frames as :meth:`Frame.to_dict`.
            features: every stored feature as float32 ``[B, C, H, W]``.

        Raises:
            FeatureStoreError: a value is not finite, or too large for ``float16``.
        """
        checked = {}
        for name, spec in self.header.specs.items():
            values = np.ascontiguousarray(features[name], dtype=np.float32)
            expected = (len(ids), spec.channels, spec.height, spec.width)
            if values.shape != expected:
                raise FeatureStoreError(
                    f"teacher feature `{name}` has shape {tuple(values.shape)}, its spec says {expected}"
                )
            self._check_values(name, values, ids)
            checked[name] = values
        # Nothing is buffered before every feature passed its checks.
        for name, values in checked.items():
            flat = values.reshape(len(ids), values.shape[1], -1)
            self._sums[name].append(flat.sum(axis=2, dtype=np.float64))
            self._squares[name].append(np.square(flat).sum(axis=2, dtype=np.float64))
            self._parts[name].append(self.codec.encode(values))
        self._ids.extend(ids)
        self._frames.extend(frames)
        while len(self._ids) >= self.shard_size:
            self._commit(self.shard_size)

    def _check_values(self, name: str, values: np.ndarray, ids: Sequence[str]) -> None:
        finite = np.isfinite(values).reshape(len(ids), -1).all(axis=1)
        if not finite.all():
            bad = [sample_id for sample_id, ok in zip(ids, finite) if not ok]
            raise FeatureStoreError(
                f"the teacher returned NaN or infinite `{name}` values for sample(s) {bad[:5]}; "
                "check the weights and the images"
            )
        if self.codec.name == "float16":
            largest = float(np.abs(values).max()) if values.size else 0.0
            if largest > FLOAT16_MAX:
                raise FeatureStoreError(
                    f"`{name}` holds values up to {largest:.4g}, beyond float16's {FLOAT16_MAX:.0f} "
                    f"(samples {list(ids)[:5]}); extract with --dtype bfloat16 or float32"
                )

    def flush(self) -> None:
        """Commit every pending sample (a last, smaller shard)."""
        if self._ids:
            self._commit(len(self._ids))

    close = flush

    def _take(self, parts: list[Any], count: int) -> tuple[Any, list[Any]]:
        joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
        rest = [joined[count:]] if len(joined) > count else []
        return joined[:count], rest

    def _commit(self, count: int) -> None:
        name = _shard_name(self.rank, self.next_index)
        files: dict[str, dict[str, dict[str, Any]]] = {}
        stats: dict[str, dict[str, Any]] = {}
        for feature, spec in self.header.specs.items():
            data_parts = [data for data, _ in self._parts[feature]]
            data, data_rest = self._take(data_parts, count)
            entries = {"data": _write_npy(self.shards / f"{name}.{feature}.npy", data)}
            scale_rest: list[Any] = []
            if self.codec.has_scale:
                scale, scale_rest = self._take([scale for _, scale in self._parts[feature]], count)
                entries["scale"] = _write_npy(self.shards / f"{name}.{feature}.scale.npy", scale)
            self._parts[feature] = [
                (rest, scale_rest[0] if scale_rest else None) for rest in data_rest
            ]
            sums, self._sums[feature] = self._take(self._sums[feature], count)
            squares, self._squares[feature] = self._take(self._squares[feature], count)
            stats[feature] = {
                "sum": sums.sum(axis=0).tolist(),
                "sumsq": squares.sum(axis=0).tolist(),
                "count": int(count * spec.height * spec.width),
            }
            files[feature] = entries
        record = ShardRecord(
            name, self.fingerprint, self.codec.name, self._ids[:count], self._frames[:count], files, stats
        )
        # NOTE: the record is written last; its rename is the commit.
        atomic_write_text(self.shards / f"{name}{RECORD_SUFFIX}", json.dumps(record.to_dict()))
        del self._ids[:count], self._frames[:count]
        self.next_index += 1
        self.committed_samples += count
        self.committed_shards += 1
        logger.debug("committed shard %s (%d samples)", name, count)


class StoreLock:
    """An exclusive lock on a store directory while one extraction writes to it.

    Released when the holder exits, even on SIGKILL (``flock``). A process forked while
    the lock is held (a DataLoader worker) closes its inherited copy at once, so the lock
    ends with its holder and not with that holder's last child.
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._handle: IO[bytes] | None = None

    def __enter__(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "ab")
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no flock (Windows): one writer per store is the user's duty
        except OSError as error:
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FeatureStoreError(
                    f"another extraction is writing to {self.path.parent} (it holds {self.path}); "
                    "wait for it to finish or write to another folder"
                ) from error
            raise
        self._handle = handle
        _HELD_LOCKS.add(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        _HELD_LOCKS.discard(self)
        if self._handle is not None:
            self._handle.close()
            self._handle = None


_HELD_LOCKS: "weakref.WeakSet[StoreLock]" = weakref.WeakSet()


def _close_inherited_locks() -> None:
    # NOTE: flock belongs to the open file, which a fork shares: a persistent worker that
    # kept the descriptor would keep the store locked after its parent released it.
    for lock in list(_HELD_LOCKS):
        if lock._handle is not None:
            lock._handle.close()
            lock._handle = None
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


# --------------------------------------------------------------------------- reader
class FeatureStore:
    """Read access to a feature store. Build it with :meth:`open`.

    Arrays are memory-mapped lazily, once per shard and process, and kept for the next
    reads; a pickled store (e.g. sent to a spawned DataLoader worker) maps them again in
    the new process, a forked worker uses the inherited maps. Each map holds a file
    descriptor, so at most ``max_open_shards`` shards stay mapped (least recently used
    ones are unmapped; default: a quarter of the process's open-file limit).
    """

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        records: list[ShardRecord],
        *,
        max_open_shards: int | None = None,
    ) -> None:
        self.path = root
        self.manifest = manifest
        self.codec = get_codec(manifest["codec"])
        self.specs = {name: FeatureSpec.from_dict(spec) for name, spec in manifest["features"].items()}
        self._shard_files: list[dict[str, tuple[str, str | None]]] = []
        self._shard_names: list[str] = []
        index: dict[str, tuple[int, int]] = {}
        frame_rows: list[np.ndarray] = []
        for shard_index, record in enumerate(records):
            self._shard_names.append(record.name)
            self._shard_files.append(
                {
                    name: (record.files[name]["data"]["file"], record.files[name].get("scale", {}).get("file"))
                    for name in self.specs
                }
            )
            for row, sample_id in enumerate(record.ids):
                index[sample_id] = (shard_index, row)
            frame_rows.append(_frames_to_rows(record.frames))
        self._index = index
        self.ids = sorted(index)
        self._frames = frame_rows
        self._stats = merge_statistics(records, self.specs)
        files_per_shard = len(self.specs) * (2 if self.codec.has_scale else 1)
        self.max_open_shards = max_open_shards or _default_open_shards(files_per_shard)
        self._arrays: OrderedDict[int, dict[str, tuple[np.ndarray, np.ndarray | None]]] = OrderedDict()

    # ----------------------------------------------------------------- open
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expect: Mapping[str, Any] | None = None,
        verify: bool = False,
        max_open_shards: int | None = None,
    ) -> "FeatureStore":
        """Open and validate a store.

        Args:
            path: the store directory.
            expect: fingerprint fields the caller needs (e.g. ``teacher.fingerprint_fields()``
                or a subset built from a config); keys it leaves out are not compared,
                so asking for one feature of a store holding several is fine.
            verify: also check every shard file's SHA-256 (reads the whole store).
            max_open_shards: shards kept memory-mapped at once (default: from the
                open-file limit).

        Raises:
            StoreNotFoundError: no manifest at ``path``.
            StoreMismatchError: a field of ``expect`` differs (each one named).
            StoreCorruptError: the manifest was edited, or a shard file is missing,
                truncated or (with ``verify``) damaged.
        """
        root = Path(path)
        manifest = _read_manifest(root)
        if expect is not None:
            differences = describe_differences(manifest["fingerprint_fields"], expect, both_ways=False)
            if differences:
                raise StoreMismatchError(
                    f"the feature store at {root} does not hold the features asked for:\n  "
                    + "\n  ".join(differences)
                    + "\nExtract features with the asked teacher settings into another folder, "
                    "or point the config at a matching store",
                    differences,
                )
        header = StoreHeader.from_manifest(manifest)
        records, problems = read_shard_records(
            root, header.specs, header.codec, manifest["fingerprint"], verify=verify
        )
        if problems:
            listed = "\n  ".join(problem.message for problem in problems[:MAX_LISTED_PROBLEMS])
            more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
            raise StoreCorruptError(f"the feature store at {root} is damaged:\n  {listed}{more}\nTo repair: {REBUILD_HINT}")
        return cls(root, manifest, records, max_open_shards=max_open_shards)

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._index

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, teacher={self.teacher!r}, samples={len(self)}, codec={self.codec.name})"

    @property
    def teacher(self) -> str:
        """Name of the teacher that computed the features."""
        return str(self.manifest["teacher"])

    @property
    def fingerprint(self) -> str:
        """The teacher fingerprint the store was written with."""
        return str(self.manifest["fingerprint"])

    @property
    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields behind :attr:`fingerprint`."""
        return dict(self.manifest["fingerprint_fields"])

    @property
    def num_shards(self) -> int:
        """Committed shards."""
        return len(self._shard_names)

    @property
    def is_complete(self) -> bool:
        """Whether every sample the extraction was asked for is stored."""
        requested = self.manifest.get("requested_samples")
        return requested is None or len(self) >= int(requested)

    def stats(self, feature: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel statistics of a feature over the whole store.

        Returns:
            ``(mean [C], std [C])`` float32.
        """
        self._check_feature(feature)
        mean, std = self._stats[feature]
        return mean.copy(), std.copy()

    def frame(self, sample_id: str) -> Frame:
        """The teacher frame of a sample (original image -> teacher input)."""
        shard, row = self._locate(sample_id)
        values = self._frames[shard][row]
        return Frame(
            values[:6].reshape(2, 3),
            (int(values[6]), int(values[7])),
            tuple(values[8:12]),
            (int(values[12]), int(values[13])),
        )

    # ----------------------------------------------------------------- reads
    def read(
        self, sample_id: str, features: Sequence[str] | None = None, *, dtype: DTypeLike | None = None
    ) -> dict[str, np.ndarray]:
        """The features of one sample.

        Args:
            sample_id: image path relative to the split's image folder, no extension.
            features: names to read (default: all stored).
            dtype: ``np.float32`` (default) or ``np.float16``. From a ``float16`` store,
                float16 is the stored values copied as they are (no decoding: a reader
                that trains in half precision pays a memcpy); other codecs decode and
                cast to float16 (values beyond +-65504 become +-inf).

        Returns:
            Per feature, a new array ``[C, H, W]`` of ``dtype``.
        """
        names = self._names(features)
        shard, row = self._locate(sample_id)
        arrays = self._shard_arrays(shard)
        outputs = self._allocate(names, 1, dtype)
        for name in names:
            data, scale = arrays[name]
            self.codec.decode_into(data[row], outputs[name][0], None if scale is None else scale[row])
        return {name: outputs[name][0] for name in names}

    def read_many(
        self, sample_ids: Sequence[str], features: Sequence[str] | None = None, *, dtype: DTypeLike | None = None
    ) -> dict[str, np.ndarray]:
        """The features of several samples, stacked (``dtype`` as in :meth:`read`).

        Returns:
            Per feature, a new array ``[B, C, H, W]`` of ``dtype`` in the order of
            ``sample_ids``.
        """
        names = self._names(features)
        outputs = self._allocate(names, len(sample_ids), dtype)
        for position, sample_id in enumerate(sample_ids):
            shard, row = self._locate(sample_id)
            arrays = self._shard_arrays(shard)
            for name in names:
                data, scale = arrays[name]
                self.codec.decode_into(data[row], outputs[name][position], None if scale is None else scale[row])
        return outputs

    # ----------------------------------------------------------------- internals
    def _names(self, features: Sequence[str] | None) -> list[str]:
        names = list(features) if features is not None else list(self.specs)
        for name in names:
            self._check_feature(name)
        return names

    def _allocate(self, names: Sequence[str], count: int, dtype: DTypeLike | None = None) -> dict[str, np.ndarray]:
        """Outputs ``[count, C, H, W]`` per feature (float32 by default), carved from one block.

        NOTE: one block per read instead of one per feature keeps glibc's malloc reusing
        the same heap memory read after read; separate blocks of several MiB each get
        returned to the system and page-faulted in again every time, which made reads
        several times slower.
        """
        sizes = [count * self.specs[name].channels * self.specs[name].height * self.specs[name].width for name in names]
        block = np.empty(sum(sizes), dtype=np.float32 if dtype is None else decode_dtype(dtype))
        outputs, offset = {}, 0
        for name, size in zip(names, sizes):
            spec = self.specs[name]
            outputs[name] = block[offset : offset + size].reshape(count, spec.channels, spec.height, spec.width)
            offset += size
        return outputs

    def _check_feature(self, name: str) -> None:
        if name not in self.specs:
            raise KeyError(
                f"the feature store at {self.path} has no feature `{name}`; it holds {', '.join(self.specs)}"
            )

    def _locate(self, sample_id: str) -> tuple[int, int]:
        try:
            return self._index[sample_id]
        except KeyError:
            examples = ", ".join(repr(sample) for sample in self.ids[:3])
            raise KeyError(
                f"sample '{sample_id}' is not in the feature store at {self.path} ({len(self)} samples, "
                f"e.g. {examples}); extract features for this data set and split, or check the id "
                "(image path relative to the split's image folder, without extension)"
            ) from None

    def _shard_arrays(self, shard: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        arrays = self._arrays.get(shard)
        if arrays is not None:
            self._arrays.move_to_end(shard)
            return arrays
        arrays = {}
        for name, (data_file, scale_file) in self._shard_files[shard].items():
            data = self._map(data_file, self.codec.storage_dtype)
            scale = self._map(scale_file, np.dtype(np.float32)) if scale_file else None
            arrays[name] = (data, scale)
        self._arrays[shard] = arrays
        while len(self._arrays) > self.max_open_shards:
            self._arrays.popitem(last=False)
        return arrays

    def _map(self, file_name: str, dtype: np.dtype) -> np.ndarray:
        path = self.path / SHARDS_DIR / file_name
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise StoreCorruptError(f"{path} cannot be read ({error}); {REBUILD_HINT}") from error
        if array.dtype != dtype:
            raise StoreCorruptError(f"{path} holds {array.dtype}, expected {dtype}; {REBUILD_HINT}")
        return array

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = OrderedDict()
        return state


def _default_open_shards(files_per_shard: int) -> int:
    """Shards that may stay mapped: a quarter of the open-file limit (each map holds a descriptor)."""
    limit = 1024
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = 65536 if soft == resource.RLIM_INFINITY or soft <= 0 else soft
    except (ImportError, OSError, ValueError):
        pass  # no resource module (Windows): assume the common 1024
    return int(max(4, min(limit // 4, 16384) // max(files_per_shard, 1)))


def _frames_to_rows(frames: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Frame dicts as ``[N, 14]`` float64 rows: matrix (6), input size (2), valid (4), source size (2)."""
    rows = np.empty((len(frames), 14), dtype=np.float64)
    for row, frame in enumerate(frames):
        rows[row, :6] = np.asarray(frame["matrix"], dtype=np.float64).reshape(6)
        rows[row, 6:8] = frame["input_size"]
        rows[row, 8:12] = frame["valid"]
        rows[row, 12:14] = frame["source_size"]
    return rows


