"""Evaluation: `python -m algos.evaluate model=<spec> tasks=<source> [key=value ...]` (Hydra).

    python -m algos.evaluate model=tiny:qwen2_5_vl tasks=synthetic split=test n=8
    python -m algos.evaluate model=qwen3vl checkpoint=outputs/grpo samples=4 temperature=1.0
    python -m algos.evaluate model=oracle n=200            # a scripted agent alone: no torch, no model
    python -m algos.evaluate model=openai:my-vlm endpoint=http://127.0.0.1:8000/v1 api_key_env=OPENAI_API_KEY

Plays every task (and, with `robustness=true`, each task under the five orientation transforms
of `cv_env.tasks.RobustnessWrapper`; a parquet benchmark whose rows already vary `transform`,
such as MVToolBench, is its own robustness table instead) through `CodeVision-v0`: a model
through the rollout engine (greedy, or `samples` sampled runs), the scripted agents (`oracle`,
`random`) through the same engine (`agents.scripted.ScriptedAgents`), a served model
(`openai:<name>`) through the same engine too, its OpenAI-compatible endpoint as the chat
backend (`agents.served`).
The scripted oracle runs on the same tasks as a reference column (`oracle=true`). Outputs in
`output_dir` (by default a new `outputs/eval/<date_time>/` per evaluation, so none overwrites another):

    report.json, report.md   accuracy per category (per dataset_name for the release's files), the
                             robustness table (original + 5 transforms + average), turns, tool
                             calls, execution success, op usage, reward terms
    cases/<agent>_worst.html, cases/<agent>_best.html   viewer pages (agents.viewer)
    transcripts/<agent>.jsonl                           every episode, turn by turn
    metrics.jsonl (+ W&B)                               val/... figures via algos.tracking
    evaluate.log, .hydra/                                the console's messages; the composed config

Configuration: `conf/evaluate.yaml` (every key commented) and `algos/eval_config.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import cv_env  # noqa: F401  (registers CodeVision-v0)
from agents.scripted import OracleAgent, RandomAgent
from agents.jsonl import write_jsonl
from agents.transcript import Transcript
from agents.viewer import write_html
from algos.cli import hydra_main
from algos.eval_config import EvalConfig, normalize_overrides
from algos.metrics import rank_cases, report_markdown, report_metrics, summarize
from algos.tracking import Tracker, say
from cv_env.sandbox import Sandbox
from cv_env.task import ORIENT_OPS, Task
from cv_env.tasks import RobustnessWrapper, load_tasks
from cv_env.tasks.parquet import ParquetTasks

__all__ = ["evaluate", "evaluation_tasks", "orientation_variant", "load_policy", "run_scripted", "run_model",
           "run_served_model", "agent_label", "main"]


def evaluation_tasks(cfg: EvalConfig) -> list[Task]:
    """The first `cfg.n` tasks of the source (all for n=0), each followed by its robustness variants.

    A parquet file whose rows show different orientations (their `transform`) already is a
    robustness benchmark: its rows are evaluated as they are, each labelled by its orientation.
    """
    source = load_tasks(cfg.tasks, split=cfg.split, seed=cfg.seed, **cfg.tasks_options)
    count = len(source) if cfg.n == 0 else min(cfg.n, len(source))
    if count == 0:
        raise ValueError(f"the task source {cfg.tasks!r} (split {cfg.split!r}) is empty: nothing to evaluate")
    base = [source[i] for i in range(count)]
    if not cfg.robustness:
        return base
    if isinstance(source, ParquetTasks) and len({orientation_variant(t) for t in base}) > 1:
        return [dataclasses.replace(t, extra={**t.extra, "robustness": {"variant": orientation_variant(t),
                                                                        "base_id": t.id}}) for t in base]
    wrapped = RobustnessWrapper(load_tasks(base))
    return [wrapped[i] for i in range(len(wrapped))]


def orientation_variant(task: Task) -> str:
    """A task's column in the robustness table: the orientation transforms it shows, joined by
    "+" ("rotate_90", "rotate_90+flip_vertical"), or "original" when none."""
    return "+".join(t for t in task.transforms if t in ORIENT_OPS) or "original"


def agent_label(path: str) -> str:
    """A short column name for a model spec: the last path component of a folder, else the spec."""
    stripped = path.rstrip("/")
    return os.path.basename(stripped) if os.sep in stripped and os.path.exists(stripped) else stripped


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="episode", dynamic_ncols=True)


def run_scripted(name: str, tasks: Sequence[Task], cfg: EvalConfig, sandbox: Sandbox, samples: int = 1) -> list[Transcript]:
    """Play `samples` episodes of every task with the scripted agent `name` ("oracle" | "random")
    through the rollout engine, `cfg.batch_size` episodes at a time on the shared `sandbox`.
    Results come back task by task, sample by sample."""
    if name not in ("oracle", "random"):
        raise ValueError(f"unknown scripted agent {name!r}: use oracle or random")
    from agents.scripted import ScriptedAgents

    def factory(first: int):
        # Episode `index` of the rollout starting at task `first` is task first + index // samples.
        return lambda index: OracleAgent() if name == "oracle" else RandomAgent(
            seed=cfg.seed * 1_000_003 + first * samples + index)

    return _run(ScriptedAgents(), tasks, cfg, sandbox, name, samples, factory)


def run_model(policy, tasks: Sequence[Task], cfg: EvalConfig, sandbox: Sandbox, name: str = "model") -> list[Transcript]:
    """Roll out `policy` (an `agents.policy.Policy` or generation backend) on every task.

    `cfg.samples` episodes per task at `cfg.temperature` (0 = greedy), `cfg.batch_size` episodes
    per rollout call.
    """
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens)
    return _run(policy, tasks, cfg, sandbox, name, cfg.samples, None, sampling)


def _run(policy, tasks: Sequence[Task], cfg: EvalConfig, sandbox: Sandbox, name: str, samples: int,
         agent_factory=None, sampling=None) -> list[Transcript]:
    """Every task `samples` times through one `RolloutEngine`, as transcripts (the loop of both runs)."""
    from agents.rollout import RolloutEngine

    chunk = max(1, cfg.batch_size // samples)
    out: list[Transcript] = []
    with RolloutEngine(policy, sandbox=sandbox, env_kwargs=cfg.env_kwargs(), sampling=sampling,
                       max_total_tokens=cfg.max_total_tokens) as engine, _progress(len(tasks) * samples, name) as bar:
        for start in range(0, len(tasks), chunk):
            batch = list(tasks[start:start + chunk])
            if agent_factory is not None:
                engine.backend.agent_factory = agent_factory(start)
            trajectories = engine.rollout(batch, n=samples, seed=cfg.seed + start)
            out.extend(Transcript.of(t, task=batch[i // samples], agent=name) for i, t in enumerate(trajectories))
            bar.update(len(trajectories))
    return out


def run_served_model(cfg: EvalConfig, tasks: Sequence[Task], sandbox: Sandbox, name: str) -> list[Transcript]:
    """Play every task with the served model of `cfg` (`model=openai:<name>`, `endpoint`), `cfg.samples`
    episodes each, `served.max_concurrency` requests at a time; returns their transcripts (each
    with the endpoint's `usage`)."""
    from agents.openai_backend import OpenAIBackend
    from agents.served import run_served

    backend = OpenAIBackend(cfg.openai_config())
    with _progress(len(tasks) * cfg.samples, name) as bar:
        return run_served(backend, tasks, cfg.env_kwargs(), sandbox, samples=cfg.samples, seed=cfg.seed, name=name,
                          on_episode=lambda transcript: bar.update(1))


def load_policy(cfg: EvalConfig):
    """The policy of `cfg.model`, with the weights of `cfg.checkpoint` when set, in eval mode.

    A checkpoint (as `algos.checkpoint.save_checkpoint` writes it) holds weights only: the model
    is built from `model.path` (with the LoRA adapters of `model.lora` when enabled, which the
    checkpoint then fills) and the checkpoint's weights are loaded into it.
    """
    import torch

    from agents.policy import Policy

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lora = cfg.model.lora.adapter_kwargs() if cfg.checkpoint else None  # adapters the checkpoint fills
    policy = Policy.load(cfg.model.path, dtype=cfg.model.dtype, device=device,
                         attn_implementation=cfg.model.attn_implementation, lora=lora,
                         chat_template=cfg.model.chat_template, tool_response_format=cfg.model.tool_response_format)
    if cfg.checkpoint:
        from algos.checkpoint import load_checkpoint, resolve_resume

        path = resolve_resume(str(cfg.checkpoint), cfg.output_dir, key="checkpoint")  # a folder or a run's latest
        load_checkpoint(path, policy.model, restore_rng=False)
    policy.eval()
    return policy


def _write_cases(name: str, ranked: dict[str, list[Transcript]], out_dir: Path) -> dict[str, str]:
    pages = {}
    for kind, cases in ranked.items():
        path = out_dir / "cases" / f"{_safe(name)}_{kind}.html"
        write_html(cases, path, title=f"{name}: {kind} {len(cases)} episode(s)",
                   subtitle="wrong before right, then by shaped reward")
        pages[kind] = str(path.relative_to(out_dir))
    return pages


def _case_table(ranked: dict[str, dict[str, list[Transcript]]]) -> tuple[list[dict], list[list]]:
    """Rows (and images: inputs, then tool outputs) of the worst and best episodes, for W&B."""
    rows, images = [], []
    for name, kinds in ranked.items():
        for kind, cases in kinds.items():
            for e in cases:
                rows.append({"agent": name, "case": kind, "task_id": e.task_id, "category": e.category,
                             "variant": e.variant, "correct": e.success, "reward": e.reward, "answer": e.answer,
                             "ground_truth": e.ground_truth, "turns": e.num_turns, "tool_calls": e.num_tool_calls})
                images.append(list(e.input_images) + [im for t in e.turns for im in t.tool_images])
    return rows, images


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def evaluate(cfg: EvalConfig, policy=None) -> dict[str, Any]:
    """Run the evaluation `cfg` describes; write the report files; return the report dict.

    policy: an already loaded `Policy` (e.g. from a trainer) to evaluate instead of loading
    `cfg.model.path`; ignored for scripted agents.
    Report keys: title, settings, agents ({label: algos.metrics.summarize(...)}), cases, metrics.
    """
    start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = evaluation_tasks(cfg)
    main_label = cfg.model.path if cfg.model.scripted else agent_label(cfg.model.path)
    if cfg.model.served:  # openai:<name>, a folder's name shortened as for local models
        main_label = "openai:" + agent_label(cfg.model.path.split(":", 1)[1])
    if cfg.checkpoint:
        main_label += f"@{Path(cfg.checkpoint).name}"
    results: dict[str, list[Transcript]] = {}
    served: dict[str, Any] = {}
    if not (cfg.model.scripted or cfg.model.served) and policy is None:
        policy = load_policy(cfg)  # before the sandbox starts: a model that cannot load fails at once
    with Sandbox(**cfg.sandbox.to_kwargs()) as sandbox:
        if cfg.model.scripted:
            results[main_label] = run_scripted(cfg.model.path, tasks, cfg, sandbox, samples=cfg.samples)
        elif cfg.model.served:
            from agents.served import usage_metrics

            results[main_label] = run_served_model(cfg, tasks, sandbox, main_label)
            served = {"endpoint": cfg.endpoint, "tool_mode": cfg.model.tool_mode,
                      **usage_metrics(results[main_label])}
        else:
            results[main_label] = run_model(policy, tasks, cfg, sandbox, name=main_label)
        if cfg.oracle and main_label != "oracle":
            results["oracle"] = run_scripted("oracle", tasks, cfg, sandbox)

    summaries = {name: summarize(transcripts) for name, transcripts in results.items()}
    ranked = {name: dict(zip(("worst", "best"), rank_cases(transcripts, cfg.cases)))
              for name, transcripts in results.items()} if cfg.cases else {}
    cases = {name: _write_cases(name, kinds, out_dir) for name, kinds in ranked.items()}
    if cfg.write_transcripts:
        for name, transcripts in results.items():
            path = out_dir / "transcripts" / f"{_safe(name)}.jsonl"
            path.unlink(missing_ok=True)  # write_jsonl appends: start this run's file afresh
            shutil.rmtree(path.parent / f"{path.stem}_images", ignore_errors=True)
            write_jsonl(transcripts, path)
    metrics = report_metrics(summaries[main_label], "val")
    metrics.update({f"val/{k}": v for k, v in served.items() if k.startswith("served/")})
    for name, summary in summaries.items():
        if name != main_label:
            metrics.update(report_metrics(summary, f"val/{_safe(name)}"))
    base_ids = {t.extra.get("robustness", {}).get("base_id", t.id) for t in tasks}
    settings = {"tasks": cfg.tasks, "split": cfg.split, "base tasks": len(base_ids),
                "episodes per agent": len(tasks) * cfg.samples, "robustness": cfg.robustness,
                "samples": cfg.samples, "temperature": cfg.temperature, "max_turns": cfg.max_turns}
    report = {"title": f"Evaluation of {main_label} on {cfg.tasks} ({cfg.split})", "settings": settings,
              "agents": summaries, "cases": cases, "metrics": metrics,
              "seconds": round(time.perf_counter() - start, 2)}
    if served:
        report["served"] = served
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(report), encoding="utf-8")

    run_config = dataclasses.asdict(cfg)
    logger = dataclasses.replace(cfg.logger, progress_bar=False)  # evaluation has its own bars
    tracker = Tracker(logger, out_dir, run_config=run_config, enabled=os.environ.get("RANK", "0") == "0")
    try:
        tracker.log(metrics, step=0)
        if ranked:
            tracker.log_table("eval/cases", *_case_table(ranked), step=0)
    finally:
        tracker.finish()
    return report


