"""SentencePiece BPE training and its export as a Hugging Face (tokenizers-backed) tokenizer."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import generate_merges

from utils.files import read_json, unreadable
from utils.templates import CHATML

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SPM_FILE = "sentencepiece.model"
# The name llama.cpp's converter, gguf-py and transformers look for beside a checkpoint's tokenizer files.
CHECKPOINT_SPM_FILE = "tokenizer.model"
# SentencePiece trains on lines; longer ones are skipped, so documents are fed line by line.
MAX_LINE_BYTES = 16384


class TokenizerError(ValueError):
    pass


def _sample_lines(texts: Iterable[str], sample_bytes: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            line = line[:MAX_LINE_BYTES // 4] if len(line.encode("utf-8")) > MAX_LINE_BYTES else line
            if not line.strip():
                continue
            yield line
            seen += len(line.encode("utf-8")) + 1
            if sample_bytes and seen >= sample_bytes:
                return


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, model_path: Path, sample_bytes: int = 0, num_threads: int = 2
) -> None:
    """Trains a byte-fallback BPE model (no text is ever unknown) on the first `sample_bytes` of `texts`."""
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_sample_lines(texts, sample_bytes),
                model_prefix=str(Path(tmp, "spm")),
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                character_coverage=0.9995,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
                user_defined_symbols=CHAT_TOKENS,
                # Lossless: keep whitespace as written and add no dummy prefix, so decode(encode(x)) == x
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                max_sentence_length=MAX_LINE_BYTES,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as err:
            message = str(err)
            if "smaller than required_chars" in message:
                raise TokenizerError(
                    f"--vocab_size {vocab_size} is too small: the 256 byte pieces, the special tokens and the "
                    f"corpus's characters need more ({message.strip()}); use a larger --vocab_size"
                ) from None
            if "Vocabulary size" in message or "vocab_size" in message:
                raise TokenizerError(
                    f"--vocab_size {vocab_size} is too large for this corpus ({message.strip()}); "
                    "use a smaller --vocab_size or more text"
                ) from None
            raise TokenizerError(f"SentencePiece training failed: {message.strip()}") from None
        shutil.move(str(Path(tmp, "spm.model")), model_path)


def hf_tokenizer_from_sentencepiece(model_path: Path) -> PreTrainedTokenizerBase:
    """The same BPE as a fast Hugging Face tokenizer, with chat tokens and a ChatML chat template."""
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        add_prefix_space=False,
        unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=CHAT_TOKENS,
        add_bos_token=False,
        padding_side="left",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, output_dir: str | Path, sample_bytes: int = 0, num_threads: int = 2
) -> PreTrainedTokenizerBase:
    """Trains SentencePiece BPE and saves it as a Hugging Face tokenizer directory (plus the .model file)."""
    output_dir = Path(output_dir)
    model_path = output_dir / SPM_FILE
    train_sentencepiece(texts, vocab_size, model_path, sample_bytes, num_threads)
    tokenizer = hf_tokenizer_from_sentencepiece(model_path)
    save_tokenizer(tokenizer, output_dir, CHATML)
    return tokenizer


# Every JSON file AutoTokenizer may open (config.json tells it the model type).
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


def sentencepiece_model(directory: str | Path) -> Path | None:
    """The SentencePiece model beside a tokenizer: a checkpoint's tokenizer.model or a data dir's .model file."""
    for name in (CHECKPOINT_SPM_FILE, SPM_FILE):
        if Path(directory, name).is_file():
            return Path(directory, name)
    return None


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path, chat_template: str | None) -> None:
    """Saves `tokenizer` into a checkpoint (or data) directory the way other tools expect to find it.

    `chat_template` is the inference template to ship, or None for a base model (which was never trained on
    one, so it advertises none). The SentencePiece model the tokenizer was loaded with is copied as
    `tokenizer.model` when it is there (checkpoints written before it was carried have none), and
    tokenizer_config.json states that no BOS or EOS is added: llama.cpp, transformers 4's LlamaTokenizer and
    transformers' GGUF reader all add a BOS to a sentencepiece vocabulary that does not say otherwise, and
    this one was trained without.
    """
    directory = Path(directory)
    trained_with = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.chat_template = trained_with
    config_path = directory / "tokenizer_config.json"
    config = read_json(config_path, "tokenizer file")
    config.update(add_bos_token=False, add_eos_token=False)
    if chat_template is None:
        config.pop("chat_template", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    source = sentencepiece_model(tokenizer.name_or_path) if tokenizer.name_or_path else None
    target = directory / CHECKPOINT_SPM_FILE
    if source is not None and source.resolve() != target.resolve():
        shutil.copyfile(source, target)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise TokenizerError(f"{path} holds no Hugging Face tokenizer (tokenizer.json is missing)")
    for name in TOKENIZER_JSON_FILES:
        if (path / name).is_file():
            read_json(path / name, "tokenizer file" if name != "config.json" else "checkpoint file")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - the Rust backend raises plain Exception for a file it cannot parse
        raise unreadable(path / "tokenizer.json", err, "tokenizer file") from None


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added: the Rust backend's batch call without offsets,
    a third faster than `tokenizer(texts)` for the same ids."""
    return [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def tokenizer_sha256(path: str | Path) -> str:
    """Hash of the tokenizer's defining file, to tie data and checkpoints to one tokenizer."""
    return hashlib.sha256(Path(path, "tokenizer.json").read_bytes()).hexdigest()
