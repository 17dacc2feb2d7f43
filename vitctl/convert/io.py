"""The format readers and writers, under the names convert and its callers have used: they live in
vitctl.formats (base, safetensors, orbax, zarr); new code imports them from there."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitctl.formats.base import CheckpointRoot, Reader, TensorInfo, Writer, hf_cache_repo, iter_by_name, parse_size  # noqa: F401
from vitctl.formats.orbax import CHECKPOINT_METADATA, METADATA, OrbaxReader, OrbaxWriter  # noqa: F401
from vitctl.formats.safetensors import (  # noqa: F401
    INDEX,
    MAX_HEADER_BYTES,
    SAFETENSORS,
    SHARD_NAME,
    ST_CODES,
    ST_DTYPES,
    RowStack,
    SafetensorsReader,
    SafetensorsWriter,
    plan_shards,
    read_safetensors_header,
    shard_names,
)
from vitctl.formats.zarr import ZARR_DTYPES, choose_chunks, slab_chunks  # noqa: F401
from vitctl.params import is_stacked, layer_name, split_layer  # noqa: F401


def OrbaxFilesWriter(params: str | Path, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], chunk_bytes: int) -> OrbaxWriter:
    """OrbaxWriter of uncompressed arrays in one directory each, written as plain files (`vitctl convert`'s output)."""
    return OrbaxWriter(params, specs, chunk_bytes, compress=False, use_ocdbt=False)
