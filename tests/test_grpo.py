"""The GRPO trainer: a tiny end-to-end run and its resume, one update that learns, and the
shared training pieces (prompt order, LR schedule, exact gradient accumulation, metrics)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from agents.policy import Policy  # noqa: E402
from tests.trajectories import from_tokens  # noqa: E402
from algos.config import load_config  # noqa: E402
from algos.grpo import compute_advantages, grpo_update, run  # noqa: E402
from algos.groups import groups_with_signal, kept_groups, loss_keep_mask, make_groups  # noqa: E402
from algos.metrics import episode_summary, rollout_metrics, validation_metrics  # noqa: E402
from algos.losses import aggregate  # noqa: E402
from algos.tracking import read_metrics  # noqa: E402
from algos.batching import group_minibatches, pad_rows  # noqa: E402
from algos.optim import build_optimizer, build_scheduler  # noqa: E402
from algos.prompt_sampler import PromptSampler  # noqa: E402
from algos.update import update_step  # noqa: E402
from cv_env.reward import RewardConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Small enough for a loaded 2-core box: 2 prompts x 2 samples, short turns, 2 validation tasks.
TINY_RUN = [
    "+exp=tiny",
    "rollout.prompts_per_step=2",
    "rollout.n=2",
    "rollout.max_new_tokens=16",
    "algo.mini_batch_size=1",
    "algo.micro_batch_size=1",
    "algo.entropy_coef=0.01",  # a gradient on every step, whatever the (random) rewards
    "algo.lr=1e-3",
    "env.max_turns=2",
    "env.sandbox.workers=1",
    "trainer.val_size=2",
    "trainer.val_every=2",
    "trainer.save_every=1",
    "trainer.keep_last=5",
    "trainer.sample_table_every=1",
    "trainer.sample_table_rows=2",
    "logger.mode=disabled",
    "logger.progress_bar=false",
]

DOCUMENTED = [
    "reward/total", "reward/acc", "reward/fmt", "tool/calls_per_episode", "episode/turns",
    "episode/response_length", "episode/truncated", "actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy",
    "actor/clipfrac", "actor/approx_kl", "actor/grad_norm", "lr", "time/rollout", "time/sandbox", "time/update",
    "time/step", "throughput/tokens_per_s", "throughput/episodes_per_s",
]


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def test_tiny_run_trains_logs_checkpoints_and_resumes(tmp_path, caplog):
    out = tmp_path / "run"
    summary = run(load_config(TINY_RUN + ["trainer.total_steps=2", f"trainer.output_dir={out}"]))
    assert summary["steps"] == 2 and summary["resumed_from"] is None
    printed = caplog.text
    assert "GRPO finished at step 2" in printed and str(out / "metrics.jsonl") in printed

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "val/acc" in records[0] and "val/acc" in records[2]
    assert any(k.startswith("val/acc/") for k in records[2])
    for record in records[1:]:
        missing = [name for name in DOCUMENTED if name not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        for name in ("actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm"):
            assert record[name] is not None and math.isfinite(record[name]), name
        assert record["actor/grad_norm"] > 0
        assert record["lr"] == pytest.approx(1e-3)
    tables = (out / "tables" / "samples_train.jsonl").read_text().splitlines()
    assert len(tables) == 4 and json.loads(tables[0])["images"]  # 2 rows x 2 steps, with their images

    ckpt = out / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").is_file() and (out / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_state"]["position"] == 4  # 2 steps x 2 prompts

    # The weights moved away from the initial model.
    trained = load_file(str(ckpt / "model.safetensors"))
    initial = Policy.load("tiny:qwen2_5_vl", dtype="float32").model.state_dict()
    changed = [k for k, v in trained.items() if not torch.equal(v, initial[k])]
    assert len(changed) > len(trained) // 2

    # Resume: the same command with a longer horizon continues at step 3 and prompt 5.
    summary = run(load_config(TINY_RUN + ["trainer.total_steps=3", f"trainer.output_dir={out}"]))
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("step_00000002")
    assert "resuming from" in caplog.text
    records = read_metrics(out / "metrics.jsonl")
    lines = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [0, 1, 2, 3]  # nothing repeated, nothing lost; no second baseline validation
    state = json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data_state"]["position"] == 6
    optimizer_state = torch.load(out / "checkpoints" / "step_00000003" / "optimizer.pt", weights_only=True)
    adam_steps = {float(s["step"]) for s in optimizer_state["state"].values()}
    assert adam_steps == {6.0}  # 3 steps x 2 mini-batches: the resumed optimizer kept counting


@pytest.mark.slow  # five more tiny steps: ~10 s idle, a minute on a loaded box
def test_resumed_run_reproduces_the_uninterrupted_run_exactly(tmp_path):
    """Weights, optimizer, RNG and data position all come back: step 3 after a resume at step 2
    logs the very figures of step 3 of a run that was never stopped."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(load_config(TINY_RUN + ["trainer.total_steps=3", f"trainer.output_dir={straight}"]))
    run(load_config(TINY_RUN + ["trainer.total_steps=2", f"trainer.output_dir={resumed}"]))
    run(load_config(TINY_RUN + ["trainer.total_steps=3", f"trainer.output_dir={resumed}"]))
    a, b = read_metrics(straight / "metrics.jsonl")[-1], read_metrics(resumed / "metrics.jsonl")[-1]
    compared = [k for k in a if k.startswith(("reward/", "actor/", "episode/", "val/", "tool/"))]
    assert len(compared) > 20
    assert {k: a[k] for k in compared} == {k: b[k] for k in compared}


