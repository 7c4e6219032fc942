#!/usr/bin/env python
"""Stage 05: evaluate any checkpoint → results.json + report.md; promotion gates; comparison with other results.

Tasks (--tasks), each skipped with a note in results.json when its data is not available:
  wikitext  perplexity of raw WikiText-2 test articles with a sliding window: token and word perplexity,
            bits per byte, next-token accuracy (--wikitext_path FILE, or `hub` when online)
  val       perplexity and next-token accuracy on the run's own held-out val.bin (the data dir comes from
            the checkpoint's run.json, or --data_path)
  boolq     BoolQ zero-shot accuracy: ` no`/` yes` by log-likelihood, with its standard error and the
            majority-class baseline (--boolq_path FILE, or `hub`)
  mc        your multiple-choice JSONL benchmarks (--mc_path, repeatable): accuracy and length-normalised
            accuracy
  generate  smoke-test generations for prompts (--prompts_path), with the checkpoint's chat template; prompts
            given with reference answers are also scored: exact match, BLEU (sacrebleu), ROUGE-1/2/L (rouge-score)
  speed     prefill and decode tokens/s, time to first token; peak memory of the whole evaluation

Backends (--backend): `ours` (default) scores everything above with the project's evaluator, whose WikiText
pages, word and byte counts, prefix token and multiple-choice scoring are lm-evaluation-harness's; `lm-eval`
runs the harness itself (optional extra: pip install -r requirements-eval.txt) on the same loaded model and
the same local files, through task YAMLs written to <output_dir>/lm_eval_tasks/, plus any harness task named
by --lm_eval_tasks. Both write results.json and the harness's results shape, results_lm_eval.json.

Exit codes: 0 done (and gates passed), 2 bad input (nothing written), 3 a promotion gate failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from utils.checkpoint import describe_missing, resolve_checkpoint
from utils.cli import StageSummary, quiet_libraries, run_main
from utils.contamination import BUILTIN_EVALS
from utils.decoding import GenerationSettings
from utils.eval_data import (
    EvalDataError,
    SourceInfo,
    SourceUnavailable,
    contamination_of,
    data_path_from_run,
    detokenize_wikitext,
    load_boolq,
    load_multiple_choice,
    load_prompts,
    load_references,
    load_wikitext,
    mc_task_name,
    parse_field_map,
    training_contamination,
)
from utils.evaluation import (
    EvaluationError,
    check_context_length,
    measure_speed,
    peak_memory_mb,
    perplexity_metrics,
    reference_scores,
    score_multiple_choice,
    sliding_window_score,
    smoke_generations,
    text_stats,
)
from utils.files import atomic_write_json, atomic_write_text
from utils.layout import STAGES, default_model, stage_and_preset
from utils.lm_eval_backend import HARNESS_TASKS, LM_EVAL_RESULTS_FILE, import_lm_eval, lm_eval_shape
from utils.lm_eval_backend import evaluate as harness_evaluate
from utils.loading import LoadedModel, load_for_inference
from utils.metrics import MetricsLogger
from utils.model import default_device, inference_dtype
from utils.report import results_markdown
from utils.results import (
    RESULTS_FILE,
    StageGates,
    check_gates,
    checkpoint_info,
    comparison_table,
    environment_info,
    flatten_metrics,
    load_gates,
    load_results,
)
from utils.tokenizer import load_tokenizer, tokenizer_sha256
from utils.tokens import TOKENIZER_DIR, open_tokens, read_meta

TASKS = ("wikitext", "val", "boolq", "mc", "generate", "speed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GATE_FAILED = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model and output")
    model.add_argument("--model_path", default="auto",
                       help="checkpoint dir (pretrain step/final/best, a stage dir with a `latest` pointer, an SFT/DPO "
                            "adapter, a merged model); `auto` = the furthest stage with a complete "
                            "checkpoint under --checkpoints_dir (dpo, else sft, else pretrain), of the preset "
                            "trained last (the rule 06_serve follows)")
    model.add_argument("--checkpoints_dir", default="checkpoints", help="where `auto` looks (default: checkpoints)")
    model.add_argument("--preset", default=None, help="`auto` looks in <checkpoints_dir>/<stage>/<preset> only")
    model.add_argument("--output_dir", default=None,
                       help="default: evaluation_results/<stage>-<preset>, or evaluation_results/<checkpoint name> "
                            "for a checkpoint outside the stage layout")
    model.add_argument("--stage", choices=[*STAGES, "custom"], default=None,
                       help="what the checkpoint is, for the output dir and the report (default: from its path "
                            ".../<stage>/<preset>/...)")
    model.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps")
    model.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                       help="auto = float32 on CPU, bfloat16 (or float16) on GPU")
    model.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    model.add_argument("--backend", choices=["ours", "lm-eval"], default="ours",
                       help="ours: the project's evaluator; lm-eval: lm-evaluation-harness (lm_eval==0.4.13, "
                            "requirements-eval.txt) on the same model and local files, for the tasks it has "
                            "(wikitext, boolq, mc); val, generate and speed are then skipped")
    model.add_argument("--lm_eval_tasks", default=None,
                       help="with --backend lm-eval: extra harness task names, comma-separated (e.g. hellaswag,"
                            "arc_easy), run as the harness defines them (their data comes from the hub: online only)")

    scoring = parser.add_argument_group("log-likelihood scoring")
    scoring.add_argument("--context_length", type=int, default=None,
                         help="tokens the model sees at once (default and maximum: the model's context)")
    scoring.add_argument("--stride", type=int, default=None,
                         help="tokens scored per perplexity window (default: the context length = the "
                              "harness's disjoint rolling windows; smaller = more context per token, slower)")
    scoring.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    scoring.add_argument("--prefix_token", choices=["bos", "eos"], default="bos",
                         help="token that each perplexity document's first token is predicted from (bos: "
                              "lm-evaluation-harness's default; eos: how pretraining separates documents)")

    data = parser.add_argument_group("data sets")
    data.add_argument("--wikitext_path", default=None,
                      help="raw WikiText-2 test file (wiki.test.raw), or `hub[:id[:config[:split]]]` when online")
    data.add_argument("--wikitext_limit", type=int, default=None, help="first N pages only (test set: 62)")
    data.add_argument("--wikitext_detokenize", action=argparse.BooleanOptionalAction, default=True,
                      help="score articles after the harness's WikiText detokenizer (' @-@ ' -> '-' ...); words and "
                           "bytes are always counted on the original text")
    data.add_argument("--data_path", default=None,
                      help="processed data dir whose val.bin is scored (default: from the checkpoint's run.json)")
    data.add_argument("--val_max_tokens", type=int, default=262144,
                      help="score at most this many val.bin tokens (0 = all)")
    data.add_argument("--boolq_path", default=None,
                      help="BoolQ JSONL ({question, passage, answer} or SuperGLUE {question, passage, label}), "
                           "or `hub[:id[:config[:split]]]` (google/boolq validation) when online")
    data.add_argument("--boolq_limit", type=int, default=None, help="first N BoolQ questions only")
    data.add_argument("--mc_path", action="append", default=[],
                      help="multiple-choice JSONL {context, choices: [...], answer: index or text}; repeatable; "
                           "the task is named after the file")
    data.add_argument("--mc_fields", default=None,
                      help="field names of your JSONL, e.g. context=ctx,choices=endings,answer=label")
    data.add_argument("--mc_delimiter", default=" ", help="text between context and each choice (default: a space)")
    data.add_argument("--mc_limit", type=int, default=None, help="first N questions of each --mc_path file only")

    gen = parser.add_argument_group("smoke-test generations and speed")
    gen.add_argument("--prompts_path", default=None,
                     help='JSON list of prompts: "text", {"prompt": "text"} or a [{role, content}] message list '
                          '(default: three built-in prompts); {"prompt": ..., "reference": "text"} (or "references": '
                          '[...]) for every prompt adds exact match, BLEU and ROUGE against the references')
    gen.add_argument("--prompt_mode", choices=["auto", "chat", "completion"], default="auto",
                     help="auto: the chat template for fine-tuned checkpoints (template.json), plain completion "
                          "for base ones")
    gen.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per smoke-test prompt at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top_k", type=int, default=0, help="0 = off")
    gen.add_argument("--top_p", type=float, default=1.0, help="1.0 = off")
    gen.add_argument("--repetition_penalty", type=float, default=1.0, help="1.0 = off")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (used when --temperature > 0)")
    gen.add_argument("--speed_prompt_tokens", type=int, default=None, help="prompt length (default: half the context)")
    gen.add_argument("--speed_new_tokens", type=int, default=64, help="tokens decoded per speed run")
    gen.add_argument("--speed_repeats", type=int, default=3, help="timed runs after one warm-up; medians reported")

    gates = parser.add_argument_group("promotion gates and comparison")
    gates.add_argument("--gates", choices=STAGES, default=None,
                       help="check this stage's thresholds from --gates_config; exit 3 naming each failed metric")
    gates.add_argument("--gates_config", default="config/gates.json", help="per-stage thresholds (JSON)")
    gates.add_argument("--baseline", default=None,
                       help="results.json of the previous stage for regression gates (default: "
                            "<previous stage>-<preset>/results.json beside this evaluation's output dir)")
    gates.add_argument("--compare", default=None, help="another results.json (or its dir): print a side-by-side table")
    gates.add_argument("--from_results", "--results", default=None,
                       help="evaluate nothing: check --gates / --compare on this existing results.json")
    return parser.parse_args()


def check_arguments(args: argparse.Namespace) -> list[str]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise EvaluationError(f"--tasks: unknown task(s) {unknown or tasks}; choose from {', '.join(TASKS)}")
    positive = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                "speed_new_tokens": args.speed_new_tokens, "speed_repeats": args.speed_repeats}
    for name, value in positive.items():
        if value < 1:
            raise EvaluationError(f"--{name} must be >= 1, got {value}")
    for limit, source in (("wikitext_limit", "wikitext_path"), ("boolq_limit", "boolq_path"), ("mc_limit", "mc_path")):
        if getattr(args, limit) is not None and not getattr(args, source):
            raise EvaluationError(f"--{limit} needs --{source}")
    if args.val_max_tokens < 0:
        raise EvaluationError(f"--val_max_tokens must be >= 0 (0 = all), got {args.val_max_tokens}")
    if args.lm_eval_tasks is not None and args.backend != "lm-eval":
        raise EvaluationError("--lm_eval_tasks needs --backend lm-eval (the harness runs those tasks)")
    if args.backend == "lm-eval" and args.stride is not None:
        raise EvaluationError("--stride is not used by --backend lm-eval: the harness scores disjoint windows of the "
                              "context length (leave out --stride, or use --backend ours)")
    return tasks


def find_checkpoint(model_path: str, checkpoints_dir: Path, preset: str | None) -> Path:
    """The checkpoint to evaluate; `auto` is the default model of utils/layout.py, the one 06_serve takes."""
    path = resolve_checkpoint(default_model(preset, checkpoints_dir) if model_path == "auto" else model_path)
    problem = describe_missing(path)
    if problem:
        raise EvaluationError(f"--model_path: {problem}")
    return path


def load_sources(args: argparse.Namespace, tasks: list[str], checkpoint: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Every data set the tasks need, read before the model loads so bad input fails fast; plus skip notes."""
    data: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    optional = {
        "wikitext": (args.wikitext_path, "--wikitext_path", "a raw file such as wiki.test.raw",
                     lambda: load_wikitext(args.wikitext_path, args.wikitext_limit)),
        "boolq": (args.boolq_path, "--boolq_path", "a BoolQ JSONL file",
                  lambda: load_boolq(args.boolq_path, args.boolq_limit)),
    }
    for task, (path, flag, example, load) in optional.items():
        if task not in tasks:
            continue
        if path is None:
            skipped[task] = f"no {flag} given ({example}, or `hub` when online)"
            continue
        try:
            data[task] = load()
        except SourceUnavailable as err:
            skipped[task] = str(err)
    if "val" in tasks:
        val_dir, note = _val_data_dir(args.data_path, checkpoint)
        if val_dir is None:
            skipped["val"] = note
        else:
            data["val"] = val_dir
    if "mc" in tasks:
        if not args.mc_path:
            skipped["mc"] = "no --mc_path given"
        else:
            fields = parse_field_map(args.mc_fields)
            data["mc"] = {mc_task_name(p): load_multiple_choice(p, fields, args.mc_limit) for p in args.mc_path}
    if "generate" in tasks:
        data["generate"] = (load_prompts(args.prompts_path), load_references(args.prompts_path))
    return data, skipped


