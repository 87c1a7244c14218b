"""Peak resident memory of training on a generated 2 GB JSONL with ``data.streaming``.

    python bench/stream_memory.py [--gib 2] [--steps 20] [--workdir /tmp/qfine-stream]

Writes a JSONL of chat rows of about ``--gib`` GiB, trains the bundled model on it for ``--steps``
steps with streaming on, and prints the process's peak RSS next to the file size. Rows are read
and tokenized only as the trainer consumes them, so the peak does not grow with the file.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path


def write_big_jsonl(path: Path, gib: float) -> int:
    """Write chat rows until the file reaches ``gib`` GiB; returns the number of rows."""
    target = int(gib * 2**30)
    rows = 0
    with path.open("w", encoding="utf-8") as f:
        size = 0
        while size < target:
            chunk = "".join(json.dumps({"messages": [
                {"role": "user", "content": f"Question {rows + i}: what is {rows + i} plus one?"},
                {"role": "assistant", "content": f"{rows + i} plus one is {rows + i + 1}."}]}) + "\n"
                for i in range(10000))
            f.write(chunk)
            size += len(chunk)
            rows += 10000
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/qfine-stream")
    args = ap.parse_args()

    from qfine import config as C
    from qfine.training import train

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    rows = write_big_jsonl(work / "big.jsonl", args.gib)
    size = (work / "big.jsonl").stat().st_size
    print(f"wrote {size / 2**30:.2f} GiB ({rows:,} rows) in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = C.RunConfig(output_dir=str(work / "run"))
    cfg.data = C.DataConfig(path=str(work / "big.jsonl"), streaming=True, max_seq_len=128)
    cfg.train = C.TrainConfig(max_steps=args.steps, batch_size=4, save_steps=args.steps)
    t1 = time.perf_counter()
    train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"trained {args.steps} steps in {time.perf_counter() - t1:.0f} s streaming a {size / 2**30:.2f} GiB file; "
          f"peak RSS {peak / 2**30:.2f} GiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
