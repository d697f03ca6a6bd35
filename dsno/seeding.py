"""Per-index generator seeds: item `index` of a run with seed `seed` gets its own 64-bit seed, so
its random numbers depend on (seed, index) only, never on batching, sharding or resuming.

    index_seed(seed, index, domain=b"dsno.noise")   # BLAKE2b-64 of (seed, index), keyed by domain

`domain` (at most 16 bytes, BLAKE2b's `person`) keeps the streams of different uses apart.
"""

from __future__ import annotations

import hashlib
import struct

NOISE = b"dsno.noise"      # x_T of teacher trajectory `index` (dsno.data.generate)
CHUNK = b"dsno.chunk"      # noise of image chunk `index` (dsno.sample_images)
LABEL = b"dsno.label"      # class label of teacher trajectory `index` (dsno.data.generate)


def index_seed(seed: int, index: int, domain: bytes = NOISE) -> int:
    """64-bit seed (0 <= s < 2**64) of item `index` under `seed`: BLAKE2b-64 of the little-endian
    uint64 pair (seed, index) with person=domain. seed, index: integers in [0, 2**64)."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed, index), digest_size=8, person=domain).digest()
    return int.from_bytes(digest, "little")
