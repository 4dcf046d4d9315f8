"""``vfmkd features info``: a store's manifest as a readable table."""

from __future__ import annotations

import numpy as np

from vfmkd.features.codecs import get_codec
from vfmkd.features.format import MIRROR_SUFFIX
from vfmkd.features.store import FeatureStore

__all__ = ["format_store_info"]


def format_store_info(store: FeatureStore) -> str:
    """A store's manifest as a readable table."""
    manifest = store.manifest
    requested = manifest.get("requested_samples")
    samples = f"{len(store)}"
    if requested is not None:
        samples += f" of {requested} requested" + ("" if store.is_complete else " (incomplete: re-run the extraction)")
    mirrored = sum(sample_id.endswith(MIRROR_SUFFIX) for sample_id in store.ids)
    if mirrored:
        samples += f" ({mirrored} of them mirror images, --fliplr)"
    random_init = bool(manifest.get("random_init"))
    codec = get_codec(manifest["codec"])
    fields = manifest["fingerprint_fields"]
    lines = [
        f"store        {store.path}",
        f"teacher      {manifest['teacher']}",
        f"fingerprint  {manifest['fingerprint']}",
        f"weights      {manifest.get('weights_path') or '-'} (sha256 {str(fields.get('weights_sha256', '-'))[:16]})",
        f"random init  {'YES: features of an untrained teacher, for tests only' if random_init else 'no'}",
        f"codec        {codec.name}",
        f"samples      {samples} in {manifest.get('num_shards', '?')} shard(s)",
        f"data         {manifest.get('data_source')} (split {manifest.get('split')})",
        f"created      {manifest.get('created')}   updated {manifest.get('updated')}",
        "",
    ]
    header = ("feature", "shape CxHxW", "stride", "bytes/sample", "mean", "std")
    rows = []
    total = 0
    for name, spec in store.specs.items():
        mean, std = store.stats(name)
        per_sample = codec.bytes_per_sample(spec.channels, spec.height, spec.width)
        total += per_sample
        shape = f"{spec.channels}x{spec.height}x{spec.width}"
        average = [f"{float(np.mean(values)) if values.size else 0.0:.4g}" for values in (mean, std)]
        rows.append((name, shape, str(spec.stride), f"{per_sample:,}", *average))
    rows.append(("total", "", "", f"{total:,}", "", ""))
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.append("(mean: mean of the channel means; std: mean of the channel stds)")
    return "\n".join(lines)