def test_tiny_run_with_lora_trains_only_the_adapter(tmp_path):
    out = tmp_path / "lora"
    run(load_config(TINY_RUN + [
        "trainer.total_steps=1", "trainer.val_before_train=false", "trainer.val_every=0",
        "model.lora.enabled=true", "model.freeze_vision=true", f"trainer.output_dir={out}",
    ]))
    weights = load_file(str(out / "checkpoints" / "step_00000001" / "model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert not any("visual" in k for k in weights)
    record = read_metrics(out / "metrics.jsonl")[-1]
    assert math.isfinite(record["actor/kl"]) and record["actor/grad_norm"] > 0


# --------------------------------------------------------------------------------------------
# One update learns
# --------------------------------------------------------------------------------------------


def _one_token_trajectory(prompt_ids, token, logprob, reward, group="g"):
    ids = list(prompt_ids) + [token]
    n = len(ids)
    return from_tokens(ids, [0] * (n - 1) + [1], [0.0] * (n - 1) + [reward], [0.0] * (n - 1) + [logprob],
                       group_id=group, reward_components={"acc": reward}, success=reward > 0)


def test_one_grpo_update_raises_the_probability_of_the_rewarded_answer():
    """A single-step task: answering token A pays 1, token B pays 0; after one GRPO update the
    real tiny model says A more often and B less often."""
    cfg = load_config([
        "+exp=tiny", "rollout.n=8", "rollout.prompts_per_step=1", "algo.mini_batch_size=1",
        "algo.micro_batch_size=2", "algo.lr=1e-3", "algo.kl.coef=0",
    ])
    policy = Policy.load("tiny:qwen2_5_vl", dtype="float32")
    tok = policy.tokenizer
    prompt = tok("<|im_start|>user\nIs the image upright? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n",
                 add_special_tokens=False)["input_ids"]
    token_a, token_b = tok("yes", add_special_tokens=False)["input_ids"][0], tok("no", add_special_tokens=False)["input_ids"][0]
    assert token_a != token_b

    def logprob(token):
        with torch.no_grad():
            batch = policy.collate([_one_token_trajectory(prompt, token, 0.0, 0.0)])
            return float(policy.logprobs(batch)[0][0, -1])

    before_a, before_b = logprob(token_a), logprob(token_b)
    trajectories = [_one_token_trajectory(prompt, token_a, before_a, 1.0) for _ in range(4)]
    trajectories += [_one_token_trajectory(prompt, token_b, before_b, 0.0) for _ in range(4)]
    rewards_G = torch.tensor([t.reward for t in trajectories])
    advantages_G = compute_advantages(rewards_G, _groups(trajectories), "grpo")
    assert advantages_G[:4].gt(0).all() and advantages_G[4:].lt(0).all()

    optimizer = build_optimizer(policy.named_parameters(), cfg.algo)
    scheduler = build_scheduler(optimizer, cfg.algo, total_updates=1)
    metrics = grpo_update(policy, optimizer, scheduler, _groups(trajectories), advantages_G, [True] * 8, cfg)
    assert metrics["data/updates"] == 1 and metrics["actor/grad_norm"] > 0
    # The first mini-batch is on-policy: the ratio starts at 1, nothing is clipped.
    assert metrics["actor/clipfrac"] == 0
    after_a, after_b = logprob(token_a), logprob(token_b)
    assert after_a > before_a + 1e-3, (before_a, after_a)
    assert after_b < before_b - 1e-3, (before_b, after_b)


# --------------------------------------------------------------------------------------------
# Group terms, masks, advantages
# --------------------------------------------------------------------------------------------


def _traj(group, reward, success=False, calls=0, truncated=False):
    return dataclasses.replace(_one_token_trajectory([1, 2], 3, -1.0, reward, group), success=success,
                               num_tool_calls=calls, truncation="max_turns" if truncated else "")


def _groups(trajectories, beta=0.0):
    return make_groups(trajectories, RewardConfig(beta=beta))


def test_necessity_is_added_per_group_when_beta_is_positive():
    # Group a: two tool users correct, two tool-free wrong -> necessity 1 - 0 = 1 for the two.
    # Group b: a tool-free rollout was correct twice -> answerable without tools, no bonus.
    group = [_traj("a", 1, True, 1), _traj("a", 1, True, 2), _traj("a", 0, False, 0), _traj("a", 0, False, 0),
             _traj("b", 1, True, 1), _traj("b", 1, True, 0), _traj("b", 1, True, 0), _traj("b", 0, False, 1)]
    assert [t for g in _groups(group, 0.5) for t in g.group_terms_G] == [0.5, 0.5, 0, 0, 0, 0, 0, 0]
    assert [t for g in _groups(group, 0.0) for t in g.group_terms_G] == [0.0] * 8
    assert [r for g in _groups(group, 0.5) for r in g.rewards_G] == [1.5, 1.5, 0, 0, 1, 1, 1, 0]


def test_advantages_use_groups_in_any_order():
    groups = _groups([_traj("x", 1), _traj("y", 5), _traj("x", 3), _traj("y", 5)])  # built once, x then y
    trajs = [t for g in groups for t in g.trajectories_G]
    assert [t.reward for t in trajs] == [1, 3, 5, 5]
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0])
    # Group x: mean 2, std sqrt(2) -> -1/sqrt(2), +1/sqrt(2); group y constant -> 0.
    expected = torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0])
    assert torch.allclose(compute_advantages(rewards, groups, "grpo"), expected, atol=1e-5)
    assert torch.allclose(compute_advantages(rewards, groups, "drgrpo"), torch.tensor([-1.0, 1, 0, 0]))
    assert torch.allclose(compute_advantages(rewards, groups, "rloo"), torch.tensor([-2.0, 2, 0, 0]))


