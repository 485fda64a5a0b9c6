"""Resume never silently does nothing: a changed config stops with the keys and the ways on; a
finished run says so; an older run's later checkpoints never win over a new run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from algos import grpo, sft
from algos.checkpoint import (
    ResumeConflict,
    config_changes,
    list_checkpoints,
    plan_resume,
    resolve_resume,
    save_checkpoint,
)
from algos.config import config_to_dict, load_config
from algos.sft_config import load_sft_config

REPO = Path(__file__).resolve().parents[1]


def _run_folder(tmp_path: Path, cfg, step: int, name: str = "run") -> Path:
    """A run folder holding one complete checkpoint of `cfg` at `step` (tiny weights: only the
    config and the step matter before any weights load)."""
    out = tmp_path / name
    save_checkpoint(out, step, nn.Linear(2, 2), extra={"config": config_to_dict(cfg)})
    return out


def _tiny(out: Path, *overrides: str):
    return load_config(["+exp=tiny", f"trainer.output_dir={out}", *overrides])


def test_config_changes_by_hand():
    saved = {"model": {"path": "a", "lora": {"r": 8}}, "trainer": {"total_steps": 4, "seed": 0}, "reward": {"alpha": 1.0}}
    now = {"model": {"path": "b", "lora": {"r": 8}}, "trainer": {"total_steps": 8, "seed": 0}, "reward": {"alpha": 1.0},
           "algo": {"lr": 1e-5}}
    # algo.lr only exists now (a setting newer than the checkpoint): not a change.
    assert config_changes(saved, now) == [("model.path", "a", "b")]
    assert config_changes(saved, saved) == []
    # Run length, logging and resources may change; what the run trains may not.
    assert config_changes({"logger": {"mode": "offline"}, "env": {"sandbox": {"workers": 2}}},
                          {"logger": {"mode": "online"}, "env": {"sandbox": {"workers": 8}}}) == []


def test_changed_model_path_under_resume_auto_stops_naming_the_key_and_the_ways_on(tmp_path):
    out = _run_folder(tmp_path, _tiny(tmp_path / "run"), step=4)
    changed = _tiny(out, "model.path=tiny:qwen3_vl", "algo.lr=1e-4")
    with pytest.raises(ResumeConflict) as caught:
        grpo.run(changed)  # stops before any weights load: this takes no time
    message = str(caught.value)
    assert "model.path: 'tiny:qwen2_5_vl' in the checkpoint, 'tiny:qwen3_vl' now" in message
    assert "algo.lr: 1e-05 in the checkpoint, 0.0001 now" in message
    assert "trainer.output_dir=" in message and "trainer.resume=never" in message
    assert "step 4" in message and str(out) in message


def test_same_settings_and_a_longer_run_resume_without_complaint(tmp_path):
    out = _run_folder(tmp_path, _tiny(tmp_path / "run"), step=2)
    longer = _tiny(out, "trainer.total_steps=6", "logger.mode=offline", "env.sandbox.workers=1")
    point = plan_resume("auto", out, config_to_dict(longer), longer.trainer.total_steps)
    assert point.checkpoint == resolve_resume("auto", out) and point.step == 2 and not point.finished


def test_explicit_checkpoint_with_other_settings_is_the_users_choice(tmp_path, caplog):
    out = _run_folder(tmp_path, _tiny(tmp_path / "run"), step=2)
    changed = _tiny(tmp_path / "new", "algo.lr=1e-4", f"trainer.resume={out}")
    point = plan_resume(changed.trainer.resume, tmp_path / "new", config_to_dict(changed), 4)
    assert point.step == 2
    assert "algo.lr 1e-05 -> 0.0001" in caplog.text  # reported, not refused


def test_finished_run_says_so_and_how_to_continue(tmp_path, caplog):
    cfg = _tiny(tmp_path / "run")
    out = _run_folder(tmp_path, cfg, step=cfg.trainer.total_steps)
    summary = grpo.run(cfg)
    assert summary["already_finished"] and summary["steps"] == 4
    assert "already finished at step 4" in caplog.text
    assert "raise trainer.total_steps" in caplog.text and "trainer.resume=never" in caplog.text
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004"]  # nothing touched


def test_sft_checks_its_config_too(tmp_path):
    cfg = load_sft_config(["+exp=tiny_sft", f"trainer.output_dir={tmp_path / 'sft'}"])
    out = _run_folder(tmp_path, cfg, step=6, name="sft")
    changed = load_sft_config(["+exp=tiny_sft", f"trainer.output_dir={out}", "data.oracle.num_tasks=48"])
    with pytest.raises(ResumeConflict, match="data.oracle.num_tasks: 24 in the checkpoint, 48 now"):
        sft.run(changed)


def test_a_new_run_replaces_the_later_checkpoints_of_an_older_run(tmp_path):
    """resume=never in a folder that holds steps 1..4 of an older run: after the new run's step 2,
    resume=auto must find step 2, not the stale step 4."""
    out = tmp_path / "run"
    for step in (1, 2, 3, 4):
        save_checkpoint(out, step, nn.Linear(2, 2), keep_last=4)
    save_checkpoint(out, 1, nn.Linear(2, 2), keep_last=2)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001"]
    save_checkpoint(out, 2, nn.Linear(2, 2), keep_last=2)
    assert resolve_resume("auto", out).name == "step_00000002"


def test_the_readme_sequence_stops_with_the_message_on_the_command_line(tmp_path):
    """The main command's run folder, then the same command with another model.path: exit 1, the
    message alone on stderr (no traceback), and the same lines in the run's grpo.log."""
    out = _run_folder(tmp_path, _tiny(tmp_path / "run"), step=4)
    done = subprocess.run(
        [sys.executable, "-m", "algos.grpo", "+exp=tiny", "model.path=tiny:qwen3_vl", f"trainer.output_dir={out}"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "error:" in done.stderr and "model.path: 'tiny:qwen2_5_vl' in the checkpoint" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "trainer.resume=never" in (out / "grpo.log").read_text()
