"""Data-parallel helpers: single-process no-ops, and two real gloo ranks launched by torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from algos import distributed as D

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_a_no_op(single_process):
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert not D.is_distributed() and D.is_main()
    D.barrier()
    assert D.all_reduce_mean({"b": 2, "a": 0.5}) == {"a": 0.5, "b": 2.0}
    assert D.broadcast_object({"seed": 3}) == {"seed": 3}
    model = nn.Linear(2, 2)
    assert D.wrap_model(model, info) is model
    assert D.unwrap_model(model) is model


def test_inconsistent_launch_variables_are_clear_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5 and WORLD_SIZE=2"):
        D.init_distributed()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        D.init_distributed()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        D.init_distributed()


def test_fsdp2_needs_a_process_group(single_process):
    with pytest.raises(RuntimeError, match="FSDP2 needs a process group"):
        D.fsdp2_wrap(nn.Linear(2, 2))


def test_fsdp2_needs_layers_to_shard():
    class Flat(nn.Module):
        _no_split_modules = ["DecoderLayer"]

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)

    # The layer check runs before any sharding, so a process group of one suffices.
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="no layer of Flat matches"):
            D.fsdp2_wrap(Flat())
    finally:
        dist.destroy_process_group()


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    from algos import distributed as D
    from algos.checkpoint import save_checkpoint, load_checkpoint

    out = sys.argv[1]
    info = D.init_distributed()
    assert info.world_size == 2 and D.is_distributed()

    reduced = D.all_reduce_mean({"reward/total": float(info.rank + 1), "actor/kl": 10.0 * info.rank})
    seed = D.broadcast_object({"seed": 1234} if info.is_main else None)
    try:
        D.all_reduce_mean({"reward/total": 1.0} if info.is_main else {"reward/totl": 1.0})
        mismatch = "not detected"
    except RuntimeError as err:
        mismatch = str(err)

    torch.manual_seed(0)  # same initial weights on both ranks, as DDP expects
    model = D.wrap_model(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), info)
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + info.rank)  # each rank trains on its own data
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    optimizer.step()

    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(2)]
    torch.distributed.all_gather(gathered, params)

    ckpt = save_checkpoint(out, 1, model, optimizer, data_state={"position": 16 * 2})
    before = params.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    state = load_checkpoint(ckpt, model, optimizer)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])

    with open(os.path.join(out, f"rank{info.rank}.json"), "w") as f:
        json.dump({
            "rank": info.rank, "reduced": reduced, "seed": seed, "mismatch": mismatch, "loss": loss.item(),
            "params": [t.tolist() for t in gathered], "moved": not torch.equal(initial, params), "restored": torch.equal(before, after),
            "step": state.step, "data_state": state.data_state,
            "checkpoint_files": sorted(os.listdir(ckpt)),
        }, f)
    D.barrier()
    D.destroy_distributed()
    """
)