def test_truncated_masking_and_dynamic_sampling():
    groups = _groups([_traj("x", 1), _traj("x", 0, truncated=True), _traj("y", 2), _traj("y", 2)])
    assert loss_keep_mask(groups, mask_truncated=False, dynamic_sampling=False) == [True] * 4
    assert loss_keep_mask(groups, mask_truncated=True, dynamic_sampling=False) == [True, False, True, True]
    assert loss_keep_mask(groups, mask_truncated=True, dynamic_sampling=True) == [True, False, False, False]


def test_groups_with_signal_by_hand():
    # x: rewards 1, 0 -> advantages +-0.71; y: 2, 2 -> all 0; z: 0, 3 -> +-0.71. Order of first appearance.
    groups = _groups([_traj("x", 1), _traj("y", 2), _traj("x", 0), _traj("z", 0), _traj("y", 2), _traj("z", 3)])
    advantages = compute_advantages(torch.tensor([r for g in groups for r in g.rewards_G]), groups, "grpo")
    assert groups_with_signal(groups, advantages) == [True, False, True]
    assert groups_with_signal(groups[1:2], advantages[[2, 3]]) == [False]


# --------------------------------------------------------------------------------------------
# Shared training pieces
# --------------------------------------------------------------------------------------------


def test_prompt_sampler_covers_each_epoch_and_resumes_exactly():
    sampler = PromptSampler(5, seed=3)
    first = sampler.draw(3) + sampler.draw(2)
    assert sorted(first) == [0, 1, 2, 3, 4]  # one epoch: every task once
    crossing = sampler.draw(7)  # the rest of epoch 1 spills into epoch 2
    assert sorted(crossing[:5]) == [0, 1, 2, 3, 4] and sampler.state_dict()["epoch"] == 2
    state = json.loads(json.dumps(sampler.state_dict()))
    resumed = PromptSampler(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.draw(4) == sampler.draw(4)
    with pytest.raises(ValueError, match="same env.tasks"):
        PromptSampler(6, seed=3).load_state_dict(state)


def test_scheduler_warmup_then_decay_by_hand():
    cfg = load_config(["+exp=tiny", "algo.lr=1.0", "algo.warmup_steps=2", "algo.scheduler=linear"]).algo
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = build_optimizer([("w", param)], cfg)
    scheduler = build_scheduler(optimizer, cfg, total_updates=6)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup (u+1)/3 for u=0,1; then 1 - (u-2)/4 for u=2..6
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0])
    cfg = load_config(["+exp=tiny", "algo.lr=1.0", "algo.scheduler=cosine"]).algo
    optimizer = build_optimizer([("w", torch.nn.Parameter(torch.zeros(2, 2)))], cfg)
    scheduler = build_scheduler(optimizer, cfg, total_updates=4)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # halfway down the cosine
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([("w", torch.nn.Parameter(torch.zeros(1), requires_grad=False))], cfg)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_gradient_accumulation_equals_one_big_batch(agg):
    """Micro-batches of uneven token counts give exactly the gradient of the whole mini-batch."""
    torch.manual_seed(0)
    x_BT = torch.randn(5, 7)
    mask_BT = (torch.rand(5, 7) > 0.4).float()
    mask_BT[2] = 0  # a row with nothing in the loss

    def run_with(splits):
        weight = torch.nn.Parameter(torch.tensor(0.5))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        micro = [{"x": x_BT[a:b], "loss_mask": mask_BT[a:b]} for a, b in splits]

        def loss_fn(batch):
            loss = aggregate((weight * batch["x"]) ** 2, batch["loss_mask"], agg)
            return loss, {"value": loss.detach()}

        stats = update_step(micro, loss_fn, [weight], optimizer, scheduler, grad_clip=1e9, agg=agg)
        return float(weight), stats

    whole, whole_stats = run_with([(0, 5)])
    split, split_stats = run_with([(0, 1), (1, 3), (3, 5)])
    assert split == pytest.approx(whole, abs=1e-6)
    assert split_stats["value"] == pytest.approx(whole_stats["value"], abs=1e-6)
    assert split_stats["grad_norm"] == pytest.approx(whole_stats["grad_norm"], abs=1e-6)


