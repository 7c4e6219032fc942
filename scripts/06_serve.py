"""Stage 06: serve a checkpoint — interactive chat, an HTTP API (with OpenAI-compatible routes), or a batch file.

    python scripts/06_serve.py --model_path checkpoints/dpo/tiny --mode interactive
    python scripts/06_serve.py --model_path checkpoints/dpo/tiny --mode api --port 8000
    python scripts/06_serve.py --model_path … --mode batch --prompts_file prompts.json --output_file out.json

Any checkpoint loads: pretrain, merged, DPO, or a LoRA adapter on its base (merged in memory). A
fine-tuned checkpoint is prompted with its own template (template.json); a base checkpoint does plain
text completion.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from utils.cli import StageSummary, progress, quiet_libraries, run_main
from utils.decoding import GenerationError, GenerationSettings, context_window
from utils.files import read_text
from utils.generation import ChatSession, generate_batch, generate_stream
from utils.layout import default_model
from utils.loading import LoadedModel, load_for_inference
from utils.messages import validate_messages
from utils.metrics import MetricsLogger
from utils.templates import TEMPLATES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ITEM_SETTINGS = {  # per-prompt overrides allowed in a batch file, with their JSON types
    "max_new_tokens": (int, "an integer"), "temperature": ((int, float), "a number"), "top_k": (int, "an integer"),
    "top_p": ((int, float), "a number"), "repetition_penalty": ((int, float), "a number"),
    "stop": (list, "a list of strings"), "seed": (int, "an integer"),
}
HELP = """commands:
  /reset          forget the conversation
  /system <text>  set the system prompt (and reset); /system alone clears it
  /temp <t>       sampling temperature (0 = greedy)
  /max <n>        max new tokens per reply
  /help           this list
  /quit           leave (Ctrl-D too); Ctrl-C stops a reply, not the chat"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model_path", default=None,
                        help="checkpoint dir, stage dir or `latest` pointer; default: the furthest stage with a "
                             "complete checkpoint (dpo, else sft, else pretrain) under checkpoints/, of --preset or "
                             "of the preset trained last (the rule 05_evaluate's `auto` follows)")
    parser.add_argument("--preset", default=None,
                        help="look for the default --model_path in checkpoints/<stage>/<preset> only")
    parser.add_argument("--mode", choices=("interactive", "api", "batch"), default="interactive",
                        help="terminal chat, HTTP server, or a prompts file to an outputs file")
    parser.add_argument("--template", choices=("auto", "none", *TEMPLATES), default="auto",
                        help="prompt template; auto = the checkpoint's own, none (plain completion) for a base model")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto = float32 on CPU, bfloat16 (or float16) on GPU")
    gen = parser.add_argument_group("sampling (interactive and batch modes; API requests carry their own)")
    gen.add_argument("--max_new_tokens", type=int, default=150, help="tokens generated per reply at most")
    gen.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    gen.add_argument("--top_k", type=int, default=50, help="0 = off")
    gen.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling; 1.0 = off")
    gen.add_argument("--repetition_penalty", type=float, default=1.1, help="1.0 = off")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--system", default="", help="system prompt (interactive mode)")
    api = parser.add_argument_group("api mode")
    api.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --api_key")
    api.add_argument("--port", type=int, default=8000, help="TCP port")
    api.add_argument("--api_key", default=None,
                     help="Bearer token required on every route but /health and the chat page; prefer the "
                          "SERVE_API_KEY environment variable (a flag shows in `ps`)")
    api.add_argument("--served_model_name", default=None,
                     help="the model id /v1/models lists and OpenAI requests may name (another name is a 404); "
                          "default: the checkpoint path below checkpoints/")
    api.add_argument("--cors_origins", default=None,
                     help="comma-separated origins whose pages may call the API from a browser (CORS), e.g. "
                          "http://localhost:3000, or *; default: none, and no CORS headers")
    api.add_argument("--max_new_tokens_cap", type=int, default=512, help="server-side cap on max_new_tokens")
    api.add_argument("--max_batch_size", type=int, default=8, help="sequences decoded together (API and batch)")
    api.add_argument("--max_queue", type=int, default=64, help="requests waiting beyond the batch; more get 503")
    api.add_argument("--max_body_bytes", type=int, default=1 << 20, help="request body size limit (413 above)")
    api.add_argument("--request_timeout", type=float, default=30.0,
                     help="seconds a client has to send its whole body once its headers are in; a slower one "
                          "gets 408 and is disconnected, so a trickled body cannot hold a connection forever")
    api.add_argument("--timeout_keep_alive", type=int, default=5,
                     help="seconds an idle keep-alive connection stays open between requests")
    api.add_argument("--max_connections", type=int, default=128,
                     help="open connections at most (more get 503): bounds what clients that never finish their "
                          "headers can hold, which uvicorn does not time out; keep it above "
                          "--max_batch_size + --max_queue")
    batch = parser.add_argument_group("batch mode")
    batch.add_argument("--prompts_file", default=None,
                       help="JSON list (or JSONL) of prompts: strings, or objects with 'prompt' or 'messages', "
                            "optional 'id' and per-item sampling fields")
    batch.add_argument("--output_file", default=None, help="where the JSON results are written")
    return parser.parse_args()


