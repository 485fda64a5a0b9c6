"""A training step's rollouts as GRPO and PPO both get them, and their figures: all that comes
before either algorithm begins.

    train_tasks, val_tasks = load_task_splits(cfg)
    engine, val_engine = open_engines(cfg, policy, cleanup, resumed=False)  # closed by the ExitStack
    trajectories = engine.rollout(prompts, n=cfg.rollout.n, group_ids=group_ids, seed=seed)
    adjustments = group_reward_terms(trajectories, cfg.reward_config())    # beta x necessity
    keep = loss_keep_mask(trajectories, rewards_G, mask_truncated=True, dynamic_sampling=False)
    metrics = step_metrics(trajectories, rewards_G, adjustments, beta, timings, sum(keep))   # reward/..., tool/...
    metrics = validate(val_engine, val_tasks, chunk=16, seed=0)              # val/acc, ...
    rows, images = sample_table(policy.tokenizer, policy.image_token_id, trajectories, rewards, advantages, 8)

A group is the rollouts of one prompt (`Trajectory.group_id`): group terms and dynamic sampling
compare a trajectory with the others of its group. `cfg` is a `GRPOConfig` (or `PPOConfig`).
The figures' names are the shared vocabulary of `algos.tracking`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch

from agents.policy import Policy
from agents.rollout import RolloutEngine, Trajectory
from algos.distributed import all_reduce_mean, gather_lists, get_rank, get_world_size
from cv_env.judge import judge_metrics, make_judge
from cv_env.reward import RewardConfig, apply_necessity
from cv_env.sandbox import Sandbox
from cv_env.tasks import load_tasks

__all__ = [
    "check_rollout_backend",
    "make_generator",
    "vllm_options",
    "build_engines",
    "open_engines",
    "load_task_splits",
    "validate",
    "group_index",
    "group_reward_terms",
    "loss_keep_mask",
    "groups_with_signal",
    "report_episode_errors",
    "step_metrics",
    "episode_summary",
    "rollout_metrics",
    "validation_metrics",
    "sample_table",
]


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
    call; the metrics (`algos.train_step.validation_metrics`) are over all ranks."""
    rank, world = get_rank(), get_world_size()
    mine = list(val_tasks)[rank::world]
    summaries = []
    for start in range(0, len(mine), chunk):
        summaries.extend(episode_summary(t) for t in engine.rollout(mine[start:start + chunk], n=1, seed=seed + start))
    return validation_metrics(gather_lists(summaries))


# --------------------------------------------------------------------------------------------
# The groups of one step
# --------------------------------------------------------------------------------------------


def group_index(trajectories: Sequence[Trajectory]) -> torch.Tensor:
    """[G] long: the index of each trajectory's group, numbered in order of first appearance."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t.group_id, len(ids)) for t in trajectories], dtype=torch.long)


def group_reward_terms(trajectories: Sequence[Trajectory], reward_cfg: RewardConfig) -> list[float]:
    """Per-trajectory group adjustment (beta x necessity), computed group by group; 0 when beta is 0."""
    if reward_cfg.beta == 0:
        return [0.0] * len(trajectories)
    adjustments = [0.0] * len(trajectories)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajectories):
        groups.setdefault(t.group_id, []).append(i)
    for members in groups.values():
        episodes = [
            {"correct": trajectories[i].success, "n_calls": trajectories[i].num_tool_calls,
             "n_failed": trajectories[i].num_failed_calls, "acc": trajectories[i].reward_components.get("acc", 1.0)}
            for i in members
        ]
        for i, value in zip(members, apply_necessity(episodes, reward_cfg)):
            adjustments[i] = value
    return adjustments


def loss_keep_mask(trajectories: Sequence[Trajectory], rewards_G: torch.Tensor, mask_truncated: bool,
                   dynamic_sampling: bool) -> list[bool]:
    """Which trajectories enter the loss.

    An episode ended by an exception (`Trajectory.error`) never does: its end is not the
    model's doing. mask_truncated: drop trajectories cut by the turn or token limit (DAPO
    over-long masking: an unfinished answer's reward says little about its tokens).
    dynamic_sampling: drop whole groups whose rewards are all equal (zero advantage, no signal; DAPO).
    """
    keep = [not (t.error or (mask_truncated and t.truncated)) for t in trajectories]
    if dynamic_sampling:
        group_ids_G = group_index(trajectories)
        for g in group_ids_G.unique():
            members = (group_ids_G == g).nonzero().flatten().tolist()
            if float(rewards_G[members].max()) == float(rewards_G[members].min()):
                for i in members:
                    keep[i] = False
    return keep


def groups_with_signal(trajectories: Sequence[Trajectory], advantages_G: torch.Tensor) -> list[bool]:
    """Per group, in order of first appearance: whether any of its trajectories has a nonzero
    advantage. A group whose rewards are all equal teaches nothing; their share says how much of
    a step's sampling the update can learn from (logged by GRPO as data/groups_with_signal)."""
    group_ids_G = group_index(trajectories)
    return [bool((advantages_G[group_ids_G == g] != 0).any()) for g in range(len(group_ids_G.unique()))]


