"""Feature store read throughput and size, beside plain memcpy and one .npz per image.

SAM2-shaped records (``embed`` 256x64x64, ``hires_s8`` 64x128x128, ``hires_s4``
32x256x256; 8 MiB per sample in float16) are written three ways, then read in one random
order by each reader in the same process:

- ``store_float32``: :meth:`FeatureStore.read` (memory-mapped float16 -> new float32
  arrays, the default);
- ``store_float16``: ``FeatureStore.read(id, dtype=np.float16)`` (the stored float16 bytes
  copied as they are, what a half-precision trainer reads);
- ``memcpy``: a copy of the same float16 bytes out of one preallocated in-memory buffer
  (the ceiling for any reader that returns new arrays; ``store_float16`` is compared
  with it);
- ``memcpy_float32``: a copy of twice those bytes, what any reader that returns float32
  must at least write (``store_float32`` is compared with it);
- ``npz``: ``np.load`` of one uncompressed float32 ``.npz`` per image (the seed's layout).

Each reader runs ``--passes`` passes. Pass 1 of the store also maps its pages into the
process; later passes read mapped pages. Decoding runs with ``--threads`` torch threads
(default 1, as in a DataLoader worker; several threads only help on an idle machine).
Two page cache states are measured: ``warm``
(files just written, in the page cache) and ``cold`` (every file's pages dropped with
``posix_fadvise(DONTNEED)`` before each reader's first pass, so the two store readers do
not warm the files for each other; later passes are warm again, so only pass 1 is
reported for cold). Then bytes per sample per codec and the int8 and
bfloat16 reconstruction cosine.

    python benchmarks/bench_feature_store.py [--samples 256] [--passes 3] [--dir /tmp/x]

Prints a markdown table and writes benchmarks/results/feature_store.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vfmkd.features.codecs import CODEC_NAMES, get_codec  # noqa: E402
from vfmkd.features.format import StoreHeader  # noqa: E402
from vfmkd.features.store import FeatureStore  # noqa: E402
from vfmkd.features.writer import ShardWriter, finalize_store, prepare_store_for_writing  # noqa: E402
from vfmkd.geometry import resize_frame  # noqa: E402
from vfmkd.teachers.base import FeatureSpec  # noqa: E402

SPECS = {
    "embed": FeatureSpec("embed", 256, 16, 64, 64),
    "hires_s8": FeatureSpec("hires_s8", 64, 8, 128, 128),
    "hires_s4": FeatureSpec("hires_s4", 32, 4, 256, 256),
}


def synthetic_sample(rng: np.random.Generator, channel_scales: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One sample: per-channel shifted and scaled Gaussian maps, float32 ``[C, H, W]``."""
    result = {}
    for name, spec in SPECS.items():
        scale, offset = channel_scales[name]
        values = rng.standard_normal((spec.channels, spec.height, spec.width), dtype=np.float32)
        result[name] = values * scale[:, None, None] + offset[:, None, None]
    return result


def write_everything(folder: Path, count: int, shard_size: int) -> tuple[list[str], float, float]:
    """Write the store and the per-image npz files; returns ids and both write times."""
    rng = np.random.default_rng(0)
    channel_scales = {
        name: (np.exp(rng.normal(0, 1, spec.channels)).astype(np.float32),
               rng.normal(0, 0.5, spec.channels).astype(np.float32))
        for name, spec in SPECS.items()
    }
    header = StoreHeader(
        teacher="synthetic_sam2",
        fingerprint_fields={"teacher": "synthetic_sam2", "features": {k: v.to_dict() for k, v in SPECS.items()}},
        codec="float16",
        specs=SPECS,
    )
    store_dir, npz_dir = folder / "store", folder / "npz"
    npz_dir.mkdir(parents=True)
    prepare_store_for_writing(store_dir, header)
    writer = ShardWriter(store_dir, header, rank=0, shard_size=shard_size, start_index=0)
    frame = resize_frame((480, 640), (1024, 1024)).to_dict()
    ids = [f"{index:012d}" for index in range(count)]
    store_seconds = npz_seconds = 0.0
    for sample_id in ids:
        sample = synthetic_sample(rng, channel_scales)
        start = time.perf_counter()
        writer.add([sample_id], [frame], {name: values[None] for name, values in sample.items()})
        store_seconds += time.perf_counter() - start
        start = time.perf_counter()
        np.savez(npz_dir / f"{sample_id}.npz", **sample)
        npz_seconds += time.perf_counter() - start
    start = time.perf_counter()
    writer.flush()
    finalize_store(store_dir, header)
    store_seconds += time.perf_counter() - start
    return ids, store_seconds, npz_seconds