def sampling(args: argparse.Namespace) -> GenerationSettings:
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=list(args.stop), seed=args.seed,
    )
    try:
        settings.validate()
    except GenerationError as err:
        raise ValueError(f"bad sampling flag: {err}") from None
    return settings


def resolve_template(args: argparse.Namespace, loaded: LoadedModel) -> str | None:
    if args.template == "auto":
        return loaded.template
    return None if args.template == "none" else args.template


# --------------------------------------------------------------------------- interactive


def chat_command(line: str, session: ChatSession, settings: GenerationSettings) -> GenerationSettings | None:
    """Applies a /command; returns the (maybe changed) settings, or None for /quit."""
    name, _, value = line.partition(" ")
    value = value.strip()
    try:
        if name == "/quit":
            return None
        if name == "/reset":
            session.reset()
            print("(conversation cleared)")
        elif name == "/system":
            session.system = value
            session.reset()
            print(f"(system prompt {'set' if value else 'cleared'}; conversation cleared)")
        elif name == "/temp":
            settings = settings.replace(temperature=float(value))
            settings.validate()
            print(f"(temperature {settings.temperature})")
        elif name == "/max":
            settings = settings.replace(max_new_tokens=int(value))
            settings.validate()
            print(f"(max new tokens {settings.max_new_tokens})")
        elif name == "/help":
            print(HELP)
        else:
            print(f"unknown command {name}; /help lists them")
    except (ValueError, GenerationError) as err:
        print(f"bad value for {name}: {err}")
    return settings


def reply(loaded: LoadedModel, session: ChatSession, user: str, settings: GenerationSettings) -> None:
    """Streams one reply to the terminal; Ctrl-C ends it early and keeps what was said."""
    text, result = "", None
    try:
        prompt, dropped = session.prompt(user, settings.max_new_tokens)
        if dropped:
            print(f"(dropped the {dropped} oldest turn(s) to fit the {session.window}-token context window)")
        print("bot> " if session.chat else "", end="", flush=True)
        for event in generate_stream(loaded.model, loaded.tokenizer, prompt, settings, session.template):
            print(event.delta, end="", flush=True)
            text += event.delta
            result = event.result
    except GenerationError as err:
        print(f"(cannot answer: {err}; shorten the message, /max a smaller reply, or /reset)")
        return
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print()
    if result is not None and result.finish_reason == "length":
        print(f"(reply cut at {settings.max_new_tokens} tokens: /max to raise)")
    session.record(user, text)


