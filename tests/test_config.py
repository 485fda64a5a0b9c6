"""Hydra configs: composition of every experiment, strictness, documentation, wheel install."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.errors import ConfigCompositionException

from algos.config import GRPOConfig, conf_dir, load_config
from cv_env.reward import RewardConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("exp", ["tiny", "qwen25vl", "qwen3vl"])
def test_every_experiment_composes_into_a_valid_config(exp):
    cfg = load_config([f"+exp={exp}"])
    assert isinstance(cfg, GRPOConfig)
    assert cfg.reward_config() == RewardConfig.preset("codevision")
    assert cfg.trainer.output_dir == f"outputs/grpo-{exp}"


def test_tiny_experiment_is_a_small_cpu_run():
    cfg = load_config(["+exp=tiny"])
    assert cfg.model.path == "tiny:qwen2_5_vl"
    assert cfg.model.dtype == "float32"
    assert cfg.rollout.backend == "hf"
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n) == (4, 4)
    assert cfg.env.tasks == "synthetic" and cfg.env.max_turns <= 3
    assert cfg.rollout.max_new_tokens <= 64
    assert cfg.trainer.total_steps <= 5
    assert cfg.logger.mode == "offline"


@pytest.mark.parametrize("exp,model", [("qwen3vl", "Qwen/Qwen3-VL-8B-Instruct"), ("qwen25vl", "Qwen/Qwen2.5-VL-7B-Instruct")])
def test_paper_experiments_carry_the_paper_settings(exp, model):
    cfg = load_config([f"+exp={exp}"])
    assert cfg.model.path == model
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert cfg.rollout.backend == "vllm"
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.rollout.temperature) == (64, 8, 1.0)
    assert cfg.rollout.max_total_tokens == 16384
    assert cfg.env.max_turns == 12
    a = cfg.algo
    assert (a.lr, a.mini_batch_size) == (1e-6, 32)
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert (a.kl.in_loss, a.kl.coef, a.kl.kind) == (True, 0.001, "k3")
    assert a.loss_agg == "token-mean" and a.advantage_estimator == "grpo"


def test_overrides_and_groups_apply():
    cfg = load_config(["+exp=tiny", "algo.lr=3e-5", "model.path=/models/q", "reward=codevision_release", "logger=local"])
    assert cfg.algo.lr == 3e-5
    assert cfg.model.path == "/models/q"
    assert cfg.reward_config() == RewardConfig.preset("codevision_release")
    assert cfg.logger.mode == "disabled"
    # An experiment still wins over the primary config's defaults it does not mention.
    assert cfg.rollout.n == 4


def test_misspelt_key_is_an_error_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        load_config(["algo.lrr=1"])
    assert "algo.lrr" in str(err.value)


def test_appended_unknown_key_is_an_error_too():
    # Hydra's `+key=` opens the node; the schema must still refuse the key.
    with pytest.raises(ValueError, match=r"config algo\.lrr: unknown key"):
        load_config(["+algo.lrr=1"])
    with pytest.raises(ValueError, match=r"config algo\.kl\.kindd: unknown key"):
        load_config(["+algo.kl.kindd=k3"])


def test_misspelt_reward_key_is_an_error():
    with pytest.raises(ConfigCompositionException) as err:
        load_config(["reward.alpah=2"])
    assert "reward.alpah" in str(err.value)


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        load_config(["algo.lr=fast"])
    assert "algo.lr" in str(err.value) or "algo.lr" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException):
        load_config(["rollout.n=many"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("algo.clip_ratio_low=1.5", r"algo\.clip_ratio_low: must lie in \[0, 1\)"),
        ("rollout.backend=sglang", r"rollout\.backend: 'sglang' is not one of 'hf', 'vllm'"),
        ("algo.kl.kind=k4", r"algo\.kl\.kind"),
        ("algo.loss_agg=sum", r"algo\.loss_agg"),
        ("algo.mini_batch_size=5", r"algo\.mini_batch_size: 5 prompts must divide rollout\.prompts_per_step \(64\)"),
        ("algo.clip_ratio_c=0.5", r"algo\.clip_ratio_c"),
        ("algo.micro_batch_size=3", r"algo\.micro_batch_size: 3 trajectories must divide a mini-batch"),
        ("rollout.n=1", r"rollout\.n: must be >= 2"),
        ("reward.gamma=fast", r"config reward"),
        ("env=parquet", r"env\.tasks: is not set"),
        ("env.prompt=short", r"env\.prompt: 'short' is not one of 'full', 'compact'"),
    ],
)
def test_out_of_range_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config([override])


def test_env_kwargs_fit_the_environment_constructor():
    import inspect
    import os

    from cv_env.env import CodeVisionEnv

    cfg = load_config(["+exp=tiny", "env.val_tasks=charts"])
    signature = inspect.signature(CodeVisionEnv.__init__)
    train, val = cfg.env_kwargs(), cfg.env_kwargs(validation=True)
    signature.bind(None, **train)
    signature.bind(None, **val)
    assert (train["tasks"], train["split"], val["tasks"], val["split"]) == ("synthetic", "train", "charts", "validation")
    assert train["max_turns"] == 3 and train["reward"] == RewardConfig.preset("codevision")
    assert train["sandbox"] == {"workers": 2, "timeout_s": 10.0, "memory_mb": 2048}
    auto = load_config(["env.sandbox.workers=0"]).env_kwargs()["sandbox"]["workers"]
    assert auto == max(1, os.cpu_count() or 1)


def test_dual_clip_can_be_disabled_with_null():
    assert load_config(["algo.clip_ratio_c=null"]).algo.clip_ratio_c is None


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(Exception) as err:
        load_config(["+exp=qwen4"])
    assert "tiny" in str(err.value) and "qwen3vl" in str(err.value)


def test_schema_defaults_are_the_paper_settings():
    cfg = GRPOConfig()
    assert (cfg.algo.lr, cfg.rollout.n, cfg.algo.kl.coef) == (1e-6, 8, 0.001)
    assert cfg.reward == RewardConfig().to_dict()


def _yaml_files() -> list[Path]:
    return sorted(conf_dir().rglob("*.yaml"))


def _key_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that sets a mapping key (not list items, not comments)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        if re.match(r"^[A-Za-z_][\w.-]*\s*:", stripped):
            out.append((number, line))
    return out


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(conf_dir())))
def test_every_key_of_every_config_file_has_a_comment(path):
    text = path.read_text()
    yaml.safe_load(text)  # parses
    undocumented = [f"{path.name}:{n}: {line.strip()}" for n, line in _key_lines(text) if " #" not in line]
    assert not undocumented, "keys without a comment:\n" + "\n".join(undocumented)
    # and each entry of a defaults list says what the group is for
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("- ") and ":" in line or line.strip().startswith("- _self_"):
            assert " #" in line, f"{path.name}:{number}: {line.strip()} has no comment"


def _documented(group: str, option: str) -> dict:
    """The keys a group option's file writes down, with those of the files its defaults list
    includes: of its own group (`algo/grpo.yaml` includes `algo/clipped_surrogate.yaml`) or of
    another at a node of its own (`env/synthetic.yaml` includes `/judge@judge: default`)."""
    text = yaml.safe_load((conf_dir() / group / f"{option}.yaml").read_text())
    keys = {}
    for entry in text.pop("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            keys.update(_documented(group, entry))
        elif isinstance(entry, dict):
            ((target, choice),) = entry.items()
            other, _, node = target.lstrip("/").partition("@")
            keys[node or other] = _documented(other, choice)
    keys.update(text)
    return keys


def _primary_defaults(config_name: str) -> dict[str, str]:
    entries = yaml.safe_load((conf_dir() / f"{config_name}.yaml").read_text())["defaults"]
    return {key: value for entry in entries if isinstance(entry, dict) for key, value in entry.items()
            if not key.startswith("override")}


@pytest.mark.parametrize("config_name", ["grpo", "ppo"])
def test_every_schema_field_is_written_down_in_the_yaml_once(config_name):
    import algos.ppo_config  # noqa: F401  (PPOConfig)

    schema = GRPOConfig() if config_name == "grpo" else algos.ppo_config.PPOConfig()
    groups = _primary_defaults(config_name)
    for section in ("rollout", "algo", "trainer"):
        fields = set(vars(getattr(schema, section)))
        assert set(_documented(section, groups[section])) == fields, \
            f"conf/{section}/{groups[section]}.yaml does not list exactly the schema's fields"
    for group in ("model", "env", "logger", "rollout", "trainer"):
        for path in (conf_dir() / group).glob("*.yaml"):
            assert set(_documented(group, path.stem)) == set(vars(getattr(schema, group))), path
    # The shared blocks are written once: the primary file sets only what differs per trainer.
    primary = yaml.safe_load((conf_dir() / f"{config_name}.yaml").read_text())
    assert "rollout" not in primary and "algo" not in primary and set(primary["trainer"]) == {"output_dir"}


def test_conf_dir_is_the_repository_conf_folder_in_a_checkout():
    assert conf_dir() == REPO / "conf"


def test_wheel_ships_the_configs(tmp_path):
    # Build from a copy so the checkout gets no build/ or egg-info folders.
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "outputs", "wandb")
    for name in ("cv_env", "agents", "algos", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("algos/conf/grpo.yaml", "algos/conf/__init__.py", "algos/config.py",
                     "algos/conf/hydra/job_logging/codevision.yaml"):  # nested groups ship too
        assert required in names
    for exp in ("tiny", "qwen25vl", "qwen3vl"):
        assert f"algos/conf/exp/{exp}.yaml" in names
    for group in ("model", "env", "logger", "reward"):
        assert any(n.startswith(f"algos/conf/{group}/") and n.endswith(".yaml") for n in names), group

    # Installed layout: algos/conf next to algos/config.py; conf_dir() must find it there and
    # compose from it (run in a fresh interpreter that sees only the unpacked wheel).
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import algos.config as c; d = c.conf_dir(); print(d); "
        "cfg = c.load_config(['+exp=tiny']); print(cfg.model.path)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found, model = run.stdout.split()
    assert Path(found) == site / "algos" / "conf"
    assert model == "tiny:qwen2_5_vl"


ENTRY_POINT = """
import json, sys
from algos.cli import hydra_main
from algos.config import GRPOConfig

