"""Start-up time and peak memory of `qfine --help`, `qfine train --help` and `qfine --version`.

Each command runs ``--repeats`` times in a fresh process; the median wall time and the largest peak
resident memory are printed. Run: ``.venv/bin/python bench/cli_startup.py``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["train", "--help"], ["generate", "--help"], ["--version"])


def measure(args: list[str], repeats: int) -> tuple[float, float]:
    """(median seconds, peak RSS MiB) of ``python -m qfine ARGS``."""
    times, peak = [], 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qfine", *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        # children's peak RSS so far (KiB on Linux): the largest of the runs
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=10)
    ns = ap.parse_args()
    print(f"{'command':<28} {'median s':>9} {'peak MiB':>9}")
    for args in COMMANDS:
        seconds, mib = measure(args, ns.repeats)
        print(f"{'qfine ' + ' '.join(args):<28} {seconds:>9.3f} {mib:>9.1f}")
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
