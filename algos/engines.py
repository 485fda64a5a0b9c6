"""What samples a trainer's rollouts, and on what: the generator, the training and validation
engines over one sandbox pool, the task splits, and validation.

    train_tasks, val_tasks = load_task_splits(cfg)
    engine, val_engine = open_engines(cfg, policy, cleanup, resumed=False)  # closed by the ExitStack
    trajectories = engine.rollout(prompts, n=cfg.rollout.n, group_ids=group_ids, seed=seed)
    metrics = validate(val_engine, val_tasks, chunk=16, seed=0)              # val/acc, ...

`cfg` is a `GRPOConfig` (or `PPOConfig`). What follows the rollouts: `algos.groups` (the groups
of a step) and `algos.metrics` (their figures).
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

from agents.policy import Policy
from agents.rollout import RolloutEngine
from algos.distributed import get_rank, get_world_size
from algos.metrics import episode_summary, validation_metrics
from algos.distributed import gather_lists
from cv_env.judge import make_judge
from cv_env.sandbox import Sandbox
from cv_env.tasks import load_tasks

__all__ = ["check_rollout_backend", "make_generator", "vllm_options", "build_engines", "open_engines",
           "load_task_splits", "validate"]


# --------------------------------------------------------------------------------------------
# What samples, and on what
# --------------------------------------------------------------------------------------------


def check_rollout_backend(rollout: Any) -> None:
    """Fail early (before loading any weights) when `rollout.backend` cannot run here."""
    if rollout.backend != "vllm":
        return
    from agents.vllm_backend import vllm_available

    if not vllm_available():
        raise RuntimeError(
            "rollout.backend=vllm needs the vllm package and a CUDA GPU: pip install -e '.[vllm]' on a GPU machine, "
            "or sample with transformers: rollout.backend=hf"
        )


def make_generator(policy: Policy, rollout: Any):
    """What samples the rollouts: the policy itself (hf) or a vLLM engine fed its weights."""
    if rollout.backend == "hf":
        return policy
    check_rollout_backend(rollout)
    from agents.vllm_backend import VLLMBackend

    return VLLMBackend(policy, **vllm_options(rollout))


def vllm_options(rollout: Any) -> dict[str, Any]:
    """`VLLMBackend`'s arguments from the rollout config: every vLLM key of conf/ reaches `vllm.LLM`."""
    return dict(gpu_memory_utilization=rollout.gpu_memory_utilization, max_model_len=rollout.max_total_tokens,
                tensor_parallel_size=rollout.tensor_parallel_size, max_images=rollout.max_images,
                enable_prefix_caching=rollout.enable_prefix_caching, enforce_eager=rollout.enforce_eager)


def build_engines(cfg: Any, generator: Any, sandbox: Any) -> tuple[RolloutEngine, RolloutEngine]:
    """The training engine (sampling at `rollout.temperature`) and the validation one (at
    `rollout.val_temperature`, greedy by default), sharing the generator and the sandbox pool.
    Both are context managers: the caller closes them."""
    r = cfg.rollout
    # The engine passes the tasks per rollout and its own shared sandbox.
    env_kwargs = {k: v for k, v in cfg.env_kwargs().items() if k not in ("tasks", "split", "sandbox")}
    env_kwargs["judge"] = make_judge(env_kwargs.get("judge"))  # one judge for both engines: one cache, one limit
    shared = dict(sandbox=sandbox, env_kwargs=env_kwargs, max_total_tokens=r.max_total_tokens)

    def sampling(temperature: float) -> dict[str, Any]:
        return dict(temperature=temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens)

    return (RolloutEngine(generator, sampling=sampling(r.temperature), **shared),
            RolloutEngine(generator, sampling=sampling(r.val_temperature), **shared))


def open_engines(cfg: Any, policy: Policy, cleanup: contextlib.ExitStack,
                 resumed: bool) -> tuple[RolloutEngine, RolloutEngine]:
    """A trainer's (training, validation) engines over one sandbox pool, all closed by `cleanup`.
    After a resume a separate generator (vLLM) gets the restored weights (it loaded model.path's)."""
    sandbox = cleanup.enter_context(Sandbox(**cfg.env.sandbox.to_kwargs()))
    engine, val_engine = (cleanup.enter_context(e)
                          for e in build_engines(cfg, make_generator(policy, cfg.rollout), sandbox))
    if resumed:
        engine.update_weights(policy.model)
    return engine, val_engine


def load_task_splits(cfg: Any) -> tuple[Any, list]:
    """The training task source (`env.tasks`, `env.split`) and the first `trainer.val_size`
    validation tasks (`env.val_tasks`, default the training source, `env.val_split`), both
    loaded with `env.tasks_options`."""
    seed, options = cfg.trainer.seed, dict(cfg.env.tasks_options)
    train_tasks = load_tasks(cfg.env.tasks, split=cfg.env.split, seed=seed, **options)
    val_source = load_tasks(cfg.env.val_tasks or cfg.env.tasks, split=cfg.env.val_split, seed=seed, **options)
    return train_tasks, [val_source[i] for i in range(min(cfg.trainer.val_size, len(val_source)))]


def validate(engine: RolloutEngine, val_tasks: Sequence, chunk: int, seed: int) -> dict[str, float]:
    """Greedy episodes of this rank's share of the validation tasks, `chunk` tasks per rollout
    call; the metrics (`algos.metrics.validation_metrics`) are over all ranks."""
    rank, world = get_rank(), get_world_size()
    mine = list(val_tasks)[rank::world]
    summaries = []
    for start in range(0, len(mine), chunk):
        summaries.extend(episode_summary(t) for t in engine.rollout(mine[start:start + chunk], n=1, seed=seed + start))
    return validation_metrics(gather_lists(summaries))
