"""SHA-256 digests, computed one way everywhere: of a file, and of a JSON-able value.

A weights file and a feature-store shard are hashed by :func:`file_sha256`; a teacher's
fingerprint fields and a store manifest by :func:`json_sha256`, so two processes that
describe the same thing get the same digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["HASH_CHUNK_BYTES", "file_sha256", "json_sha256"]

# Bytes read per step: constant memory for multi-GB weights, few calls for small shards.
HASH_CHUNK_BYTES = 8 << 20


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks of :data:`HASH_CHUNK_BYTES`."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """SHA-256 hex digest of ``value`` as JSON with sorted keys (key order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
