"""Evaluation: the report's figures by hand, the config, and whole runs (scripted agents, tiny model)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from agents.trajectory import Trajectory, Turn
from agents.transcript import Transcript, read_transcripts
from algos.eval_config import load_eval_config
from algos.metrics import rank_cases, report_markdown, report_metrics, robustness_columns, summarize
from algos.tracking import check_metric_name, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _episode(task_id, success, *, category="charts", variant="", reward=0.0, calls=0, failed=0, ops=(), turns=1,
             sample=0, truncated=False, components=None):
    base = task_id.split("@")[0]
    trajectory = Trajectory(
        task_id=task_id, group_id=task_id, category=category, prompt_text="q", prompt_images=(),
        turns=tuple(Turn("<answer>a</answer>", reward if k == 0 else 0.0) for k in range(turns)),
        answer="a" if success else "b", success=success,
        reward_components=components or {"acc": float(success), "total": reward}, num_tool_calls=calls,
        num_failed_calls=failed, used_ops=tuple(ops or ()), truncation="max_turns" if truncated else "",
        sample_index=sample)
    transcript = Transcript(trajectory, ground_truth="a", variant=variant, base_id=base)
    if ops is None:  # summarize reads any object with the Transcript fields; one whose ops are unknown
        return SimpleNamespace(**{name: getattr(transcript, name) for name in (
            "task_id", "category", "success", "reward", "reward_components", "num_tool_calls", "num_failed_calls",
            "num_turns", "truncated", "variant", "judge")}, used_ops=None)
    return transcript


# --------------------------------------------------------------------------------------------
# Figures by hand
# --------------------------------------------------------------------------------------------


def test_summary_by_hand():
    episodes = [
        _episode("A@original", True, variant="original", reward=2.0, calls=1, ops=["crop"], turns=2),
        _episode("A@rotate_90", False, variant="rotate_90", reward=0.5, calls=2, failed=1, ops=["crop", "rotate_270"],
                 turns=3),
        _episode("B@original", True, category="tiny_ocr", variant="original", reward=1.0, turns=1),
        _episode("B@rotate_90", True, category="tiny_ocr", variant="rotate_90", reward=1.5, calls=1, failed=1,
                 turns=2, truncated=True),
    ]
    s = summarize(episodes)
    assert (s["episodes"], s["tasks"], s["samples"]) == (4, 4, 1)
    assert s["accuracy"] == pytest.approx(3 / 4) and s["pass_at_k"] == pytest.approx(3 / 4)
    assert s["by_category"] == {"charts": {"accuracy": 0.5, "episodes": 2}, "tiny_ocr": {"accuracy": 1.0, "episodes": 2}}
    # original: A right, B right -> 1.0; rotate_90: A wrong, B right -> 0.5; average of the columns 0.75.
    assert s["robustness"] == pytest.approx({"original": 1.0, "rotate_90": 0.5, "average": 0.75})
    assert list(s["robustness"]) == ["original", "rotate_90", "average"]
    assert s["robustness_by_category"]["charts"] == pytest.approx({"original": 1.0, "rotate_90": 0.0, "average": 0.5})
    assert s["reward"] == pytest.approx((2.0 + 0.5 + 1.0 + 1.5) / 4)
    assert s["reward_components"] == pytest.approx({"acc": 0.75})  # "total" is the reward itself, not a term
    assert s["turns"] == pytest.approx(8 / 4) and s["tool_calls"] == pytest.approx(4 / 4)
    assert s["exec_success"] == pytest.approx((4 - 2) / 4)  # 4 calls, 2 failed
    # Both A episodes and B@rotate_90 called the tool (two of three right); B@original did not (right).
    assert s["with_calls"] == pytest.approx(3 / 4)
    assert s["acc_with_calls"] == pytest.approx(2 / 3) and s["acc_without_calls"] == 1.0
    assert s["truncated"] == pytest.approx(1 / 4)
    assert s["op_usage"] == pytest.approx({"crop": 2 / 4, "rotate_270": 1 / 4})


def test_samples_give_avg_and_pass_at_k():
    episodes = [_episode("X", False, sample=0), _episode("X", True, sample=1),
                _episode("Y", False, sample=0), _episode("Y", False, sample=1)]
    s = summarize(episodes)
    assert s["samples"] == 2 and s["tasks"] == 2
    assert s["accuracy"] == pytest.approx(1 / 4)  # avg@2 over all episodes
    assert s["pass_at_k"] == pytest.approx(1 / 2)  # X has a correct sample, Y none
    assert s["robustness"] is None and s["robustness_by_category"] == {}


def test_unknown_ops_and_no_calls():
    s = summarize([_episode("A", True, ops=None), _episode("B", True, ops=["crop"])])
    assert s["op_usage"] is None and s["exec_success"] is None
    assert s["with_calls"] == 0 and s["acc_with_calls"] is None and s["acc_without_calls"] == 1.0
    with pytest.raises(ValueError, match="at least one episode"):
        summarize([])


def test_robustness_columns_keep_the_paper_order():
    assert robustness_columns(["flip_vertical", "noise", "original", "rotate_90", ""]) == [
        "original", "rotate_90", "flip_vertical", "noise"]


def test_rank_cases_puts_wrong_answers_first():
    a, b, c, d = (_episode("a", True, reward=2.0), _episode("b", False, reward=0.5),
                  _episode("c", False, reward=-0.1), _episode("d", True, reward=1.0))
    worst, best = rank_cases([a, b, c, d], 2)
    assert [e.task_id for e in worst] == ["c", "b"] and [e.task_id for e in best] == ["a", "d"]
    assert rank_cases([a], 0) == ([], [])
    with pytest.raises(ValueError):
        rank_cases([a], -1)


def test_report_metrics_and_markdown():
    model = summarize([_episode("A@original", True, variant="original", calls=1, ops=["crop"]),
                       _episode("A@rotate_90", False, variant="rotate_90", calls=1, failed=1, ops=[])])
    oracle = summarize([_episode("A@original", True, variant="original"),
                        _episode("A@rotate_90", True, variant="rotate_90")])
    metrics = {**report_metrics(model), **report_metrics(oracle, "val/oracle")}
    for name in metrics:
        check_metric_name(name)
    assert metrics["val/acc"] == 0.5 and metrics["val/acc/charts"] == 0.5 and metrics["val/oracle/acc"] == 1.0
    assert metrics["val/robustness/rotate_90"] == 0.0 and metrics["val/robustness/average"] == 0.5
    assert metrics["val/tool/exec_success"] == 0.5 and metrics["val/tool/op/crop"] == 0.5
    assert "val/oracle/tool/exec_success" not in metrics  # the oracle made no call here
    assert metrics["val/tool/acc_with_calls"] == 0.5 and metrics["val/oracle/tool/acc_without_calls"] == 1.0
    assert "val/tool/acc_without_calls" not in metrics and "val/oracle/tool/acc_with_calls" not in metrics
    text = report_markdown({"title": "T", "agents": {"model": model, "oracle": oracle},
                            "cases": {"model": {"worst": "cases/model_worst.html"}}})
    assert "| agent | original | rotate_90 | average |" in text
    assert "| model | 100.0 | 0.0 | 50.0 |" in text and "| oracle | 100.0 | 100.0 | 100.0 |" in text
    assert "| **all** | **50.0** | **100.0** |" in text
    assert "| execution success (%) | 50.0 | – |" in text
    assert "| accuracy with a tool call (%) | 50.0 | – |" in text and "| accuracy without (%) | – | 100.0 |" in text
    assert "[worst](cases/model_worst.html)" in text


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_reads_model_specs_and_presets():
    assert load_eval_config(["model=oracle"]).model.path == "oracle"
    assert load_eval_config(["model=tiny:qwen2_5_vl"]).model.path == "tiny:qwen2_5_vl"
    preset = load_eval_config(["model=qwen3vl"]).model
    assert preset.path == "Qwen/Qwen3-VL-8B-Instruct" and preset.dtype == "bfloat16"
    cfg = load_eval_config(["model=random", "samples=3"])  # scripted agents may repeat without temperature
    assert cfg.samples == 3 and cfg.split == "test" and cfg.robustness


@pytest.mark.parametrize("overrides, message", [
    (["samples=3"], "greedy decoding would all be the same"),
    (["n=-1"], "must be >= 0"),
    (["+colour=red"], "unknown key"),
    (["max_total_tokens=8", "max_new_tokens=16"], "must be >= max_new_tokens"),
    (["reward.alpha=-1"], "config reward"),
    (["prompt=short"], "prompt: 'short' is not one of 'full', 'compact'"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_eval_config(overrides)


# --------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------


def _run(tmp_path, *overrides, check_no_torch=False):
    """`python -m algos.evaluate` in a subprocess (Hydra parses the command line as users type it)."""
    out = tmp_path / "eval"
    args = ["model=oracle", "n=4", f"output_dir={out}", "logger=local", "sandbox.workers=2", "max_pixels=65536",
            "cases=2", *overrides]
    code = ("import sys; from algos.evaluate import main; main(); "
            + ("assert 'torch' not in sys.modules, 'scripted evaluation imported torch'" if check_no_torch else ""))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), done


def test_oracle_alone_scores_everything_without_torch(tmp_path):
    out, report, done = _run(tmp_path, check_no_torch=True)
    oracle = report["agents"]["oracle"]
    assert list(report["agents"]) == ["oracle"]  # the reference column is the evaluated agent itself
    assert oracle["episodes"] == 4 * 6 and oracle["tasks"] == 24
    assert oracle["accuracy"] == 1.0 and oracle["exec_success"] in (1.0, None)
    assert oracle["robustness"] == {v: 1.0 for v in ("original", "rotate_90", "rotate_180", "rotate_270",
                                                     "flip_horizontal", "flip_vertical", "average")}
    assert oracle["reward_components"]["fmt"] == 1.0 and oracle["op_usage"]
    assert (out / "report.md").read_text().count("| oracle | 100.0 |") == 1
    metrics = read_metrics(out / "metrics.jsonl")[0]
    assert metrics["val/acc"] == 1.0 and metrics["val/robustness/average"] == 1.0
    for kind in ("worst", "best"):
        page = (out / report["cases"]["oracle"][kind]).read_text()
        assert page.count('<section class="episode') == 2 and "data:image/png;base64," in page
    assert len(read_transcripts(out / "transcripts" / "oracle.jsonl")) == 24
    assert "oracle:" in done.stderr  # the tqdm progress bar


def test_random_agent_against_the_oracle_column(tmp_path):
    _, report, _ = _run(tmp_path, "model=random", "robustness=false", "n=12", "max_turns=4", "samples=2")
    random, oracle = report["agents"]["random"], report["agents"]["oracle"]
    assert random["episodes"] == 24 and random["samples"] == 2 and oracle["episodes"] == 12
    assert random["robustness"] is None
    assert random["accuracy"] < oracle["accuracy"] == 1.0
    assert random["pass_at_k"] >= random["accuracy"]
    assert random["exec_success"] < 1.0  # it writes broken and hostile code on purpose
    assert report["metrics"]["val/oracle/acc"] == 1.0 and report["metrics"]["val/acc"] == random["accuracy"]


def test_tiny_model_with_robustness_and_oracle(tmp_path):
    """In process, with an already loaded policy (as a trainer would call it); the CLI is tested above."""
    from agents.policy import Policy
    from algos.evaluate import evaluate

    out = tmp_path / "eval"
    cfg = load_eval_config(["model=tiny:qwen2_5_vl", "n=1", "max_turns=2", "max_new_tokens=24", "max_total_tokens=1024",
                            "max_pixels=12544", "batch_size=6", "cases=2", "logger=local", "sandbox.workers=2",
                            f"output_dir={out}"])
    report = evaluate(cfg, policy=Policy.load("tiny:qwen2_5_vl"))
    assert report == json.loads((out / "report.json").read_text())
    model, oracle = report["agents"]["tiny:qwen2_5_vl"], report["agents"]["oracle"]
    assert model["episodes"] == oracle["episodes"] == 6
    assert set(model["robustness"]) == set(oracle["robustness"]) and len(model["robustness"]) == 7
    assert 1 <= model["turns"] <= 2 and oracle["accuracy"] == 1.0
    text = (out / "report.md").read_text()
    assert "| agent | original | rotate_90 | rotate_180 | rotate_270 | flip_horizontal | flip_vertical | average |" in text
    assert "| tiny:qwen2_5_vl |" in text
    episodes = read_transcripts(out / "transcripts" / "tiny_qwen2_5_vl.jsonl")
    assert len(episodes) == 6 and all(e.turns and e.question for e in episodes)
    page = (out / report["cases"]["tiny:qwen2_5_vl"]["worst"]).read_text()
    assert page.count('<section class="episode') == 2
    assert read_metrics(out / "metrics.jsonl")[0]["val/oracle/acc"] == 1.0


def test_checkpoint_weights_are_loaded_into_the_model(tmp_path):
    import torch

    from agents.policy import Policy
    from algos.checkpoint import save_checkpoint
    from algos.evaluate import load_policy

    trained = Policy.load("tiny:qwen2_5_vl")
    name, weight = next(iter(trained.model.named_parameters()))
    with torch.no_grad():
        weight.add_(0.5)  # what training would have changed
    save_checkpoint(tmp_path / "run", 3, trained.model)
    cfg = load_eval_config(["model=tiny", f"checkpoint={tmp_path / 'run'}", "device=cpu"])  # the run's latest
    loaded = load_policy(cfg)
    assert torch.equal(dict(loaded.model.named_parameters())[name], weight) and not loaded.model.training
    with pytest.raises(ValueError, match="no weights to load"):
        load_eval_config(["model=oracle", f"checkpoint={tmp_path / 'run'}"])


def test_a_release_format_benchmark_gives_the_per_source_and_robustness_tables(tmp_path):
    """`python -m algos.evaluate tasks=mvtoolbench.parquet reward=codevision_release`, in process."""
    import numpy as np

    from algos.evaluate import evaluate
    from release_rows import release_row, smooth_image, write_release_rows

    rng = np.random.default_rng(0)
    layout = [("ChartQA", [], "3"), ("ChartQA", ["rotate_90"], "B"), ("TextVQA", ["flip_horizontal"], "park"),
              ("TextVQA", ["rotate_180", "crop"], "7"), ("TextVQA", [], "STOP")]
    rows = [release_row(i, smooth_image(rng, (48, 40)), truth, transform=transform, bbox=[4, 4, 30, 30],
                        dataset_name=name) for i, (name, transform, truth) in enumerate(layout)]
    path = tmp_path / "mvtoolbench.parquet"
    write_release_rows(path, rows)
    cfg = load_eval_config(["model=oracle", f"tasks={path}", "reward=codevision_release", "n=0", "cases=0",
                            "write_transcripts=false", "logger=local", f"output_dir={tmp_path / 'out'}"])
    report = evaluate(cfg)
    oracle = report["agents"]["oracle"]
    assert oracle["episodes"] == 5  # the file's rows as they are: no synthetic variants on top
    assert oracle["by_category"] == {"ChartQA": {"accuracy": 1.0, "episodes": 2},
                                     "TextVQA": {"accuracy": 1.0, "episodes": 3}}
    assert set(oracle["robustness"]) == {"original", "rotate_90", "rotate_180", "flip_horizontal", "average"}
    assert oracle["reward_components"]["mandatory"] == pytest.approx(3 / 5)  # crop at the bbox: IoU 1
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| ChartQA | 100.0 |" in text and "| TextVQA | 100.0 |" in text
    assert "| agent | original | rotate_90 | rotate_180 | flip_horizontal | average |" in text
