"""Weight sync to a separate generator: peak extra memory and time, streamed layer by layer vs the
whole state dict at once (how `VLLMBackend.update_weights` worked before issue 20).

    python bench/bench_weight_sync.py [--models tiny:qwen3_vl small] [--repeats 5] [--no-fsdp] [--vllm]

Each scenario syncs a trained copy of the model into a generator copy of the checkpoint (loaded in
the generator's dtype, bf16; each tensor copied in by name, as vLLM's `load_weights` does):

* one process: the trainer in float32, cast to bf16 on the way;
* LoRA (bf16 trainer): the old way merged the adapters in place and unmerged them after; the
  bench also reports how far that moves the frozen bf16 base weights over --drift-syncs syncs;
* FSDP2 on 2 ranks (gloo on CPU, NCCL on GPUs when two exist): the old way gathered every shard
  at once (`full_tensor` over the state dict); the stream gathers one layer at a time.

Peak extra memory: the most bytes of new tensor storage alive at once during a sync
(`agents.tensor_memory.TensorMemoryMeter`, exact on CPU where torch keeps no allocator statistics;
on a GPU `torch.cuda.max_memory_allocated` is printed beside it). Time: the median of --repeats.
--vllm (GPU): also times `VLLMBackend.update_weights` into a real vLLM engine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from agents.policy import Policy  # noqa: E402
from agents.tensor_memory import TensorMemoryMeter  # noqa: E402
from agents.weight_stream import export_name, stream_weights  # noqa: E402

GENERATOR_DTYPE = torch.bfloat16
MB = 1e6


def whole_state_sync(model, load) -> None:
    """The old `update_weights`: adapters merged in place, every (gathered) tensor at once, unmerged."""
    merged = hasattr(model, "merge_adapter")
    if merged:
        model.merge_adapter()
    try:
        state = {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in model.state_dict().items()}
        if merged:
            state = {name: t for name, t in state.items() if "lora_" not in name}
        load([(export_name(name), t) for name, t in state.items()])
    finally:
        if merged:
            model.unmerge_adapter()


def generator_copy(spec: str, device: str):
    """The generator's weights: the checkpoint in bf16, and a loader that copies tensors in by name."""
    params = dict(Policy.load(spec, dtype="bfloat16", device=device).model.named_parameters())

    def load(pairs) -> None:
        with torch.no_grad():
            for name, tensor in pairs:
                if name in params:  # the state dict also lists buffers
                    params[name].copy_(tensor)
    return load


def measure(sync, model, load, repeats: int, device: str) -> dict:
    """Peak extra bytes (meter; CUDA allocator too) and median seconds of `sync(model, load)`."""
    sync(model, load)  # warm-up (first calls allocate caches)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    with TensorMemoryMeter() as meter:
        sync(model, load)
    cuda_peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else None
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sync(model, load)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak": meter.peak_bytes, "cuda_peak": cuda_peak, "seconds": statistics.median(times)}


def stream_sync(model, load) -> None:
    stream_weights(model, load, dtype=GENERATOR_DTYPE, trainable_only=True)  # as VLLMBackend.update_weights


