"""Sandbox vs unguarded in-process `exec` on the same snippets (1024x768 RGB image).

    python bench/bench_sandbox.py [--calls 200] [--workers 2] [--callers 2] [--max-calls-per-worker 200]

Prints p50/p95 latency of sequential calls, and calls/s with `callers` threads (default: one
per worker) sharing one Sandbox of `workers` workers, next to unguarded single-thread `exec`
(no isolation, no op detection, no checks), with ratios. Every sandboxed call goes through both layers and the host's checks (a crop or a
rotation is verified against the pixels). `--max-calls-per-worker 1` measures a fresh worker
for every call.

cpu/call is the whole machine's busy CPU time per sandboxed call during the throughput run (host,
workers and anything else running: measure on a quiet machine), and ceiling is the throughput
ratio this machine allows at that cost with every core busy: cpus / cpu-per-call / exec calls/s.
A ratio target above the ceiling needs more cores or less CPU per call, not less waiting.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np

SNIPPETS = {
    "crop": "w, h = image.size\nresult = image.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))",
    "rotate": "result = image.rotate(90, expand=True)",
    "enhance": "result = ImageEnhance.Contrast(image).enhance(1.5)",
}


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def unguarded(code, image, calls):
    import cv2
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    names = {"image": image, "img": image, "images": [image], "Image": Image, "ImageOps": ImageOps,
             "ImageEnhance": ImageEnhance, "ImageFilter": ImageFilter, "np": np, "cv2": cv2}
    codes = code if isinstance(code, list) else [code]
    compiled = [compile(c, "<code>", "exec") for c in codes]
    times = []
    start = time.perf_counter()
    for i in range(calls):
        t = time.perf_counter()
        exec(compiled[i % len(compiled)], dict(names))  # noqa: S102 - the baseline being measured
        times.append(time.perf_counter() - t)
    return times, calls / (time.perf_counter() - start)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, every process)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def sandboxed(sandbox, code, image, calls, threads):
    """(sequential latencies, calls/s with `threads` callers, machine CPU seconds per call in that run)."""
    codes = code if isinstance(code, list) else [code]
    times = []
    for i in range(calls):
        r = sandbox.run(codes[i % len(codes)], [image])
        assert r.ok, r.error
        times.append(r.elapsed_s)
    done = [0]
    lock = threading.Lock()

    def loop(n):
        for i in range(n):
            assert sandbox.run(codes[i % len(codes)], [image]).ok
            with lock:
                done[0] += 1

    workers = [threading.Thread(target=loop, args=(calls // threads,)) for _ in range(threads)]
    start, busy = time.perf_counter(), machine_busy_s()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return times, done[0] / (time.perf_counter() - start), (machine_busy_s() - busy) / max(1, done[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--callers", type=int, default=None, help="threads calling run (default: one per worker)")
    parser.add_argument("--max-calls-per-worker", type=int, default=200)
    args = parser.parse_args()
    callers = args.callers or args.workers
    from PIL import Image

    from cv_env.sandbox import Sandbox

    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 255, (768, 1024, 3), dtype=np.uint8))
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} calls={args.calls} workers={args.workers} "
          f"callers={callers} max_calls_per_worker={args.max_calls_per_worker}")
    with Sandbox(workers=args.workers, timeout_s=10.0, memory_mb=1024,
                 max_calls_per_worker=args.max_calls_per_worker) as sandbox:
        print("layers:", {k: v for k, v in sandbox.layers.items() if v})
        header = (f"{'snippet':8} {'exec p50':>9} {'p95':>7} {'calls/s':>8} | {'sandbox p50':>11} {'p95':>7} "
                  f"{'overhead':>8} {'calls/s':>8} {'thr ratio':>9} | {'cpu/call':>8} {'ceiling':>8}")
        print(header)
        runs = [(name, code) for name, code in SNIPPETS.items()]
        runs.append(("mix", list(SNIPPETS.values())))  # the three snippets in turn: a realistic blend
        for name, code in runs:
            threads = callers
            sandboxed(sandbox, code, image, 10, threads)  # warm up
            u_t, u_rate = unguarded(code, image, args.calls)
            s_t, s_rate, cpu = sandboxed(sandbox, code, image, args.calls, threads)
            # What this machine allows at best: all its cores busy with sandboxed calls at that CPU cost each.
            ceiling = os.cpu_count() / cpu / u_rate if cpu > 0 else float("nan")
            print(f"{name:8} {percentile(u_t, 50):8.2f}ms {percentile(u_t, 95):6.2f}ms {u_rate:8.1f} | "
                  f"{percentile(s_t, 50):10.2f}ms {percentile(s_t, 95):6.2f}ms "
                  f"{percentile(s_t, 50) - percentile(u_t, 50):+7.2f}ms {s_rate:8.1f} {s_rate / u_rate:8.2f}x | "
                  f"{cpu * 1000:6.2f}ms {ceiling:7.2f}x")


if __name__ == "__main__":
    main()