def test_update_step_without_loss_tokens_takes_no_step():
    weight = torch.nn.Parameter(torch.tensor(1.0))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats = update_step([{"loss_mask": torch.zeros(2, 3)}], lambda b: (weight * 0, {}), [weight], optimizer,
                        scheduler, grad_clip=1.0, agg="token-mean")
    assert stats is None and float(weight) == 1.0


def test_lockstep_runs_every_micro_batch_but_steps_on_the_loss_tokens_only():
    calls = []

    def run_with(lockstep):
        weight = torch.nn.Parameter(torch.tensor(1.0))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        micro = [{"name": "empty", "loss_mask": torch.zeros(1, 2)}, {"name": "real", "loss_mask": torch.ones(1, 2)}]

        def loss_fn(batch):
            calls.append((lockstep, batch["name"]))
            return (weight - 3.0) ** 2, {}

        update_step(micro, loss_fn, [weight], optimizer, scheduler, grad_clip=1e9, agg="token-mean", lockstep=lockstep)
        return float(weight)

    # d/dw (w - 3)^2 at 1 is -4: one SGD step of lr 1 gives 5, whether or not the empty one ran.
    assert run_with(False) == run_with(True) == 5.0
    assert calls == [(False, "real"), (True, "empty"), (True, "real")]
    with pytest.raises(ValueError, match="at least one micro-batch"):
        weight = torch.nn.Parameter(torch.tensor(1.0))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        update_step([], lambda b: (weight, {}), [weight], optimizer, None, grad_clip=1.0, agg="token-mean",
                    lockstep=True)


