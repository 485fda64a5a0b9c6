"""The command line points at the fix: the closest valid key, the key and path of a missing
file, one short paragraph for a model hub that cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import algos.ppo_config  # noqa: F401  (registers ppo_schema, as `python -m algos.ppo` does)
import algos.sft_config  # noqa: F401  (registers sft_schema)
from algos.cli import check_paths, prepare_overrides
from algos.config import ConfigError, closest_key, load_config
from algos.eval_config import load_eval_config, normalize_overrides

REPO = Path(__file__).resolve().parents[1]


def test_closest_key_by_hand():
    known = ["trainer.total_steps", "trainer.output_dir", "algo.lr", "rollout.n", "samples", "split"]
    assert closest_key("trainer.totl_steps", known) == "trainer.total_steps"
    assert closest_key("output_dir", known) == "trainer.output_dir"  # the one key with that last part
    assert closest_key("lr", known) == "algo.lr"
    assert closest_key("spls", known) == "samples"
    assert closest_key("zzz", known) is None


@pytest.mark.parametrize("override, suggestion", [
    ("trainer.totl_steps=10", "trainer.total_steps"),
    ("+trainer.totl_steps=10", "trainer.total_steps"),
    ("algo.lrr=1e-5", "algo.lr"),
    ("reward.alpah=2", "reward.alpha"),
    ("lr=1e-5", "algo.lr"),
])
def test_unknown_keys_name_the_closest_valid_key_and_never_advise_appending(override, suggestion):
    with pytest.raises(ConfigError) as caught:
        prepare_overrides("grpo", ["+exp=tiny", override])
    message = str(caught.value)
    assert f"did you mean {suggestion}?" in message and "--cfg job" in message
    assert "append" not in message and "+" + override.lstrip("+") not in message


def test_output_dir_means_the_run_folder_on_every_entry_point(tmp_path):
    for config_name, exp in (("grpo", "tiny"), ("ppo", "tiny_ppo"), ("sft", "tiny_sft")):
        overrides = prepare_overrides(config_name, [f"+exp={exp}", f"output_dir={tmp_path}"])
        assert overrides == [f"+exp={exp}", f"trainer.output_dir={tmp_path}"]
        assert load_config(overrides, config_name).trainer.output_dir == str(tmp_path)
    assert prepare_overrides("evaluate", [f"output_dir={tmp_path}"], normalize_overrides) == [f"output_dir={tmp_path}"]


def test_groups_and_specs_pass_through():
    kept = ["+exp=tiny", "model=tiny", "logger=local", "algo.lr=1e-5", "algo.adam_betas=[0.9,0.99]",
            "hydra.run.dir=/tmp/elsewhere", "hydra/job_logging=default", "~trainer.fsdp"]
    assert prepare_overrides("grpo", kept) == kept
    assert prepare_overrides("evaluate", ["model=oracle", "n=4"], normalize_overrides) == ["model.path=oracle", "n=4"]


def test_evaluations_get_a_new_run_folder_each():
    folder = load_eval_config(["model=oracle"]).output_dir
    assert folder.startswith("outputs/eval/20") and len(Path(folder).name) == len("2026-01-31_12-00-00")


@pytest.mark.parametrize("key, value, expected", [
    ("env.tasks", "/nope/train.parquet", "config env.tasks=/nope/train.parquet: no such file or folder"),
    ("env.tasks", "corner_orientaton", "not a task source"),
    ("trainer.resume", "/nope/run", "config trainer.resume=/nope/run: no such checkpoint or run folder"),
    ("model.path", "outputs/nope/hf/step_00000006", "config model.path=outputs/nope/hf/step_00000006: no such folder"),
])
def test_a_missing_path_names_the_key_and_the_path(key, value, expected):
    cfg = load_config(["+exp=tiny", f"{key}={value}"])
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("+", r"\+")):
        check_paths(cfg)


def test_paths_that_exist_and_non_paths_pass(tmp_path):
    check_paths(load_config(["+exp=tiny", "env.tasks='corner_orientation,glyph_orientation'"]))
    check_paths(load_eval_config(["model=tiny:qwen2_5_vl", f"checkpoint={tmp_path}"]))  # exists: resolved later
    with pytest.raises(ConfigError, match="config checkpoint=/nope/ckpt: no such checkpoint"):
        check_paths(load_eval_config(["model=tiny:qwen2_5_vl", "checkpoint=/nope/ckpt"]))


def test_a_hub_id_without_network_fails_at_once_in_one_paragraph(monkeypatch):
    from huggingface_hub import constants

    from agents.loading import ModelUnavailableError, _hub_unreachable, check_hub_model_available

    with pytest.raises(ModelUnavailableError, match="offline mode is on"):
        check_hub_model_available("nobody/not-a-model")  # the tests run with HF_HUB_OFFLINE=1
    # Online but the hub is unreachable (nothing listens on port 9): one request, no retries.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    _hub_unreachable.cache_clear()
    with pytest.raises(ModelUnavailableError, match=r"the hub at http://127\.0\.0\.1:9 cannot be reached") as caught:
        check_hub_model_available("nobody/not-a-model")
    assert "hf download nobody/not-a-model" in str(caught.value) and "tiny:<family>" in str(caught.value)
    _hub_unreachable.cache_clear()


def test_the_offline_hub_error_on_the_command_line_is_short():
    done = subprocess.run(
        [sys.executable, "-m", "algos.evaluate", "model=nobody/not-a-model", "n=1", "output_dir=/tmp/unused-eval"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 1
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "nobody/not-a-model" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    assert len(lines) <= 6, lines  # the error, and the sandbox/progress lines before it at most
