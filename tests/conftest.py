"""Shared fixtures: a micro tokenizer and model built the way the pipeline builds them (no mocks)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: micro models gain nothing from a second one, and on a busy 2-core machine the idle
# threads' spin-waits slow them several times. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from presets import micro_preset  # noqa: E402

from utils.corpus import builtin_documents  # noqa: E402
from utils.model import build_model  # noqa: E402
from utils.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip where no CUDA GPU is visible (bench/gpu_check.sh runs them on one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: bench/gpu_check.sh runs these on one")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """A slice of the built-in offline corpus (the Python docs), the same on every machine."""
    return list(builtin_documents(limit=300))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus, vocab_size=512, output_dir=path)
    return path


@pytest.fixture()
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """An untrained micro Llama saved as a Hugging Face checkpoint with its tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    model = build_model(micro_preset(len(tok)), tok, seed=0)
    path = tmp_path_factory.mktemp("micro_ckpt")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory, tokenizer_dir, corpus) -> Path:
    """A processed data dir (tokenizer/, train.bin, val.bin, meta.json) of the micro corpus."""
    import json
    import shutil

    from utils.tokenizer import tokenizer_sha256
    from utils.tokens import META, TOKENIZER_DIR, TokenFileWriter, token_dtype

    path = tmp_path_factory.mktemp("processed")
    shutil.copytree(tokenizer_dir, path / TOKENIZER_DIR)
    tok = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(len(tok))
    meta = {"vocab_size": len(tok), "dtype": dtype.name, "tokenizer_sha256": tokenizer_sha256(tokenizer_dir)}
    for split, docs in (("train", corpus[:-30]), ("val", corpus[-30:])):
        writer = TokenFileWriter(path / f"{split}.bin", dtype)
        for doc in docs:
            writer.write_documents(tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        writer.close()
        meta[f"{split}_tokens"], meta[f"{split}_documents"] = writer.tokens, writer.documents
    (path / META).write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="session")
def micro_config(tmp_path_factory, processed_dir) -> Path:
    """The micro preset as a config file, with the micro corpus's vocabulary."""
    import dataclasses
    import json

    from utils.tokens import META

    path = tmp_path_factory.mktemp("preset") / "micro.json"
    vocab = json.loads((processed_dir / META).read_text())["vocab_size"]
    path.write_text(json.dumps(dataclasses.asdict(micro_preset(vocab))))
    return path


@pytest.fixture()
def run_stage(capsys):
    """Runs `scripts/<script> ARGS` in this process, as `python scripts/<script>` would (runpy, `__main__`):
    the imports are paid once per test session, not per run. Returns (exit code, stdout, stderr); an exception
    that escapes the stage comes back as a "traceback: …" code, since a stage must never let one out."""
    import runpy

    def run(script: str, args: list[str]) -> tuple[int | str, str, str]:
        saved = sys.argv
        sys.argv = [script, *args]
        # A stage starts with no accelerator: another run's choices (e.g. its precision) must not carry over.
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
            code: int | str = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as err:  # noqa: BLE001 - the point: any escaping exception is a defect
            code = f"traceback: {type(err).__name__}: {err}"
        finally:
            sys.argv = saved
        out, err = capsys.readouterr()
        return code, out, err

    return run