def drop_page_cache(paths: list[Path]) -> bool:
    """Evict the files' clean pages (no root needed); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    return True


def time_pass(read, order: list[str]) -> float:
    """Samples per second of one pass over ``order``."""
    start = time.perf_counter()
    for sample_id in order:
        read(sample_id)
    return len(order) / (time.perf_counter() - start)


def measure_reads(folder: Path, ids: list[str], passes: int, cold: bool) -> dict[str, list[float]]:
    """Per reader, samples/s of each pass (same random order for all).

    The readers take turns pass by pass, so a change in machine load hits them alike.
    """
    order = list(np.random.default_rng(1).permutation(ids))
    store_files = sorted((folder / "store").rglob("*.npy"))
    npz_files = sorted((folder / "npz").glob("*.npz"))
    # One store per reader: each maps (and page-faults) its own view of the files.
    store_float32 = FeatureStore.open(folder / "store")
    store_float16 = FeatureStore.open(folder / "store")

    # The memcpy ceiling: the same float16 bytes, from one buffer in memory.
    per_sample = sum(get_codec("float16").bytes_per_sample(s.channels, s.height, s.width) for s in SPECS.values())
    buffer = np.empty((len(ids), per_sample), dtype=np.uint8)
    reference = FeatureStore.open(folder / "store")
    for row, sample_id in enumerate(ids):
        shard, position = reference._locate(sample_id)
        arrays = reference._shard_arrays(shard)
        buffer[row] = np.concatenate([np.asarray(arrays[name][0][position]).view(np.uint8).ravel() for name in SPECS])
    del reference
    rows = {sample_id: row for row, sample_id in enumerate(ids)}
    # The bytes a float32 reader must at least write: 2x the float16 bytes (a smaller
    # buffer, cycled: 64 samples already exceed every CPU cache).
    cycled = min(len(ids), 64)
    wide = np.ones((cycled, per_sample // 2), dtype=np.float32)

    def read_npz(sample_id: str) -> dict[str, np.ndarray]:
        with np.load(folder / "npz" / f"{sample_id}.npz") as data:
            return {name: data[name] for name in SPECS}

    readers = {
        "store_float32": store_float32.read,
        "store_float16": lambda sample_id: store_float16.read(sample_id, dtype=np.float16),
        "memcpy": lambda sample_id: buffer[rows[sample_id]].copy(),
        "memcpy_float32": lambda sample_id: wide[rows[sample_id] % cycled].copy(),
        "npz": read_npz,
    }
    results: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(passes):
        for name, read in readers.items():
            if cold:
                # NOTE: pages still mapped by a store are not dropped: unmap both first.
                for store in (store_float32, store_float16):
                    store._arrays.clear()
                gc.collect()
                drop_page_cache(store_files + npz_files)
            results[name].append(time_pass(read, order))
    return results


def codec_table(samples: int = 4) -> list[dict[str, float | str]]:
    """Bytes per sample per codec vs float32 and the reconstruction cosine (worst sample/feature)."""
    rng = np.random.default_rng(2)
    scales = {name: (np.exp(rng.normal(0, 1, s.channels)).astype(np.float32),
                     rng.normal(0, 0.5, s.channels).astype(np.float32)) for name, s in SPECS.items()}
    data = [synthetic_sample(rng, scales) for _ in range(samples)]
    float32_bytes = sum(get_codec("float32").bytes_per_sample(s.channels, s.height, s.width) for s in SPECS.values())
    rows = []
    for name in CODEC_NAMES:
        codec = get_codec(name)
        cosines = []
        for sample in data:
            for feature, values in sample.items():
                stored, scale = codec.encode(values[None])
                decoded = codec.decode(stored, scale)[0].astype(np.float64).ravel()
                original = values.astype(np.float64).ravel()
                cosines.append(float(decoded @ original / np.linalg.norm(decoded) / np.linalg.norm(original)))
        per_sample = sum(codec.bytes_per_sample(s.channels, s.height, s.width) for s in SPECS.values())
        rows.append({"codec": name, "bytes_per_sample": per_sample, "vs_float32": per_sample / float32_bytes,
                     "min_cosine": min(cosines)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--dir", help="work folder (default: a temporary folder, removed afterwards)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for decoding (default 1, as in a DataLoader worker)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_feature_store_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        ids, store_write, npz_write = write_everything(folder, args.samples, args.shard_size)
        start = time.perf_counter()
        FeatureStore.open(folder / "store")
        open_seconds = time.perf_counter() - start
        warm = measure_reads(folder, ids, args.passes, cold=False)
        cold = measure_reads(folder, ids, 1, cold=True)
        store_bytes = sum(path.stat().st_size for path in (folder / "store").rglob("*") if path.is_file())
        npz_bytes = sum(path.stat().st_size for path in (folder / "npz").glob("*.npz"))
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    codecs = codec_table()

    def steady(rates: list[float]) -> float:
        return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__,
                    "torch_threads": args.threads, "load_average_before": list(load_before)},
        "samples": args.samples,
        "float16_bytes_per_sample": store_bytes / args.samples,
        "npz_float32_bytes_per_sample": npz_bytes / args.samples,
        "write_seconds": {"store": store_write, "npz": npz_write},
        "open_seconds": open_seconds,
        "warm_page_cache": {name: {"passes": rates, "steady": steady(rates)} for name, rates in warm.items()},
        "cold_page_cache_first_pass": {name: rates[0] for name, rates in cold.items()},
        "ratios": {
            "store_float16_vs_memcpy_warm": steady(warm["store_float16"]) / steady(warm["memcpy"]),
            "store_float32_vs_memcpy_float32_warm": steady(warm["store_float32"]) / steady(warm["memcpy_float32"]),
            "store_float32_vs_memcpy_warm": steady(warm["store_float32"]) / steady(warm["memcpy"]),
            "store_float16_vs_npz_warm": steady(warm["store_float16"]) / steady(warm["npz"]),
            "store_float32_vs_npz_warm": steady(warm["store_float32"]) / steady(warm["npz"]),
            "store_float16_vs_npz_cold": cold["store_float16"][0] / cold["npz"][0],
            "store_float32_vs_npz_cold": cold["store_float32"][0] / cold["npz"][0],
        },
        "codecs": codecs,
    }
    out = ROOT / "benchmarks" / "results" / "feature_store.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    mib = result["float16_bytes_per_sample"] / 2**20
    lines = [
        f"## Feature store reads ({args.samples} SAM2-shaped samples, {mib:.1f} MiB each in float16; "
        f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), load average {load_before[0]:.1f} at start)",
        "",
        "| reader | warm: pass 1 (samples/s) | warm: steady | cold page cache: pass 1 |",
        "|---|---|---|---|",
    ]
    for name in ("store_float16", "memcpy", "store_float32", "memcpy_float32", "npz"):
        lines.append(
            f"| {name} | {warm[name][0]:.0f} | {steady(warm[name]):.0f} | {cold[name][0]:.0f} |"
        )
    ratios = result["ratios"]
    lines += [
        "",
        f"warm, steady: store_float16 / memcpy {ratios['store_float16_vs_memcpy_warm']:.2f}x (target >= 0.8x); "
        f"store_float32 / memcpy_float32 {ratios['store_float32_vs_memcpy_float32_warm']:.2f}x, "
        f"/ memcpy {ratios['store_float32_vs_memcpy_warm']:.2f}x",
        f"vs npz (target >= 8x): store_float16 {ratios['store_float16_vs_npz_warm']:.1f}x warm, "
        f"{ratios['store_float16_vs_npz_cold']:.1f}x cold; store_float32 {ratios['store_float32_vs_npz_warm']:.1f}x "
        f"warm, {ratios['store_float32_vs_npz_cold']:.1f}x cold",
        f"open (index of {args.samples} samples): {open_seconds * 1000:.1f} ms; write: store {store_write:.1f} s, "
        f"npz {npz_write:.1f} s",
        "",
        "| codec | bytes/sample | vs float32 | min cosine |",
        "|---|---|---|---|",
    ]
    for row in codecs:
        lines.append(f"| {row['codec']} | {row['bytes_per_sample']:,} | {row['vs_float32']:.3f} | {row['min_cosine']:.6f} |")
    sys.stdout.write("\n".join(lines) + f"\n\nwrote {out}\n")


if __name__ == "__main__":
    main()
