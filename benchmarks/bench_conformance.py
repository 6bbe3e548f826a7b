"""How long the full CPU conformance run takes: every catalog case on the three CPU backends.

Times, on this machine: generating the catalog from scratch (into a temporary folder, as a cold
``.fixtures-cache/`` would), then ``pytest conformance --backend NAME -n WORKERS`` for
``reference``, ``compressed-tensors`` and ``transformers`` one after the other (the cache warm),
and prints each with its verdict counts and the total. The budget is 5 minutes on 2 cores.

    python benchmarks/bench_conformance.py [--workers 2] [--backends reference,transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("reference", "compressed-tensors", "transformers")
BUDGET_S = 300


def generate_cold(workers: int) -> float:
    """Seconds to generate every catalog case into an empty folder."""
    from ctref.fixtures import generate

    with tempfile.TemporaryDirectory() as out, open(os.devnull, "w") as quiet:
        start = time.perf_counter()
        summary = generate.generate(Path(out), jobs=workers, log=quiet)
        seconds = time.perf_counter() - start
    if summary["failed"]:
        raise SystemExit(f"fixture generation failed: {summary['failed']}")
    return seconds


def run_backend(backend: str, workers: int) -> tuple[float, dict[str, int], int]:
    """Seconds, verdict counts and exit status of one full conformance run."""
    with tempfile.TemporaryDirectory() as reports:
        command = [
            sys.executable, "-m", "pytest", "conformance", "--backend", backend,
            "-n", str(workers), "-q", "-p", "no:cacheprovider", "--report-dir", reports,
        ]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        results = Path(reports) / "results.json"
        counts = json.loads(results.read_text())["counts"] if results.exists() else {}
    if not counts:
        print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
    return seconds, counts, result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    options = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores, {options.workers} workers")
    generation = generate_cold(options.workers)
    print(f"{'catalog generation (cold)':<28} {generation:7.1f} s")
    total = generation
    for backend in options.backends.split(","):
        seconds, counts, status = run_backend(backend, options.workers)
        total += seconds
        verdicts = ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n)
        print(f"{backend:<28} {seconds:7.1f} s  exit {status}  {verdicts}")
    verdict = "within" if total <= BUDGET_S else "OVER"
    print(f"{'total':<28} {total:7.1f} s  ({verdict} the {BUDGET_S} s budget)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