def interactive(args: argparse.Namespace, loaded: LoadedModel, settings: GenerationSettings) -> None:
    template = resolve_template(args, loaded)
    session = ChatSession(loaded.tokenizer, template, context_window(loaded.model), system=args.system)
    mode = f"chat, template {template}" if session.chat else "plain completion (base model: no chat history)"
    print(f"model {loaded.path} on {loaded.device} ({mode}); /help for commands, /quit to leave")
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    while True:
        try:
            line = input("you> " if session.chat else "prompt> ")
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops a reply; /quit or Ctrl-D leaves)")
            continue
        except EOFError:
            print()
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            settings = chat_command(line.strip(), session, settings)
            if settings is None:
                return
            continue
        reply(loaded, session, line, settings)


# --------------------------------------------------------------------------- batch


def read_prompts(path: Path) -> list[dict]:
    """Prompt items from a JSON list or JSONL file; errors name the file, the item and the field."""
    if not path.is_file():
        raise FileNotFoundError(f"--prompts_file {path} does not exist")
    text = read_text(path, "--prompts_file")
    if path.suffix == ".jsonl":
        items, where = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: invalid JSON: {err.msg}") from None
                where.append(f"{path}, line {number}")
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of prompts, got {type(items).__name__}")
        where = [f"{path}, item {i}" for i in range(len(items))]
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return [normalize_item(item, at, i) for i, (item, at) in enumerate(zip(items, where))]


def normalize_item(item: object, where: str, index: int) -> dict:
    if isinstance(item, str):
        return {"id": index, "prompt": item, "settings": {}}
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a string or an object with 'prompt' or 'messages'")
    unknown = sorted(set(item) - {"id", "prompt", "messages", *ITEM_SETTINGS})
    if unknown:
        allowed = ", ".join(["id", "prompt", "messages", *ITEM_SETTINGS])
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {allowed}")
    if ("prompt" in item) == ("messages" in item):
        raise ValueError(f"{where}: give exactly one of 'prompt' (a string) or 'messages' (a list)")
    if "prompt" in item and not isinstance(item["prompt"], str):
        raise ValueError(f"{where}: field 'prompt' must be a string")
    for name, (kind, expected) in ITEM_SETTINGS.items():
        if name in item and (isinstance(item[name], bool) or not isinstance(item[name], kind)):
            raise ValueError(f"{where}: field '{name}' must be {expected}, got {item[name]!r}")
    out = {"id": item.get("id", index), "settings": {k: item[k] for k in ITEM_SETTINGS if k in item}}
    if "messages" in item:
        out["messages"] = validate_messages(item["messages"], f"{where}: field messages")
    else:
        out["prompt"] = item["prompt"]
    return out


def item_settings(base: GenerationSettings, item: dict, where: str) -> GenerationSettings:
    try:
        settings = base.replace(**item["settings"])
        settings.validate()
    except GenerationError as err:
        raise ValueError(f"{where}: {err}") from None
    return settings


def batch(args: argparse.Namespace, loaded: LoadedModel, items: list[dict], per_item: list[GenerationSettings],
          summary: StageSummary) -> None:
    from utils.files import atomic_write_json

    prompts_file, output_file = Path(args.prompts_file), Path(args.output_file)
    summary.add(model=str(loaded.path), prompts_file=str(prompts_file))
    template = resolve_template(args, loaded)
    prompts = [item.get("messages", item.get("prompt")) for item in items]
    results = []
    started = time.perf_counter()
    bar = progress(total=len(items), desc="generating")
    for start in range(0, len(items), args.max_batch_size):
        chunk = slice(start, start + args.max_batch_size)
        try:
            results += generate_batch(loaded.model, loaded.tokenizer, prompts[chunk], per_item[chunk], template,
                                      max_batch_size=args.max_batch_size)
        except GenerationError as err:
            raise ValueError(f"{prompts_file}: {err} (items are numbered from {start} in this batch)") from None
        bar.update(len(prompts[chunk]))
    bar.close()
    metrics = MetricsLogger(output_file.with_suffix(".metrics.jsonl"))
    rows = []
    for item, result in zip(items, results):
        source = {"messages": item["messages"]} if "messages" in item else {"prompt": item["prompt"]}
        rows.append({"id": item["id"], **source, "text": result.text, "tokens": len(result.tokens),
                     "prompt_tokens": result.prompt_tokens, "finish_reason": result.finish_reason,
                     "timings": result.timings})
        metrics.log({"id": item["id"], "tokens": len(result.tokens), "finish_reason": result.finish_reason,
                     **result.timings})
    atomic_write_json(output_file, rows)
    generated = sum(len(r.tokens) for r in results)
    reasons = sorted({r.finish_reason for r in results})
    summary.add(
        output_file=str(output_file), prompts=len(items), template=template or "none", generated_tokens=generated,
        generated_tokens_per_second=round(generated / (time.perf_counter() - started), 1),
        finish_reasons={reason: sum(r.finish_reason == reason for r in results) for reason in reasons},
    )
    summary.finish(output_file.parent, f"{output_file.stem}.summary.json")


