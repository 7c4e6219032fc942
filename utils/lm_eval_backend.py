"""lm-evaluation-harness as a second evaluation backend (`05_evaluate.py --backend lm-eval`), and results in the
harness's JSON shape for both backends.

The harness is an optional extra (`pip install -r requirements-eval.txt`, lm_eval==0.4.13). It runs in this
process on the model 05 has loaded (the same weights, adapter included, and tokenizer), with the same local
files: 05's data flags become task YAMLs written into `<output_dir>/lm_eval_tasks/`:
- WikiText: `dataset_path: text` reads the raw file itself (`sample_by: document`); `process_docs` cuts it
  into the harness's pages (`utils.eval_data.wikitext_pages`); the harness's own `wikitext_detokenizer`
  and `process_results` (from `lm_eval.tasks.wikitext`) score it, so it is the harness's `wikitext` task
  with the local file as its data.
- BoolQ and multiple choice: `dataset_path: json` with `dataset_kwargs: data_files` naming the user's JSONL;
  `process_docs` maps the record fields (BoolQ `answer`/`label`, `--mc_fields`) and applies the limits.
The generated tasks are named `wikitext`, `boolq` and `mc_<file stem>`; an include path takes precedence
over the harness's own tasks of the same name. Any other harness task (`--lm_eval_tasks hellaswag`) runs
as the harness defines it (from the hub: online only).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL_REQUIREMENT = "lm_eval==0.4.13"
LM_EVAL_RESULTS_FILE = "results_lm_eval.json"
TASKS_DIR = "lm_eval_tasks"
MODULE = "local_tasks"
# Our metric names ↔ the harness's (its results keys are "<metric>,<filter>", the filter "none").
HARNESS_METRICS = {
    "accuracy": "acc", "accuracy_stderr": "acc_stderr", "accuracy_norm": "acc_norm",
    "accuracy_norm_stderr": "acc_norm_stderr", "word_perplexity": "word_perplexity",
    "byte_perplexity": "byte_perplexity", "bits_per_byte": "bits_per_byte", "exact_match": "exact_match",
    "bleu": "bleu", "rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rougeL",
}
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "word_perplexity": False, "byte_perplexity": False,
                    "bits_per_byte": False, "exact_match": True, "bleu": True, "rouge1": True, "rouge2": True,
                    "rougeL": True}
# The harness's version of the task definitions the local tasks reproduce (metadata.version in its YAMLs).
TASK_VERSIONS = {"wikitext": 2.0, "boolq": 2.0}


class LmEvalUnavailable(ValueError):
    """--backend lm-eval without lm-evaluation-harness installed: a user error with the fix, not a traceback."""


def import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.tasks.wikitext import preprocess_wikitext  # noqa: F401 - the task module the YAMLs use
    except ImportError as err:
        raise LmEvalUnavailable(
            f"--backend lm-eval needs lm-evaluation-harness, which is not installed in this Python "
            f"({sys.executable}: {err}). It is an optional extra: install it with `pip install -r "
            f"requirements-eval.txt` ({LM_EVAL_REQUIREMENT}), or leave out --backend to use the project's own "
            "evaluator (--backend ours), whose WikiText, BoolQ and multiple-choice scores follow the harness's "
            "definitions."
        ) from None
    return lm_eval


@dataclass
class McSource:
    name: str
    path: str
    fields: dict[str, str]
    delimiter: str = " "
    limit: int | None = None


@dataclass
class LocalTasks:
    """The local data sets 05 was given, as harness tasks."""

    wikitext: str | None = None
    wikitext_limit: int | None = None
    detokenize: bool = True
    boolq: str | None = None
    boolq_limit: int | None = None
    mc: list[McSource] = field(default_factory=list)


def _q(value: Any) -> str:
    """A YAML scalar: JSON's double-quoted strings, numbers and null are valid YAML."""
    return json.dumps(value, ensure_ascii=False)


