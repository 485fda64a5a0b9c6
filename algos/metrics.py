"""Figures of episodes: a training step's (`step_metrics`, `rollout_metrics`, `validation_metrics`,
`sample_table`) and an evaluation's (`summarize` ... `report_markdown`). Pure functions.

Evaluation: episodes (`agents.transcript.Transcript`) in, a report out.

    summary = summarize(transcripts)                      # one agent
    report = {"agents": {"model": summarize(a), "oracle": summarize(b)}, ...}
    text = report_markdown(report)                        # the tables of the paper
    metrics = report_metrics(summary)                     # val/... names for algos.tracking

Accuracy is answer correctness (`success`), apart from the shaped reward. With k samples per
task, `accuracy` is the mean over all episodes (avg@k) and `pass_at_k` the share of tasks with
at least one correct sample. The robustness table is the paper's: accuracy on the original
images and under each of the five orientation transforms (`cv_env.tasks.RobustnessWrapper`
variants), and their unweighted average.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from cv_env.judge import judge_metrics
from cv_env.tasks.robustness import ROBUSTNESS_VARIANTS

if TYPE_CHECKING:
    from agents.trajectory import Trajectory, TrajectoryGroup

__all__ = ["summarize", "robustness_columns", "rank_cases", "report_markdown", "report_metrics", "report_episode_errors",
           "step_metrics", "episode_summary", "rollout_metrics", "validation_metrics", "sample_table"]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def robustness_columns(variants: Iterable[str]) -> list[str]:
    """The table's columns for the variants present: the paper's order first, then the others."""
    present = set(variants) - {""}
    return [v for v in ROBUSTNESS_VARIANTS if v in present] + sorted(present - set(ROBUSTNESS_VARIANTS))


def _robustness(episodes: Sequence[Any]) -> dict[str, float] | None:
    by_variant: dict[str, list[bool]] = defaultdict(list)
    for e in episodes:
        if e.variant:
            by_variant[e.variant].append(bool(e.success))
    if not by_variant:
        return None
    row = {v: _mean(by_variant[v]) for v in robustness_columns(by_variant)}
    row["average"] = _mean(list(row.values()))
    return row


def summarize(transcripts: Sequence[Any]) -> dict[str, Any]:
    """The figures of one agent's episodes (any objects with the `Transcript` fields).

    Keys: episodes, tasks, samples, accuracy, pass_at_k, by_category ({category: {accuracy,
    episodes}}), robustness ({variant: accuracy, ..., "average"} or None when no episode has a
    variant), robustness_by_category, reward (mean total), reward_components (means), turns,
    tool_calls (per episode), exec_success (share of tool calls that ran; None without calls),
    with_calls (share of episodes that called the tool), acc_with_calls / acc_without_calls
    (accuracy of the episodes that did / did not; None where there are none), truncated (share),
    op_usage ({op: share of episodes that applied it} or None when some episode does not know its
    ops), judge (`cv_env.judge.judge_metrics` of the episodes the LLM judge ruled on; {} for none).
    """
    episodes = list(transcripts)
    if not episodes:
        raise ValueError("summarize needs at least one episode: the evaluation produced none")
    n = len(episodes)
    by_task: dict[str, list[bool]] = defaultdict(list)
    by_category: dict[str, list[bool]] = defaultdict(list)
    episodes_by_category: dict[str, list[Any]] = defaultdict(list)
    components: dict[str, list[float]] = defaultdict(list)
    for e in episodes:
        by_task[e.task_id].append(bool(e.success))
        by_category[e.category].append(bool(e.success))
        episodes_by_category[e.category].append(e)
        for name, value in e.reward_components.items():
            if name != "total":
                components[name].append(float(value))
    calls = sum(e.num_tool_calls for e in episodes)
    with_calls = [bool(e.success) for e in episodes if e.num_tool_calls]
    without_calls = [bool(e.success) for e in episodes if not e.num_tool_calls]
    failed = sum(e.num_failed_calls for e in episodes)
    op_usage = None
    if all(e.used_ops is not None for e in episodes):
        counts: dict[str, int] = defaultdict(int)
        for e in episodes:
            for op in set(e.used_ops):
                counts[op] += 1
        op_usage = {op: counts[op] / n for op in sorted(counts)}
    robustness_by_category = {c: _robustness(eps) for c, eps in sorted(episodes_by_category.items())}
    return {
        "episodes": n,
        "tasks": len(by_task),
        "samples": max(len(v) for v in by_task.values()),
        "accuracy": _mean([bool(e.success) for e in episodes]),
        "pass_at_k": _mean([any(v) for v in by_task.values()]),
        "by_category": {c: {"accuracy": _mean(v), "episodes": len(v)} for c, v in sorted(by_category.items())},
        "robustness": _robustness(episodes),
        "robustness_by_category": {c: r for c, r in robustness_by_category.items() if r is not None},
        "reward": _mean([float(e.reward) for e in episodes]),
        "reward_components": {name: _mean(v) for name, v in components.items()},
        "turns": _mean([e.num_turns for e in episodes]),
        "tool_calls": calls / n,
        "exec_success": (calls - failed) / calls if calls else None,
        "with_calls": len(with_calls) / n,
        "acc_with_calls": _mean(with_calls) if with_calls else None,
        "acc_without_calls": _mean(without_calls) if without_calls else None,
        "truncated": _mean([bool(e.truncated) for e in episodes]),
        "op_usage": op_usage,
        "judge": judge_metrics([e.judge for e in episodes if e.judge]),
    }


def rank_cases(transcripts: Sequence[Any], count: int) -> tuple[list[Any], list[Any]]:
    """The `count` worst and `count` best episodes: wrong before right, then by shaped reward.

    Worst first in the first list, best first in the second; ties keep the input order.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    order = sorted(range(len(transcripts)), key=lambda i: (bool(transcripts[i].success), float(transcripts[i].reward)))
    worst = [transcripts[i] for i in order[:count]]
    best = [transcripts[i] for i in reversed(order[len(order) - count:])] if count else []
    return worst, best


