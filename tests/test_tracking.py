"""Tracker: W&B offline run files, metrics.jsonl, sample tables with images, resume, rank 0 only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from algos.config import LoggerConfig
from algos.tracking import Tracker, check_metric_name, read_metrics, resolve_wandb_mode


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """No credentials, no home-directory state: W&B's files stay in the test's folder."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def offline(**kw):
    return LoggerConfig(mode="offline", progress_bar=False, **kw)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_run_writes_wandb_files_and_metrics_jsonl(tmp_path):
    out = tmp_path / "run"
    with Tracker(offline(), out, run_config={"algo": {"lr": 1e-6}}, total_steps=3) as tracker:
        assert tracker.mode == "offline"
        tracker.log({"reward/total": torch.tensor(0.5), "actor/kl": np.float32(0.25), "lr": 1e-6}, step=1)
        tracker.log({"val/acc": 0.75, "val/acc/charts": 1.0, "tool/op/rotate_90": 0.5}, step=1)
        tracker.log({"reward/total": 0.75, "episode/turns": np.int64(3)}, step=2)

    records = lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 1, 2]
    assert all(isinstance(r["time"], float) and r["time"] > 1.7e9 for r in records)
    assert records[0] == {"step": 1, "time": records[0]["time"], "reward/total": 0.5, "actor/kl": 0.25, "lr": 1e-6}
    assert records[2]["episode/turns"] == 3.0
    merged = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in merged] == [1, 2]
    assert merged[0]["val/acc"] == 0.75 and merged[0]["reward/total"] == 0.5

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run_id = (out / "wandb_run_id").read_text().strip()
    assert run_dir.name.endswith(run_id)
    assert (run_dir / f"run-{run_id}.wandb").stat().st_size > 0


def test_sample_table_writes_pngs_and_rows(tmp_path):
    red = Image.new("RGB", (20, 10), "red")
    gray = np.full((6, 8), 128, dtype=np.uint8)
    rows = [
        {"question": "What is written?", "answer": "42", "reward/total": 1.1, "turns": ["<think>..</think>"]},
        {"question": "Rotate?", "answer": "no"},
    ]
    with Tracker(offline(), tmp_path, total_steps=2) as tracker:
        tracker.log_table("samples/train", rows, [[red, gray], [red]], step=2)

    (record0, record1) = lines(tmp_path / "tables" / "samples_train.jsonl")
    assert record0["step"] == 2 and record0["row"] == 0 and record0["answer"] == "42"
    assert record0["turns"] == '["<think>..</think>"]'  # non-scalars become readable JSON text
    assert record1["reward/total"] is None  # a column this row lacks
    assert record0["images"] == [
        "tables/samples_train/step_00000002/row0_image0.png",
        "tables/samples_train/step_00000002/row0_image1.png",
    ]
    assert Image.open(tmp_path / record0["images"][0]).size == (20, 10)
    assert np.array_equal(np.asarray(Image.open(tmp_path / record0["images"][1])), gray)
    assert len(record1["images"]) == 1
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("files/media/table/samples/train_*.table.json"))


def test_table_input_errors(tmp_path):
    with Tracker(offline(), tmp_path) as tracker:
        with pytest.raises(ValueError, match="2 rows but 1 image lists"):
            tracker.log_table("samples/train", [{"a": 1}, {"a": 2}], [[]])
        with pytest.raises(TypeError, match="image 0 of row 0 must be a PIL image"):
            tracker.log_table("samples/train", [{"a": 1}], [["not an image"]])
        with pytest.raises(ValueError, match="reserved"):
            tracker.log_table("samples/train", [{"images": 1}])


def test_metric_vocabulary_is_enforced():
    for good in ("reward/total", "reward/mandatory", "val/acc/charts", "tool/op/crop", "lr", "time/sandbox",
                 "throughput/tokens_per_s", "critic/value_loss", "data/groups_with_signal"):
        check_metric_name(good)
    for bad in ("actr/kl", "loss", "reward/", "step", "time", ""):
        with pytest.raises(ValueError):
            check_metric_name(bad)


def test_log_input_errors(tmp_path):
    with Tracker(LoggerConfig(mode="disabled", progress_bar=False), tmp_path) as tracker:
        with pytest.raises(ValueError, match="outside the shared vocabulary"):
            tracker.log({"acc": 1.0}, step=1)
        with pytest.raises(TypeError, match="'actor/kl' must be a number"):
            tracker.log({"actor/kl": torch.zeros(3)}, step=1)
        with pytest.raises(ValueError, match="step must be an integer >= 0"):
            tracker.log({"lr": 1.0}, step=-1)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_non_finite_values_become_null_with_a_warning(tmp_path):
    with Tracker(LoggerConfig(mode="disabled", progress_bar=False), tmp_path) as tracker:
        with pytest.warns(UserWarning, match="actor/kl"):
            tracker.log({"actor/kl": math.nan, "actor/grad_norm": math.inf, "lr": 1.0}, step=4)
    (record,) = lines(tmp_path / "metrics.jsonl")  # strict JSON: parses everywhere
    assert record["actor/kl"] is None and record["actor/grad_norm"] is None and record["lr"] == 1.0


