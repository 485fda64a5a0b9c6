"""Evaluation figures: episodes (`agents.transcript.Transcript`) in, a report out. Pure functions.

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
from typing import Any, Iterable, Mapping, Sequence

from cv_env.judge import judge_metrics
from cv_env.tasks.robustness import ROBUSTNESS_VARIANTS

__all__ = ["summarize", "robustness_columns", "rank_cases", "report_markdown", "report_metrics"]


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
