"""The checks of `bash scripts/gpu_check.sh`, one per process (vLLM engines are not shared):

    python scripts/gpu_check.py family qwen3_vl     # log-prob parity, stale-encoder-cache check and its counter-check
    python scripts/gpu_check.py grpo colocated      # three GRPO steps on vLLM (also: lora, freeze_vision)
    torchrun --nproc_per_node N scripts/gpu_check.py fsdp          # FSDP2 on NCCL, placement, streamed sync
    torchrun --nproc_per_node 2 scripts/gpu_check.py grpo fsdp     # GRPO under torchrun with trainer.fsdp=true
    python scripts/gpu_check.py throughput          # our rollout engine vs raw LLM.generate

Each check prints one line per verdict, `PASS <name>: <figures>` or `FAIL <name>: <figures>`, and
exits with 3 when one failed (a crash exits with 1). Models are the tiny and small ones built
offline (no model hub). Log-probs are compared where the trainer learns from them: the sampled
tokens of rollouts with images, the sampler's (vLLM, bf16) against the trainer's recomputation (bf16).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agents.policy import Policy  # noqa: E402
from agents.rollout import RolloutEngine  # noqa: E402
from agents.vllm_backend import VLLMBackend, sampling_kwargs, vllm_prompt  # noqa: E402
from algos.scoring import score_trajectories  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from cv_env.tasks import load_tasks  # noqa: E402

# bf16 sampler vs bf16 trainer: PASS when both hold over the sampled tokens. (On CPU the tiny models'
# bf16 log-probs differ from float32 ones by ~7e-4 on average and ~3e-3 at most.)
TOLERANCE_MAX = 0.1
TOLERANCE_MEAN = 0.01
# A vision update must move the trainer's log-probs by this much on average, or a stale encoder
# cache could not be told from a fresh one (on CPU the re-drawn tower moves them by ~0.06).
DETECTABLE = 3 * TOLERANCE_MEAN
# Short episodes whose prompts are mostly image: no tool schemas (prompt "compact"), large images.
ENV = dict(max_turns=2, max_pixels=448 * 448, prompt="compact")
SAMPLING = dict(temperature=1.0, max_new_tokens=32)
BACKEND = dict(gpu_memory_utilization=0.2, max_model_len=4096, enforce_eager=True, max_images=4)
VERDICT_FAILED = 3  # the exit code when a check's verdict was FAIL (a crash exits 1)


def verdict(ok: bool, name: str, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def sampled(trajectories, per_token) -> torch.Tensor:
    """The values of `per_token` (one sequence per trajectory) at the sampled tokens, concatenated."""
    return torch.cat([torch.as_tensor(values, dtype=torch.float32)[torch.tensor(t.loss_mask, dtype=torch.bool)]
                      for values, t in zip(per_token, trajectories)])


def gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |a - b|."""
    d = (a - b).abs()
    return float(d.max()), float(d.mean())


