"""Checkpoints: a resumed run continues bit-for-bit; partial saves are never resumed from."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import algos.checkpoint as C
from algos.checkpoint import (
    COMPLETE_MARKER,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


class TinyPolicy(nn.Module):
    """Embedding + projection tied to it, like a language model's input and output layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.q_proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.q_proj(self.embed(tokens))))


def build(seed=0):
    torch.manual_seed(seed)
    model = TinyPolicy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, position):
    """One step whose data depends on the data position and whose noise on all three RNGs."""
    tokens = torch.arange(position, position + 4) % 12
    noise = torch.randn(4, 12) * 0.01 + float(np.random.rand()) * 0.01 + random.random() * 0.01
    loss = ((model(tokens) - noise) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return position + 4


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # Uninterrupted: 5 steps.
    model, opt, sched = build()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    position = 0
    for _ in range(5):
        position = train_step(model, opt, sched, position)
    expected, expected_position = params(model), position
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    # Interrupted after 3 steps, resumed in fresh objects with scrambled RNGs.
    model, opt, sched = build()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    position = 0
    for step in range(1, 4):
        position = train_step(model, opt, sched, position)
        save_checkpoint(tmp_path, step, model, opt, sched, data_state={"position": position}, keep_last=2)

    model, opt, sched = build(seed=99)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    ckpt = resolve_resume("auto", tmp_path)
    assert ckpt == tmp_path / "checkpoints" / "step_00000003"
    state = load_checkpoint(ckpt, model, opt, sched)
    assert state.step == 3 and state.data_state == {"position": 12}
    assert sched.last_epoch == 3
    position = state.data_state["position"]
    for _ in range(2):
        position = train_step(model, opt, sched, position)

    assert position == expected_position
    actual = params(model)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    assert model.head.weight is model.embed.weight  # loading kept the tie


def test_rng_states_round_trip(tmp_path):
    model, opt, _ = build()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's legacy state
    path = save_checkpoint(tmp_path, 1, model)
    draws = (random.random(), np.random.randn(), float(torch.randn(1)))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_checkpoint(path, model)
    assert (random.random(), np.random.randn(), float(torch.randn(1))) == draws


def test_checkpoint_layout_and_metadata(tmp_path):
    model, opt, sched = build()
    path = save_checkpoint(tmp_path, 7, model, opt, sched, data_state={"epoch": 1, "index": 3}, extra={"run": "a"})
    assert path.name == "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [COMPLETE_MARKER, "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_rank0.pt", "trainer_state.json"]
    )
    meta = json.loads((path / "trainer_state.json").read_text())
    assert meta["step"] == 7 and meta["data_state"] == {"epoch": 1, "index": 3} and meta["extra"] == {"run": "a"}
    assert meta["trainable_only"] is False
    weights = load_file(str(path / "model.safetensors"))
    torch.testing.assert_close(weights["q_proj.weight"], model.q_proj.weight.detach())
    assert not list(tmp_path.glob("checkpoints/.tmp-*"))


def test_partial_checkpoint_is_ignored(tmp_path):
    model, opt, sched = build()
    good = save_checkpoint(tmp_path, 2, model, opt, sched)
    # A later save that was killed before its completion marker (e.g. a copy that stopped).
    partial = tmp_path / "checkpoints" / "step_00000004"
    partial.mkdir()
    (partial / "trainer_state.json").write_text(json.dumps({"step": 4}))
    # and a save killed before the rename
    (tmp_path / "checkpoints" / ".tmp-step_00000005").mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert resolve_resume("auto", tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(partial, model)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        resolve_resume(str(partial), tmp_path)


def test_save_that_crashes_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    model, opt, sched = build()
    first = save_checkpoint(tmp_path, 1, model, opt, sched)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(C, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, opt, sched)
    assert latest_checkpoint(tmp_path) == first
    monkeypatch.undo()
    # The next attempt at that step clears the leftover and succeeds.
    second = save_checkpoint(tmp_path, 2, model, opt, sched)
    assert latest_checkpoint(tmp_path) == second
    assert not list(tmp_path.glob("checkpoints/.tmp-*"))


def test_keep_last_deletes_the_oldest(tmp_path):
    model, _, _ = build()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]