def test_minibatches_take_whole_groups_and_reshuffle_after_the_first_epoch():
    groups = _groups([_traj(g, 0) for g in ("a", "a", "b", "b", "c", "c")])
    batches = list(group_minibatches(groups, prompts_per_update=2, epochs=2, seed=5,
                                     keep=[True, False, True, True, True, True]))
    assert batches[:2] == [[0, 2, 3], [4, 5]]  # the rollout order first; trajectory 1 left out
    assert len(batches) == 4 and sorted(i for b in batches[2:] for i in b) == [0, 2, 3, 4, 5]
    assert all(set(b) in ({0}, {2, 3}, {4, 5}, {0, 2, 3}, {0, 4, 5}, {2, 3, 4, 5}) for b in batches[2:])
    assert batches == list(group_minibatches(groups, 2, 2, seed=5, keep=[True, False, True, True, True, True]))
    assert list(group_minibatches([], prompts_per_update=2, epochs=2, seed=0)) == [[], []]  # every rank steps alike


def test_kept_groups_drop_the_left_out_trajectories_and_the_emptied_groups():
    groups = _groups([_traj("a", 1, success=True, calls=1), _traj("a", 0), _traj("b", 5), _traj("c", 2),
                      _traj("c", 3)], beta=0.5)
    kept = kept_groups(groups, [True, False, False, True, True])
    assert [[t.group_id for t in g.trajectories_G] for g in kept] == [["a"], ["c", "c"]]
    assert [g.rewards_G for g in kept] == [groups[0].rewards_G[:1], groups[2].rewards_G]  # terms stay with theirs
    with pytest.raises(ValueError, match="one per trajectory"):
        kept_groups(groups, [True] * 4)


def test_pad_rows_left_aligns_rows_with_zeros_after():
    padded = pad_rows([[1.0, 2.0], torch.tensor([3.0]), []], width=3)
    assert padded.dtype == torch.float32 and padded.tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0]]
    assert pad_rows([[1.0], [2.0, 3.0]]).shape == (2, 2)


def test_rollout_and_validation_metrics_by_hand():
    a = _traj("x", 1.0, success=True, calls=2)
    b = _traj("x", 0.0, success=False, calls=0, truncated=True)
    summaries = [episode_summary(a), episode_summary(b, reward=0.5)]
    m = rollout_metrics(summaries)
    assert m["reward/total"] == 0.75 and m["reward/acc"] == 0.5
    assert m["tool/calls_per_episode"] == 1.0 and m["episode/truncated"] == 0.5 and m["episode/success"] == 0.5
    assert m["episode/response_length"] == 1.0 and m["episode/turns"] == 1.0
    summaries[0]["category"], summaries[1]["category"] = "charts", "tiny_ocr"
    v = validation_metrics(summaries + [dict(summaries[0], success=False)])
    assert v["val/acc"] == pytest.approx(1 / 3)
    assert v["val/acc/charts"] == 0.5 and v["val/acc/tiny_ocr"] == 0.0
    # Two episodes called the tool (one right), one did not (wrong).
    assert v["val/tool/acc_with_calls"] == 0.5 and v["val/tool/acc_without_calls"] == 0.0
    assert "val/tool/acc_without_calls" not in validation_metrics(summaries[:1])


# --------------------------------------------------------------------------------------------
# Data-parallel ranks (two gloo processes on CPU)
# --------------------------------------------------------------------------------------------

