"""One SHA-256 of a file and one of a JSON value, shared by teachers and feature stores."""

from __future__ import annotations

import hashlib

from vfmkd.features.format import fingerprint_of
from vfmkd.utils.hashing import HASH_CHUNK_BYTES, file_sha256, json_sha256


def test_file_digest_is_the_digest_of_the_bytes_across_chunks(tmp_path) -> None:
    data = bytes(range(256)) * (HASH_CHUNK_BYTES // 256 + 3)  # more than one chunk
    path = tmp_path / "weights.pt"
    path.write_bytes(data)
    assert file_sha256(path) == file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_json_digest_ignores_key_order_and_is_the_store_fingerprint() -> None:
    fields = {"teacher": "sam2", "preprocessing": {"image_size": 256, "mean": [0.5, 0.5]}}
    reordered = {"preprocessing": {"mean": [0.5, 0.5], "image_size": 256}, "teacher": "sam2"}
    assert json_sha256(fields) == json_sha256(reordered) == fingerprint_of(fields)
    assert json_sha256(fields) != json_sha256({**fields, "teacher": "sam"})