def _val_data_dir(explicit: str | None, checkpoint: Path) -> tuple[Path | None, str]:
    if explicit is not None:
        read_meta(explicit)
        return Path(explicit), ""
    found = data_path_from_run(checkpoint)
    if found is None:
        return None, "no --data_path given and the checkpoint's run.json names no data_path"
    if not (found / "meta.json").is_file():
        return None, f"the checkpoint's run.json names data dir {found}, which is not here (pass --data_path)"
    return found, ""


def default_output_dir(stage: str, preset: str) -> Path:
    return Path("evaluation_results", f"{stage}-{preset}" if stage in STAGES else preset)


@dataclass
class Evaluator:
    """The loaded model and the scoring settings every task shares."""

    loaded: LoadedModel
    args: argparse.Namespace
    context: int
    stride: int
    prefix_id: int

    def run(self, task: str, data: Any) -> dict[str, Any]:
        return getattr(self, task)(data)

    def wikitext(self, data: tuple[list[str], SourceInfo]) -> dict[str, Any]:
        articles, info = data
        scored = [detokenize_wikitext(a) for a in articles] if self.args.wikitext_detokenize else articles
        ids = [self.loaded.tokenizer.encode(a, add_special_tokens=False) for a in scored]
        score = sliding_window_score(self.loaded.model, ids, self.prefix_id, self.context, self.stride,
                                     self.args.batch_size, self.loaded.device, desc="wikitext")
        return {**info.as_dict(used=len(articles)), "detokenized": self.args.wikitext_detokenize,
                "metrics": {**perplexity_metrics(score, text_stats(articles)), "documents": len(articles)}}

    def val(self, data_dir: Path) -> dict[str, Any]:
        """Perplexity of the run's held-out tokens as one stream (as training saw it), no prefix token."""
        meta = read_meta(data_dir)
        ours = tokenizer_sha256(self.loaded.path)
        same_file = meta.get("tokenizer_sha256") in (None, ours)
        # A re-saved tokenizer can differ in bytes but not in vocabulary: that one is the same tokenizer.
        if not same_file and load_tokenizer(data_dir / TOKENIZER_DIR).get_vocab() != self.loaded.tokenizer.get_vocab():
            message = (f"{data_dir} was tokenized with a different tokenizer (sha256 {meta['tokenizer_sha256'][:12]}) "
                       f"than the checkpoint's ({ours[:12]})")
            if self.args.data_path is not None:
                raise EvalDataError(f"--data_path: {message}")
            return {"skipped": message}
        tokens = open_tokens(data_dir, "val")
        if self.args.val_max_tokens:
            tokens = tokens[:self.args.val_max_tokens]
        score = sliding_window_score(self.loaded.model, [tokens.tolist()], None, self.context, self.stride,
                                     self.args.batch_size, self.loaded.device, desc="val.bin")
        metrics = perplexity_metrics(score)
        metrics["perplexity"] = metrics.pop("token_perplexity")
        return {"source": str(data_dir), "sha256": (meta.get("files") or {}).get("val.bin"),
                "records": int(meta["val_tokens"]), "used": len(tokens), "metrics": metrics}

    def _choices(self, items: list, info: SourceInfo, delimiter: str, desc: str) -> dict[str, Any]:
        metrics = score_multiple_choice(self.loaded.model, self.loaded.tokenizer, items, self.prefix_id, self.context,
                                        self.args.batch_size, self.loaded.device, delimiter=delimiter, desc=desc)
        return {**info.as_dict(used=len(items)), "metrics": metrics}

    def boolq(self, data: tuple[list, SourceInfo]) -> dict[str, Any]:
        return self._choices(*data, delimiter=" ", desc="boolq")

    def mc(self, data: dict[str, tuple[list, SourceInfo]]) -> dict[str, Any]:
        fields = parse_field_map(self.args.mc_fields)
        return {name: {**self._choices(items, info, self.args.mc_delimiter, name), "fields": fields}
                for name, (items, info) in data.items()}

    def generate(self, data: tuple[list, list[list[str]] | None]) -> dict[str, Any]:
        prompts, references = data
        a = self.args
        settings = GenerationSettings(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty,
                                      [], a.seed)
        # auto: the template the checkpoint was fine-tuned with; a base checkpoint continues plain text
        template = {"completion": None, "chat": self.loaded.template or "chatml"}.get(a.prompt_mode,
                                                                                       self.loaded.template)
        samples = smoke_generations(self.loaded.model, self.loaded.tokenizer, prompts, settings, template)
        shown = {**settings.__dict__, "template": template or "none (plain completion)"}
        if references is None:
            return {"settings": shown, "samples": samples}
        for sample, refs in zip(samples, references):
            sample["references"] = refs
        metrics = reference_scores([s["text"] for s in samples], references)
        return {"settings": shown, "samples": samples, "metrics": metrics}

    def speed_lengths(self) -> tuple[int, int]:
        """Prompt and generated tokens of the speed runs: they must fit in the context together."""
        prompt_tokens = self.args.speed_prompt_tokens or self.context // 2
        new_tokens = min(self.args.speed_new_tokens, self.context - prompt_tokens)
        if prompt_tokens < 1 or new_tokens < 1:
            raise EvaluationError(f"--speed_prompt_tokens {prompt_tokens} leaves no room to generate in the context "
                                  f"of {self.context} tokens")
        return prompt_tokens, new_tokens

    def speed(self, _: Any) -> dict[str, Any]:
        prompt_tokens, new_tokens = self.speed_lengths()
        metrics = measure_speed(self.loaded.model, self.loaded.tokenizer, prompt_tokens, new_tokens,
                                self.args.speed_repeats, seed=self.args.seed)
        return {"metrics": metrics}


