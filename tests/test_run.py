"""The run skeleton the trainers share (algos.run): its schedule, set-up checks and resume."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from algos.config import LoraConfig, load_config  # noqa: E402
from algos.distributed import DistInfo  # noqa: E402
from algos.run import due, start_run, timed  # noqa: E402


def test_periodic_events_fall_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if due(s, 0, 7)] == [7]  # 0: none on the way, still the last step
    assert [s for s in range(1, 5) if due(s, 1, 4)] == [1, 2, 3, 4]


def test_timed_adds_the_seconds_of_the_work():
    metrics = timed("time/validation", lambda: {"val/acc": 0.5})
    assert metrics["val/acc"] == 0.5 and metrics["time/validation"] >= 0.0


def test_a_fresh_run_starts_at_step_zero_and_checks_each_ranks_share(tmp_path, monkeypatch):
    cfg = load_config(["+exp=tiny", f"trainer.output_dir={tmp_path}"])
    start = start_run(cfg, cfg.trainer.total_steps, shares={"rollout.prompts_per_step": 4})
    assert (start.rank, start.world, start.point.checkpoint, start.point.finished) == (0, 1, None, False)
    assert start.output_dir == tmp_path
    # As rank 0 of 3 would see it (no process group is started here).
    monkeypatch.setattr("algos.run.init_distributed", lambda: DistInfo(rank=0, world_size=3))
    with pytest.raises(ValueError, match=r"rollout.prompts_per_step=4 must be divisible by the number of ranks \(3\)"):
        start_run(cfg, cfg.trainer.total_steps, shares={"rollout.prompts_per_step": 4})


def test_lora_adapter_arguments_only_when_enabled():
    assert LoraConfig(enabled=False).adapter_kwargs() is None
    assert LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]).adapter_kwargs() == {
        "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}