@hydra_main("grpo")
def main(cfg: GRPOConfig) -> None:
    assert isinstance(cfg, GRPOConfig)
    print("RECEIVED", json.dumps({"path": cfg.model.path, "lr": cfg.algo.lr, "out": cfg.trainer.output_dir}))

if __name__ == "__main__":
    main()
"""


def test_hydra_main_entry_point(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(ENTRY_POINT)
    out = tmp_path / "run"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [sys.executable, str(script), "+exp=tiny", "algo.lr=2e-5", f"trainer.output_dir={out}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    (line,) = [l for l in ok.stdout.splitlines() if l.startswith("RECEIVED")]
    assert json.loads(line.split(" ", 1)[1]) == {"path": "tiny:qwen2_5_vl", "lr": 2e-5, "out": str(out)}
    # Hydra records the composed config in the run folder, beside the checkpoints.
    saved = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    assert saved["algo"]["lr"] == 2e-5 and saved["model"]["path"] == "tiny:qwen2_5_vl"

    typo = subprocess.run(
        [sys.executable, str(script), "+exp=tiny", "algo.lrr=1", f"trainer.output_dir={out}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert typo.returncode != 0 and "algo.lrr" in typo.stderr and "RECEIVED" not in typo.stdout
    assert "did you mean algo.lr?" in typo.stderr and "+algo.lrr" not in typo.stderr and "Traceback" not in typo.stderr


def test_the_judge_and_the_task_loader_options_are_config_keys(tmp_path):
    from algos.engines import load_task_splits
    from release_rows import release_row, smooth_image, write_release_rows

    cfg = load_config(["+exp=tiny", "env.judge.url=http://127.0.0.1:8000/v1", "env.judge.model=Qwen/Qwen3-8B",
                       "env.judge.max_concurrency=32", "env.judge.cache=verdicts.jsonl"])
    judge = cfg.env_kwargs()["judge"]
    assert (judge["url"], judge["model"], judge["max_concurrency"], judge["cache"], judge["timeout_s"]) == (
        "http://127.0.0.1:8000/v1", "Qwen/Qwen3-8B", 32, "verdicts.jsonl", 30.0)
    assert load_config(["+exp=tiny"]).env_kwargs()["judge"]["url"] is None  # no judge by default
    with pytest.raises(ValueError, match="config env.judge: judge model must be named"):
        load_config(["+exp=tiny", "env.judge.url=http://127.0.0.1:8000/v1"])
    with pytest.raises(ValueError, match=r"config env.tasks_options: unknown option\(s\) \['crop'\]"):
        load_config(["+exp=tiny", "+env.tasks_options.crop=true"])

    path = tmp_path / "rows.parquet"
    write_release_rows(path, [release_row(i, smooth_image(np.random.default_rng(i), (24, 24)), "7", bbox=[1, 1, 9, 9])
                              for i in range(3)])
    cfg = load_config(["+exp=tiny", f"env.tasks={path}", "env.tasks_options.crop_from_bbox=true", "trainer.val_size=2"])
    train, val = load_task_splits(cfg)
    assert train[0].required_ops == ["crop"] and [t.required_ops for t in val] == [["crop"], ["crop"]]
    with pytest.raises(ValueError, match="do not apply to a synthetic source"):
        load_task_splits(load_config(["+exp=tiny", "env.tasks_options.crop_from_bbox=true"]))
