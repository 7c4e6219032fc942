"""The docs cover the code: every make target and variable, every script flag, links that resolve, a short README.

Flags are read from each script's own argparse parser: the script is imported as a module and its
`parse_args()` (or `main()`) runs until it calls `ArgumentParser.parse_args`, which hands the parser back
instead of parsing. No subprocess, no model; the whole file runs in a few seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_DIR = ROOT / "docs"
MAKEFILE = ROOT / "Makefile"
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))
README_MAX_LINES = 250

# The page that documents each script's flags; a script not listed here may document them on any page.
SCRIPT_PAGES = {
    "01_prepare_data.py": "docs/01_prepare_data.md",
    "02_pretrain.py": "docs/02_pretrain.md",
    "03_sft.py": "docs/03_sft.md",
    "04_dpo.py": "docs/04_dpo.md",
    "05_evaluate.py": "docs/05_evaluate.md",
    "06_serve.py": "docs/06_serve.md",
    "07_report.py": "docs/07_report.md",
    "sweep.py": "docs/sweep.md",
    "run_pipeline.py": "docs/pipeline.md",
    "export_gguf.py": "docs/interop.md",
    "check_env.py": "docs/development.md",
    "checkpoints.py": "docs/development.md",
    "create_sample_datasets.py": "docs/development.md",
    "monitor.py": "docs/development.md",
    "show_presets.py": "docs/development.md",
}
# Make's own variables and the Makefile's internal ones, which users do not set.
MAKE_INTERNAL = {"MAKE", "CURDIR", "MAKEFILE_LIST", "SHELL"}


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS_DIR.glob("*.md"))]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def outside_fences(text: str) -> list[str]:
    """The lines of a Markdown text with fenced code blocks blanked out."""
    out, fence = [], None
    for line in text.splitlines():
        marker = re.match(r"\s*(`{3,}|~{3,})", line)
        if marker:
            if fence is None:
                fence = marker.group(1)
            elif marker.group(1).startswith(fence):
                fence = None
            out.append("")
            continue
        out.append("" if fence else line)
    return out


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans: what renders as prose and links."""
    return "\n".join(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line) for line in outside_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (keeping - and _), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in outside_fences(read(path)):
        match = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def make_targets() -> list[str]:
    """Every target with a `## help` text (what `make help` lists), one name per target."""
    names = []
    for line in read(MAKEFILE).splitlines():
        match = re.match(r"^([a-zA-Z0-9_% -]+):.*## ", line)
        if match:
            names += [name for name in match.group(1).split() if "%" not in name]
    return names


def make_variables() -> list[str]:
    """Variables a user can set: `VAR ?= …` ones, and those used but never assigned (PROMPTS, OUTPUT)."""
    text = read(MAKEFILE)
    settable = re.findall(r"^(?:export\s+)?([A-Z][A-Z0-9_]*)\s*\?=", text, flags=re.M)
    assigned = set(re.findall(r"^(?:export\s+)?([A-Z][A-Z0-9_]*)\s*[:?]?=", text, flags=re.M))
    used = re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", text)
    free = [name for name in used if name not in assigned and name not in MAKE_INTERNAL]
    return list(dict.fromkeys(settable + free))


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _hand_back(self: argparse.ArgumentParser, *args, **kwargs):
    raise _Captured(self)


def script_parser(name: str) -> argparse.ArgumentParser:
    """The script's ArgumentParser, as built by its parse_args() or main(), without parsing anything."""
    spec = importlib.util.spec_from_file_location(f"docs_check_{name[:-3]}", ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _hand_back), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", _hand_back):
        spec.loader.exec_module(module)
        build = getattr(module, "parse_args", None) or module.main
        try:
            build()
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"scripts/{name} never called ArgumentParser.parse_args")


def parser_words(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option string (both forms of a --x/--no-x pair) and every subcommand name."""
    words = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                words += [command, *parser_words(sub)]
            continue
        words += [option for option in action.option_strings if option.startswith("--")]
    return list(dict.fromkeys(words))


@pytest.fixture(scope="module")
def all_docs() -> str:
    return "\n".join(read(path) for path in doc_files())


def test_readme_is_short():
    lines = len(read(README).splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines; "
                                       f"keep it to {README_MAX_LINES} and move detail to docs/")


def test_docs_pages_exist():
    expected = {page for page in SCRIPT_PAGES.values()} | {
        "docs/formats.md", "docs/serving.md", "docs/scaling.md", "docs/interop.md", "docs/performance.md",
        "docs/troubleshooting.md", "docs/make.md", "docs/development.md", "docs/design.md",
    }
    missing = sorted(page for page in expected if not (ROOT / page).is_file())
    assert not missing, f"missing docs pages: {missing}"


def test_every_make_target_is_documented(all_docs):
    targets = make_targets()
    assert len(targets) > 20, "parsed too few targets from the Makefile"
    table_cells = "\n".join(line for line in all_docs.splitlines() if line.lstrip().startswith("|"))
    undocumented = [
        target for target in targets
        if not re.search(rf"\bmake\s+{re.escape(target)}(?![\w-])", all_docs)
        and f"`{target}`" not in table_cells
    ]
    assert not undocumented, ("make targets documented nowhere (as `make <target>` or in a targets table): "
                              f"{undocumented}")


def test_make_page_lists_every_target_and_variable():
    page = read(DOCS_DIR / "make.md")
    rows = "\n".join(line for line in page.splitlines() if line.lstrip().startswith("|"))
    missing_targets = [t for t in make_targets() if f"`{t}`" not in rows and not mentions(page, f"make {t}")]
    missing_variables = [v for v in make_variables() if not mentions(page, v)]
    assert not missing_targets, f"docs/make.md lacks targets: {missing_targets}"
    assert not missing_variables, f"docs/make.md lacks variables: {missing_variables}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_flag_is_documented(script, all_docs):
    words = parser_words(script_parser(script))
    page = SCRIPT_PAGES.get(script)
    text = read(ROOT / page) if page else all_docs
    where = page or "README.md or docs/"
    assert text, f"{where} does not exist"
    missing = [word for word in words if not mentions(text, word)]
    assert not missing, f"flags of scripts/{script} missing from {where}: {missing}"


def test_relative_links_resolve():
    broken = []
    for path in doc_files():
        prose = strip_code(read(path))
        for target in re.findall(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto: …
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not linked.exists():
                broken.append(f"{where} -> no such file")
            elif anchor and linked.suffix == ".md" and anchor.lower() not in anchors(linked):
                broken.append(f"{where} -> no heading with anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_outside_design_document():
    """The design contracts live in docs/design.md, not in a document beside the repository."""
    offenders = [str(p.relative_to(ROOT)) for p in doc_files() if "shared/DESIGN.md" in read(p)]
    assert not offenders, f"these point to ../shared/DESIGN.md instead of docs/design.md: {offenders}"


@pytest.mark.parametrize("script", ["02_pretrain.py", "03_sft.py", "04_dpo.py"])
def test_precision_help_states_the_cpu_rule(script):
    """`--mixed_precision auto` trains a CPU with fast bf16 products in bf16 (utils.model.resolve_precision); the
    help once said every CPU trains in fp32."""
    action = next(a for a in script_parser(script)._actions if "--mixed_precision" in a.option_strings)
    assert "fp32 on CPU" not in action.help
    assert "on a CPU, bf16 where" in action.help
