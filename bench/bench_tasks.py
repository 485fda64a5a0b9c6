"""Tasks generated per second, per category, on one core; parquet write/read throughput.

    python bench/bench_tasks.py [--n 200] [--difficulty 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cv_env.tasks import CATEGORIES, RobustnessWrapper, SyntheticSuite, read_parquet, write_parquet


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f}/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="tasks per category")
    parser.add_argument("--difficulty", default="1", choices=["0", "1", "2", "mixed"])
    args = parser.parse_args()
    difficulty = args.difficulty if args.difficulty == "mixed" else int(args.difficulty)

    print(f"generation, {args.n} tasks per category, difficulty {args.difficulty}")
    print(f"{'category':24s} {'tasks/s':>10s}  {'image size (first)':>18s}")
    for name in CATEGORIES:
        suite = SyntheticSuite(name, split="train", seed=1, size=args.n, difficulty=difficulty)
        suite[0]  # warm the font cache
        start = time.perf_counter()
        for i in range(len(suite)):
            task = suite[i]
        seconds = time.perf_counter() - start
        print(f"{name:24s} {rate(args.n, seconds):>10s}  {str(task.images[0].size):>18s}")

    suite = SyntheticSuite(None, split="train", seed=1, size=args.n, difficulty=difficulty)
    start = time.perf_counter()
    tasks = [suite[i] for i in range(len(suite))]
    print(f"{'default mix':24s} {rate(len(tasks), time.perf_counter() - start):>10s}")
    wrapped = RobustnessWrapper(suite)
    start = time.perf_counter()
    for i in range(min(len(wrapped), 6 * 50)):
        wrapped[i]
    print(f"{'robustness wrapper x6':24s} {rate(min(len(wrapped), 300), time.perf_counter() - start):>10s}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        start = time.perf_counter()
        write_parquet(tasks, path)
        seconds = time.perf_counter() - start
        mb = path.stat().st_size / 2**20
        print(f"\nparquet write  {rate(len(tasks), seconds)}  ({mb:.1f} MiB for {len(tasks)} tasks)")
        start = time.perf_counter()
        n = sum(1 for _ in read_parquet(path))
        print(f"parquet stream {rate(n, time.perf_counter() - start)}")
        src = read_parquet(path)
        start = time.perf_counter()
        for i in range(0, len(src), 7):
            src[i]
        print(f"parquet random {rate(len(range(0, len(src), 7)), time.perf_counter() - start)}")


if __name__ == "__main__":
    main()
