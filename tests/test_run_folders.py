"""Run folders and logs: nothing overwrites an earlier run, a run log is never empty, long work
shows its progress, and the spaces print in a line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from agents import collect
from cv_env.spaces import MessageText, observation_space, text_space

REPO = Path(__file__).resolve().parents[1]


def test_evaluate_writes_its_own_run_folder_with_a_log(tmp_path):
    """No output_dir: a new outputs/eval/<date_time>/ under the working directory, whose
    evaluate.log holds the console's messages and the figures."""
    done = subprocess.run(
        [sys.executable, "-m", "algos.evaluate", "model=oracle", "n=2", "robustness=false", "cases=0",
         "sandbox.workers=1"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-2000:]
    (folder,) = (tmp_path / "outputs" / "eval").iterdir()
    assert (folder / "report.md").read_text().strip() in done.stdout  # the report on stdout, its files in the folder
    log = (folder / "evaluate.log").read_text()
    assert f"report: {Path('outputs/eval') / folder.name / 'report.md'}" in log and "val/acc=1" in log
    assert "oracle: 100%" in done.stderr  # the progress bar


def test_collect_without_out_writes_a_new_run_folder_with_a_progress_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert collect.main(["--num-tasks", "2", "--workers", "1", "--max-turns", "3"]) == 0
    (written,) = (tmp_path / "outputs" / "collect").glob("*/demos.jsonl")
    printed = capsys.readouterr()
    assert f"to {written.relative_to(tmp_path)}" in printed.out
    assert "collect: 100%" in printed.err and "episode/s" in printed.err


def test_learn_curve_shows_the_last_progress_state_of_a_stage(tmp_path):
    spec = importlib.util.spec_from_file_location("learn_curve", REPO / "bench" / "learn_curve.py")
    learn_curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(learn_curve)
    log = tmp_path / "sft.log"
    log.write_text("recorded 24 oracle demonstrations\ntrain:  10%| 1/10 [00:01<00:09, 1.0step/s]"
                   "\rtrain:  20%| 2/10 [00:02<00:08, 1.0step/s]\r")
    assert learn_curve._last_progress(log) == "train:  20%| 2/10 [00:02<00:08, 1.0step/s]"
    log.write_text("")
    assert learn_curve._last_progress(log) == "starting"


def test_spaces_print_in_a_line():
    text = repr(observation_space(8, 802816, 8192))
    assert len(text) < 300, text  # Text's own repr lists its 55,000 characters
    assert "ImageList(max_images=8, max_pixels=802816)" in text and "charset=text_charset()" in text
    assert repr(text_space(16)) == "MessageText(min_length=0, max_length=16, charset=text_charset())"
    assert repr(MessageText(4, charset="abc")) == "MessageText(min_length=0, max_length=4, charset='abc')"