def report_episode_errors(trajectories: Sequence[Trajectory], step: int) -> None:
    """Say on the console which of this rank's episodes an exception ended (the run goes on
    without them; `rollout/episode_errors` counts them)."""
    failed = [t for t in trajectories if t.error]
    if failed:
        print(f"step {step}: {len(failed)} of {len(trajectories)} episodes ended by an error and are left out of "
              f"the loss; the first (task {failed[0].task_id}): {failed[0].error}", flush=True)


def step_metrics(trajectories: Sequence[Trajectory], rewards_G: torch.Tensor, adjustments: Sequence[float],
                 beta: float, timings: dict[str, float], trajectories_in_loss: int) -> dict[str, float]:
    """The figures of a step's rollouts that every RL trainer logs, over all ranks (call on each).

    `rollout_metrics` of the episodes scored with the rewards the update used (`rewards_G`, group
    terms included), reward/necessity (the mean necessity term, when `beta` > 0), the timings
    averaged over ranks (`timings`: time/rollout, time/sandbox, time/update), throughput/* over
    the rollout time, and data/trajectories_in_loss summed over ranks.
    """
    summaries = gather_lists([episode_summary(t, float(reward)) for t, reward in zip(trajectories, rewards_G)])
    timing = all_reduce_mean(timings)
    rollout_s = max(timing["time/rollout"], 1e-9)
    metrics = {
        **rollout_metrics(summaries),
        **timing,
        "throughput/tokens_per_s": sum(s["response_length"] for s in summaries) / rollout_s,
        "throughput/episodes_per_s": len(summaries) / rollout_s,
        "data/trajectories_in_loss": float(sum(gather_lists([int(trajectories_in_loss)]))),
    }
    if beta > 0:
        metrics["reward/necessity"] = sum(gather_lists(list(adjustments))) / max(1, len(summaries)) / beta
    return metrics


# --------------------------------------------------------------------------------------------
# Figures of episodes
# --------------------------------------------------------------------------------------------


def episode_summary(trajectory: Any, reward: float | None = None) -> dict[str, Any]:
    """The plain, picklable figures of one `agents.rollout.Trajectory` that the metrics read
    (small enough to gather from every data-parallel rank).

    reward: the reward the update used (e.g. with group terms added); default the trajectory's.
    """
    summary = {
        "category": trajectory.category,
        "reward": float(trajectory.reward if reward is None else reward),
        "components": {k: float(v) for k, v in trajectory.reward_components.items() if k != "total"},
        "success": bool(trajectory.success),
        "num_tool_calls": int(trajectory.num_tool_calls),
        "num_turns": int(trajectory.num_turns),
        "response_length": int(trajectory.num_sampled_tokens),
        "truncated": bool(trajectory.truncated),
        "num_failed_calls": int(trajectory.num_failed_calls),
        "used_ops": sorted(set(trajectory.used_ops)),
        "error": bool(getattr(trajectory, "error", "")),
        "judge": dict(trajectory.judge),  # the LLM judge's ruling on the answer ({} when not asked)
    }
    return summary