def parity(policy, trajectories) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sampler's log-probs, the trainer's recomputation) at the sampled tokens."""
    return (sampled(trajectories, [t.sampler_logprobs for t in trajectories]),
            sampled(trajectories, score_trajectories(policy, trajectories, micro_batch_size=8)))


def within(max_gap: float, mean_gap: float) -> bool:
    return max_gap < TOLERANCE_MAX and mean_gap < TOLERANCE_MEAN


def figures(max_gap: float, mean_gap: float) -> str:
    return f"max |Δ| {max_gap:.4f}, mean |Δ| {mean_gap:.5f} (PASS below max {TOLERANCE_MAX}, mean {TOLERANCE_MEAN})"


# -- vLLM generation, log-probs and the encoder cache, per tiny family --------------------------------


@contextlib.contextmanager
def vision_weights(policy, weights):
    """The vision tower temporarily set to `weights`."""
    visual = policy.model.model.visual
    saved = {n: p.detach().clone() for n, p in visual.named_parameters()}
    _load_vision(visual, weights)
    try:
        yield
    finally:
        _load_vision(visual, saved)


def _load_vision(visual, weights) -> None:
    with torch.no_grad():
        for name, param in visual.named_parameters():
            param.copy_(weights[name])


def redraw_vision(policy, seed: int) -> dict[str, torch.Tensor]:
    """A training step that changes the whole vision tower (fresh random matrices, as the tiny model's
    init); returns the old weights."""
    visual = policy.model.model.visual
    old = {n: p.detach().clone() for n, p in visual.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in visual.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator).mul(0.02).to(param))
    return old


def stale_check(policy, backend, engine, tasks, seed: int, name: str) -> tuple[bool, bool, float]:
    """Update the vision tower, sync, roll out the same images again: vLLM's log-probs must be the
    new weights', not those of vision features cached before the update.
    Returns (passed, detectable, mean gap to the new weights)."""
    old_vision = redraw_vision(policy, seed)
    backend.update_weights(policy.model)
    trajectories = engine.rollout(tasks, n=2, seed=seed)
    sampler, new = parity(policy, trajectories)
    with vision_weights(policy, old_vision):  # what a stale encoder cache serves: old vision, new rest
        stale = sampled(trajectories, score_trajectories(policy, trajectories, micro_batch_size=8))
    max_gap, mean_gap = gap(sampler, new)
    moved = gap(new, stale)[1]
    detectable = moved >= DETECTABLE
    ok = detectable and within(max_gap, mean_gap)
    verdict(ok, name, f"vLLM vs the new weights: {figures(max_gap, mean_gap)}; vs the old vision features: mean "
                      f"|Δ| {gap(sampler, stale)[1]:.5f}; the update moved the trainer's log-probs by mean {moved:.4f} "
                      f"(>= {DETECTABLE} needed to tell)")
    return ok, detectable, mean_gap


def check_family(family: str) -> bool:
    policy = Policy.load(f"tiny:{family}", dtype="bfloat16", device="cuda")
    backend = VLLMBackend(policy, **BACKEND)
    return family_checks(family, policy, backend, lambda: without_encoder_reset(backend))


@contextlib.contextmanager
def without_encoder_reset(backend):
    """`backend.update_weights` with vLLM's encoder cache left as it is (the defect of issue 20)."""
    backend.llm.llm_engine.reset_encoder_cache = lambda: None
    try:
        yield
    finally:
        del backend.llm.llm_engine.reset_encoder_cache


def family_checks(family: str, policy, backend, no_encoder_reset, num_tasks: int = 8) -> bool:
    """Parity, the stale-encoder-cache check, and the same check with the reset switched off, which
    must FAIL (`no_encoder_reset()`: a context in which updates leave the encoder cache alone)."""
    source = load_tasks("synthetic", split="test")
    tasks = [source[i] for i in range(num_tasks)]
    with Sandbox(workers=4) as sandbox, RolloutEngine(backend, sandbox=sandbox, env_kwargs=ENV, sampling=SAMPLING,
                                                       max_total_tokens=4096) as engine:
        trajectories = engine.rollout(tasks, n=2, seed=0)
        sampler, trainer = parity(policy, trajectories)
        images = sum(len(t.images) for t in trajectories)
        ok = verdict(within(*gap(sampler, trainer)) and images > 0, f"vllm-logprobs[{family}]",
                     f"{len(sampler)} sampled tokens of {len(trajectories)} trajectories with {images} images: "
                     + figures(*gap(sampler, trainer)))
        ok &= stale_check(policy, backend, engine, tasks, 1, f"stale-encoder-cache[{family}]")[0]
        with no_encoder_reset():
            _, detectable, mean_gap = stale_check(policy, backend, engine, tasks, 2,
                                                  f"stale-encoder-cache[{family}, reset disabled: must FAIL]")
        caught = detectable and mean_gap >= TOLERANCE_MEAN
        ok &= verdict(caught, f"stale-check-catches-a-missing-reset[{family}]",
                      f"without the encoder-cache reset the sampler's log-probs were {mean_gap:.5f} from the new "
                      "weights' on average " + ("(the check above failed, as it must)" if caught
                                                 else "(the check above could not tell: no stale features were served)"))
    return ok


