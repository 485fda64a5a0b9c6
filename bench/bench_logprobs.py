"""Peak memory and time of chunked log-probs vs the naive full-logits computation.

    python bench/bench_logprobs.py [--tokens 8192] [--vocab 151936] [--hidden 896] [--chunk 1024] [--backward]

A random hidden-state tensor [tokens, hidden] and a random LM head [vocab, hidden] stand in for a
Qwen-VL model's last layer (the head dominates memory: 8192 x 151,936 float32 logits are 5 GB).
Each measurement runs in a fresh subprocess; the peak is the rise of the process's peak RSS (CPU)
or of `torch.cuda.max_memory_allocated` (GPU) over what the inputs already hold. Both modes compute
log-probs and entropy; --backward adds the backward pass (what training pays).

When the naive computation would not fit in the free memory of this machine, it is measured at the
largest token count that fits and scaled linearly (its memory is exactly linear in tokens: every
big tensor is [tokens, vocab]); the output says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _available_bytes() -> int:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(mode: str, tokens: int, vocab: int, hidden: int, chunk: int, backward: bool, dtype: str) -> dict:
    """One measurement in this process (call in a fresh process for a clean peak)."""
    from agents.logprobs import naive_sequence_logprobs, sequence_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden_BTH = (torch.randn(1, tokens, hidden, device=device) / hidden**0.5).to(dt).requires_grad_(backward)
    weight = torch.randn(vocab, hidden, device=device).to(dt).requires_grad_(backward)
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_bytes()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        if mode == "chunked":
            lp, ent = sequence_logprobs(hidden_BTH, ids, weight, chunk_size=chunk)
        else:
            lp, ent = naive_sequence_logprobs(hidden_BTH @ weight.T, ids)
        if backward:
            (lp.sum() + 0.01 * ent.sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"mode": mode, "tokens": tokens, "peak_bytes": _peak_bytes() - base, "seconds": seconds, "device": device}


def measure(mode: str, tokens: int, args) -> dict:
    command = [sys.executable, __file__, "--run", mode, "--tokens", str(tokens), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--dtype", args.dtype]
    if args.backward:
        command.append("--backward")
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896, help="hidden size (Qwen2-VL-2B: 1536; time scales with it)")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backward", action="store_true", help="include the backward pass")
    parser.add_argument("--run", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.tokens, args.vocab, args.hidden, args.chunk, args.backward, args.dtype)))
        return

    # Naive forward holds ~4 [T, V] float32 tensors (logits, log-softmax, probs, product), more with backward.
    naive_need = (7 if args.backward else 4) * args.tokens * args.vocab * 4
    naive_tokens = args.tokens
    while naive_tokens > 256 and naive_need * naive_tokens / args.tokens > 0.6 * _available_bytes():
        naive_tokens //= 2
    chunked = measure("chunked", args.tokens, args)
    naive = measure("naive", naive_tokens, args)
    scale = args.tokens / naive_tokens
    naive_peak = naive["peak_bytes"] * scale
    naive_time = naive["seconds"] * scale
    gib = 1 << 30
    print(f"{args.tokens} tokens x {args.vocab} vocab, hidden {args.hidden}, {args.dtype}, chunk {args.chunk}, "
          f"{'forward+backward' if args.backward else 'forward'}, device {chunked['device']}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':<10}{'peak GiB':>10}{'seconds':>10}")
    print(f"{'chunked':<10}{chunked['peak_bytes'] / gib:>10.3f}{chunked['seconds']:>10.2f}")
    note = "" if naive_tokens == args.tokens else f"   (measured at {naive_tokens} tokens, scaled x{scale:g})"
    print(f"{'naive':<10}{naive_peak / gib:>10.3f}{naive_time:>10.2f}{note}")
    print(f"chunked peak = {chunked['peak_bytes'] / naive_peak:.3f} of naive (goal <= 0.1)")


if __name__ == "__main__":
    main()
