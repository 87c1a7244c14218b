"""How fast the studio's pages are, in a real browser (Debian's chromium through selenium).

Builds N run folders (config.yaml, 1,000 metrics rows each, an adapter or a status record), starts
``qfine studio`` on them, then measures in headless chromium:

- the studio's start: from the process's start to its printed address;
- the runs page: from navigation to the table holding all N rows (cold: the studio's first read of
  every metrics file; warm: later loads, served from the incremental cache), median of R loads;
- a live curve: a row appended to a run's metrics.jsonl, to the point drawn on its loss chart
  (median of R appends).

    python bench/studio_bench.py [--runs 50] [--rows 1000] [--repeat 7] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import browser  # noqa: E402
from qfine import config as C  # noqa: E402
from qfine.util import runstate  # noqa: E402


def make_runs(root: Path, n: int, rows: int) -> None:
    """``n`` finished/stopped/failed run folders of ``rows`` training rows (an eval row every 50)."""
    for i in range(n):
        run = root / f"run-{i:03d}"
        run.mkdir(parents=True)
        cfg = C.RunConfig(output_dir=str(run))
        cfg.train.max_steps = rows
        (run / "config.yaml").write_text(C.to_yaml(cfg))
        lines = []
        for step in range(1, rows + 1):
            lines.append(json.dumps({"step": step, "epoch": step / rows, "loss": 2.5 * math.exp(-step / 300) + 0.1,
                                     "grad_norm": 1.0 / math.sqrt(step), "lr": 2e-4 * (1 - step / rows),
                                     "tokens_per_s": 11500.0 + (step % 7)}))
            if step % 50 == 0:
                lines.append(json.dumps({"step": step, "eval_loss": 2.4 * math.exp(-step / 320) + 0.2}))
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        state = ("finished", "stopped", "failed")[i % 3]
        if state == "finished":
            (run / "adapter").mkdir()
        runstate.write_status(run, state, "" if state == "finished" else f"{state} at step {rows}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    why = browser.available()
    if why:
        sys.exit(f"studio_bench: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="qfine-studio-bench-"))
    make_runs(tmp / "runs", args.runs, args.rows)
    t0 = time.perf_counter()
    studio = browser.Studio(tmp / "runs", [tmp])
    started = time.perf_counter() - t0  # process start to the printed address
    d = browser.driver()
    try:
        loads = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            d.get(studio.url + "/#/runs")
            browser.wait(lambda: d.execute_script(
                "return document.body.dataset.loaded === 'runs' && "
                "document.querySelectorAll('#runs-table tbody tr').length") == args.runs, 30, "the runs table", 0.005)
            loads.append(time.perf_counter() - t0)
            d.get("about:blank")
        run = tmp / "runs" / "run-000"
        d.get(studio.url + "/#/run/run-000")
        points = lambda: int(d.find_element("id", "chart-loss").get_attribute("data-points") or 0)  # noqa: E731
        browser.wait(lambda: points() >= args.rows, 30, "the loss chart", 0.01)
        live = []
        for i in range(args.repeat):
            before = points()
            step = args.rows + 1 + i
            with (run / "metrics.jsonl").open("a") as f:
                t0 = time.perf_counter()
                f.write(json.dumps({"step": step, "loss": 0.1, "lr": 0.0, "grad_norm": 0.1}) + "\n")
            browser.wait(lambda: points() > before, 10, "the appended row", 0.005)
            live.append(time.perf_counter() - t0)
    finally:
        d.quit()
        studio.close()
    chromium = subprocess.run([browser.CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "machine": f"{platform.machine()}, "
              f"{len(__import__('os').sched_getaffinity(0))} cores", "browser": chromium,
              "runs": args.runs, "rows_per_run": args.rows, "studio_start_s": round(started, 3),
              "runs_page_first_s": round(loads[0], 3), "runs_page_median_s": round(statistics.median(loads), 3),
              "runs_page_max_s": round(max(loads), 3),
              "live_row_median_s": round(statistics.median(live), 3), "live_row_max_s": round(max(live), 3)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