# -- GRPO with vLLM rollouts ------------------------------------------------------------------------

GRPO_BASE = [
    "+exp=tiny", "model.dtype=bfloat16", "rollout.backend=vllm", "rollout.gpu_memory_utilization=0.2",
    "rollout.enforce_eager=true", "rollout.max_total_tokens=4096", "trainer.total_steps=3",
    "trainer.val_before_train=false", "trainer.val_every=0", "trainer.save_every=0", "trainer.sample_table_every=0",
    "algo.mask_truncated=false", "logger=local",  # a random model's turns run to the limit: train on them anyway
]
GRPO_VARIANTS = {
    "colocated": [],
    "lora": ["model.lora.enabled=true"],
    "freeze_vision": ["model.freeze_vision=true"],
    "fsdp": ["trainer.fsdp=true"],  # under torchrun
}


def check_grpo(variant: str) -> bool:
    from algos.config import load_config
    from algos.grpo import run

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run(load_config(GRPO_BASE + GRPO_VARIANTS[variant] + [f"trainer.output_dir={out}"]))
        seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) != 0:
        return True
    metrics = summary["last_metrics"]
    wanted = ("reward/total", "actor/loss", "time/step")
    finite = all(name in metrics and math.isfinite(metrics[name]) for name in wanted)
    return verdict(summary["steps"] == 3 and finite, f"grpo[{variant}]",
                   f"{summary['steps']} steps in {seconds:.0f} s; last step: "
                   + ", ".join(f"{name} {metrics.get(name, float('nan')):.4f}" for name in wanted))


# -- FSDP2 on NCCL: placement, one optimizer step, streamed sync ------------------------------------