def task_yamls(tasks: LocalTasks) -> dict[str, str]:
    """File name → text of the task YAMLs (and the Python module their `!function`s name)."""
    files: dict[str, str] = {}
    module = [
        "# Written by utils/lm_eval_backend.py for the task YAMLs beside this file.",
        "import sys",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401",
        "from utils import lm_eval_backend as backend",
        "",
    ]
    if tasks.wikitext:
        target = f"!function {MODULE}.wikitext_detokenizer" if tasks.detokenize else _q("{{page}}")
        files["wikitext.yaml"] = f"""task: wikitext
dataset_path: text
dataset_kwargs:
  data_files:
    test: {_q(str(Path(tasks.wikitext).resolve()))}
  sample_by: document
output_type: loglikelihood_rolling
test_split: test
process_docs: !function {MODULE}.wikitext_docs
doc_to_text: ""
doc_to_target: {target}
process_results: !function {MODULE}.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: {TASK_VERSIONS['wikitext']}
"""
        module += ["", "def wikitext_docs(dataset):",
                   f"    return backend.wikitext_docs(dataset, {tasks.wikitext_limit!r})"]
    if tasks.boolq:
        files["boolq.yaml"] = f"""task: boolq
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {_q(str(Path(tasks.boolq).resolve()))}
output_type: multiple_choice
validation_split: validation
process_docs: !function {MODULE}.boolq_docs
doc_to_text: {_q("{{passage}}" + chr(10) + "Question: {{question}}?" + chr(10) + "Answer:")}
doc_to_target: label
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: {TASK_VERSIONS['boolq']}
"""
        module += ["", "def boolq_docs(dataset):", f"    return backend.boolq_docs(dataset, {tasks.boolq_limit!r})"]
    for source in tasks.mc:
        name = f"mc_{source.name}"
        files[f"{name}.yaml"] = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {_q(str(Path(source.path).resolve()))}
output_type: multiple_choice
test_split: test
process_docs: !function {MODULE}.{name}_docs
doc_to_text: context
doc_to_target: answer
doc_to_choice: choices
target_delimiter: {_q(source.delimiter)}
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
        module += ["", f"def {name}_docs(dataset):",
                   f"    return backend.mc_docs(dataset, {source.fields!r}, {source.path!r}, {source.limit!r})"]
    if files:
        files[f"{MODULE}.py"] = "\n".join(module) + "\n"
    return files


def write_tasks(directory: Path, tasks: LocalTasks) -> list[str]:
    """Writes the task YAMLs into `directory`; returns the task names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for name, text in task_yamls(tasks).items():
        (directory / name).write_text(text, encoding="utf-8")
        if name.endswith(".yaml"):
            names.append(name.removesuffix(".yaml"))
    return names


# process_docs functions (called by the harness through the generated module).

def _first(dataset: Any, limit: int | None) -> Any:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def wikitext_docs(dataset: Any, limit: int | None) -> Any:
    """The raw file (one `text` row: `sample_by: document`) → one {"page"} row per harness page."""
    from datasets import Dataset

    from utils.eval_data import wikitext_pages

    pages = wikitext_pages("".join(dataset["text"]))
    return Dataset.from_list([{"page": page} for page in pages[:limit]])


def boolq_docs(dataset: Any, limit: int | None) -> Any:
    """Original BoolQ records (`answer`: true/false) get the SuperGLUE `label` the harness's task reads."""
    dataset = _first(dataset, limit)
    if "label" not in dataset.column_names:
        dataset = dataset.map(lambda doc: {"label": int(doc["answer"])})
    return dataset


def mc_docs(dataset: Any, fields: dict[str, str], path: str, limit: int | None) -> Any:
    """Records with the user's field names → {context, choices, answer index}, validated as ours are."""
    from datasets import Dataset

    from utils.eval_data import choice_item

    items = [choice_item(record, fields, f"{path}, record {i + 1}") for i, record in enumerate(dataset)]
    rows = [{"context": i.context, "choices": list(i.choices), "answer": i.answer} for i in items]
    return _first(Dataset.from_list(rows), limit)


