"""Offline language identification for stage 01: py3langid's model, scored a batch of documents at a time.

py3langid walks its byte DFA one byte at a time in Python, which made language ID the slowest filter of
stage 01. The DFA recognises byte n-grams of at most `MODEL_DEPTH` bytes, so the state after any position
depends only on the bytes just before it. That lets us cut every document into short segments, warm each
segment up on the bytes before it, and walk all segments of a batch in lockstep with numpy. The scores are
py3langid's own (naive Bayes over log1p feature counts, temperature sqrt(bytes), aliases folded);
tests/test_prepare_data.py checks them against `LanguageIdentifier.classify` and checks the depth.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix

MODEL_DEPTH = 6  # longest path from the DFA's start to any state, in bytes (py3langid 0.4.0's model)
WARMUP_BYTES = 8  # >= MODEL_DEPTH
SEGMENT_BYTES = 32
MAX_CHARACTERS = 4000  # of each document, as many as the language needs


def _encode(text: str) -> bytes:
    """py3langid's input normalisation: all-caps text lowered, NFC, UTF-8."""
    text = text[:MAX_CHARACTERS]
    if text.isupper():
        text = text.lower()
    return unicodedata.normalize("NFC", text).encode("utf-8", errors="surrogatepass")


def cache_dir() -> Path:
    """Where derived files that are slow to rebuild are kept: $MINI_LLM_CACHE, else ~/.cache/mini-llm."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mini-llm"
    return Path(os.environ.get("MINI_LLM_CACHE") or default)


def _converted_model(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """py3langid's arrays in the types the batch walk and the sparse scoring use."""
    return {
        "next_state": model["nextmove"].astype(np.int32),
        "row_start": model["nextmove_row"].astype(np.int32) << 8,
        "state_feature": model["out_feat"].astype(np.int32),
        "feature_scores": model["ptc"].astype(np.float32),
        "class_prior": model["pc"].astype(np.float32),
        "classes": model["classes"],
    }


def _load_model() -> dict[str, np.ndarray]:
    """The model's arrays, memory-mapped from the cache: unpacking py3langid's LZMA file and converting it
    costs about 0.7 s, once per machine instead of once per process; forked workers share the pages."""
    from py3langid.langid import MODEL_DIR, MODEL_FILE

    packed = Path(MODEL_DIR, MODEL_FILE)
    cached = cache_dir() / f"py3langid-{hashlib.sha256(packed.read_bytes()).hexdigest()[:16]}"
    if not cached.is_dir():
        with lzma.open(packed) as handle, np.load(handle, allow_pickle=False) as model:
            converted = _converted_model({name: model[name] for name in model.files})
        try:
            tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for name, array in converted.items():
                np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            os.replace(tmp, cached)
        except OSError:  # read-only home, or another process won the rename: use what we have
            shutil.rmtree(tmp, ignore_errors=True)
            if not cached.is_dir():
                return converted
    # plain views of the maps: np.memmap's indexing costs more than the lookups themselves
    return {path.stem: np.asarray(np.load(path, mmap_mode="r", allow_pickle=False)) for path in cached.glob("*.npy")}


class LanguageIdentifier:
    """Batch language ID with py3langid's bundled model (numpy arrays inside the package, no pickle)."""

    def __init__(self) -> None:
        model = _load_model()
        self.next_state = model["next_state"]
        self.row_start = model["row_start"]
        self.state_feature = model["state_feature"]
        self.feature_scores = model["feature_scores"]
        self.class_prior = np.asarray(model["class_prior"])
        self.classes = model["classes"].tolist()
        first = {}
        self.alias_pairs = [(first[c], i) for i, c in enumerate(self.classes) if first.setdefault(c, i) != i]

    def _step(self, states: np.ndarray, next_bytes: np.ndarray) -> np.ndarray:
        return self.next_state[self.row_start[states] + next_bytes]

    def _feature_counts(self, encoded: list[bytes]):
        """Sparse (documents × features) matrix of how often each n-gram feature occurs in each document."""
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        segments = -(-lengths // SEGMENT_BYTES)
        first_segment = np.cumsum(segments) - segments
        n_segments = int(segments.sum())
        text = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        doc_start = np.cumsum(lengths) - lengths
        slot = np.arange(len(text)) + np.repeat(first_segment * SEGMENT_BYTES - doc_start, lengths)
        grid = np.zeros(n_segments * SEGMENT_BYTES, dtype=np.int32)
        grid[slot] = text
        grid = grid.reshape(n_segments, SEGMENT_BYTES)
        in_text = np.zeros(n_segments * SEGMENT_BYTES, dtype=bool)
        in_text[slot] = True

        states = np.zeros(n_segments, dtype=np.int32)
        continuing = np.ones(n_segments, dtype=bool)
        continuing[first_segment[segments > 0]] = False
        rows = np.flatnonzero(continuing)  # each starts where the full segment before it (same document) ends
        warm = np.zeros(len(rows), dtype=np.int32)
        for column in range(SEGMENT_BYTES - WARMUP_BYTES, SEGMENT_BYTES):
            warm = self._step(warm, grid[rows - 1, column])
        states[rows] = warm
        features = np.empty((n_segments, SEGMENT_BYTES), dtype=np.int32)
        for column in range(SEGMENT_BYTES):
            states = self._step(states, grid[:, column])
            features[:, column] = self.state_feature[states]

        features = features.ravel()
        found = in_text & (features >= 0)
        documents = np.repeat(np.repeat(np.arange(len(encoded)), segments), SEGMENT_BYTES)[found]
        counts = csr_matrix(
            (np.ones(int(found.sum()), dtype=np.float32), (documents, features[found])),
            shape=(len(encoded), len(self.feature_scores)),
        )
        counts.sum_duplicates()
        return counts, lengths

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """(language, probability) of each text, as py3langid's `classify` with `norm_probs=True` gives."""
        if not texts:
            return []
        counts, lengths = self._feature_counts([_encode(t) for t in texts])
        counts.data = np.log1p(counts.data)
        scores = np.asarray(counts @ self.feature_scores) + self.class_prior
        scores[np.diff(counts.indptr) == 0] = 0.0  # no feature at all: uniform, as py3langid
        scores /= np.sqrt(np.maximum(lengths, 1)).astype(np.float32)[:, None]
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        for first, alias in self.alias_pairs:
            scores[:, first] += scores[:, alias]
            scores[:, alias] = 0.0
        best = scores.argmax(axis=1)
        return [(self.classes[b], float(scores[i, b])) for i, b in enumerate(best)]
