"""Seeded hashing and shuffling of the sample index, stable across NumPy versions.

Shuffles use NumPy's legacy `RandomState`, whose stream NumPy keeps frozen
across versions (NEP 19; the newer `Generator` streams may change), seeded from
a hash of (seed, source, purpose, epoch): the order must survive an upgrade on
resume. The held-out split hashes each document on its own (SplitMix64), so a
document's side never depends on the others.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction

import numpy as np

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (a bijection of uint64, so distinct inputs never tie)."""
    x = np.asarray(x, dtype=np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def key64(*parts) -> np.uint64:
    """A 64-bit key from JSON-serializable parts."""
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def seed_words(*parts) -> np.ndarray:
    """A 128-bit RandomState seed (four uint32 words) from JSON-serializable parts."""
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).digest()
    return np.frombuffer(digest, dtype="<u4").astype(np.uint32)


def permutation(n: int, seed: np.ndarray) -> np.ndarray:
    """A random permutation of range(n) (int64), the same under every NumPy version."""
    return np.random.RandomState(seed).permutation(n).astype(np.int64, copy=False)


def held_out_mask(doc_ids: np.ndarray, fraction: Fraction, seed: int, source: str) -> np.ndarray:
    """True for the documents held out for validation: a hash of (seed, source, document) below `fraction`."""
    if fraction <= 0:
        return np.zeros(len(doc_ids), dtype=bool)
    threshold = np.uint64(min(int(fraction * 2**64), 2**64 - 1))
    return mix64(doc_ids.astype(np.uint64) ^ key64("held-out", seed, source)) < threshold


__all__ = ["mix64", "key64", "seed_words", "permutation", "held_out_mask"]