def trained(policy: Policy) -> Policy:
    """The policy after some training: every trainable weight moved a little (same on every rank)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name or "lora_" not in name:
                param.add_(torch.randn_like(param) * 0.01)
    return policy


def base_drift(spec: str, device: str, syncs: int) -> dict:
    """Largest change of the frozen bf16 base weights of a LoRA policy after `syncs` syncs."""
    out = {}
    for label, sync in (("whole state", whole_state_sync), ("stream", stream_sync)):
        policy = trained(Policy.load(spec, dtype="bfloat16", device=device, lora=dict(r=8, alpha=16)))
        base = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" not in n}
        load = generator_copy(spec, device)
        for _ in range(syncs):
            sync(policy.model, load)
        params = dict(policy.model.named_parameters())
        out[label] = max(float((params[n].float() - w.float()).abs().max()) for n, w in base.items())
    return out


def single_process(spec: str, repeats: int, device: str, drift_syncs: int) -> list[dict]:
    rows = []
    policy = trained(Policy.load(spec, dtype="float32", device=device))
    load = generator_copy(spec, device)
    for label, sync in (("whole state", whole_state_sync), ("stream", stream_sync)):
        rows.append({"scenario": "one process, fp32 -> bf16", "method": label,
                     **measure(sync, policy.model, load, repeats, device)})
    lora = trained(Policy.load(spec, dtype="bfloat16", device=device, lora=dict(r=8, alpha=16)))
    drift = base_drift(spec, device, drift_syncs)
    for label, sync in (("whole state", whole_state_sync), ("stream", stream_sync)):
        rows.append({"scenario": "LoRA, bf16", "method": label, "drift": drift[label],
                     **measure(sync, lora.model, load, repeats, device)})
    return rows


def fsdp_worker(spec: str, repeats: int, out: str) -> None:
    """One rank of the FSDP2 scenario (run by torchrun); rank 0 writes the rows."""
    import torch.distributed as dist

    from algos.distributed import fsdp2_wrap, init_distributed

    info = init_distributed()
    device = info.device.type
    policy = trained(Policy.load(spec, dtype="float32", device=info.device))
    fsdp2_wrap(policy.model, mixed_precision=None)
    load = generator_copy(spec, str(info.device))
    rows = [{"scenario": f"FSDP2, {dist.get_world_size()} ranks, fp32 -> bf16", "method": label,
             **measure(sync, policy.model, load, repeats, device)}
            for label, sync in (("whole state", whole_state_sync), ("stream", stream_sync))]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()  # no rank tears down the process group while its peer may still be reading
    dist.destroy_process_group()


def fsdp(spec: str, repeats: int) -> list[dict]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    ranks = 2 if not torch.cuda.is_available() else min(2, torch.cuda.device_count())
    if ranks < 2:
        return []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "rows.json"
        subprocess.run([torchrun, "--standalone", f"--nproc_per_node={ranks}", __file__, "--fsdp-worker",
                        "--models", spec, "--repeats", str(repeats), "--out", str(out)], check=True, env=env)
        return json.loads(out.read_text())


def vllm_rows(spec: str, repeats: int) -> list[dict]:
    """`VLLMBackend.update_weights` into a real engine (GPU, vLLM installed)."""
    from agents.vllm_backend import VLLMBackend

    policy = trained(Policy.load(spec, dtype="bfloat16", device="cuda"))
    backend = VLLMBackend(policy, gpu_memory_utilization=0.3, max_model_len=4096, enforce_eager=True)
    backend.update_weights(policy.model)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.update_weights(policy.model)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return [{"scenario": "vLLM engine, bf16", "method": "stream", "peak": None,
             "cuda_peak": torch.cuda.max_memory_allocated() - before, "seconds": statistics.median(times)}]


def report(spec: str, rows: list[dict]) -> None:
    params = sum(p.numel() for p in Policy.load(spec).model.parameters())
    print(f"\n{spec}: {params / 1e6:.2f} M parameters ({params * 4 / MB:.2f} MB in fp32, "
          f"{params * 2 / MB:.2f} MB in bf16); generator copy in bf16")
    print(f"{'scenario':<34}{'method':<14}{'peak extra MB':>14}{'CUDA peak MB':>14}{'sync ms':>10}{'drift':>10}")
    for row in rows:
        cuda = "" if row.get("cuda_peak") is None else f"{row['cuda_peak'] / MB:.3f}"
        peak = "" if row.get("peak") is None else f"{row['peak'] / MB:.3f}"
        drift = "" if "drift" not in row else f"{row['drift']:.1e}"
        print(f"{row['scenario']:<34}{row['method']:<14}{peak:>14}{cuda:>14}{row['seconds'] * 1e3:>10.1f}{drift:>10}")
    by = {(r["scenario"], r["method"]): r for r in rows}
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        old, new = by.get((scenario, "whole state")), by.get((scenario, "stream"))
        if old and new and old["peak"]:
            print(f"  {scenario}: stream peak = {new['peak'] / old['peak']:.3f} of whole state, "
                  f"time x{new['seconds'] / old['seconds']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny:qwen3_vl", "small"],
                        help="model specs; 'small' is agents.small's ~2 M parameter Qwen3-VL")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--drift-syncs", type=int, default=20, help="syncs before measuring the LoRA base drift")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the two-rank FSDP2 scenario")
    parser.add_argument("--vllm", action="store_true", help="also time VLLMBackend.update_weights (GPU)")
    parser.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    specs = [str(small_dir()) if spec == "small" else spec for spec in args.models]
    if args.fsdp_worker:
        fsdp_worker(specs[0], args.repeats, args.out)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"weight sync bench on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    for spec in specs:
        rows = single_process(spec, args.repeats, device, args.drift_syncs)
        if not args.no_fsdp:
            rows += fsdp(spec, args.repeats)
        if args.vllm:
            rows += vllm_rows(spec, args.repeats)
        report(spec, rows)


def small_dir() -> Path:
    from agents.small import small_model_dir

    return small_model_dir()


if __name__ == "__main__":
    main()
