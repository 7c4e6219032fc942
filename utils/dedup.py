"""Exact and near-duplicate removal for stage 01: MinHash signatures of word shingles, datasketch's LSH index.

Signatures are computed a batch of documents at a time with numpy. Each one is exactly what
`datasketch.MinHash(num_perm, seed=1, scheme="affine32").update_batch(...)` gives for the document's set of
shingle hashes (tests/test_prepare_data.py checks this): the shingle hash is pre-mixed with the MurmurHash3
finalizer, then each permutation is a*h + b in uint32. Doing it per document through datasketch cost more
than all other filters together, mostly in Python-level calls.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np
from datasketch import MinHash, MinHashLSH

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier that combines a shingle's word hashes
_MASK64 = (1 << 64) - 1
_WORD_PRIME = 0x100000001B3  # FNV-1's 64-bit prime: odd, so invertible modulo 2**64
_WORD_PRIME_INVERSE = pow(_WORD_PRIME, -1, 1 << 64)


@lru_cache(maxsize=4)
def minhash_permutations(num_perm: int) -> np.ndarray:
    """datasketch's affine32 permutations for seed 1: (a, b) per permutation."""
    return MinHash(num_perm=num_perm, seed=1, scheme="affine32").permutations


def _murmur_finalizer(hashes: np.ndarray) -> np.ndarray:
    hashes = hashes ^ (hashes >> np.uint32(16))
    hashes = hashes * np.uint32(0x85EBCA6B)
    hashes = hashes ^ (hashes >> np.uint32(13))
    hashes = hashes * np.uint32(0xC2B2AE35)
    return hashes ^ (hashes >> np.uint32(16))


@lru_cache(maxsize=1)
def word_characters() -> np.ndarray:
    """Which code points `\\w` matches, asked of the regex itself once (0.05 s)."""
    table = np.zeros(0x110000, dtype=bool)
    table[[ord(c) for c in re.findall(r"\w", "".join(map(chr, range(0x110000))))]] = True
    return table


def _powers(base: int, count: int) -> np.ndarray:
    """base**k mod 2**64 for k in [0, count)."""
    powers = np.empty(count, dtype=np.uint64)
    powers[:1] = 1
    powers[1:] = base
    return np.cumprod(powers)


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(words per text, hash of each word) for the `\\w+` words of the lower-cased texts. A word's hash is the
    polynomial sum(code point_j * P**(n-1-j)) mod 2**64, computed for all texts at once: the hash of a run is a
    difference of prefix sums scaled by inverse powers of P."""
    lowered = [text.lower() for text in texts]
    codes = np.frombuffer("\0".join(lowered).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    edges = np.diff(word_characters()[codes].view(np.int8), prepend=0, append=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
    np.cumsum(codes * _powers(_WORD_PRIME_INVERSE, len(codes)), out=prefix[1:])
    hashes = (prefix[ends] - prefix[starts]) * _powers(_WORD_PRIME, len(codes) + 1)[ends - 1]
    lengths = np.fromiter(map(len, lowered), dtype=np.int64, count=len(texts)) + 1
    documents = np.searchsorted(np.cumsum(lengths) - lengths, starts, side="right") - 1
    return np.bincount(documents, minlength=len(texts)), hashes


def combine_word_hashes(word_hashes: list[int]) -> int:
    """One shingle's 32-bit hash from the hashes of its words (what `shingle_hashes` computes in bulk)."""
    combined = 0
    for word_hash in word_hashes:
        combined = (combined * int(_MIX) + word_hash) & _MASK64
    return (combined ^ (combined >> 32)) & 0xFFFFFFFF


def word_ngram_hashes(counts: np.ndarray, hashed_words: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(document index, 64-bit hash) of every run of `size` consecutive words that lies inside one document,
    from `word_hashes`' output; a document shorter than `size` words has none."""
    ends = np.cumsum(counts)
    windows = max(len(hashed_words) - size + 1, 0)
    combined = np.zeros(windows, dtype=np.uint64)
    for offset in range(size):
        combined = combined * _MIX + hashed_words[offset:offset + windows]
    window_document = np.repeat(np.arange(len(counts)), counts)[:windows]
    inside = np.arange(windows) + size <= ends[window_document]
    return window_document[inside], combined[inside]


def shingle_hashes(texts: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(document index, 32-bit hash) of every shingle of `size` consecutive lower-cased words, grouped by
    document; a document of `size` words or fewer is one shingle of all its words."""
    counts, hashed_words = word_hashes(texts)
    ends = np.cumsum(counts)
    window_document, combined = word_ngram_hashes(counts, hashed_words, size)
    short = np.flatnonzero(counts <= size)
    short_hashes = [combine_word_hashes(hashed_words[ends[d] - counts[d]:ends[d]].tolist()) for d in short]
    documents = np.concatenate([window_document, short])
    folded = combined ^ (combined >> np.uint64(32))
    hashes = np.concatenate([folded.astype(np.uint32), np.array(short_hashes, dtype=np.uint32)])
    order = np.argsort(documents, kind="stable")
    return documents[order], hashes[order]


def minhash_signatures(texts: list[str], num_perm: int, shingle_size: int) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures of the texts' word shingles."""
    multipliers, offsets = minhash_permutations(num_perm)
    documents, hashes = shingle_hashes(texts, shingle_size)
    permuted = np.multiply.outer(multipliers, _murmur_finalizer(hashes))
    permuted += offsets[:, None]
    starts = np.flatnonzero(np.r_[True, documents[1:] != documents[:-1]])
    return np.minimum.reduceat(permuted, starts, axis=1).T


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class NearDuplicateIndex(MinHashLSH):
    """datasketch's LSH index (its band layout for the threshold, its band tables) with one method that asks
    and inserts in a single pass over the bands: `query` then `insert` would cut and hash every band twice and
    keep a reverse key table, and this loop is the one part of stage 01 that runs serially."""

    def add_unless_near(self, key: int, signature: np.ndarray) -> bool:
        """True when a document sharing a band is indexed already; otherwise indexes this one."""
        bands = [signature[start:end].tobytes() for start, end in self.hashranges]
        if any(table.has_key(band) for band, table in zip(bands, self.hashtables)):
            return True
        for band, table in zip(bands, self.hashtables):
            table.insert(band, key)
        return False


class Deduplicator:
    """Exact (sha256) and near (datasketch MinHash LSH) dedup; keeps the first document of each cluster."""

    def __init__(self, num_perm: int, threshold: float, near: bool = True):
        self.seen: set[bytes] = set()
        self.index = NearDuplicateIndex(threshold=threshold, num_perm=num_perm) if near else None
        self.count = 0

    def duplicate_kind(self, sha256: str, signature: np.ndarray | None) -> str | None:
        """"exact_duplicate", "near_duplicate" or None (new: remembered from now on)."""
        digest = bytes.fromhex(sha256)
        if digest in self.seen:
            return "exact_duplicate"
        self.seen.add(digest)
        if self.index is not None and signature is not None:
            if self.index.add_unless_near(self.count, signature):
                return "near_duplicate"
            self.count += 1
        return None
