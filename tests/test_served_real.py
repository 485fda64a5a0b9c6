"""A real OpenAI-compatible server: `transformers serve` (its serving extra) on loopback, serving
the tiny random Qwen2.5-VL folder (agents.tiny), started and stopped here. Evaluation runs end to
end through it, and it accepts every conversation shape the served backend sends (both tool
modes, native tool replies with their images, the CodeVision <tool_response> layout)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from transformers.utils.import_utils import is_serve_available

pytestmark = pytest.mark.skipif(
    not is_serve_available(),
    reason="the transformers serving extra is not installed (pip install -e '.[serve]'): no real server to test",
)

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, model name) of `transformers serve` preloading the tiny Qwen2.5-VL folder."""
    from agents.tiny import tiny_model_dir

    folder, port = str(tiny_model_dir("qwen2_5_vl")), _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agents.serve_local", folder, "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu", "--dtype", "float32"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + STARTUP_S
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up within {STARTUP_S} s (exit code {process.poll()}):\n"
                            + log.read_text()[-3000:])
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", folder
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_evaluate_through_transformers_serve(served, tmp_path):
    url, folder = served
    out = tmp_path / "eval"
    args = [f"model=openai:{folder}", f"endpoint={url}", "n=1", "max_turns=2", "max_new_tokens=16",
            "max_pixels=12544", f"output_dir={out}", "logger=local", "sandbox.workers=2", "cases=1",
            "served.max_concurrency=4", "served.timeout_s=60"]
    code = "import sys; from algos.evaluate import main; main(); assert 'torch' not in sys.modules, 'imported torch'"
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    label = "openai:" + Path(folder).name
    model, oracle = report["agents"][label], report["agents"]["oracle"]
    assert model["episodes"] == oracle["episodes"] == 6 and oracle["accuracy"] == 1.0
    assert list(model["robustness"]) == list(oracle["robustness"]) and len(model["robustness"]) == 7
    served = report["served"]
    assert served["served/episode_errors"] == 0 and served["served/requests"] >= 6  # every request answered
    assert served["served/prompt_tokens_per_episode"] > 0 and served["served/completion_tokens_per_episode"] > 0
    assert f"| {label} |" in done.stdout and "## Served endpoint" in done.stdout


@pytest.mark.parametrize("tool_mode", ["native", "prompt"])
def test_the_server_accepts_every_conversation_shape_we_send(served, tool_mode):
    from agents.openai_backend import OpenAIBackend, OpenAIConfig, tool_reply_messages, user_message
    from cv_env.protocol import TOOL_SCHEMA, get_prompt

    url, folder = served
    backend = OpenAIBackend(OpenAIConfig(url=url, model=folder, tool_mode=tool_mode, max_tokens=8, timeout_s=60))
    image = np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    call_id = "call_0" if tool_mode == "native" else None
    call = {"name": "code_image_tool", "arguments": json.dumps({"code": "result = image", "image_index": 0})}
    assistant = ({"role": "assistant", "content": "<think>look</think>",
                  "tool_calls": [{"id": call_id, "type": "function", "function": call}]} if call_id else
                 {"role": "assistant", "content": "<think>look</think>\n<tool_call>\n{}\n</tool_call>".format(
                     json.dumps({"name": call["name"], "arguments": json.loads(call["arguments"])}))})
    def conversation(images):
        return [*backend.system_messages(get_prompt("full").system, [TOOL_SCHEMA]),
                user_message("Which digit is shown?", images), assistant,
                *tool_reply_messages("Image 1 created: 84x56 pixels.", images, call_id)]

    turn = backend.complete(conversation([image]), seed=0)
    assert isinstance(turn.action, str) and turn.completion_tokens >= 1
    # Both images reached the model: 84x56 pixels are 6x4 patches of 14, merged 2x2 into 6 tokens each.
    without = backend.complete(conversation([]), seed=0)
    assert turn.prompt_tokens - without.prompt_tokens >= 2 * 6
