"""Generation speed of the tiny Qwen-VL models on CPU (for spotting regressions).

    python bench/bench_generate.py [--families qwen2_vl qwen3_vl] [--batch 1 8] [--new-tokens 32]

Prints, per family and batch size: prompt length, time to load processor + model, and generated
tokens per second (batch x new tokens / wall time of `model.generate`, median of --repeats runs).
Prompts are left-padded image+text chat prompts of different lengths, as the rollout engine sends.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from agents.loading import load_model, load_processor  # noqa: E402
from agents.tiny import FAMILIES  # noqa: E402


def _prompts(batch: int):
    rng = np.random.default_rng(0)
    conversations, images = [], []
    for i in range(batch):
        size = (64 + 32 * (i % 3), 64)
        images.append([Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))])
        question = "What is written on the sign? " * (1 + i % 4)
        conversations.append(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        )
    return conversations, images


def bench(family: str, batch: int, new_tokens: int, repeats: int) -> dict:
    start = time.perf_counter()
    processor = load_processor(f"tiny:{family}")
    model = load_model(f"tiny:{family}", dtype="float32", device="cpu")
    load_s = time.perf_counter() - start
    processor.tokenizer.padding_side = "left"
    conversations, images = _prompts(batch)
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first run warms up kernels and caches
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - t0)
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    wall = statistics.median(times[1:])
    return dict(prompt=inputs["input_ids"].shape[1], load_s=load_s, tok_s=batch * new_tokens / wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, greedy")
    print(f"{'family':<12}{'batch':>6}{'prompt':>8}{'load s':>8}{'tokens/s':>10}")
    for family in args.families:
        for batch in args.batch:
            r = bench(family, batch, args.new_tokens, args.repeats)
            print(f"{family:<12}{batch:>6}{r['prompt']:>8}{r['load_s']:>8.2f}{r['tok_s']:>10.1f}")


if __name__ == "__main__":
    main()