def check_fsdp() -> bool:
    import torch.distributed as dist

    from agents.small import small_model_dir
    from agents.weight_stream import layer_of
    from algos.distributed import fsdp2_gathered, fsdp2_wrap, init_distributed

    info = init_distributed()
    if not dist.is_initialized():  # one GPU: FSDP2 still shards over a process group of one
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=info.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    policy = Policy.load(str(small_model_dir()), dtype="bfloat16", device=info.device)
    layers: dict[str, int] = {}
    for name, param in policy.model.named_parameters():
        layers[layer_of(name)] = layers.get(layer_of(name), 0) + param.numel() * param.element_size()
    fsdp2_wrap(policy.model, mixed_precision=None)
    backend = VLLMBackend(policy, **{**BACKEND, "gpu_memory_utilization": 0.25})
    devices = backend.llm.collective_rpc("codevision_device")
    ok = verdict(devices == [str(info.device)], f"vllm-placement[rank {rank} of {world}]",
                 f"the engine's worker runs on {devices}, the trainer on {info.device}")

    source = load_tasks("synthetic", split="test")
    tasks = [source[i] for i in range(rank, 8 * world, world)]
    with Sandbox(workers=4) as sandbox, RolloutEngine(backend, sandbox=sandbox, env_kwargs=ENV, sampling=SAMPLING,
                                                       max_total_tokens=4096) as engine:
        trajectories = engine.rollout(tasks, n=2, seed=rank)
        # One optimizer step on FSDP2 (every rank one forward and backward: FSDP's collectives pair up).
        optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
        batch = policy.collate(trajectories)
        logprobs_BT, _ = policy.logprobs(batch)
        (-(logprobs_BT * batch["loss_mask"]).sum() / batch["loss_mask"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del batch, logprobs_BT
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        stats = backend.update_weights(policy.model)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        after = engine.rollout(tasks, n=2, seed=100 + rank)
        with fsdp2_gathered(policy.model):
            sampler, trainer = parity(policy, after)
    max_gap, mean_gap = gap(sampler, trainer)
    largest, model = max(layers.values()), sum(layers.values())
    ok &= verdict(within(max_gap, mean_gap) and peak < model / 2, f"fsdp2-nccl-sync[rank {rank} of {world}]",
                  f"one AdamW step on FSDP2, then {stats.chunks} layer chunks streamed to vLLM in {stats.seconds:.3f} s; "
                  f"peak extra CUDA memory {peak / 1e6:.2f} MB (largest layer {largest / 1e6:.2f} MB, model "
                  f"{model / 1e6:.2f} MB; PASS below half the model); vLLM after the sync vs the trainer: "
                  + figures(max_gap, mean_gap))
    dist.barrier()
    dist.destroy_process_group()
    return ok


# -- throughput: our engine vs raw LLM.generate on the same prompts and lengths -------------------------


def check_throughput(goal: float = 0.8) -> bool:
    from vllm import SamplingParams as VLLMSamplingParams

    from agents.small import small_model_dir

    policy = Policy.load(str(small_model_dir()), dtype="bfloat16", device="cuda")
    backend = VLLMBackend(policy, **{**BACKEND, "gpu_memory_utilization": 0.3, "max_model_len": 8192})
    calls = []  # (vLLM prompts, results, sampling) of every generate call the engine makes
    generate = backend.generate

    def recorded(requests, sampling, seed=None, on_finish=None):
        # The prompts as sent: an episode's token list grows after the call.
        prompts = [vllm_prompt(request, backend.image_token_id) for request in requests]
        results = generate(requests, sampling, seed=seed, on_finish=on_finish)
        calls.append((prompts, results, sampling))
        return results

    backend.generate = recorded
    source = load_tasks("synthetic", split="test")
    tasks = [source[i] for i in range(32)]
    sampling = dict(temperature=1.0, max_new_tokens=256)
    with Sandbox(workers=8) as sandbox, RolloutEngine(backend, sandbox=sandbox, env_kwargs=ENV, sampling=sampling,
                                                       max_total_tokens=8192) as engine:
        engine.rollout(tasks[:4], n=2, seed=0)  # warm-up
        calls.clear()
        backend.drop_caches()
        start = time.perf_counter()
        engine.rollout(tasks, n=4, seed=1)
        engine_s = time.perf_counter() - start
    backend.drop_caches()
    tokens, raw_s = 0, 0.0
    for prompts, results, turn_sampling in calls:
        params = []
        for i, result in enumerate(results):
            kwargs = sampling_kwargs(turn_sampling, len(result.token_ids), [], backend.suppress_bias, seed=i)
            params.append(VLLMSamplingParams(**kwargs, min_tokens=len(result.token_ids), ignore_eos=True))
        tokens += sum(len(r.token_ids) for r in results)
        start = time.perf_counter()
        backend.llm.generate(prompts, params, use_tqdm=False)
        raw_s += time.perf_counter() - start
    ratio = raw_s / engine_s
    return verdict(ratio >= goal, "rollout-throughput",
                   f"{tokens} sampled tokens in {len(calls)} generate calls: our engine {tokens / engine_s:.0f} tok/s "
                   f"(with the sandbox's steps), raw LLM.generate {tokens / raw_s:.0f} tok/s on the same prompts and "
                   f"lengths; ratio {ratio:.2f} (goal >= {goal})")


def main(argv: list[str]) -> int:
    kind = argv[0] if argv else ""
    if kind == "family" and len(argv) == 2:
        ok = check_family(argv[1])
    elif kind == "grpo" and len(argv) == 2 and argv[1] in GRPO_VARIANTS:
        ok = check_grpo(argv[1])
    elif kind == "fsdp":
        ok = check_fsdp()
    elif kind == "throughput":
        ok = check_throughput()
    else:
        print(__doc__)
        return 2
    return 0 if ok else VERDICT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
