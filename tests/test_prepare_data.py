"""Stage 01: readers, filters, dedup, split, tokenizer, .bin files, and every bad input, on small fixtures."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from utils.data import (
    CleanedDocument,
    CleaningSettings,
    DataError,
    ReadStats,
    clean_documents,
    code_fraction,
    is_validation,
    normalize_text,
    read_documents,
    remove_urls,
)
from utils.dedup import Deduplicator, combine_word_hashes, minhash_permutations, minhash_signatures
from utils.language import MODEL_DEPTH, WARMUP_BYTES, LanguageIdentifier
from utils.tokenizer import TokenizerError, encode_documents, load_tokenizer, train_tokenizer
from utils.tokens import open_tokens, read_meta

ROOT = Path(__file__).resolve().parents[1]
PROSE = (
    "The quick brown fox jumps over the lazy dog while the children watch from the garden. "
    "Every evening the river carries small boats past the old mill, and the miller waves at them. "
)


def run_prepare(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "scripts/01_prepare_data.py", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"prepare failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def prose_documents(count: int) -> list[str]:
    """Distinct English paragraphs (distinct enough that near-dedup keeps them all)."""
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
    return [
        f"Story number {i}. " + PROSE + " ".join(words[(i * 7 + j) % len(words)] + str(i * j) for j in range(40)) + "."
        for i in range(count)
    ]


# --------------------------------------------------------------------------- filters


def clean(text: str, settings: CleaningSettings) -> CleanedDocument:
    return clean_documents([text], settings)[0]


def test_normalize_nfc_controls_and_whitespace():
    text = "Cafe\u0301 ok\x07 \u00a0tab\t \r\nline two   \n\n\n\nend  "
    assert normalize_text(text) == "Café ok  tab\nline two\n\nend"


def test_remove_urls_keeps_surrounding_prose():
    assert remove_urls("See https://example.com/a?b=1 and www.test.org now.") == "See  and  now."


def test_code_heavy_documents_are_dropped_and_prose_kept():
    code = "def f(x):\n    return x\nimport os\nx = 1\nprint(x)\n"
    assert code_fraction(code) > 0.5
    assert clean(code * 5, CleaningSettings(language=None)).removed_by == "code"
    assert clean(PROSE, CleaningSettings(language=None)).removed_by is None


def test_length_filters():
    settings = CleaningSettings(language=None, min_length=100, max_length=150, use_minhash=False)
    assert clean("short text", settings).removed_by == "too_short"
    assert clean(PROSE * 3, settings).removed_by == "too_long"
    assert clean(PROSE[:120], settings).removed_by is None


def test_language_filter_keeps_english_drops_german():
    settings = CleaningSettings(language="en", use_minhash=False)
    german = "Der schnelle braune Fuchs springt über den faulen Hund, und die Kinder schauen aus dem Garten zu."
    assert clean(PROSE, settings).removed_by is None
    dropped = clean(german, settings)
    assert (dropped.removed_by, dropped.language) == ("language", "de")


def test_exact_and_near_duplicates_keep_first_of_cluster():
    settings = CleaningSettings(language=None)
    dedup = Deduplicator(settings.num_perm, threshold=0.8)
    base = " ".join(f"word{i}" for i in range(300))
    near = base.replace("word150", "changed150")  # ~98 % of shingles shared
    different = " ".join(f"other{i}" for i in range(300))
    documents = clean_documents([base, base, near, different], settings)
    kinds = [dedup.duplicate_kind(d.sha256, d.minhash) for d in documents]
    assert kinds == [None, "exact_duplicate", "near_duplicate", None]


MANY_LANGUAGES = [
    PROSE,
    "Der schnelle braune Fuchs springt über den faulen Hund, und die Kinder schauen aus dem Garten zu.",
    "Le renard brun rapide saute par-dessus le chien paresseux pendant que les enfants regardent.",
    "El rápido zorro marrón salta sobre el perro perezoso mientras los niños miran desde el jardín.",
    "Быстрая коричневая лиса прыгает через ленивую собаку, а дети смотрят из сада.",
    "敏捷的棕色狐狸跳过了懒狗，孩子们在花园里看着。",
    "素早い茶色の狐が怠け者の犬を飛び越え、子供たちが庭から見ている。",
    "الثعلب البني السريع يقفز فوق الكلب الكسول بينما يشاهد الأطفال من الحديقة.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG AND THE CHILDREN WATCH.",
    "ok",
    "1234 5678 !!!",
    PROSE * 40 + "Und dann kam der Hund nach Hause.",  # longer than the 4000 characters language ID reads
    "Mixed: the dog und der Hund et le chien y el perro.",
]


def test_batch_language_id_matches_py3langid():
    from py3langid.langid import MODEL_FILE
    from py3langid.langid import LanguageIdentifier as Py3LangId

    reference = Py3LangId.from_model_file(MODEL_FILE, norm_probs=True)
    ours = LanguageIdentifier().classify(MANY_LANGUAGES)
    for text, (language, probability) in zip(MANY_LANGUAGES, ours):
        expected_language, expected_probability = reference.classify(text[:4000])
        assert language == expected_language, text[:40]
        assert probability == pytest.approx(expected_probability, abs=1e-4), text[:40]


def test_language_model_state_depends_only_on_the_last_warmup_bytes():
    """The batch walk restarts segments WARMUP_BYTES early; that is exact only while no DFA state lies
    deeper than that from the start state (a newer py3langid model could)."""
    model = LanguageIdentifier()
    depth = np.full(len(model.row_start), -1)
    depth[0], frontier, level = 0, np.array([0]), 0
    while len(frontier):
        level += 1
        reached = np.unique(model.next_state[(model.row_start[frontier][:, None] + np.arange(256)).ravel()])
        frontier = reached[depth[reached] < 0]
        depth[frontier] = level
    assert depth.max() == MODEL_DEPTH <= WARMUP_BYTES
    assert (depth >= 0).all()


def test_language_model_is_cached_once_and_works_without_a_writable_cache(tmp_path, monkeypatch):
    import utils.language

    monkeypatch.setenv("MINI_LLM_CACHE", str(tmp_path / "cache"))
    first = LanguageIdentifier().classify([PROSE])
    assert len(list((tmp_path / "cache").glob("py3langid-*/*.npy"))) == 6
    monkeypatch.setattr(utils.language.lzma, "open", lambda *a, **k: pytest.fail("unpacked the model again"))
    assert LanguageIdentifier().classify([PROSE]) == first
    monkeypatch.undo()
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("MINI_LLM_CACHE", str(tmp_path / "file" / "cache"))
    assert LanguageIdentifier().classify([PROSE]) == first


def word_hash(word: str) -> int:
    """The word hash `utils.dedup.word_hashes` computes in bulk, one code point at a time."""
    hashed = 0
    for character in word:
        hashed = (hashed * 0x100000001B3 + ord(character)) % 2**64
    return hashed


def test_minhash_signatures_equal_datasketch_minhash_of_the_shingles():
    from datasketch import MinHash

    texts = [PROSE, "Two words", "", "exactly five words in here", PROSE.upper() + " and six more words",
             "İstanbul'da ΣΊΣΥΦΟΣ und Straße — don’t 中文字 snake_case 42"]
    assert np.array_equal(minhash_permutations(64), MinHash(num_perm=64, seed=1, scheme="affine32").permutations)
    signatures = minhash_signatures(texts, num_perm=64, shingle_size=5)
    for text, signature in zip(texts, signatures):
        hashes = [word_hash(word) for word in re.findall(r"\w+", text.lower())]
        shingles = [hashes[i:i + 5] for i in range(max(1, len(hashes) - 4))]
        expected = MinHash(num_perm=64, seed=1, scheme="affine32", hashfunc=combine_word_hashes)
        expected.update_batch(shingles)
        assert np.array_equal(signature, expected.hashvalues), text[:40]


def test_split_is_seeded_order_independent_and_close_to_fraction():
    hashes = [f"{i:064x}" for i in range(4000)]
    val = [h for h in hashes if is_validation(h, seed=1, val_fraction=0.1)]
    assert 300 < len(val) < 500
    assert val == [h for h in reversed(hashes) if is_validation(h, 1, 0.1)][::-1]
    assert val != [h for h in hashes if is_validation(h, 2, 0.1)]


# --------------------------------------------------------------------------- readers


def write_inputs(tmp_path: Path, docs: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    paths["txt"] = tmp_path / "a.txt"
    paths["txt"].write_text("\n\n".join(docs[:2]) + "\n", encoding="utf-8")
    paths["json"] = tmp_path / "b.json"
    paths["json"].write_text(json.dumps([{"content": d, "id": i} for i, d in enumerate(docs[:2])]))
    paths["jsonl"] = tmp_path / "c.jsonl"
    paths["jsonl"].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:2]))
    paths["jsonl.gz"] = tmp_path / "d.jsonl.gz"
    with gzip.open(paths["jsonl.gz"], "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps({"text": d}) + "\n" for d in docs[:2]))
    paths["txt.gz"] = tmp_path / "e.txt.gz"
    with gzip.open(paths["txt.gz"], "wt", encoding="utf-8") as handle:
        handle.write("\n\n".join(docs[:2]))
    paths["parquet"] = tmp_path / "f.parquet"
    pq.write_table(pa.table({"story": docs[:2], "n": [1, 2]}), paths["parquet"])
    return paths


def test_every_input_format_reads_the_same_documents(tmp_path):
    docs = ["First document line one.\nline two.", "Second document."]
    for kind, path in write_inputs(tmp_path, docs).items():
        stats = ReadStats()
        assert [d.strip() for d in read_documents([str(path)], stats)] == docs, kind
        assert stats.records == 2


def test_txt_whole_file_mode(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo\n")
    assert list(read_documents([str(path)], ReadStats(), txt_split="file")) == ["one\n\ntwo\n"]


def test_malformed_jsonl_lines_are_counted_with_line_numbers_or_fail_when_strict(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok one"}\n{broken\n{"text": "ok two"}\nnot json\n')
    stats = ReadStats()
    assert list(read_documents([str(path)], stats)) == ["ok one", "ok two"]
    assert stats.malformed == 2
    assert [e.split(" ")[0] for e in stats.malformed_examples] == [f"{path}:2", f"{path}:4"]
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        list(read_documents([str(path)], ReadStats(), strict=True))


def test_missing_text_field_names_the_fields_found(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"title": "a", "body_text": "b"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1.*fields found: \['body_text', 'title'\]"):
        list(read_documents([str(path)], ReadStats()))
    with pytest.raises(DataError, match=r"no field 'text'"):
        list(read_documents([str(path)], ReadStats(), text_field="text"))


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf" + b"\xe9 au lait\n\nna\xefve\n")
    stats = ReadStats()
    docs = list(read_documents([str(path)], stats))
    assert docs == ["caf\ufffd au lait\n", "na\ufffdve\n"]
    assert stats.replaced_characters == 2


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    text = "Hello  world!\n\tIndented — unicode é, emoji 😀, digits 12345."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>", "<unk>", "<s>", "</s>")
    assert tokenizer.unk_token_id not in ids  # byte fallback: nothing is unknown
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert chat_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2
    assert encode_documents(tokenizer, [text, chat, ""]) == [ids, chat_ids, []]  # the fast path stage 01 uses


def test_vocab_too_large_or_too_small_for_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"--vocab_size 4000 is too large for this corpus"):
        train_tokenizer(["a tiny corpus of few words"], 4000, tmp_path / "tok")
    with pytest.raises(TokenizerError, match=r"--vocab_size 200 is too small.*use a larger --vocab_size"):
        train_tokenizer(["a tiny corpus of few words"], 200, tmp_path / "tok")


# --------------------------------------------------------------------------- the script, end to end


def test_prepare_end_to_end_bins_match_meta(tmp_path):
    docs = prose_documents(40)
    inputs = write_inputs(tmp_path, docs)
    (tmp_path / "more.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[2:]))
    out = tmp_path / "out"
    result = run_prepare(
        "--input_path", str(inputs["jsonl"]), "--input_path", str(tmp_path / "more.jsonl"),
        "--input_path", str(inputs["parquet"]), "--output_dir", str(out), "--vocab_size", "400",
        "--val_fraction", "0.2", "--num_proc", "2",
    )
    assert "01_prepare_data summary" in result.stdout
    meta = read_meta(out)
    filters = {row["step"]: row for row in meta["filters"]}
    assert filters["exact_duplicate"]["removed"] == 2  # the parquet file repeats the first two documents
    assert meta["train_documents"] + meta["val_documents"] == 40
    assert meta["val_documents"] > 0
    tokenizer = load_tokenizer(out / "tokenizer")
    assert meta["vocab_size"] == len(tokenizer) == 400 and meta["dtype"] == "uint16"
    for split in ("train", "val"):
        tokens = open_tokens(out, split)
        assert len(tokens) == meta[f"{split}_tokens"]
        assert int(np.sum(tokens == tokenizer.eos_token_id)) == meta[f"{split}_documents"]
    text = tokenizer.decode(open_tokens(out, "train")).replace(tokenizer.eos_token, "\n")
    assert "quick brown fox" in text
    from utils.files import sha256_file
    assert meta["files"]["train.bin"] == sha256_file(out / "train.bin")
    assert json.loads((out / "summary.json").read_text())["documents_kept"] == 40

    refused = run_prepare("--input_path", str(inputs["jsonl"]), "--output_dir", str(out), check=False)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_one_and_two_worker_processes_write_identical_files(tmp_path, tokenizer_dir):
    """Batches, byte ranges and worker order must not change what is kept, where it goes, or its order."""
    docs = prose_documents(300)  # > 64 KB of training text: several tokenisation ranges
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:5]))
    outputs = []
    for num_proc in ("1", "2"):
        out = tmp_path / f"out{num_proc}"
        run_prepare("--input_path", str(path), "--output_dir", str(out), "--tokenizer_path", str(tokenizer_dir),
                    "--num_proc", num_proc, "--val_fraction", "0.1")
        outputs.append(read_meta(out))
    assert outputs[0]["files"] == outputs[1]["files"]
    assert outputs[0]["filters"] == outputs[1]["filters"]
    assert outputs[0]["train_documents"] + outputs[0]["val_documents"] == 300


def test_reusing_a_tokenizer_and_validate_only(tmp_path, tokenizer_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in prose_documents(12)))
    report = run_prepare("--input_path", str(path), "--validate_only", "--language", "none")
    parsed = json.loads(report.stdout[report.stdout.index("{"):])
    assert parsed["kept_documents"] == 12 and parsed["read"]["formats"] == {"jsonl": 1}
    assert not (tmp_path / "out").exists()  # validate_only writes nothing
    run_prepare("--input_path", str(path), "--output_dir", str(tmp_path / "out"),
                "--tokenizer_path", str(tokenizer_dir))
    assert read_meta(tmp_path / "out")["tokenizer_source"] == str(tokenizer_dir)


def test_empty_result_names_the_filter_and_leaves_no_output(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": f"tiny {i}"}) + "\n" for i in range(5)))
    result = run_prepare("--input_path", str(path), "--output_dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 2
    assert "filter 'too_short' removed 5 of 5" in result.stderr and "--min_length" in result.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_killed_run_leaves_nothing_that_looks_complete(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in prose_documents(3000)))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "scripts/01_prepare_data.py", "--input_path", str(path), "--output_dir", str(out),
         "--num_proc", "1", "--vocab_size", "300"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not list(tmp_path.glob(".tmp-out-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave the output dir in place"
    assert not list(tmp_path.rglob("meta.json"))


def test_builtin_corpus_is_identical_in_every_process_and_leaks_no_environment(tmp_path):
    """Same Python, same corpus: nothing process- or machine-specific (object addresses, the environment,
    the working directory) leaks into the text. Signatures such as `cgi.parse(environ=os.environ)` used to."""
    code = ("import hashlib, sys; sys.path.insert(0, sys.argv[1]); from utils.corpus import builtin_documents; "
            "text = '\\0'.join(builtin_documents()); "
            "print(hashlib.sha256(text.encode()).hexdigest(), 'sk-secret-123' in text, sys.argv[1] in text)")
    outputs = {
        subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=cwd, capture_output=True, text=True, check=True,
                       env={**os.environ, "API_TOKEN": "sk-secret-123", "EXTRA": extra}).stdout
        for cwd, extra in ((ROOT, "a"), (tmp_path, "bb"))
    }
    assert len(outputs) == 1
    assert outputs.pop().split()[1:] == ["False", "False"]
