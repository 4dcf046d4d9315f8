"""The teacher feature store: offline features, computed once and read back fast.

- :mod:`vfmkd.features.format`: the on-disk format (manifest, shard records, errors);
- :mod:`vfmkd.features.writer`: the shard writer, store preparation and finalisation;
- :mod:`vfmkd.features.store`: :class:`FeatureStore`, the reader;
- :mod:`vfmkd.features.codecs`: float16 / bfloat16 / float32 / int8 storage;
- :mod:`vfmkd.features.extract`: :func:`extract_features` (resumable, multi-rank);
- :mod:`vfmkd.features.cli`: the ``vfmkd features extract | info | verify`` commands
  (:mod:`vfmkd.features.info`: the ``info`` table).
"""

from vfmkd.features.codecs import CODEC_NAMES, Codec, get_codec
from vfmkd.features.extract import extract_features, verify_against_teacher
from vfmkd.features.format import (
    FeatureStoreError,
    StoreCorruptError,
    StoreMismatchError,
    StoreNotFoundError,
)
from vfmkd.features.store import FeatureStore

__all__ = [
    "CODEC_NAMES",
    "Codec",
    "FeatureStore",
    "FeatureStoreError",
    "StoreCorruptError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "extract_features",
    "get_codec",
    "verify_against_teacher",
]
