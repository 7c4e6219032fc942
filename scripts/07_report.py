#!/usr/bin/env python
"""The run report: one Markdown run card, with PNG plots, from everything the pipeline stages wrote.

Reads data/processed/*/meta.json (+ summary.json), checkpoints/{pretrain,sft,dpo}/<preset>/summary.json and
metrics.jsonl, evaluation_results/**/results.json and runs/sweep/*/trials.json; writes <output_dir>/report.md and
<output_dir>/plots/{loss,learning_rate,evaluation}.png. Missing parts are listed in the report, not errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.cli import StageSummary, run_main
from utils.files import atomic_write_text
from utils.report import collect_run, render_run_report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="the run's root: the default dirs below are inside it")
    parser.add_argument("--data_dir", default=None, help="processed data sets (default: <root>/data/processed)")
    parser.add_argument("--checkpoints_dir", default=None, help="training stage outputs (default: <root>/checkpoints)")
    parser.add_argument("--results_dir", default=None,
                        help="searched recursively for results.json (default: <root>/evaluation_results)")
    parser.add_argument("--sweeps_dir", default=None,
                        help="hyper-parameter sweeps of scripts/sweep.py (default: <root>/runs/sweep)")
    parser.add_argument("--output_dir", default=None, help="where report.md and plots/ go (default: <root>/reports)")
    parser.add_argument("--title", default="Training run report", help="the report's heading")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    root = Path(args.root)
    output_dir = Path(args.output_dir or root / "reports")
    summary = StageSummary("report", output_dir=str(output_dir))
    run = collect_run(Path(args.data_dir or root / "data" / "processed"),
                      Path(args.checkpoints_dir or root / "checkpoints"),
                      Path(args.results_dir or root / "evaluation_results"),
                      Path(args.sweeps_dir or root / "runs" / "sweep"))
    markdown, plots = render_run_report(run, output_dir, title=args.title)
    atomic_write_text(output_dir / "report.md", markdown)
    summary.add(
        datasets=len(run.datasets),
        stages=[f"{s.stage}/{s.preset}" for s in run.stages],
        evaluations=len(run.evaluations),
        sweeps=len(run.sweeps),
        plots=[str(p) for p in plots],
        missing=run.notes,
        report=str(output_dir / "report.md"),
    )
    summary.finish(output_dir)


if __name__ == "__main__":
    run_main(main)
