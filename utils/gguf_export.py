"""A pipeline checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio, transformers' `gguf_file=`).

Written with gguf-py's GGUFWriter and its tensor-name map (the package llama.cpp maintains), following
llama.cpp's convert_hf_to_gguf.py where it decides something:

- Llama checkpoints are arch `llama`; qk_norm presets (Qwen3ForCausalLM) are arch `qwen3` with the
  `attn_q_norm` / `attn_k_norm` tensors. MoE presets (Mixtral) are refused.
- `llama` rotates query/key pairs interleaved (ggml's "normal" RoPE), HF Llama rotates the two halves of
  each head (`rotate_half`), so attn_q / attn_k rows are permuted exactly as the converter's `permute` does;
  transformers' GGUF loader undoes it on reading (LlamaTensorProcessor._reverse_permute_weights). `qwen3`
  uses NeoX RoPE, the same layout as HF, so nothing is permuted there.
- Tied embeddings: no `output.weight` is written; llama.cpp then uses token_embd for the output layer.
- 1-D tensors (norms) stay F32 at every --outtype; q8_0 falls back to F16 for a matrix whose rows do not
  split into 32-value blocks.
- The vocabulary is the SentencePiece model's (`tokenizer.model`) as tokenizer model `llama`: pieces,
  scores, types; tokens the HF tokenizer treats as special (the chat tokens) are CONTROL, as the converter
  marks them from tokenizer_config. No BOS or EOS is added and no space prefix (the model was trained so).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.checkpoint import ADAPTER_CONFIG, check_readable, describe_missing, resolve_checkpoint
from utils.files import read_json
from utils.layout import stage_and_preset
from utils.templates import TEMPLATE_FILE, get_template, load_template_name
from utils.tokenizer import EOS, sentencepiece_model

OUTTYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3"}  # HF model_type -> GGUF architecture
PERMUTED_ARCHITECTURES = ("llama",)
IM_END = "<|im_end|>"

# Each template as the text around one turn, per role, and the text that opens the reply; the Ollama template
# is written from this and tests/test_interop.py checks it renders what the Jinja template does.
TURNS: dict[str, tuple[dict[str, tuple[str, str]], str]] = {
    "chatml": ({role: (f"<|im_start|>{role}\n", f"{IM_END}\n") for role in ("system", "user", "assistant")},
               "<|im_start|>assistant\n"),
    "instruct": ({"system": ("", "\n\n"), "user": ("### Instruction:\n", "\n\n### Response:\n"),
                  "assistant": ("", f"{EOS}\n\n")}, ""),
    "chat": ({"system": ("", "\n\n"), "user": ("Human: ", "\n\nAssistant:"), "assistant": (" ", f"{EOS}\n\n")}, ""),
}
STOPS = {"chatml": IM_END, "instruct": EOS, "chat": EOS}


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportResult:
    path: Path
    modelfile: Path
    architecture: str
    outtype: str
    tensors: int
    template: str | None
    size_bytes: int


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows from HF's half-split order to
    llama.cpp's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def render_turns(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt TURNS describes for `messages`: what the Ollama template renders."""
    turns, opening = TURNS[template]
    text = "".join(turns[m["role"]][0] + m["content"] + turns[m["role"]][1] for m in messages)
    return text + (opening if add_generation_prompt else "")


def ollama_template(template: str | None) -> str:
    """The Go template Ollama formats prompts with: the checkpoint's chat template, or the raw prompt."""
    if template is None:
        return "{{ .Prompt }}"
    turns, opening = TURNS[template]
    (sys_open, sys_close), (user_open, user_close), (reply_open, reply_close) = (
        turns["system"], turns["user"], turns["assistant"])
    return (
        f'{{{{- range .Messages }}}}{{{{ if eq .Role "system" }}}}{sys_open}{{{{ .Content }}}}{sys_close}'
        f'{{{{ else if eq .Role "user" }}}}{user_open}{{{{ .Content }}}}{user_close}'
        f"{{{{ else }}}}{reply_open}{{{{ .Content }}}}{reply_close}{{{{ end }}}}{{{{ end }}}}{opening}"
    )


