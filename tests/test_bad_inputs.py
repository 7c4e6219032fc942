"""Bad inputs to every stage, as a table: each must end in one `error:` paragraph that names the file (and
the line or field where there is one), with a non-zero exit, no traceback, and nothing that looks complete.

The stages run in this process (the `run_stage` fixture), so the table stays fast: the imports are paid
once, not once per case.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_UTF8 = b'{"text": "caf\xe9 au lait"}\n'


@dataclass
class Inputs:
    """Good files of every kind, copied per case so each case damages its own."""

    tmp: Path
    checkpoint: Path
    tokenizer: Path
    data: Path
    sft: Path
    pairs: Path
    prompts: Path
    docs: Path


@pytest.fixture(scope="module")
def good(tmp_path_factory, micro_checkpoint, tokenizer_dir, processed_dir) -> Inputs:
    root = tmp_path_factory.mktemp("good")
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                    {"role": "assistant", "content": f"{i}."}]}) + "\n"
                           for i in range(8)))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {i}.", "chosen": f"{i}.", "rejected": "No."}) + "\n"
                             for i in range(8)))
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps(["Hello there", "What is Python?"]))
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {i} is about rivers, boats and mills. " * 4}) + "\n"
                            for i in range(8)))
    return Inputs(root, micro_checkpoint, tokenizer_dir, processed_dir, sft, pairs, prompts, docs)


def copy_of(source: Path, tmp: Path) -> Path:
    target = tmp / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return target


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def gz_truncated(path: Path, text: str) -> Path:
    data = gzip.compress(text.encode() * 50)
    path.write_bytes(data[: len(data) // 2])
    return path


def parquet_impostor(path: Path) -> Path:
    path.write_bytes(b"PAR1 this is not really parquet " * 10)
    return path


@dataclass
class Case:
    id: str
    script: str
    # Builds the damaged input in tmp; returns the command-line arguments and the damaged path.
    build: Callable[[Inputs, Path], tuple[list[str], Path]]
    also: tuple[str, ...] = ()  # further text the error must hold (a line, a field)


def prepare(inputs: list[str], tmp: Path, *extra: str) -> list[str]:
    args = []
    for spec in inputs:
        args += ["--input_path", spec]
    return [*args, "--output_dir", str(tmp / "out"), "--language", "none", *extra]


def with_tokenizer(good: Inputs) -> list[str]:
    return ["--tokenizer_path", str(good.tokenizer)]


def sft(good: Inputs, tmp: Path, model: Path | None = None, dataset: Path | None = None) -> list[str]:
    return ["--model_path", str(model or good.checkpoint), "--dataset_path", str(dataset or good.sft),
            "--output_dir", str(tmp / "out"), "--max_steps", "1", "--max_length", "64"]


def dpo(good: Inputs, tmp: Path, model: Path | None = None, dataset: Path | None = None) -> list[str]:
    return ["--model_path", str(model or good.checkpoint), "--dataset_path", str(dataset or good.pairs),
            "--output_dir", str(tmp / "out"), "--max_steps", "1", "--max_length", "64"]


def evaluate(good: Inputs, tmp: Path, model: Path | None = None, *extra: str) -> list[str]:
    return ["--model_path", str(model or good.checkpoint), "--output_dir", str(tmp / "out"), "--device", "cpu",
            *extra]


def serve(good: Inputs, tmp: Path, model: Path | None = None, prompts: Path | None = None,
          output: Path | None = None) -> list[str]:
    return ["--model_path", str(model or good.checkpoint), "--mode", "batch", "--device", "cpu",
            "--prompts_file", str(prompts or good.prompts), "--output_file", str(output or tmp / "answers.jsonl"),
            "--max_new_tokens", "4"]


def pretrain(good: Inputs, tmp: Path, data: Path | None = None, config: Path | None = None) -> list[str]:
    return ["--config", str(config or ROOT / "config" / "micro.json"), "--data_path", str(data or good.data),
            "--output_dir", str(tmp / "out"), "--max_steps", "1"]


def weights(checkpoint: Path) -> Path:
    return truncate(checkpoint / "model.safetensors")


def config_json(checkpoint: Path) -> Path:
    path = checkpoint / "config.json"
    path.write_text(path.read_text()[:-40])
    return path


def tokenizer_json(checkpoint: Path) -> Path:
    return truncate(checkpoint / "tokenizer.json", 0.3)


def file(tmp: Path, name: str, content: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def meta_damaged(good: Inputs, tmp: Path, content: bytes) -> Path:
    data = copy_of(good.data, tmp)
    (data / "meta.json").write_bytes(content)
    return data


CASES = [
    # 01_prepare_data
    Case("01 truncated .gz", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := gz_truncated(t / "docs.jsonl.gz", '{"text": "a river runs past the mill"}\n'))], t,
                *with_tokenizer(g)), p)),
    Case("01 parquet impostor", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := parquet_impostor(t / "docs.parquet"))], t, *with_tokenizer(g)), p)),
    Case("01 empty txt", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := file(t, "empty.txt", ""))], t, *with_tokenizer(g)), p)),
    Case("01 empty jsonl", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := file(t, "empty.jsonl", "\n\n"))], t, *with_tokenizer(g)), p)),
    Case("01 binary garbage", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := file(t, "garbage.txt", bytes(range(256)) * 40))], t, "--vocab_size", "300"), p)),
    Case("01 json not a list", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := file(t, "docs.json", '{"a": 1, "b": 2}'))], t, *with_tokenizer(g)), p)),
    Case("01 json invalid", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := file(t, "docs.json", '[{"text": "x"},'))], t, *with_tokenizer(g)), p), ("line 1",)),
    Case("01 jsonl no text field", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := file(t, "docs.jsonl", '{"a": 1, "b": 2}\n'))], t, *with_tokenizer(g)), p), ("fields",)),
    Case("01 unknown extension", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := file(t, "docs.xyz", "text"))], t, *with_tokenizer(g)), p)),
    Case("01 missing input", "01_prepare_data.py", lambda g, t: (
        prepare([str(p := t / "nowhere.jsonl")], t, *with_tokenizer(g)), p)),
    Case("01 corrupt tokenizer", "01_prepare_data.py", lambda g, t: (
        prepare([str(g.docs)], t, "--tokenizer_path", str(d := copy_of(g.tokenizer, t))),
        truncate(d / "tokenizer.json", 0.3))),
    Case("01 tokenizer dir without tokenizer", "01_prepare_data.py", lambda g, t: (
        prepare([str(g.docs)], t, "--tokenizer_path", str(p := t / "empty_dir")), p)),
    Case("01 preset invalid json", "01_prepare_data.py", lambda g, t: (
        prepare([str(g.docs)], t, "--config", str(p := file(t, "preset.json", '{"n_layer": 2,')),
                *with_tokenizer(g)), p)),
    # 02_pretrain
    Case("02 meta.json invalid", "02_pretrain.py", lambda g, t: (
        pretrain(g, t, data=(d := meta_damaged(g, t, b'{"vocab_size": '))), d / "meta.json")),
    Case("02 meta.json not UTF-8", "02_pretrain.py", lambda g, t: (
        pretrain(g, t, data=(d := meta_damaged(g, t, b'{"vocab_size": "\xe9"}'))), d / "meta.json")),
    Case("02 train.bin missing", "02_pretrain.py", lambda g, t: (
        pretrain(g, t, data=(d := copy_of(g.data, t))), _unlink(d / "train.bin"))),
    Case("02 preset invalid json", "02_pretrain.py", lambda g, t: (
        pretrain(g, t, config=(p := file(t, "preset.json", '{"n_layer": 2,'))), p)),
    Case("02 preset not UTF-8", "02_pretrain.py", lambda g, t: (
        pretrain(g, t, config=(p := file(t, "preset.json", b'{"model_name": "\xe9"}'))), p)),
    Case("02 data dir missing", "02_pretrain.py", lambda g, t: (pretrain(g, t, data=(p := t / "nodata")), p)),
    # 03_sft
    Case("03 truncated weights", "03_sft.py", lambda g, t: (
        sft(g, t, model=(c := copy_of(g.checkpoint, t))), weights(c))),
    Case("03 invalid config.json", "03_sft.py", lambda g, t: (
        sft(g, t, model=(c := copy_of(g.checkpoint, t))), config_json(c))),
    Case("03 corrupt tokenizer.json", "03_sft.py", lambda g, t: (
        sft(g, t, model=(c := copy_of(g.checkpoint, t))), tokenizer_json(c))),
    Case("03 truncated .gz", "03_sft.py", lambda g, t: (
        sft(g, t, dataset=(p := gz_truncated(t / "sft.jsonl.gz", g.sft.read_text()))), p)),
    Case("03 not UTF-8", "03_sft.py", lambda g, t: (
        sft(g, t, dataset=(p := file(t, "sft.jsonl", NOT_UTF8))), p), ("line 1",)),
    Case("03 invalid JSON line", "03_sft.py", lambda g, t: (
        sft(g, t, dataset=(p := file(t, "sft.jsonl", g.sft.read_text() + '{"messages": [\n'))), p), ("line 9",)),
    Case("03 no messages field", "03_sft.py", lambda g, t: (
        sft(g, t, dataset=(p := file(t, "sft.jsonl", '{"text": "hello"}\n'))), p), ("line 1",)),
    Case("03 parquet impostor", "03_sft.py", lambda g, t: (
        sft(g, t, dataset=(p := parquet_impostor(t / "sft.parquet"))), p)),
    Case("03 missing dataset", "03_sft.py", lambda g, t: (sft(g, t, dataset=(p := t / "none.jsonl")), p)),
    Case("03 missing model", "03_sft.py", lambda g, t: (sft(g, t, model=(p := t / "no_model")), p)),
    # 04_dpo
    Case("04 truncated weights", "04_dpo.py", lambda g, t: (
        dpo(g, t, model=(c := copy_of(g.checkpoint, t))), weights(c))),
    Case("04 truncated .gz", "04_dpo.py", lambda g, t: (
        dpo(g, t, dataset=(p := gz_truncated(t / "pairs.jsonl.gz", g.pairs.read_text()))), p)),
    Case("04 not UTF-8", "04_dpo.py", lambda g, t: (
        dpo(g, t, dataset=(p := file(t, "pairs.jsonl", b'{"prompt": "caf\xe9"}\n'))), p), ("line 1",)),
    Case("04 pair without rejected", "04_dpo.py", lambda g, t: (
        dpo(g, t, dataset=(p := file(t, "pairs.jsonl", '{"prompt": "Hi", "chosen": "Hello"}\n'))), p),
        ("line 1", "rejected")),
    # 05_evaluate
    Case("05 truncated weights", "05_evaluate.py", lambda g, t: (
        evaluate(g, t, (c := copy_of(g.checkpoint, t)), "--tasks", "generate"), weights(c))),
    Case("05 invalid config.json", "05_evaluate.py", lambda g, t: (
        evaluate(g, t, (c := copy_of(g.checkpoint, t)), "--tasks", "generate"), config_json(c))),
    Case("05 wikitext not UTF-8", "05_evaluate.py", lambda g, t: (
        evaluate(g, t, None, "--tasks", "wikitext", "--wikitext_path",
                 str(p := file(t, "wiki.raw", b" = Title = \n caf\xe9 \n"))), p)),
    Case("05 boolq invalid line", "05_evaluate.py", lambda g, t: (
        evaluate(g, t, None, "--tasks", "boolq", "--boolq_path",
                 str(p := file(t, "boolq.jsonl", '{"question": "is it"\n'))), p), ("line 1",)),
    Case("05 mc missing choices", "05_evaluate.py", lambda g, t: (
        evaluate(g, t, None, "--tasks", "mc", "--mc_path",
                 str(p := file(t, "mc.jsonl", '{"context": "A cat is", "label": 0}\n'))), p), ("line 1",)),
    Case("05 prompts not UTF-8", "05_evaluate.py", lambda g, t: (
        evaluate(g, t, None, "--tasks", "generate", "--prompts_path",
                 str(p := file(t, "prompts.json", b'["caf\xe9"]'))), p)),
    Case("05 results not UTF-8", "05_evaluate.py", lambda g, t: (
        ["--results", str(p := file(t, "results.json", b'{"model": "caf\xe9"}'))], p)),
    Case("05 results invalid JSON", "05_evaluate.py", lambda g, t: (
        ["--results", str(p := file(t, "results.json", '{"model": '))], p)),
    # 06_serve
    Case("06 truncated weights", "06_serve.py", lambda g, t: (
        serve(g, t, model=(c := copy_of(g.checkpoint, t))), weights(c))),
    Case("06 corrupt tokenizer.json", "06_serve.py", lambda g, t: (
        serve(g, t, model=(c := copy_of(g.checkpoint, t))), tokenizer_json(c))),
    Case("06 prompts not UTF-8", "06_serve.py", lambda g, t: (
        serve(g, t, prompts=(p := file(t, "prompts.json", b'["caf\xe9"]'))), p)),
    Case("06 prompts invalid JSONL", "06_serve.py", lambda g, t: (
        serve(g, t, prompts=(p := file(t, "prompts.jsonl", '{"prompt": "Hi"}\n{"prompt": \n'))), p), ("line 2",)),
    Case("06 output is a directory", "06_serve.py", lambda g, t: (
        serve(g, t, output=(p := t / "answers")), _mkdir(p))),
]


def _unlink(path: Path) -> Path:
    path.unlink()
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


COMPLETE_MARKERS = ("meta.json", "latest", "final", "results.json")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_clear_error_naming_the_file(case: Case, good: Inputs, tmp_path, run_stage):
    args, damaged = case.build(good, tmp_path)
    code, _, stderr = run_stage(case.script, args)
    assert code == 2, f"{code}\n{stderr[-2000:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    message = stderr[stderr.index("error:"):]
    assert str(damaged) in message, message
    for text in case.also:
        assert text in message, message
    out = tmp_path / "out"
    left = [p.name for p in out.rglob("*") if p.name in COMPLETE_MARKERS] if out.is_dir() else []
    assert not left and not (tmp_path / "answers.jsonl").exists(), left


def test_the_table_covers_every_stage_with_forty_cases():
    assert len(CASES) >= 40
    assert {c.script for c in CASES} == {"01_prepare_data.py", "02_pretrain.py", "03_sft.py", "04_dpo.py",
                                         "05_evaluate.py", "06_serve.py"}