def test_saving_a_step_again_replaces_it(tmp_path):
    model, _, _ = build()
    save_checkpoint(tmp_path, 5, model, data_state={"v": 1})
    with torch.no_grad():
        model.q_proj.bias.fill_(3.0)
    path = save_checkpoint(tmp_path, 5, model, data_state={"v": 2})
    fresh, _, _ = build()
    assert load_checkpoint(path, fresh).data_state == {"v": 2}
    assert torch.all(fresh.q_proj.bias == 3.0)
    assert len(list_checkpoints(tmp_path)) == 1


def test_resolve_resume_modes(tmp_path):
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    model, _, _ = build()
    path = save_checkpoint(tmp_path, 3, model)
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(path), "/elsewhere") == path
    assert resolve_resume(str(tmp_path), "/elsewhere") == path  # a run folder: its latest
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_loading_into_a_different_model_is_an_error(tmp_path):
    model, _, _ = build()
    path = save_checkpoint(tmp_path, 1, model)
    with pytest.raises(RuntimeError):
        load_checkpoint(path, nn.Linear(6, 6))


def test_non_json_data_state_is_refused(tmp_path):
    model, _, _ = build()
    with pytest.raises(TypeError, match="data_state must be JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model, data_state={"order": torch.arange(3)})
    assert latest_checkpoint(tmp_path) is None


def test_lora_checkpoint_holds_only_the_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora_model():
        torch.manual_seed(0)
        return get_peft_model(TinyPolicy(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))

    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.arange(4)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    saved = load_file(str(path / "model.safetensors"))
    assert saved and all("lora_" in key for key in saved)
    assert json.loads((path / "trainer_state.json").read_text())["trainable_only"] is True

    restored = lora_model()
    with torch.no_grad():
        for name, p in restored.named_parameters():
            if "lora_" in name:
                p.zero_()
    restored_opt = torch.optim.AdamW([p for p in restored.parameters() if p.requires_grad], lr=1e-2)
    load_checkpoint(path, restored, restored_opt)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


TRAIN_SCRIPT = """
import json, random, sys, time
import numpy as np, torch
from torch import nn
from algos.checkpoint import load_checkpoint, resolve_resume, save_checkpoint

out, total = sys.argv[1], int(sys.argv[2])
random.seed(0); np.random.seed(0); torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
step, position = 0, 0
ckpt = resolve_resume("auto", out)
if ckpt is not None:
    state = load_checkpoint(ckpt, model, optimizer)
    step, position = state.step, state.data_state["position"]
while step < total:
    x = torch.sin(torch.arange(position, position + 8, dtype=torch.float32)).reshape(2, 4)
    noise = torch.randn(2, 1) + float(np.random.rand()) + random.random()
    loss = ((model(x) - noise) ** 2).mean()
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    step, position = step + 1, position + 8
    save_checkpoint(out, step, model, optimizer, data_state={"position": position}, keep_last=2)
    print("STEP", step, flush=True)
    time.sleep(0.02)  # room for the test's SIGKILL to land anywhere
print("DONE", json.dumps({"position": position, "weights": [p.detach().flatten().tolist() for p in model.parameters()]}))
"""


def _parse(stdout):
    (line,) = [l for l in stdout.splitlines() if l.startswith("DONE")]
    return json.loads(line[5:]), [int(l.split()[1]) for l in stdout.splitlines() if l.startswith("STEP")]


def test_sigkilled_run_resumes_where_its_checkpoint_left_off(tmp_path, monkeypatch, capsys):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}

    # The uninterrupted reference runs in this process (same code, fresh RNG seeds).
    monkeypatch.setattr(sys, "argv", ["train.py", str(tmp_path / "uninterrupted"), "12"])
    exec(compile(TRAIN_SCRIPT, "train.py", "exec"), {"__name__": "__main__"})
    expected, _ = _parse(capsys.readouterr().out)

    def finish(out):
        done = subprocess.run([sys.executable, str(script), str(out), "12"], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return _parse(done.stdout)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "12"], stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("STEP 4"):
            proc.send_signal(signal.SIGKILL)  # wherever it is: training, or in the middle of a save
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    killed_at = int(latest_checkpoint(out).name.split("_")[1])
    assert 4 <= killed_at < 12

    resumed, steps = finish(out)
    assert steps == list(range(killed_at + 1, 13))  # continues after its checkpoint, no step twice
    assert resumed["position"] == expected["position"] == 12 * 8
    assert resumed["weights"] == expected["weights"]
