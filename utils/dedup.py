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
import zlib
from functools import lru_cache

import numpy as np

MINHASH_SCHEME = "affine32"
WORD_RE = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier that combines a shingle's word hashes
_MASK64 = (1 << 64) - 1


@lru_cache(maxsize=4)
def minhash_permutations(num_perm: int) -> np.ndarray:
    """datasketch's affine32 permutations for seed 1: (a odd, b) per permutation, drawn as datasketch draws
    them (a test compares). Made here so that workers need not import datasketch (0.5 s, mostly scipy)."""
    generator = np.random.RandomState(1)
    multipliers = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    offsets = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return np.array([multipliers, offsets])


def _murmur_finalizer(hashes: np.ndarray) -> np.ndarray:
    hashes = hashes ^ (hashes >> np.uint32(16))
    hashes = hashes * np.uint32(0x85EBCA6B)
    hashes = hashes ^ (hashes >> np.uint32(13))
    hashes = hashes * np.uint32(0xC2B2AE35)
    return hashes ^ (hashes >> np.uint32(16))


def combine_word_hashes(word_hashes: list[int]) -> int:
    """One shingle's 32-bit hash from the crc32 of its words (what `shingle_hashes` computes in bulk)."""
    combined = 0
    for word_hash in word_hashes:
        combined = (combined * int(_MIX) + word_hash) & _MASK64
    return (combined ^ (combined >> 32)) & 0xFFFFFFFF


def shingle_hashes(texts: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(document index, 32-bit hash) of every shingle of `size` consecutive lower-cased words, grouped by
    document; a document of `size` words or fewer is one shingle of all its words."""
    words = [WORD_RE.findall(text.lower()) for text in texts]
    counts = np.fromiter(map(len, words), dtype=np.int64, count=len(texts))
    all_words = (word.encode("utf-8") for document in words for word in document)
    word_hashes = np.fromiter(map(zlib.crc32, all_words), dtype=np.uint64, count=int(counts.sum()))
    ends = np.cumsum(counts)
    windows = max(len(word_hashes) - size + 1, 0)
    combined = np.zeros(windows, dtype=np.uint64)
    for offset in range(size):
        combined = combined * _MIX + word_hashes[offset:offset + windows]
    window_document = np.repeat(np.arange(len(texts)), counts)[:windows]
    inside = np.arange(windows) + size <= ends[window_document]
    short = np.flatnonzero(counts <= size)
    short_hashes = [combine_word_hashes(word_hashes[ends[d] - counts[d]:ends[d]].tolist()) for d in short]
    documents = np.concatenate([window_document[inside], short])
    folded = combined[inside] ^ (combined[inside] >> np.uint64(32))
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


class Deduplicator:
    """Exact (sha256) and near (datasketch MinHash LSH) dedup; keeps the first document of each cluster."""

    def __init__(self, num_perm: int, threshold: float, near: bool = True):
        from datasketch import MinHashLSH

        self.seen: set[bytes] = set()
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if near else None
        self.count = 0

    def duplicate_kind(self, sha256: str, signature: np.ndarray | None) -> str | None:
        """"exact_duplicate", "near_duplicate" or None (new: remembered from now on)."""
        digest = bytes.fromhex(sha256)
        if digest in self.seen:
            return "exact_duplicate"
        self.seen.add(digest)
        if self.lsh is not None and signature is not None:
            from datasketch import LeanMinHash

            minhash = LeanMinHash(seed=1, hashvalues=signature, scheme=MINHASH_SCHEME)
            if self.lsh.query(minhash):
                return "near_duplicate"
            self.lsh.insert(self.count, minhash, check_duplication=False)
            self.count += 1
        return None
