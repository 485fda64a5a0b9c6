"""Can GRPO fit the prompts it trains on? The RL form of "overfit one batch" (issue 9).

    python bench/grpo_overfit.py --model outputs/learn/sft/hf/step_00000300
    python bench/grpo_overfit.py --model <SFT folder> --tasks corner_orientation --temperatures 0.4,0.7

For each sampling temperature, starting each time from the same SFT weights: sample `--n`
trajectories for each of `--prompts` fixed training prompts, take one GRPO update on them
(std-normalised group advantages, no KL, constant lr), and repeat for `--rounds` rounds on the
same prompts. Prints each round's mean reward, answer accuracy, fix rate (`mandatory`) and
format rate side by side, then the first-to-late gain on the trained prompts, and the same
figures on as many validation prompts never trained on, sampled before and after the rounds.

A correct trainer raises the reward on its own prompts within a few rounds; if it does not, look
for the fault in the loop (advantages, masks, log-probs of the wrong tokens, rewards at the wrong
positions) before blaming the recipe. A trainer that fits its prompts but whose held-out score
does not move is limited by generalisation (what one update teaches about other images), not by
its plumbing.

Measured on 2 cores with the 300-step glyph SFT model of bench/learn_curve.py (4 prompts x 16
samples, lr 1e-4, 10 rounds, ~7 s per round):

    trained prompts, sampled accuracy   T=0.4: 0.50 -> 0.95 within 2 rounds
                                        T=0.7: 0.36 -> 0.91 over 9 rounds (format rate down to 0.81 on the way)
    4 unseen prompts, sampled accuracy  T=0.4: 0.38 -> 0.25;  T=0.7: 0.34 -> 0.25 (4 images: a small sample)

The loop learns what it is rewarded for, fast; what those updates teach is each image's answer,
not a reading of glyphs that carries to new images. That is why the 100-step GRPO run of
bench/learn_curve.py moves held-out greedy success by less than its noise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from algos.config import load_config  # noqa: E402
from algos.grpo import compute_advantages, grpo_update  # noqa: E402
from algos.engines import load_task_splits, open_engines  # noqa: E402
from algos.groups import loss_keep_mask, make_groups  # noqa: E402
from algos.metrics import episode_summary, rollout_metrics  # noqa: E402
from algos.optim import build_optimizer, build_scheduler  # noqa: E402
from algos.run import load_policy, seed_everything  # noqa: E402
from cv_env.reward import RewardConfig  # noqa: E402


def figures(trajectories) -> dict[str, float]:
    """Mean reward, answer accuracy, fix rate and format rate of sampled trajectories (the
    trainer's own reward/* rollout metrics)."""
    m = rollout_metrics([episode_summary(t) for t in trajectories])
    return {"reward": m["reward/total"], "acc": m.get("reward/acc", 0.0), "fix": m.get("reward/mandatory", 0.0),
            "fmt": m.get("reward/fmt", 0.0)}


def fit(model: str, tasks: str, temperature: float, lr: float, prompts: int, n: int, rounds: int) -> dict:
    """`rounds` GRPO updates on the same `prompts` training prompts: each round's sampled figures
    ("rounds") and, before and after them, those of as many validation prompts never trained on."""
    cfg = load_config([
        "+exp=tiny_learn", f"model.path={model}", f"env.tasks={tasks}", f"rollout.temperature={temperature}",
        f"rollout.n={n}", f"rollout.prompts_per_step={prompts}", f"algo.mini_batch_size={prompts}",
        f"algo.lr={lr}", "algo.kl.coef=0", "algo.warmup_steps=0", "algo.scheduler=constant",
    ])
    seed_everything(0)
    policy = load_policy(cfg, torch.device("cpu"))
    optimizer = build_optimizer(policy.named_parameters(), cfg.algo)
    scheduler = build_scheduler(optimizer, cfg.algo, rounds)
    train_tasks, val_tasks = load_task_splits(cfg)
    chosen = [train_tasks[i] for i in range(prompts)]
    unseen = list(val_tasks[:prompts])
    group_ids = [f"prompt{i}" for i in range(prompts)]
    rows = []
    with contextlib.ExitStack() as cleanup:
        engine, _ = open_engines(cfg, policy, cleanup, resumed=False)
        unseen_before = figures(engine.rollout(unseen, n=n, seed=7))
        for round_ in range(rounds):
            start = time.perf_counter()
            trajectories = engine.rollout(chosen, n=n, group_ids=group_ids, seed=1_000 + round_)
            groups = make_groups(trajectories, RewardConfig(beta=0))
            trajectories = [t for g in groups for t in g.trajectories_G]
            rewards_G = torch.tensor([r for g in groups for r in g.rewards_G], dtype=torch.float32)
            keep = loss_keep_mask(groups, cfg.algo.mask_truncated, dynamic_sampling=False)
            advantages_G = compute_advantages(rewards_G, groups, cfg.algo.advantage_estimator)
            grpo_update(policy, optimizer, scheduler, groups, advantages_G, keep, cfg, seed=round_)
            rows.append({**figures(trajectories), "seconds": time.perf_counter() - start})
        unseen_after = figures(engine.rollout(unseen, n=n, seed=7))
    return {"rounds": rows, "unseen_before": unseen_before, "unseen_after": unseen_after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an SFT model folder (bench/learn_curve.py's <out>/sft/hf/step_*)")
    parser.add_argument("--tasks", default="glyph_orientation", help="the category the model was trained on")
    parser.add_argument("--temperatures", default="0.4,0.7", help="comma-separated sampling temperatures to compare")
    parser.add_argument("--lr", type=float, default=1e-4, help="constant Adam learning rate")
    parser.add_argument("--prompts", type=int, default=2, help="fixed training prompts")
    parser.add_argument("--n", type=int, default=32, help="samples per prompt per round")
    parser.add_argument("--rounds", type=int, default=8, help="GRPO updates on the same prompts")
    args = parser.parse_args(argv)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    results = {t: fit(args.model, args.tasks, t, args.lr, args.prompts, args.n, args.rounds) for t in temperatures}

    print(f"\nGRPO on {args.prompts} fixed {args.tasks} prompts x {args.n} samples, lr {args.lr:g}, no KL "
          f"(sampled figures before each round's update)")
    header = "round " + "".join(f"| T={t:<4g} reward  acc   fix   fmt " for t in temperatures)
    print(header)
    for round_ in range(args.rounds):
        cells = "".join(f"|       {r['reward']:6.3f} {r['acc']:5.2f} {r['fix']:5.2f} {r['fmt']:5.2f} "
                        for r in (results[t]["rounds"][round_] for t in temperatures))
        print(f"{round_:>5} {cells}")
    for t in temperatures:
        rows = results[t]["rounds"]
        last = rows[len(rows) // 2:]  # the second half of the rounds, against the first round
        late = sum(r["reward"] for r in last) / len(last)
        before, after = results[t]["unseen_before"], results[t]["unseen_after"]
        print(f"T={t:g}: trained prompts: reward {rows[0]['reward']:.3f} in round 0 -> {late:.3f} averaged over "
              f"rounds {args.rounds - len(last)}-{args.rounds - 1}; {sum(r['seconds'] for r in rows) / len(rows):.1f} s "
              f"per round\n       {args.prompts} unseen validation prompts: reward {before['reward']:.3f} -> "
              f"{after['reward']:.3f}, accuracy {before['acc']:.2f} -> {after['acc']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