def rollout_metrics(summaries: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The shared rollout figures of a batch of `episode_summary`s (names: see algos.tracking):
    reward/total and reward/<component>, tool/calls_per_episode, tool/exec_success,
    tool/op/<name> (share of episodes), episode/turns, response_length, truncated, success, and
    rollout/episode_errors (how many episodes an exception ended), and judge/*
    (`cv_env.judge.judge_metrics`) when the LLM judge was asked."""
    if not summaries:
        return {}
    n = len(summaries)
    out = {"reward/total": sum(s["reward"] for s in summaries) / n}
    components: dict[str, float] = defaultdict(float)
    for s in summaries:
        for name, value in s["components"].items():
            components[name] += value
    out.update({f"reward/{name}": total / n for name, total in components.items()})
    calls = sum(s["num_tool_calls"] for s in summaries)
    out["tool/calls_per_episode"] = calls / n
    failed = sum(s["num_failed_calls"] for s in summaries)
    out["tool/exec_success"] = (calls - failed) / calls if calls else 0.0
    op_counts: dict[str, int] = defaultdict(int)
    for s in summaries:
        for op in s["used_ops"]:
            op_counts[op] += 1
    out.update({f"tool/op/{op}": count / n for op, count in sorted(op_counts.items())})
    out["episode/turns"] = sum(s["num_turns"] for s in summaries) / n
    out["episode/response_length"] = sum(s["response_length"] for s in summaries) / n
    out["episode/truncated"] = sum(s["truncated"] for s in summaries) / n
    out["episode/success"] = sum(s["success"] for s in summaries) / n
    out["rollout/episode_errors"] = float(sum(s.get("error", False) for s in summaries))
    out.update(judge_metrics([s["judge"] for s in summaries if s.get("judge")]))
    return out


def validation_metrics(summaries: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """val/acc (answer correct; apart from the shaped reward), val/acc/<category>,
    val/reward/total, val/tool/calls_per_episode, val/rollout/episode_errors and val/tool/acc_with_calls /
    acc_without_calls (accuracy of the episodes that did / did not call the tool, where there
    are any), from greedy `episode_summary`s."""
    if not summaries:
        return {}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for s in summaries:
        by_category[s["category"]].append(s["success"])
    n = len(summaries)
    out = {
        "val/acc": sum(s["success"] for s in summaries) / n,
        "val/reward/total": sum(s["reward"] for s in summaries) / n,
        "val/tool/calls_per_episode": sum(s["num_tool_calls"] for s in summaries) / n,
        "val/rollout/episode_errors": float(sum(s.get("error", False) for s in summaries)),
    }
    out.update({f"val/acc/{c}": sum(v) / len(v) for c, v in sorted(by_category.items())})
    for name, called in (("acc_with_calls", True), ("acc_without_calls", False)):
        chosen = [s["success"] for s in summaries if bool(s["num_tool_calls"]) == called]
        if chosen:
            out[f"val/tool/{name}"] = sum(chosen) / len(chosen)
    rulings = [s["judge"] for s in summaries if s.get("judge")]
    out.update({f"val/{name}": value for name, value in judge_metrics(rulings).items()})
    return out


def sample_table(tokenizer: Any, image_token_id: int, trajectories: Sequence[Any], rewards: Sequence[float],
                 advantages: Sequence[float], rows: int, max_chars: int = 4000) -> tuple[list[dict], list[list]]:
    """Rows and images of a `Tracker.log_table` of the first `rows` trajectories: task, reward,
    advantage, outcome, and the transcript after the prompt (image placeholders left out)."""
    table, images = [], []
    for i, t in enumerate(trajectories[:rows]):
        ids = [token for token in t.token_ids[t.prompt_length:] if token != image_token_id]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        table.append({
            "task_id": t.task_id, "category": t.category, "reward": float(rewards[i]),
            "advantage": float(advantages[i]), "success": bool(t.success), "answer": t.answer,
            "turns": t.num_turns, "tool_calls": t.num_tool_calls, "truncated": t.truncation or "no",
            "transcript": text if len(text) <= max_chars else text[:max_chars] + " ...",
        })
        images.append(list(t.images))
    return table, images
