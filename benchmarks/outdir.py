"""Where benchmark results go: benchmarks/results/local/ (not committed) unless `--publish` asks
for benchmarks/results/, the committed results that the README's tables quote."""
from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_publish_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--publish", action="store_true",
                    help="write into benchmarks/results/ (the committed results); default: benchmarks/results/local/")


def results_dir(publish: bool) -> Path:
    out = RESULTS if publish else RESULTS / "local"
    out.mkdir(parents=True, exist_ok=True)
    return out