def report_metrics(summary: Mapping[str, Any], prefix: str = "val") -> dict[str, float]:
    """One agent's summary as flat metrics in the shared vocabulary of `algos.tracking`.

    prefix: "val" for the evaluated agent; e.g. "val/oracle" for a reference column.
    """
    out = {
        f"{prefix}/acc": summary["accuracy"],
        f"{prefix}/pass_at_k": summary["pass_at_k"],
        f"{prefix}/reward/total": summary["reward"],
        f"{prefix}/tool/calls_per_episode": summary["tool_calls"],
        f"{prefix}/episode/turns": summary["turns"],
        f"{prefix}/episode/truncated": summary["truncated"],
    }
    out.update({f"{prefix}/acc/{c}": v["accuracy"] for c, v in summary["by_category"].items()})
    out.update({f"{prefix}/reward/{name}": v for name, v in summary["reward_components"].items()})
    for name in ("exec_success", "acc_with_calls", "acc_without_calls"):
        if summary[name] is not None:
            out[f"{prefix}/tool/{name}"] = summary[name]
    for op, share in (summary["op_usage"] or {}).items():
        out[f"{prefix}/tool/op/{op}"] = share
    for variant, acc in (summary["robustness"] or {}).items():
        out[f"{prefix}/robustness/{variant}"] = acc
    out.update({f"{prefix}/{name}": value for name, value in summary.get("judge", {}).items()})
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: accuracy per category, robustness, tool use, ops, reward terms.

    report: {"title": str, "agents": {name: summarize(...)}, optional "settings": {key: value},
    optional "cases": {name: {"worst": path, "best": path}}}. Percentages have one decimal.
    """
    agents: dict[str, Mapping[str, Any]] = dict(report["agents"])
    names = list(agents)
    lines = [f"# {report.get('title', 'Evaluation')}", ""]
    if report.get("settings"):
        lines += [", ".join(f"{k}={v}" for k, v in report["settings"].items()), ""]

    categories = sorted({c for s in agents.values() for c in s["by_category"]})
    lines += ["## Accuracy (%)", ""]
    rows = [[c] + [_pct(agents[a]["by_category"].get(c, {}).get("accuracy")) for a in names] for c in categories]
    rows.append(["**all**"] + [f"**{_pct(agents[a]['accuracy'])}**" for a in names])
    if any(agents[a]["samples"] > 1 for a in names):
        rows.append(["pass@k"] + [_pct(agents[a]["pass_at_k"]) + f" (k={agents[a]['samples']})" for a in names])
    lines += _table(["category"] + names, rows)

    with_robustness = [a for a in names if agents[a]["robustness"]]
    if with_robustness:
        columns = robustness_columns(v for a in with_robustness for v in agents[a]["robustness"] if v != "average")
        lines += ["## Robustness: accuracy (%) under orientation transforms", ""]
        lines += _table(["agent"] + columns + ["average"],
                        [[a] + [_pct(agents[a]["robustness"].get(v)) for v in columns + ["average"]]
                         for a in with_robustness])
        for a in with_robustness:
            per_category = agents[a]["robustness_by_category"]
            lines += [f"### Robustness of {a} per category (%)", ""]
            lines += _table(["category"] + columns + ["average"],
                            [[c] + [_pct(r.get(v)) for v in columns + ["average"]] for c, r in per_category.items()])

    lines += ["## Tool use", ""]
    lines += _table([""] + names, [
        ["episodes"] + [str(agents[a]["episodes"]) for a in names],
        ["turns / episode"] + [f"{agents[a]['turns']:.2f}" for a in names],
        ["tool calls / episode"] + [f"{agents[a]['tool_calls']:.2f}" for a in names],
        ["execution success (%)"] + [_pct(agents[a]["exec_success"]) for a in names],
        ["episodes with a tool call (%)"] + [_pct(agents[a]["with_calls"]) for a in names],
        ["accuracy with a tool call (%)"] + [_pct(agents[a]["acc_with_calls"]) for a in names],
        ["accuracy without (%)"] + [_pct(agents[a]["acc_without_calls"]) for a in names],
        ["truncated (%)"] + [_pct(agents[a]["truncated"]) for a in names],
        ["shaped reward"] + [f"{agents[a]['reward']:.3f}" for a in names],
    ])

    ops = sorted({op for a in names for op in (agents[a]["op_usage"] or {})})
    if ops or any(agents[a]["op_usage"] is None for a in names):
        lines += ["## Op usage (% of episodes whose successful code applied the op)", ""]
        lines += _table(["op"] + names, [
            [op] + ["n/a" if agents[a]["op_usage"] is None else _pct(agents[a]["op_usage"].get(op, 0.0)) for a in names]
            for op in ops
        ] or [["(none)"] + ["n/a" if agents[a]["op_usage"] is None else "–" for a in names]])

    terms = list(dict.fromkeys(t for a in names for t in agents[a]["reward_components"]))
    if terms:
        lines += ["## Reward terms (mean per episode)", ""]
        lines += _table(["term"] + names, [[t] + [f"{agents[a]['reward_components'].get(t, 0.0):.3f}" for a in names]
                                           for t in terms])

    if report.get("cases"):
        lines += ["## Cases", ""]
        for a, pages in report["cases"].items():
            links = ", ".join(f"[{kind}]({path})" for kind, path in pages.items())
            lines.append(f"- {a}: {links}")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# A training step's figures
# --------------------------------------------------------------------------------------------


def report_episode_errors(trajectories: Sequence[Trajectory], step: int) -> None:
    """Say on the console which of this rank's episodes an exception ended (the run goes on
    without them; `rollout/episode_errors` counts them)."""
    failed = [t for t in trajectories if t.error]
    if failed:
        print(f"step {step}: {len(failed)} of {len(trajectories)} episodes ended by an error and are left out of "
              f"the loss; the first (task {failed[0].task_id}): {failed[0].error}", flush=True)


def step_metrics(groups: Sequence[TrajectoryGroup], beta: float, timings: dict[str, float],
                 trajectories_in_loss: int) -> dict[str, float]:
    """The figures of a step's rollouts that every RL trainer logs, over all ranks (call on each).

    `rollout_metrics` of the episodes scored with the rewards the update used (`rewards_G`, group
    terms included), reward/necessity (the mean necessity term, when `beta` > 0), the timings
    averaged over ranks (`timings`: time/rollout, time/sandbox, time/update), throughput/* over
    the rollout time, and data/trajectories_in_loss summed over ranks.
    """
    from algos.distributed import all_reduce_mean
    from algos.distributed import gather_lists

    trajectories = [t for group in groups for t in group.trajectories_G]
    rewards_G = [r for group in groups for r in group.rewards_G]
    adjustments = [term for group in groups for term in group.group_terms_G]
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