# --------------------------------------------------------------------------- api


def api(args: argparse.Namespace, loaded: LoadedModel, api_key: str | None, cors_origins: list[str]) -> None:
    import uvicorn

    from utils.server import ServerSettings, create_app

    template = resolve_template(args, loaded)
    name = args.served_model_name or loaded.name
    settings = ServerSettings(
        model_id=name, default_template=template, max_new_tokens_cap=args.max_new_tokens_cap,
        default_max_new_tokens=min(args.max_new_tokens, args.max_new_tokens_cap), max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, api_key=api_key,
        request_timeout=args.request_timeout, cors_origins=cors_origins,
    )
    app = create_app(loaded, settings)
    cors = f", CORS for {', '.join(cors_origins)}" if cors_origins else ""
    print(f"serving {loaded.path} as '{name}' (template {template or 'none'}) on http://{args.host}:{args.port}"
          f" — chat page /, docs /docs, OpenAI base URL http://{args.host}:{args.port}/v1{cors}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5,
                timeout_keep_alive=args.timeout_keep_alive, limit_concurrency=args.max_connections)


def main() -> None:
    args = parse_args()
    quiet_libraries()
    settings = sampling(args)
    for name in ("max_batch_size", "max_new_tokens_cap", "max_queue", "max_body_bytes", "max_connections",
                 "timeout_keep_alive"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request_timeout must be > 0 seconds, got {args.request_timeout}")
    api_key, cors_origins = None, []
    if args.mode == "api":
        from utils.server import api_key_for, parse_cors_origins

        api_key = api_key_for(args.host, args.api_key)
        cors_origins = parse_cors_origins(args.cors_origins)
        if args.served_model_name is not None and not args.served_model_name.strip():
            raise ValueError("--served_model_name is empty: give the name clients should send as `model`")
    if args.mode == "batch":
        # The prompts are checked before the model is loaded: a typo fails in a second, not after loading.
        summary = StageSummary("06_serve (batch)")
        if not args.prompts_file or not args.output_file:
            raise ValueError("--mode batch needs --prompts_file and --output_file")
        if Path(args.output_file).is_dir():
            raise ValueError(f"--output_file {args.output_file} is a directory; name the JSON file to write")
        items = read_prompts(Path(args.prompts_file))
        per_item = [item_settings(settings, item, f"{args.prompts_file}, item {i}") for i, item in enumerate(items)]
    model_path = Path(args.model_path) if args.model_path else default_model(args.preset)
    device = None if args.device == "auto" else args.device
    loaded = load_for_inference(model_path, device, DTYPES.get(args.dtype))
    if args.mode == "interactive":
        interactive(args, loaded, settings)
    elif args.mode == "batch":
        batch(args, loaded, items, per_item, summary)
    else:
        api(args, loaded, api_key, cors_origins)


if __name__ == "__main__":
    run_main(main)