def test_resume_drops_redone_steps_and_continues_the_wandb_run(tmp_path):
    image = Image.new("RGB", (4, 4))
    with Tracker(offline(), tmp_path) as tracker:
        for step in range(1, 6):
            tracker.log({"reward/total": float(step)}, step=step)
            tracker.log_table("samples/train", [{"q": step}], [[image]], step=step)
    run_id = (tmp_path / "wandb_run_id").read_text()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # the line a SIGKILL cut short

    # The checkpoint was at step 3: steps 4 and 5 will be logged again by the resumed run.
    with Tracker(offline(), tmp_path, resume_step=3) as tracker:
        tracker.log({"reward/total": 40.0}, step=4)
    assert [(r["step"], r["reward/total"]) for r in lines(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)
    ]
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    assert [r["step"] for r in lines(tmp_path / "tables" / "samples_train.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "tables" / "samples_train").iterdir()) == [
        "step_00000001", "step_00000002", "step_00000003"
    ]

    # A fresh run in the same folder starts over.
    with Tracker(offline(), tmp_path) as tracker:
        tracker.log({"reward/total": 0.0}, step=0)
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [0]
    assert lines(tmp_path / "tables" / "samples_train.jsonl") == []
    assert not list((tmp_path / "tables" / "samples_train").iterdir())
    assert (tmp_path / "wandb_run_id").read_text() != run_id


def test_only_the_main_rank_writes(tmp_path):
    with Tracker(offline(), tmp_path / "rank1", enabled=False) as tracker:
        tracker.log({"reward/total": 1.0}, step=1)
        tracker.log_table("samples/train", [{"q": 1}], [[Image.new("RGB", (4, 4))]], step=1)
        with pytest.raises(ValueError):  # input errors still surface on every rank
            tracker.log({"bogus": 1.0}, step=1)
    assert not (tmp_path / "rank1").exists()


def test_disabled_mode_writes_metrics_but_no_wandb(tmp_path):
    with Tracker(LoggerConfig(mode="disabled", progress_bar=False), tmp_path) as tracker:
        assert tracker.run is None
        tracker.log({"lr": 0.1}, step=1)
    assert not (tmp_path / "wandb").exists()
    assert lines(tmp_path / "metrics.jsonl")[0]["lr"] == 0.1


def test_progress_bar_shows_the_key_figures(tmp_path, capsys):
    cfg = LoggerConfig(mode="disabled", progress_bar=True)
    with Tracker(cfg, tmp_path, total_steps=4) as tracker:
        tracker.log({"reward/total": 0.125, "actor/kl": 0.002}, step=1)
        tracker.log({"val/acc": 0.5}, step=2)
    err = capsys.readouterr().err
    assert "2/4" in err
    assert "reward=0.125" in err and "kl=0.002" in err and "val_acc=0.5" in err


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    assert resolve_wandb_mode("auto") == "offline"  # no key anywhere
    assert resolve_wandb_mode("disabled") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.warns(UserWarning, match="no W&B credentials"):
        assert resolve_wandb_mode("online") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"  # the environment decides only under auto
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"  # `wandb login` credentials count
    with pytest.raises(ValueError, match="logger.mode 'cloud'"):
        resolve_wandb_mode("cloud")


def test_auto_mode_says_when_it_logs_offline_and_each_step_has_a_log_line(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="codevision.steps")
    with Tracker(LoggerConfig(mode="auto", progress_bar=False), tmp_path, total_steps=2) as tracker:
        assert tracker.mode == "offline"
        tracker.log({"reward/total": 0.5, "actor/kl": 0.25, "data/epoch": 0.0}, step=1)
    assert "W&B: no API key" in caplog.text and "logs offline" in caplog.text and "wandb sync" in caplog.text
    assert "step 1/2 reward/total=0.5 actor/kl=0.25" in caplog.text  # the run log's line for the step
    caplog.clear()
    with Tracker(LoggerConfig(mode="offline", progress_bar=False), tmp_path / "chosen"):
        pass
    assert "no API key" not in caplog.text  # offline on purpose: nothing to say