def run_harness(loaded: Any, task_names: Sequence[str], include_dir: Path, batch_size: int, context: int,
                prefix_id: int) -> dict[str, Any]:
    """The harness's `simple_evaluate` on the loaded model (0-shot, no request cache); its results dict."""
    import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, max_length=context,
              prefix_token_id=prefix_id)
    try:
        results = simple_evaluate(model=lm, tasks=list(task_names), log_samples=False,
                                  task_manager=TaskManager(include_path=str(include_dir)))
    except (KeyError, ValueError) as err:
        raise LmEvalUnavailable(f"--backend lm-eval: the harness could not run tasks {', '.join(task_names)} "
                                f"({type(err).__name__}: {err}); harness task names are listed by "
                                "`lm-eval ls tasks`, and tasks not given as local files need the dataset hub") from None
    if results is None:
        raise LmEvalUnavailable("--backend lm-eval: the harness returned no results")
    return json.loads(json.dumps(dict(results), default=_serializable))


def _serializable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def from_harness(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The harness's results → our per-task `{"metrics": {...}}` (its metric names mapped to ours)."""
    ours_by_harness = {v: k for k, v in HARNESS_METRICS.items()}
    tasks: dict[str, dict[str, Any]] = {}
    for task, values in results.get("results", {}).items():
        metrics: dict[str, Any] = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or not isinstance(value, (int, float)):
                continue
            name = ours_by_harness.get(metric, metric)
            metrics[name if filter_name == "none" else f"{name}.{filter_name}"] = value
        samples = (results.get("n-samples") or {}).get(task, {}).get("effective")
        if samples is not None:
            metrics["samples"] = samples
        tasks[task] = {"metrics": metrics, "alias": values.get("alias", task)}
    return tasks


def lm_eval_shape(results: dict[str, Any]) -> dict[str, Any]:
    """Our results.json → the JSON the harness writes (`results[task]["acc,none"]`, `configs`, `versions`,
    `n-shot`, `higher_is_better`, `n-samples`, `config`), for the tasks it has: wikitext, boolq, mc.<name>
    (as `mc_<name>`) and generate's reference scores. Tools that read harness output read this file."""
    flat_tasks: dict[str, dict[str, Any]] = {}
    for name, task in results.get("tasks", {}).items():
        if name == "mc":
            flat_tasks.update({f"mc_{sub}": t for sub, t in task.items() if isinstance(t, dict) and "metrics" in t})
        elif name in ("wikitext", "boolq", "generate") and "metrics" in task:
            flat_tasks[name] = task
    out: dict[str, Any] = {"results": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
                           "higher_is_better": {}, "n-samples": {}}
    for name, task in flat_tasks.items():
        metrics = task["metrics"]
        row: dict[str, Any] = {"alias": name}
        better: dict[str, bool] = {}
        for ours, harness in HARNESS_METRICS.items():
            if ours in metrics and not harness.endswith("_stderr"):
                value = metrics[ours]
                row[f"{harness},none"] = value if value is None or math.isfinite(value) else None
                stderr = metrics.get(f"{ours}_stderr")
                row[f"{harness}_stderr,none"] = stderr if stderr is not None and math.isfinite(stderr) else "N/A"
                better[harness] = HIGHER_IS_BETTER[harness]
        out["results"][name] = row
        out["group_subtasks"][name] = []
        out["configs"][name] = {"task": name, "dataset_path": task.get("source"), "num_fewshot": 0,
                                "output_type": _output_type(name),
                                "metadata": {"version": TASK_VERSIONS.get(name, 1.0)}}
        out["versions"][name] = TASK_VERSIONS.get(name, 1.0)
        out["n-shot"][name] = 0
        out["higher_is_better"][name] = better
        used = task.get("used", metrics.get("samples", metrics.get("documents")))
        out["n-samples"][name] = {"original": task.get("records", used), "effective": used}
    settings = results.get("settings", {})
    checkpoint = results.get("checkpoint", {})
    out["config"] = {
        "model": "project-evaluator (scripts/05_evaluate.py --backend ours)",
        "model_args": f"pretrained={checkpoint.get('path')}",
        "model_num_parameters": checkpoint.get("parameters"),
        "batch_size": settings.get("batch_size"),
        "device": (results.get("environment") or {}).get("device", settings.get("device")),
        "prefix_token_id": settings.get("prefix_token_id"),
        "max_length": settings.get("context_length"),
    }
    env = results.get("environment") or {}
    out.update(git_hash=env.get("git_commit"), date=datetime.now(UTC).timestamp(),
               model_name=str(checkpoint.get("path")), model_source="hf",
               total_evaluation_time_seconds=str((results.get("seconds") or {}).get("total")))
    return out


def _output_type(task: str) -> str:
    return {"wikitext": "loglikelihood_rolling", "generate": "generate_until"}.get(task, "multiple_choice")


def lm_eval_version() -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version("lm_eval")
    except Exception:  # noqa: BLE001 - not installed
        return None


HARNESS_TASKS = ("wikitext", "boolq", "mc")


def evaluate(args: Any, tasks: Sequence[str], data: dict[str, Any], skipped: dict[str, str], loaded: Any,
             context: int, prefix_id: int, output_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """05's `--backend lm-eval`: the tasks of `tasks` the harness has, on the data 05 read (local files as
    generated tasks, `hub` as the harness's own tasks), plus --lm_eval_tasks. Returns 05's per-task results
    (with the sources' hashes and counts) and the harness's own results dict."""
    from utils.eval_data import is_hub, parse_field_map

    run = [t for t in tasks if t in HARNESS_TASKS and t not in skipped]
    local = LocalTasks(detokenize=args.wikitext_detokenize)
    names: list[str] = []
    if "wikitext" in run:
        if is_hub(args.wikitext_path):
            names.append("wikitext")
        else:
            local.wikitext, local.wikitext_limit = args.wikitext_path, args.wikitext_limit
    if "boolq" in run:
        if is_hub(args.boolq_path):
            names.append("boolq")
        else:
            local.boolq, local.boolq_limit = args.boolq_path, args.boolq_limit
    if "mc" in run:
        from utils.eval_data import mc_task_name

        fields = parse_field_map(args.mc_fields)
        local.mc = [McSource(mc_task_name(p), p, fields, args.mc_delimiter, args.mc_limit) for p in args.mc_path]
    tasks_dir = output_dir / TASKS_DIR
    names += write_tasks(tasks_dir, local)
    extra = [t.strip() for t in (args.lm_eval_tasks or "").split(",") if t.strip()]
    names += [t for t in extra if t not in names]
    if not names:
        return {}, {}
    print(f"lm-evaluation-harness {lm_eval_version()}: tasks {', '.join(names)} (task YAMLs in {tasks_dir})")
    raw = run_harness(loaded, names, tasks_dir, args.batch_size, context, prefix_id)
    harness = from_harness(raw)
    results: dict[str, Any] = {}
    if "wikitext" in run:
        pages, info = data["wikitext"]
        metrics = harness.pop("wikitext")["metrics"]
        metrics["documents"] = metrics.pop("samples", len(pages))
        results["wikitext"] = {**info.as_dict(used=len(pages)), "detokenized": args.wikitext_detokenize,
                               "metrics": metrics}
    if "boolq" in run:
        items, info = data["boolq"]
        results["boolq"] = {**info.as_dict(used=len(items)), "metrics": _with_baseline(harness.pop("boolq"), items)}
    if "mc" in run:
        results["mc"] = {}
        for name, (items, info) in data["mc"].items():
            results["mc"][name] = {**info.as_dict(used=len(items)), "fields": parse_field_map(args.mc_fields),
                                   "metrics": _with_baseline(harness.pop(f"mc_{name}"), items)}
    if harness:
        results["lm_eval"] = harness
    return results, raw


def _with_baseline(task: dict[str, Any], items: Sequence[Any]) -> dict[str, Any]:
    from collections import Counter

    metrics = dict(task["metrics"])
    metrics["majority_baseline"] = Counter(i.answer for i in items).most_common(1)[0][1] / len(items)
    # The harness reports no count of left-truncated inputs, and no standard error for one question.
    for key in ("accuracy_stderr", "accuracy_norm_stderr", "truncated"):
        metrics.setdefault(key, None)
    return metrics