def modelfile_text(gguf_name: str, template: str | None, context_length: int) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{ollama_template(template)}"""',
             # Ollama's default context is longer than these models were trained for
             f"PARAMETER num_ctx {context_length}"]
    if template is not None:
        lines.append(f'PARAMETER stop "{STOPS[template]}"')
    return "\n".join(lines) + "\n"


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as float32 numpy, read straight from the safetensors files."""
    import torch
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(read_json(index, "checkpoint file")["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(model_dir / name, "pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key).to(torch.float32).numpy()
    return tensors


def _source(model_path: str | Path) -> Path:
    directory = resolve_checkpoint(model_path)
    if (directory / ADAPTER_CONFIG).is_file():
        raise ExportError(
            f"--model_path {directory} is a LoRA adapter; export the standalone model next to it "
            f"({directory.parent / 'merged'}), which 03_sft.py and 04_dpo.py write unless --no-merge"
        )
    problem = describe_missing(directory)
    if problem:
        raise ExportError(f"--model_path: {problem}")
    check_readable(directory)
    return directory


def _model_name(directory: Path) -> str:
    """`<preset>-<stage>` for a checkpoint inside `<stage>/<preset>/`, else the directory's name."""
    where = stage_and_preset(directory)
    return f"{where[1]}-{where[0]}" if where else directory.name


def _architecture(config: dict[str, Any], directory: Path) -> str:
    model_type = config.get("model_type")
    if model_type == "mixtral":
        raise ExportError(
            f"{directory} is a mixture-of-experts model (Mixtral class); export_gguf.py writes dense Llama and "
            "Qwen3 checkpoints only"
        )
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{directory}: model_type {model_type!r} in config.json is not one export_gguf.py writes "
                          f"(it writes {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[model_type]


def _vocabulary(directory: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int], dict[str, Any]]:
    """Pieces, scores and token types of the SentencePiece model, checked against the checkpoint's tokenizer."""
    import gguf
    import sentencepiece as spm

    from utils.tokenizer import load_tokenizer

    spm_file = sentencepiece_model(directory)
    if spm_file is None:
        raise ExportError(
            f"{directory} has no tokenizer.model (checkpoints written before it was carried along lack it): copy "
            "the data dir's tokenizer/sentencepiece.model there as tokenizer.model"
        )
    processor = spm.SentencePieceProcessor(model_file=str(spm_file))
    tokenizer = load_tokenizer(directory)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    if pieces != tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) or len(pieces) != vocab_size:
        raise ExportError(
            f"{spm_file} does not match the checkpoint's tokenizer.json ({len(pieces)} pieces, tokenizer "
            f"{len(tokenizer)} tokens, model vocabulary {vocab_size}): it belongs to another tokenizer"
        )
    special = set(tokenizer.all_special_ids)
    types = []
    for i in range(len(pieces)):
        if processor.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif processor.is_control(i) or i in special:
            kind = gguf.TokenType.CONTROL
        elif processor.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif processor.is_byte(i):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    # What the model's normalizer does, seen from its output (reading the proto would need protobuf).
    behaviour = {
        "add_space_prefix": processor.encode("a", out_type=str)[0].startswith("\u2581"),
        "remove_extra_whitespaces": processor.decode(processor.encode("a  b")) != "a  b",
        "ids": {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")},
        "im_end": tokenizer.convert_tokens_to_ids(IM_END) if IM_END in tokenizer.get_vocab() else None,
    }
    scores = [processor.get_score(i) for i in range(len(pieces))]
    return [piece.encode("utf-8") for piece in pieces], scores, types, behaviour


def _tensor_type(name: str, data: np.ndarray, outtype: str):
    """(stored data, ggml type): converter rules for one tensor."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if outtype == "f32" or data.ndim <= 1 or name.endswith("_norm.weight"):
        return data.astype(np.float32), Q.F32
    if outtype == "q8_0":
        try:
            return gguf.quants.quantize(data, Q.Q8_0), Q.Q8_0
        except gguf.QuantError:
            pass
    return data.astype(np.float16), Q.F16


def export_gguf(model_path: str | Path, output: str | Path, outtype: str = "f16") -> ExportResult:
    """Writes `output` (atomically) and `<output stem>.Modelfile` beside it; see the module docstring."""
    import gguf

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    output = Path(output)
    if output.suffix != ".gguf":
        raise ExportError(f"--output {output} must end in .gguf")
    directory = _source(model_path)
    config = read_json(directory / "config.json", "checkpoint file")
    arch = _architecture(config, directory)
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    n_layer = config["num_hidden_layers"]
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"{directory}: RoPE scaling {rope.get('rope_type')!r} is not exported; only plain RoPE")
    tokens, scores, types, vocab = _vocabulary(directory, config["vocab_size"])
    template = load_template_name(directory) if (directory / TEMPLATE_FILE).is_file() else None

    arch_enum = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    names = gguf.get_tensor_name_map(arch_enum, n_layer)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(_model_name(directory))
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        writer.add_vocab_size(config["vocab_size"])

        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(vocab["add_space_prefix"])
        writer.add_remove_extra_whitespaces(vocab["remove_extra_whitespaces"])
        for kind, token_id in vocab["ids"].items():
            if token_id is not None:
                getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        if template is not None:
            writer.add_chat_template(get_template(template))
            if template == "chatml" and vocab["im_end"] is not None:
                # llama.cpp ends generation at EOT as at EOS: a ChatML reply ends with <|im_end|>
                writer.add_eot_token_id(vocab["im_end"])

        count = 0
        for hf_name, data in _weights(directory).items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ExportError(f"{directory}: tensor {hf_name} has no llama.cpp name for arch {arch}")
            if arch in PERMUTED_ARCHITECTURES and name.endswith("attn_q.weight"):
                data = llama_permute(data, n_head, n_head)
            elif arch in PERMUTED_ARCHITECTURES and name.endswith("attn_k.weight"):
                data = llama_permute(data, n_head, n_kv)
            stored, kind = _tensor_type(name, data, outtype)
            writer.add_tensor(name, stored, raw_dtype=kind)
            count += 1

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    modelfile = output.with_suffix(".Modelfile")
    modelfile.write_text(modelfile_text(output.name, template, config["max_position_embeddings"]), encoding="utf-8")
    return ExportResult(output, modelfile, arch, outtype, count, template, output.stat().st_size)