def warn_contaminated(checkpoint: Path, results_tasks: dict[str, Any], args: argparse.Namespace) -> None:
    """A warning beside each score whose eval set overlaps the model's training data (per its data card)."""
    found = training_contamination(checkpoint)
    if found is None:
        return
    meta_file, rows = found
    scored = {name: task for name, task in results_tasks.items() if name != "mc"}
    scored |= {f"mc.{name}": task for name, task in results_tasks.get("mc", {}).items() if isinstance(task, dict)}
    default_prompts = f"{BUILTIN_EVALS}:generate-prompts" if args.prompts_path is None else None
    for name, task in scored.items():
        row = contamination_of(task, rows, default_prompts if name == "generate" else None)
        if row is None:
            continue
        task["contamination"] = {k: row[k] for k in ("contaminated_items", "checked_items", "share")}
        share = f"{row['share']:.1%}" if row["share"] is not None else "n/a"
        print(f"warning: [{name}] {row['contaminated_items']} of {row['checked_items']} items ({share}) of "
              f"{row['eval_set']} share an n-gram with this model's training data ({meta_file}); the score may be "
              "inflated")


def main() -> int:
    args = parse_args()
    quiet_libraries()
    if args.from_results:
        return check_existing(args)
    tasks = check_arguments(args)
    harness = args.backend == "lm-eval"
    if harness:
        import_lm_eval()  # before anything is loaded: a missing optional extra is a clear error
    checkpoint = find_checkpoint(args.model_path, Path(args.checkpoints_dir), args.preset)
    stage, preset = stage_and_preset(checkpoint) or ("custom", checkpoint.name)
    stage = args.stage or stage
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(stage, preset)
    gates = load_gates(args.gates_config, args.gates) if args.gates else None
    compare = load_results(args.compare) if args.compare else None
    data, skipped = load_sources(args, tasks, checkpoint)
    if harness:
        skipped |= {t: "not a harness task: --backend lm-eval runs wikitext, boolq, mc and --lm_eval_tasks "
                       "(use --backend ours for it)" for t in tasks if t not in HARNESS_TASKS}

    device = default_device() if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {args.device}: no CUDA GPU is available here (use cpu or auto)")
    dtype = inference_dtype(device) if args.dtype == "auto" else DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    precision = str(dtype).removeprefix("torch.")
    print(f"evaluating {checkpoint} (stage {stage}, preset {preset}) on {device} in {precision}")
    loaded = load_for_inference(checkpoint, device, dtype)
    context = check_context_length(loaded.model, args.context_length)
    stride = args.stride or context
    if not 1 <= stride <= context:
        raise EvaluationError(f"--stride must be between 1 and the context length {context}, got {stride}")
    prefix_id = getattr(loaded.tokenizer, f"{args.prefix_token}_token_id")
    evaluator = Evaluator(loaded, args, context, stride, prefix_id)
    if "speed" in tasks and "speed" not in skipped:
        evaluator.speed_lengths()
    summary = StageSummary("evaluate", checkpoint=str(checkpoint), output_dir=str(output_dir))
    logger = MetricsLogger(output_dir / "metrics.jsonl")

    results_tasks: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    harness_results = None
    if harness:
        started = time.perf_counter()
        done, harness_results = harness_evaluate(args, tasks, data, skipped, loaded, context, prefix_id, output_dir)
        seconds["lm_eval"] = round(time.perf_counter() - started, 2)
        logger.log({"task": "lm_eval", "seconds": seconds["lm_eval"], **flatten_metrics(done)})
    for task in tasks:
        if task in skipped:
            print(f"[{task}] skipped: {skipped[task]}")
            results_tasks[task] = {"skipped": skipped[task]}
            continue
        if harness:
            results_tasks[task] = done.pop(task)
            continue
        started = time.perf_counter()
        results_tasks[task] = evaluator.run(task, data.get(task))
        seconds[task] = round(time.perf_counter() - started, 2)
        logger.log({"task": task, "seconds": seconds[task], **flatten_metrics({task: results_tasks[task]})})
        print(f"[{task}] done in {seconds[task]:.1f} s")
    if harness:
        results_tasks.update(done)  # --lm_eval_tasks, under "lm_eval"
    warn_contaminated(checkpoint, results_tasks, args)
    if "metrics" in results_tasks.get("speed", {}):
        results_tasks["speed"]["metrics"]["peak_memory_mb"] = round(peak_memory_mb(device), 1)

    results = {
        "schema_version": 1,
        "stage": stage,
        "preset": preset,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "backend": args.backend,
        "checkpoint": checkpoint_info(loaded),
        "environment": environment_info(device, dtype),
        "settings": {**vars(args), "tasks": tasks, "context_length": context, "stride": stride,
                     "prefix_token_id": prefix_id},
        "tasks": results_tasks,
        "metrics": flatten_metrics(results_tasks),
        "seconds": {**seconds, "total": round(time.time() - summary.started, 2)},
    }
    if gates:
        results["gates"] = gate_report(args, results, gates, output_dir)
    report = results_markdown(results)
    atomic_write_json(output_dir / RESULTS_FILE, results)
    # The harness's results JSON (its own output with --backend lm-eval), for tools that read harness results.
    atomic_write_json(output_dir / LM_EVAL_RESULTS_FILE, harness_results or lm_eval_shape(results))
    atomic_write_text(output_dir / "report.md", report)
    scores = {k: v for k, v in results["metrics"].items() if k.split(".")[0] in ("wikitext", "val", "boolq", "mc")}
    skipped_tasks = sorted(t for t, r in results_tasks.items() if "skipped" in r)
    summary.add(**scores, skipped=skipped_tasks, results=str(output_dir / RESULTS_FILE),
                lm_eval_results=str(output_dir / LM_EVAL_RESULTS_FILE))
    summary.finish(output_dir)
    if compare is not None:
        print("\n" + comparison_table(results, compare, new_name="this", old_name=args.compare))
    return print_gates(results["gates"]) if gates else 0