def markdown(report: dict[str, Any]) -> str:
    """`algos.metrics.report_markdown`, and for a served model its endpoint's figures."""
    text = report_markdown(report)
    served = report.get("served")
    if not served:
        return text
    rows = [("endpoint", served["endpoint"]), ("tool mode", served["tool_mode"]),
            ("requests", f"{served['served/requests']:.0f}"), ("retries", f"{served['served/retries']:.0f}"),
            ("episodes left unanswered by the endpoint", f"{served['served/unanswered']:.0f}"),
            ("episodes ended by an error (unanswered included)", f"{served['served/episode_errors']:.0f}"),
            ("prompt tokens / episode", f"{served['served/prompt_tokens_per_episode']:.0f}"),
            ("completion tokens / episode", f"{served['served/completion_tokens_per_episode']:.0f}"),
            ("latency / request (s)", f"{served['served/latency_s']:.3f} (max {served['served/latency_max_s']:.3f})")]
    lines = ["## Served endpoint (no token-exactness claimed: the server applies its own template)", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    return text.rstrip("\n") + "\n\n" + "\n".join(lines)


@hydra_main("evaluate", normalize=normalize_overrides)  # model=<spec> -> model.path=<spec>
def main(cfg: EvalConfig) -> dict[str, Any]:
    """Entry point: `python -m algos.evaluate [key=value ...]` (Hydra overrides; see conf/evaluate.yaml).

    The report's tables go to stdout; where the files are, to the console and `<output_dir>/evaluate.log`.
    """
    report = evaluate(cfg)
    print(markdown(report), flush=True)
    say(f"report: {Path(cfg.output_dir) / 'report.md'} ({report['seconds']:.1f} s; run folder {cfg.output_dir})")
    return report


if __name__ == "__main__":
    main()
