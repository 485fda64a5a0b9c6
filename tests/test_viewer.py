"""The trajectory viewer: one self-contained HTML page per set of episodes, checked in a real browser."""

import base64
import io
import os
import re
import shutil
import subprocess
import tempfile

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

import cv_env  # noqa: F401
from agents.scripted import OracleAgent, ScriptAgent, tool_call_turn
from agents.jsonl import write_jsonl
from agents.rollout import play
from agents.transcript import Transcript
from agents.viewer import load_episodes, main, render_html, thumbnail_data_uri, write_html
from cv_env.sandbox import Sandbox
from cv_env.tasks import load_tasks

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
HOSTILE = "<script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def episodes():
    """Real episodes: the oracle on two tasks, and a failing, hostile-text episode."""
    tasks = load_tasks("orientation_ocr,tiny_ocr", split="test")
    with Sandbox(workers=2) as sandbox:
        tasks = [tasks[0], tasks[1]]
        good = play(lambda index: OracleAgent(), tasks, sandbox, max_turns=4)
        (bad,) = play(lambda index: ScriptAgent([
            tool_call_turn("result = undefined_name", thought=f"thinking {HOSTILE}"),
            "no tags at all " + HOSTILE,
        ]), tasks[1:2], sandbox, max_turns=4)
    return ([Transcript.of(t, task, "oracle") for t, task in zip(good, tasks[:2])]
            + [Transcript.of(bad, tasks[1], "script")])


def _data_uris(page):
    return re.findall(r'src="(data:image/png;base64,[^"]+)"', page)


def test_page_shows_every_turn_and_reward(episodes):
    page = render_html(episodes, title="check")
    oracle, bad = episodes[0], episodes[2]
    assert page.count('<section class="episode') == 3 and page.count('class="episode fail"') == 1
    assert oracle.turns[0].thinking in page and "result = ImageOps.mirror(image)" in page
    assert oracle.turns[0].tool_text in page  # the env's reply
    assert f"{oracle.reward:+.3f}" in page and "mandatory" in page  # final reward and its components
    # The failed call: its error reply, its penalty on that turn, and the malformed final turn.
    assert "Error:" in page and "undefined_name" in page and "-0.050" in page
    assert "malformed turn" in page
    # Inputs and tool outputs inline: no file the page depends on.
    images = sum(len(e.input_images) + sum(len(t.tool_images) for t in e.turns) for e in episodes)
    assert len(_data_uris(page)) == images and "src=\"http" not in page and "src=\"file" not in page


def test_model_text_is_escaped(episodes):
    page = render_html(episodes)
    assert HOSTILE not in page and "<script" not in page
    assert "&lt;script&gt;" in page


def test_thumbnails_are_downscaled_pngs():
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (500, 1000, 3), dtype=np.uint8))
    uri = thumbnail_data_uri(wide, max_side=320)
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.format == "PNG" and thumb.size == (320, 160)
    small = Image.new("RGB", (40, 20), "red")
    assert Image.open(io.BytesIO(base64.b64decode(thumbnail_data_uri(small).split(",", 1)[1]))).size == (40, 20)


def test_cli_renders_a_transcript_file(episodes, tmp_path, capsys):
    path = write_jsonl(episodes, tmp_path / "t.jsonl")
    assert [e.task_id for e in load_episodes(path)] == [e.task_id for e in episodes]
    assert main([str(path), "-o", str(tmp_path / "page.html"), "--failures"]) == 0
    page = (tmp_path / "page.html").read_text()
    assert page.count('<section class="episode') == 1 and "1 episode(s), 0 correct" in page
    assert "wrote 1 episode(s)" in capsys.readouterr().out


def test_cli_explains_what_a_file_lacks(tmp_path, capsys):
    (tmp_path / "traj.jsonl").write_text('{"token_ids": [1, 2]}\n')
    assert main([str(tmp_path / "traj.jsonl")]) == 2
    assert "missing field" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_trajectory_files_render_without_a_tokenizer(tmp_path):
    """Trajectory JSONL of a token rollout (the oracle via ScriptedBackend): its turns are records, not tokens to decode."""
    from agents.generation import ScriptedBackend
    from agents.loading import load_processor
    from agents.rollout import RolloutEngine

    tasks = load_tasks("orientation_ocr", split="test")
    processor = load_processor("tiny:qwen2_5_vl")
    with Sandbox(workers=2) as sandbox, RolloutEngine(ScriptedBackend(processor), sandbox=sandbox,
                                                     env_kwargs=dict(max_turns=3, max_pixels=128 * 128),
                                                     sampling=dict(max_new_tokens=4096),
                                                     max_total_tokens=8192) as engine:
        trajectories = engine.rollout([tasks[0], tasks[1]], n=1)
    write_jsonl(trajectories, tmp_path / "traj.jsonl")
    page = render_html(load_episodes(tmp_path / "traj.jsonl"))
    assert page.count('<section class="episode ok"') == 2
    assert "Image 1 created" in page and len(_data_uris(page)) == 4  # 2 inputs + 2 tool outputs


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_renders_in_headless_chromium(episodes, tmp_path):
    page = write_html(episodes, tmp_path / "page.html", title="browser check")
    profile = tempfile.mkdtemp()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
    try:
        shot = tmp_path / "shot.png"
        subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
        dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                             timeout=120).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    # The browser built the page we meant: every episode, no script injected by model text.
    assert dom.count('<section class="episode') == 3 and "<script" not in dom and "pwned" not in dom.split("<body")[0]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (1600, 1200, 3)
    # The dark page header (#1d2330) fills the top, the correct episode has its green bar (#12b76a).
    assert np.abs(pixels[10, 600] - [0x1D, 0x23, 0x30]).max() <= 3
    assert (np.abs(pixels[:, :60] - [0x12, 0xB7, 0x6A]).max(axis=2) <= 3).sum() > 100
    # The inline images were decoded: the first thumbnail is the task's picture, not an empty box.
    assert pixels[250:450, 40:300].std() > 10
