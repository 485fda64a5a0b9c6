"""End-to-end learning proof on CPU (issue 9): teacher demos -> SFT -> GRPO, evaluated at each stage.

    python bench/learn_curve.py                         # the recipe (~23 min on 2 free cores)
    python bench/learn_curve.py --seed 1                # a replicate: other demos, data order and samples
    python bench/learn_curve.py --tool-rate 1.0 --tasks glyph_orientation   # the perfect teacher, the glyph task
    python bench/learn_curve.py --sft-steps 60 --grpo-steps 6 --eval-n 48    # a shorter run
    OMP_NUM_THREADS=1 python bench/learn_curve.py ...   # on a machine shared with other jobs

On a shared 2-core machine, two processes that each run 2 OpenMP threads make both spin at their
barriers: SFT steps of 3 s took 45-80 s. One thread per process is slower alone but steady.

Stages, each the project's own entry point run as a subprocess (what a user would type):
  1+2. `python -m algos.sft +exp=tiny_learn_sft`: records demonstrations of the easy
       `corner_orientation` category (train split; `--tasks` picks another) by the oracle
       teacher, which knows every answer but fixes the image on only `--tool-rate` of the items
       that need it and answers the rest at once; then fine-tunes a small random Qwen3-VL
       (`agents.small`, 2.0 M parameters) on them;
  3.   `python -m algos.grpo +exp=tiny_learn model.path=<SFT folder>`;
  4.   `python -m algos.evaluate` on the held-out test split (greedy) with the random model, the
       SFT model and the GRPO model: success rate (answer accuracy), mean shaped reward, fix rate
       and tool calls per episode; and the SFT and GRPO models again with 4 samples per item at
       GRPO's sampling temperature (avg@4), the policy GRPO actually optimises.

Settings not given on the command line are the recipe's (`conf/exp/tiny_learn_sft.yaml`,
`conf/exp/tiny_learn.yaml`). Each stage prints one line with its command and log file, then its
progress bar (rate, ETA) on one console line while it runs. Prints the table and each stage's wall time, writes
`<out>/learn_curve.png` (SFT validation loss; GRPO training reward, validation accuracy and tool
calls; the held-out evaluations) and `<out>/summary.json`, and logs them to a W&B offline run in
`<out>/wandb`. Every stage's own run folder (metrics.jsonl, W&B files, checkpoints, report.json)
stays under `<out>`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from algos.config import load_config  # noqa: E402 - torch-free; after the offline switches
from algos.sft_config import load_sft_config  # noqa: E402

CHANCE = 0.25  # four answer choices


def _last_progress(log: Path) -> str:
    """What a stage last wrote to its log: the state of its progress bar, or its last message."""
    with open(log, "rb") as handle:
        handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
        tail = handle.read().decode("utf-8", "replace")
    parts = [part.strip() for part in re.split(r"[\r\n]", tail) if part.strip()]
    return parts[-1] if parts else "starting"


def run_stage(name: str, args: list[str], log: Path, every_s: float = 60.0) -> float:
    """Run `python -m <args>` with its output to `log`; return its wall time; raise naming the log on failure.

    While it runs, its progress bar (rate, ETA) shows on one console line, refreshed in place on
    a terminal and printed every `every_s` seconds otherwise.
    """
    start = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: python -m {' '.join(args)} > {log}", flush=True)
    in_place = sys.stdout.isatty()
    shown_at = time.monotonic()
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", *args], stdout=handle, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                try:
                    process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                if in_place:
                    width = shutil.get_terminal_size().columns - 1
                    print("\r" + f"    {_last_progress(log)}"[:width].ljust(width), end="", flush=True)
                elif time.monotonic() - shown_at >= every_s:
                    print(f"    {name}: {_last_progress(log)}", flush=True)
                    shown_at = time.monotonic()
        finally:
            if process.poll() is None:  # interrupted: do not leave the stage running
                process.terminate()
                process.wait()
            if in_place:
                print("\r\033[K", end="", flush=True)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"stage {name!r} failed with exit code {process.returncode}: see {log}")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def evaluate(name: str, model_path: str, out: Path, n: int, tasks: str, checkpoint: str | None = None,
             samples: int = 1, temperature: float = 0.0) -> dict:
    """Evaluation on the held-out test split: greedy by default, or `samples` episodes per task at
    `temperature` (avg@k). Returns success rate, mean reward, fix and format rates, episodes, seconds."""
    folder = out / f"eval_{name}"
    overrides = [
        f"model={model_path}", f"tasks={tasks}", "split=test", f"n={n}", "robustness=false",
        "max_turns=3", "max_new_tokens=96", "max_total_tokens=800", "max_pixels=12544", "prompt=compact",  # as the training runs
        "oracle=false", "cases=0", "write_transcripts=false", f"output_dir={folder}",
        "logger=offline", f"logger.name=learn-eval-{name}", f"samples={samples}", f"temperature={temperature}",
    ]
    if checkpoint:
        overrides.append(f"checkpoint={checkpoint}")
    seconds = run_stage(f"evaluate {name}", ["algos.evaluate", *overrides], out / f"eval_{name}.log")
    report = json.loads((folder / "report.json").read_text())
    agent = next(iter(report["agents"].values()))
    return {"success": agent["accuracy"], "reward": agent["reward"], "episodes": agent["episodes"],
            "tool_calls": agent["tool_calls"], "fmt": agent["reward_components"].get("fmt", 0.0),
            "fix": agent["reward_components"].get("mandatory", 0.0), "acc_with_calls": agent["acc_with_calls"],
            "acc_without_calls": agent["acc_without_calls"], "seconds": seconds}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def latest(folder: Path) -> Path:
    steps = sorted(p for p in folder.iterdir() if p.name.startswith("step_"))
    if not steps:
        raise FileNotFoundError(f"no step_* folder in {folder}: did the stage finish?")
    return steps[-1]


def draw(out: Path, sft_metrics: list[dict], grpo_metrics: list[dict], table: dict) -> Path:
    """The learning curve: SFT validation loss | GRPO reward and validation accuracy | held-out table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    val = [(m["step"], m["val/loss"]) for m in sft_metrics if m.get("val/loss") is not None]
    train = [(m["step"], m["actor/loss"]) for m in sft_metrics if m.get("actor/loss") is not None]
    if train:
        axes[0].plot(*zip(*train), alpha=0.4, label="train loss")
    if val:
        axes[0].plot(*zip(*val), marker="o", label="validation loss")
    axes[0].set(title="SFT on the teacher's demonstrations", xlabel="optimizer step", ylabel="cross-entropy (assistant tokens)")
    axes[0].legend()

    reward = [(m["step"], m["reward/total"]) for m in grpo_metrics if m.get("reward/total") is not None]
    acc = [(m["step"], m["val/acc"]) for m in grpo_metrics if m.get("val/acc") is not None]
    calls = [(m["step"], m["val/tool/calls_per_episode"]) for m in grpo_metrics
             if m.get("val/tool/calls_per_episode") is not None]
    if reward:
        steps, values = zip(*reward)
        axes[1].plot(steps, values, alpha=0.3, label="train reward/total (sampled)")
        window = 10
        if len(values) >= window:
            smooth = [sum(values[i - window:i]) / window for i in range(window, len(values) + 1)]
            axes[1].plot(steps[window - 1:], smooth, color="C0", label=f"its {window}-step mean")
    if acc:
        axes[1].plot(*zip(*acc), marker="o", label="val/acc (greedy)")
    if calls:
        axes[1].plot(*zip(*calls), marker="s", linestyle="--", label="val tool calls / episode (greedy)")
    axes[1].axhline(CHANCE, color="grey", linestyle=":", label="chance (4 choices)")
    axes[1].set(title="GRPO from the SFT checkpoint", xlabel="GRPO step")
    axes[1].legend(fontsize=8)

    names = list(table)
    bars = [(i - 0.2, table[k], "#47a", "greedy") for i, k in enumerate(names)]
    bars += [(i + 0.2, table[k]["sampled"], "#a74", "sampled") for i, k in enumerate(names) if "sampled" in table[k]]
    for x, row, colour, label in bars:
        axes[2].bar(x, row["success"], width=0.38, color=colour, label=label)
        axes[2].text(x, row["success"] + 0.01, f"{row['success']:.0%}\nR={row['reward']:.2f}", ha="center",
                     va="bottom", fontsize=8)
    handles, labels = axes[2].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[2].legend(unique.values(), unique.keys(), loc="upper left")
    axes[2].set_xticks(range(len(names)), names, fontsize=8)
    axes[2].axhline(CHANCE, color="grey", linestyle=":")
    episodes = table[names[0]]["episodes"] if names else 0
    axes[2].set(title=f"held-out test success ({episodes} items)", ylim=(0, 1.15), ylabel="success rate")
    fig.tight_layout()
    path = out / "learn_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_wandb(out: Path, table: dict, times: dict, png: Path, config: dict) -> None:
    """One offline W&B run holding the table, the stage times and the curve."""
    import wandb

    run = wandb.init(project="codevision-gym", name="learn-curve", dir=str(out), mode=os.environ["WANDB_MODE"],
                     config=config, reinit=True)
    rows = [[k, v["success"], v["reward"], v["tool_calls"], v["episodes"]] for k, v in table.items()]
    columns = ["stage", "success", "mean_reward", "tool_calls_per_episode", "episodes"]
    run.log({"val/learn_table": wandb.Table(columns=columns, data=rows),
             "val/learn_curve": wandb.Image(str(png)),
             **{f"time/{k}": v for k, v in times.items()},
             **{f"val/acc/{k}": v["success"] for k, v in table.items()},
             **{f"val/acc_sampled/{k}": v["sampled"]["success"] for k, v in table.items() if "sampled" in v},
             **{f"val/reward/{k}": v["reward"] for k, v in table.items()}})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/learn", help="folder of every stage's run (must not hold a previous run)")
    parser.add_argument("--model", default="small",
                        help="small (agents.small: Qwen3-VL, 2.0 M) | small:<family> (small:qwen2_5_vl, 1.7 M) | a folder")
    parser.add_argument("--tasks", default=None,
                        help="the category of every stage (default: the recipe's, +exp=tiny_learn_sft's "
                             "data.oracle.tasks): corner_orientation | glyph_orientation (a 4-way choice)")
    parser.add_argument("--demos", type=int, default=None, help="oracle demonstrations to record (default: the recipe's)")
    parser.add_argument("--tool-rate", type=float, default=None,
                        help="share of the demonstrations needing a fix that the oracle solves with the tool; on "
                             "the rest it answers at once (data.oracle.tool_rate; default: the recipe's)")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps, batch 32 (default: the recipe's)")
    parser.add_argument("--grpo-steps", type=int, default=None,
                        help="GRPO steps, 4 prompts x 8 samples (default: the recipe's)")
    parser.add_argument("--grpo-val-every", type=int, default=None, help="GRPO validation period in steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="trainer.seed of SFT and GRPO: which demonstrations are recorded, the data order, the "
                             "GRPO prompts and samples (the held-out test items stay the same)")
    parser.add_argument("--eval-n", type=int, default=256, help="held-out test episodes per evaluation")
    parser.add_argument("--sampled-k", type=int, default=4,
                        help="also evaluate the SFT and GRPO models with k samples per test item at GRPO's "
                             "sampling temperature, the policy GRPO optimises (0 = greedy only)")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give a new --out (the trainers would resume from its checkpoints)")
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "small" or args.model.startswith("small:"):
        from agents.small import FAMILY, small_model_dir

        model = str(small_model_dir(args.model.partition(":")[2] or FAMILY))
    else:
        model = args.model
    # Every setting not given on the command line is the recipe's (+exp=tiny_learn_sft, +exp=tiny_learn).
    grpo_cfg = load_config(["+exp=tiny_learn", f"model.path={model}"])
    sft_cfg = load_sft_config(["+exp=tiny_learn_sft"])
    recipe = {"tasks": sft_cfg.data.oracle.tasks, "demos": sft_cfg.data.oracle.num_tasks,
              "tool_rate": sft_cfg.data.oracle.tool_rate, "sft_steps": sft_cfg.trainer.total_steps,
              "grpo_steps": grpo_cfg.trainer.total_steps, "grpo_val_every": grpo_cfg.trainer.val_every}
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    temperature = grpo_cfg.rollout.temperature
    times: dict[str, float] = {}
    table: dict[str, dict] = {}

    def evaluate_stage(stage: str, name: str, path: str, checkpoint: str | None = None) -> None:
        table[stage] = evaluate(name, path, out, args.eval_n, args.tasks, checkpoint)
        times[f"eval_{name}"] = table[stage]["seconds"]
        if args.sampled_k > 0 and stage != "before SFT":  # the random model writes no well-formed turn either way
            sampled = evaluate(f"{name}_sampled", path, out, args.eval_n, args.tasks, checkpoint,
                               samples=args.sampled_k, temperature=temperature)
            table[stage]["sampled"] = sampled
            times[f"eval_{name}_sampled"] = sampled["seconds"]

    evaluate_stage("before SFT", "random", model)

    sft_dir = out / "sft"
    times["sft"] = run_stage("SFT (demos + training)", [
        "algos.sft", "+exp=tiny_learn_sft", f"model.path={model}", f"data.oracle.tasks={args.tasks}",
        f"data.oracle.num_tasks={args.demos}", f"data.oracle.tool_rate={args.tool_rate}",
        f"trainer.total_steps={args.sft_steps}", f"trainer.val_every={max(1, args.sft_steps // 6)}",
        f"trainer.output_dir={sft_dir}", f"trainer.seed={args.seed}",
    ], out / "sft.log")
    sft_model = str(latest(sft_dir / "hf"))
    evaluate_stage("after SFT", "sft", sft_model)

    grpo_dir = out / "grpo"
    times["grpo"] = run_stage("GRPO", [
        "algos.grpo", "+exp=tiny_learn", f"model.path={sft_model}", f"env.tasks={args.tasks}",
        f"env.val_tasks={args.tasks}", f"trainer.total_steps={args.grpo_steps}",
        f"trainer.val_every={args.grpo_val_every}", f"trainer.output_dir={grpo_dir}", f"trainer.seed={args.seed}",
    ], out / "grpo.log")
    evaluate_stage("after GRPO", "grpo", sft_model, checkpoint=str(grpo_dir))

    png = draw(out, read_metrics(sft_dir / "metrics.jsonl"), read_metrics(grpo_dir / "metrics.jsonl"), table)
    summary = {"table": table, "seconds": times, "png": str(png), "args": vars(args), "model": model,
               "sft_model": sft_model, "grpo_run": str(grpo_dir), "sampled_temperature": temperature}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        log_wandb(out, table, times, png, summary)
    except Exception as error:  # noqa: BLE001 - the figures above are the result; W&B is a copy of them
        print(f"W&B logging failed ({error}); the figures are in {out / 'summary.json'}")

    print(f"\nheld-out test, chance {CHANCE:.0%}; greedy, then {args.sampled_k} samples per item at T={temperature:g}")
    print(f"{'stage':<12} {'success':>8} {'mean reward':>12} {'fix rate':>9} {'calls/ep':>9} {'acc w/ call':>12}"
          f" {'acc w/o':>8} {'episodes':>9} | {'sampled success':>15} {'reward':>7} {'fix rate':>9} {'calls/ep':>9}"
          f" {'acc w/ call':>12} {'acc w/o':>8} {'format':>7}")
    for name, row in table.items():
        line = (f"{name:<12} {row['success']:>8.1%} {row['reward']:>12.3f} {row['fix']:>9.1%} {row['tool_calls']:>9.2f}"
                f" {_pct(row['acc_with_calls']):>12} {_pct(row['acc_without_calls']):>8} {row['episodes']:>9}")
        if "sampled" in row:
            r = row["sampled"]
            line += (f" | {r['success']:>15.1%} {r['reward']:>7.3f} {r['fix']:>9.1%} {r['tool_calls']:>9.2f}"
                     f" {_pct(r['acc_with_calls']):>12} {_pct(r['acc_without_calls']):>8} {r['fmt']:>7.1%}")
        print(line)
    print("\nwall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
          + f" (total {sum(times.values()) / 60:.1f} min)")
    print(f"curve: {png}\nsummary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