_DDP_WORKER = '''
import os, sys, torch
import algos.grpo as grpo
import algos.run as run_skeleton
from algos.config import load_config

out = sys.argv[1]
real_save = run_skeleton.save_checkpoint  # what the trainers' checkpoints go through (algos.run.save)

def save_and_record(output_dir, step, model, *args, **kwargs):
    # Every rank records the full weights it holds (gathered from the shards under FSDP2).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    torch.save({n: p.detach().clone() for n, p in weights.items()}, os.path.join(out, f"weights_rank{os.environ['RANK']}.pt"))
    torch.save({"sharded": any(type(p).__name__ == "DTensor" for p in model.parameters())},
               os.path.join(out, f"layout_rank{os.environ['RANK']}.pt"))
    return real_save(output_dir, step, model, *args, **kwargs)

run_skeleton.save_checkpoint = save_and_record
summary = grpo.run(load_config(sys.argv[2:] + [f"trainer.output_dir={out}"]))
'''


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_gloo_ranks_keep_identical_replicas_and_rank0_logs_all_episodes(tmp_path, fsdp):
    # trainer.fsdp=true runs the FSDP2 path of a GPU run (gathered rollouts and scoring, lock-step
    # updates, reduce-scattered gradients, sharded checkpoints) over gloo on the CPU.
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port for the rendezvous (torchrun cannot take 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    replaced = ("algo.mini_batch_size", "trainer.sample_table_every")
    overrides = [o for o in TINY_RUN if not o.startswith(replaced)]
    overrides += ["algo.mini_batch_size=2", "trainer.total_steps=1", "trainer.val_before_train=false",
                  "trainer.sample_table_every=0", f"trainer.fsdp={str(fsdp).lower()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script),
         str(tmp_path / "run"), *overrides],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "run" / "weights_rank0.pt")
    rank1 = torch.load(tmp_path / "run" / "weights_rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients were averaged
    initial = Policy.load("tiny:qwen2_5_vl", dtype="float32").model.state_dict()
    assert rank0.keys() == initial.keys()
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)  # and they did train
    assert torch.load(tmp_path / "run" / "layout_rank0.pt") == {"sharded": fsdp}
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]  # rank 0 logged both ranks' episodes
    assert record["step"] == 1 and "val/acc" in record and record["data/trajectories_in_loss"] == 4
    assert record["data/groups_with_signal"] in (0.0, 0.5, 1.0)  # both ranks' groups (one prompt each)


def test_tiny_run_with_kl_in_reward_dynamic_sampling_and_necessity(tmp_path):
    out = tmp_path / "variants"
    run(load_config(TINY_RUN + [
        "trainer.total_steps=1", "trainer.val_before_train=false", "trainer.val_every=0",
        "algo.kl.in_loss=false", "algo.kl.kind=k1", "algo.dynamic_sampling=true", "algo.ppo_epochs=2",
        "algo.loss_agg=seq-mean-token-sum-norm", "algo.advantage_estimator=rloo", "reward.beta=0.5",
        f"trainer.output_dir={out}",
    ]))
    record = read_metrics(out / "metrics.jsonl")[-1]
    assert "reward/necessity" in record and math.isfinite(record["actor/kl"])
    # Dynamic sampling drops the groups whose rewards are all equal: what is left is in the loss.
    assert 0 <= record["data/trajectories_in_loss"] <= 4
    assert record["data/updates"] <= 4  # 2 epochs x 2 mini-batches, fewer when groups were dropped


# --------------------------------------------------------------------------------------------
# The command line, killed and resumed
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # two interpreter starts of torch + transformers: ~20-30 s on a loaded 2-core box
def test_cli_run_killed_mid_way_resumes_without_repeating_or_losing_steps(tmp_path):
    """`python -m algos.grpo +exp=tiny`, SIGKILLed after step 1's checkpoint, then the same
    command again: it continues at step 2 with the next prompts, and metrics.jsonl holds each
    step exactly once."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cli"
    command = [sys.executable, "-m", "algos.grpo", *TINY_RUN, "trainer.total_steps=3", f"trainer.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "step_00000001" / "COMPLETE").is_file():
            assert process.poll() is None, f"the run ended before step 1: {process.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint of step 1 within 180 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and "GRPO finished at step 3" in done.stderr  # messages: stderr, and grpo.log
    assert "GRPO finished at step 3" in (out / "grpo.log").read_text()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    state = json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["data_state"]["position"] == 6  # 3 steps x 2 prompts: none skipped, none drawn twice
    assert (out / ".hydra" / "config.yaml").is_file()  # Hydra wrote the composed config beside the run


def test_tool_success_and_op_frequencies():
    with_ops = dataclasses.replace(_traj("x", 1.0, calls=3), num_failed_calls=1, used_ops=["rotate_90", "crop"])
    without = dataclasses.replace(_traj("x", 1.0, calls=1), num_failed_calls=0, used_ops=["crop"])
    m = rollout_metrics([episode_summary(with_ops), episode_summary(without)])
    assert m["tool/exec_success"] == 0.75  # 3 of 4 calls ran
    assert m["tool/op/crop"] == 1.0 and m["tool/op/rotate_90"] == 0.5  # share of episodes