def test_two_gloo_ranks_reduce_and_step_ddp_identically(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the interpreter"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(script), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    for r in ranks:
        # mean of 1 and 2; mean of 0 and 10
        assert r["reduced"] == {"actor/kl": 5.0, "reward/total": 1.5}
        assert r["seed"] == {"seed": 1234}
        assert "ranks passed different metric names" in r["mismatch"]
        # after one DDP step on different data, both ranks hold the same parameters
        rank0_params, rank1_params = r["params"]
        assert rank0_params == rank1_params
        assert r["moved"]
        assert r["restored"] and r["step"] == 1 and r["data_state"] == {"position": 32}
        assert {"rng_rank0.pt", "rng_rank1.pt", "COMPLETE", "model.safetensors"} <= set(r["checkpoint_files"])
    assert ranks[0]["loss"] != ranks[1]["loss"]  # the ranks really saw different data


FSDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import FSDPModule
    from algos import distributed as D
    from algos.checkpoint import save_checkpoint, load_checkpoint

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return x + torch.tanh(self.proj(x))

    class Net(nn.Module):
        _no_split_modules = ["Block"]  # what Hugging Face models declare

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    out = sys.argv[1]
    info = D.init_distributed()
    if not dist.is_initialized():  # one GPU: FSDP2 still needs a process group to shard over
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=info.device)
    assert dist.get_backend() == ("nccl" if info.device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = D.fsdp2_wrap(Net().to(info.device), mixed_precision=None)
    assert all(isinstance(m, FSDPModule) for m in [model, *model.layers])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(10 + dist.get_rank())
    loss = model(torch.randn(8, 16, device=info.device)).pow(2).mean()
    loss.backward()
    optimizer.step()

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    before = get_model_state_dict(model, options=full)
    moments_before = get_optimizer_state_dict(model, optimizer, options=full)
    ckpt = save_checkpoint(out, 1, model, optimizer, data_state={"position": 8})
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for moments in optimizer.state.values():
            for value in moments.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    value.zero_()
    state = load_checkpoint(ckpt, model, optimizer)
    after = get_model_state_dict(model, options=full)
    moments_after = get_optimizer_state_dict(model, optimizer, options=full)
    if dist.get_rank() == 0:
        for name, moments in moments_before["state"].items():
            for key, value in moments.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(moments_after["state"][name][key])), (name, key)
        assert any(torch.as_tensor(m["exp_avg"]).abs().sum() > 0 for m in moments_after["state"].values())
    loss2 = model(torch.randn(8, 16, device=info.device)).pow(2).mean()
    loss2.backward()
    optimizer.step()  # the restored optimizer state fits the shards
    if dist.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({
                "world_size": dist.get_world_size(),
                "restored": sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before),
                "step": state.step, "data_state": state.data_state, "finite": bool(torch.isfinite(loss2)),
            }, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _run_fsdp_worker(tmp_path, nproc, extra_env):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), **extra_env)
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"  # a fresh run folder: nothing of an aborted attempt is reused
        out.mkdir()
        result = subprocess.run(
            [torchrun, "--standalone", f"--nproc_per_node={nproc}", str(script), str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=280,
        )
        # torch's gloo threads now and then abort a rank as it exits ("terminate called without an
        # active exception", SIGABRT): a crash of torch's teardown, not of the code under test. One
        # more run settles it; it must then pass whole.
        if result.returncode == 0 or "terminate called without an active exception" not in result.stderr:
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_fsdp2_shards_layers_and_checkpoints_round_trip_on_cpu(tmp_path):
    # FSDP2 runs over gloo too: the same sharding and checkpoint code the GPUs use.
    res = _run_fsdp_worker(tmp_path, 2, {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert res == {"world_size": 2, "restored": True, "step": 1, "data_state": {"position": 8}, "finite": True}


@pytest.mark.gpu
def test_fsdp2_shards_layers_and_checkpoints_round_trip_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    nproc = min(2, torch.cuda.device_count())
    res = _run_fsdp_worker(tmp_path, nproc, {})
    assert res == {"world_size": nproc, "restored": True, "step": 1, "data_state": {"position": 8}, "finite": True}


FSDP_POLICY_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sys.path.insert(0, sys.argv[2])
    from test_policy import _trajectory
    from agents.policy import Policy
    from algos import distributed as D
    from algos.update import update_step

    out = sys.argv[1]
    info = D.init_distributed()
    rank = dist.get_rank()
    reference = Policy.load("tiny:qwen2_5_vl")  # the same weights on both ranks, unsharded
    policy = Policy.load("tiny:qwen2_5_vl")
    D.fsdp2_wrap(policy.model, mixed_precision=None)
    batches = [policy.collate([_trajectory(policy, seed)]) for seed in (0, 1)]
    mine = batches[rank]  # each rank trains on its own trajectory

    with torch.no_grad():
        sharded_lp, sharded_ent = policy.logprobs(mine)
        full_lp, full_ent = reference.logprobs(mine)
    head_resharded = type(policy.model.lm_head.weight).__name__ == "DTensor"

    def loss_fn(micro):  # micro: the batch, and the loss mask that weighs it in update_step
        batch = micro["batch"]
        logprobs_BT, _ = policy.logprobs(batch)
        return -(logprobs_BT * batch["loss_mask"]).sum() / batch["loss_mask"].sum(), {}

    def step(micro_batches, lockstep):
        # The trainers' optimizer step; FSDP2 reduce-scatters the gradients itself (sync_gradients=False).
        return update_step(micro_batches, loss_fn, list(policy.parameters()), optimizer, scheduler, grad_clip=1e9,
                           agg="token-mean", sync_gradients=False, lockstep=lockstep)

    def reference_step():
        # By hand on the unsharded model: the token mean over both trajectories, one SGD step.
        reference.model.zero_grad()
        tokens = sum(b["loss_mask"].sum() for b in batches)
        loss = sum(-(reference.logprobs(b)[0] * b["loss_mask"]).sum() for b in batches) / tokens
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1e9)
        torch.optim.SGD(list(reference.parameters()), lr=0.5).step()
        return float(grad_norm)

    def param_diff():
        full = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True))
        expected = reference.model.state_dict()
        return full, expected, max(float((full[k].float() - expected[k].float()).abs().max()) for k in expected)

    optimizer = torch.optim.SGD(list(policy.parameters()), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    initial = {k: v.clone() for k, v in reference.model.state_dict().items()}
    stats = step([{"batch": mine, "loss_mask": mine["loss_mask"]}], lockstep=False)  # one trajectory per rank
    ref_grad_norm = reference_step()
    full, expected, first_diff = param_diff()
    # Lock-step: rank 0 trains on both trajectories, rank 1 has nothing to train on and runs a
    # zero-weight pass twice (FSDP2's collectives need equally many passes on every rank).
    nothing = {"batch": mine, "loss_mask": torch.zeros_like(mine["loss_mask"])}
    uneven = [{"batch": b, "loss_mask": b["loss_mask"]} for b in batches] if rank == 0 else [nothing]
    lockstep_stats = step(uneven, lockstep=True)
    lockstep_ref_grad_norm = reference_step()
    _, _, lockstep_diff = param_diff()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({
            "logprobs_diff": float((sharded_lp - full_lp).abs().max()),
            "entropy_diff": float((sharded_ent - full_ent).abs().max()),
            "scored_tokens": int((mine["loss_mask"] > 0).sum()),
            "head_resharded": head_resharded,
            "same_names": sorted(full) == sorted(expected),
            "param_diff": first_diff, "lockstep_param_diff": lockstep_diff,
            "moved": max(float((expected[k] - initial[k]).abs().max()) for k in expected),
            "grad_norm": stats["grad_norm"], "ref_grad_norm": ref_grad_norm,
            "lockstep_grad_norm": lockstep_stats["grad_norm"], "lockstep_ref_grad_norm": lockstep_ref_grad_norm,
            "params": {k: full[k].flatten()[:64].tolist() for k in ("lm_head.weight", "model.language_model.norm.weight")
                       if k in full},
        }, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_fsdp2_policy_logprobs_and_step_match_the_unsharded_model_on_cpu(tmp_path):
    # Policy.logprobs reads the LM head outside the model's forward: under FSDP2 it must gather
    # the root unit's weight itself, in forward and in backward (gloo over CPU, as on GPUs). And
    # update_step(lockstep=True) keeps the ranks' collectives paired when their work is uneven.
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    script = tmp_path / "fsdp_policy_worker.py"
    script.write_text(FSDP_POLICY_WORKER)
    out = tmp_path / "run"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(script), str(out), str(REPO / "tests")],
        capture_output=True, text=True, env=env, timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["scored_tokens"] > 0
        assert r["logprobs_diff"] < 1e-5 and r["entropy_diff"] < 1e-5
        assert r["head_resharded"]  # scoring without gradients does not leave the root gathered
        assert r["same_names"]
        assert r["moved"] > 1e-3  # the step really changed the weights ...
        assert r["param_diff"] < 1e-5  # ... exactly as one step on both ranks' data at once
        assert abs(r["grad_norm"] - r["ref_grad_norm"]) < 1e-4 * r["ref_grad_norm"]
        # Uneven micro-batches in lock-step: the zero-weight passes add nothing to the step.
        assert r["lockstep_param_diff"] < 1e-5
        assert abs(r["lockstep_grad_norm"] - r["lockstep_ref_grad_norm"]) < 1e-4 * r["lockstep_ref_grad_norm"]
    assert ranks[0]["params"] and ranks[0]["params"] == ranks[1]["params"]  # both ranks hold the same weights