def check_existing(args: argparse.Namespace) -> int:
    """--from_results: comparison and gates on a results.json that is already there; evaluates nothing."""
    results = load_results(args.from_results)
    if not args.compare and not args.gates:
        raise EvaluationError("--from_results needs --compare and/or --gates (it evaluates nothing itself)")
    if args.compare:
        print(comparison_table(results, load_results(args.compare), new_name=args.from_results, old_name=args.compare))
    if args.gates:
        results_dir = Path(args.from_results)
        results_dir = results_dir if results_dir.is_dir() else results_dir.parent
        return print_gates(gate_report(args, results, load_gates(args.gates_config, args.gates), results_dir))
    return 0


def gate_report(args: argparse.Namespace, results: dict[str, Any], gates: StageGates,
                results_dir: Path) -> dict[str, Any]:
    """Gate checks; the regression baseline defaults to the previous stage's results beside these ones."""
    baseline_path = args.baseline
    if baseline_path is None and gates.previous:
        candidate = results_dir.parent / f"{gates.previous}-{results.get('preset', '')}" / RESULTS_FILE
        baseline_path = str(candidate) if candidate.is_file() else None
    baseline = load_results(baseline_path)["metrics"] if baseline_path else None
    checks = check_gates(results["metrics"], gates, baseline, (results.get("checkpoint") or {}).get("vocab_size"))
    return {
        "stage": args.gates,
        "config": args.gates_config,
        "baseline": baseline_path,
        "passed": all(c.status != "failed" for c in checks),
        "checks": [c.as_dict() for c in checks],
    }


def print_gates(report: dict[str, Any]) -> int:
    print(f"\n== promotion gates: {report['stage']} ({report['config']}) ==")
    for check in report["checks"]:
        print(f"  {check['status'].upper():<7} {check['message']}")
    if report["passed"]:
        print("  all gates passed")
        return 0
    failed = [c["message"] for c in report["checks"] if c["status"] == "failed"]
    print(f"gate failed for stage {report['stage']}: " + "; ".join(failed) + f" (thresholds in {report['config']}; "
          "`make pipeline FORCE=1` or run_pipeline.py --force carries on past it)", file=sys.stderr)
    return GATE_FAILED


if __name__ == "__main__":
    run_main(main)
