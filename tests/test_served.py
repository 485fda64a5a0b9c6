"""A served model (agents.openai_backend as the rollout engine's chat backend, agents.served) against
a loopback OpenAI-compatible stub: tool calls in both forms, reasoning, malformed calls, 429 then
success, a server that hangs, is down or answers garbage, refused settings (401/404), concurrency;
and properties of turning any reply into an env action."""

import json
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from agents.openai_backend import (EndpointConfigError, EndpointDown, OpenAIBackend, OpenAIConfig, reply_action,
                                   tool_reply_messages)
from agents.chat_records import chat_messages
from agents.rollout import EpisodesFailed
from agents.served import run_served, usage_metrics
from agents.transcript import Transcript
from cv_env import Task
from cv_env.protocol import TOOL_NAME, get_prompt, parse_action
from cv_env.sandbox import Sandbox
from openai_stub import HANG, Raw, StubChatServer

ROTATE = "result = image.rotate(90, expand=True)"
ANSWER = {"role": "assistant", "content": "<think>I see it.</think>\n<answer>7</answer>"}


def _turn(body):
    return sum(m["role"] == "assistant" for m in body["messages"])


def _native_call(arguments):
    return {"role": "assistant", "content": "<think>Rotate it upright.</think>",
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": TOOL_NAME, "arguments": arguments}}]}


def _model(mode, body, nth):
    """The stub's behaviour per URL mode: a model that calls the tool once, then answers 7."""
    first = _turn(body) == 0
    if mode == "native":
        return _native_call(json.dumps({"code": ROTATE, "image_index": 0})) if first else ANSWER
    if mode == "text":
        call = json.dumps({"name": TOOL_NAME, "arguments": {"code": ROTATE, "image_index": 0}})
        return {"role": "assistant", "content": f"<think>Rotate.</think>\n<tool_call>\n{call}\n</tool_call>"} \
            if first else ANSWER
    if mode == "malformed":
        return _native_call('{"code": "result = image.rotate(90') if first else ANSWER
    if mode == "reasoning":
        return {"role": "assistant", "content": "<answer>7</answer>", "reasoning_content": "It is seven."}
    if mode == "flaky":
        return Raw(429, b'{"error": "slow down"}', {"Retry-After": "0"}) if nth == 1 else ANSWER
    if mode == "busy":
        time.sleep(0.2)
        return ANSWER
    if mode == "hang":
        return HANG
    if mode == "down":
        return Raw(503, b'{"error": "restarting"}')
    if mode == "notjson":
        return Raw(200, b"<html>proxy error</html>")
    if mode == "nochoices":
        return Raw(200, b'{"object": "error", "message": "model not loaded"}')
    if mode == "unauthorized":
        return Raw(401, b'{"error": "invalid api key"}')
    if mode == "notfound":
        return Raw(404, b'{"detail": "Not Found"}')
    if mode == "notools":  # vLLM started without a tool parser
        return Raw(400, b'{"message": "\\"auto\\" tool choice requires --enable-auto-tool-choice and '
                        b'--tool-call-parser to be set"}')
    raise AssertionError(f"unknown mode {mode}")


@pytest.fixture(scope="module")
def server():
    with StubChatServer(_model) as stub:
        yield stub


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=1) as shared:
        yield shared


def _task(index=0):
    pixels = np.arange(40 * 24 * 3, dtype=np.uint8).reshape(24, 40, 3)  # not square, not symmetric
    return Task(id=f"seven-{index}", images=[Image.fromarray(pixels)], question="Which digit is shown?",
                answer="7", category="ocr")


def _backend(server, mode, **options):
    return OpenAIBackend(OpenAIConfig(url=server.url(mode), model="stub-vlm", **options))


class _Episode:
    """One served episode as the tests read it: its transcript, conversation, usage and error."""

    def __init__(self, transcript):
        self.transcript, self.usage, self.error = transcript, transcript.usage, transcript.error
        self.messages = chat_messages(transcript.trajectory, get_prompt("full").system)
        self.unanswered = bool(self.usage.get("unanswered"))


def _play(server, sandbox, mode, **options):
    """One episode of one task (a run of one episode that failed raises with the episode in it)."""
    try:
        (transcript,) = run_served(_backend(server, mode, **options), [_task()], {"max_turns": 4}, sandbox)
    except EpisodesFailed as failed:
        (trajectory,) = failed.trajectories
        transcript = Transcript.of(trajectory, _task())
    return _Episode(transcript)


def _requests(server, mode):
    return [r["body"] for r in server.requests if r["mode"] == mode]


def test_native_tool_call_runs_and_its_reply_cites_the_call(server, sandbox):
    episode = _play(server, sandbox, "native")
    t = episode.transcript
    assert (t.success, t.answer, t.num_tool_calls, t.num_failed_calls, episode.error) == (True, "7", 1, 0, "")
    assert t.turns[0].tool_ok and t.turns[0].ops == ["rotate_90"] and t.turns[0].code == ROTATE
    assert t.turns[0].tool_images[0].size == (24, 40)  # the env's rotated output, as its observation showed it
    first, second = _requests(server, "native")[-2:]
    assert [tool["function"]["name"] for tool in first["tools"]] == [TOOL_NAME]
    assert first["messages"][0]["role"] == "system" and first["model"] == "stub-vlm"
    assert first["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    tool, image = second["messages"][-2:]
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": t.turns[0].tool_text}
    assert image["role"] == "user" and image["content"][0]["type"] == "image_url"
    assert second["messages"][-3]["tool_calls"][0]["id"] == "call_1"
    assert episode.usage["requests"] == 2 and episode.usage["prompt_tokens"] == 200
    roles = [m["role"] for m in episode.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]


def test_text_tool_call_in_prompt_mode(server, sandbox):
    episode = _play(server, sandbox, "text", tool_mode="prompt")
    assert episode.transcript.success and episode.transcript.turns[0].ops == ["rotate_90"]
    first, second = _requests(server, "text")[-2:]
    assert "tools" not in first and "<tools>" in first["messages"][0]["content"]  # the schema as text
    reply = second["messages"][-1]
    assert reply["role"] == "user" and reply["content"][0] == {"type": "text", "text": "<tool_response>\n"}
    assert reply["content"][1]["type"] == "image_url" and reply["content"][-1]["text"].endswith("\n</tool_response>")


def test_separate_reasoning_opens_the_turn_as_thinking(server, sandbox):
    episode = _play(server, sandbox, "reasoning")
    turn = episode.transcript.turns[0]
    assert turn.text == "<think>It is seven.</think>\n<answer>7</answer>" and turn.thinking == "It is seven."
    assert episode.transcript.reward_components["fmt"] == 1.0


def test_malformed_arguments_are_an_observation_the_model_reads(server, sandbox):
    episode = _play(server, sandbox, "malformed")
    t = episode.transcript
    assert t.turns[0].tool_ok is False and t.turns[0].tool_text.startswith("Error:")
    assert "not valid JSON" in t.turns[0].tool_text and t.success  # the model went on and answered
    second = _requests(server, "malformed")[-1]
    assert "tool_calls" not in second["messages"][-2]  # a malformed call goes back as text ...
    assert "not valid JSON" in second["messages"][-1]["content"][-1]["text"]  # ... and the error as a reply


def test_429_is_retried_then_succeeds(server, sandbox):
    episode = _play(server, sandbox, "flaky", backoff_s=0.01)
    assert episode.transcript.success and episode.error == ""
    assert (episode.usage["requests"], episode.usage["attempts"]) == (1, 2)


def test_a_hanging_server_times_out_and_ends_the_episode_not_the_run(server, sandbox):
    start = time.monotonic()
    episode = _play(server, sandbox, "hang", timeout_s=0.3, retries=1, backoff_s=0.01)
    assert time.monotonic() - start < 5
    t = episode.transcript
    assert "after 2 attempts" in episode.error and "no complete reply within 0.3 s" in episode.error
    assert (t.success, t.truncated, t.truncation, t.num_turns, episode.unanswered) == (False, True, "error", 0, True)
    assert (episode.usage["requests"], episode.usage["attempts"]) == (1, 2)


def test_an_env_bug_ends_its_episode_not_the_run(server, sandbox, env_bug):
    def buggy(mode, body, nth):
        return {"role": "assistant", "content": f"<think>{env_bug}</think><answer>7</answer>"}

    tasks = [_task(i) for i in range(2)]
    with StubChatServer(buggy) as stub:
        backend = OpenAIBackend(OpenAIConfig(url=stub.url("bug"), model="m"))
        with pytest.raises(RuntimeError, match="every episode of the rollout \\(2\\) ended by an error.*KeyError"):
            run_served(backend, tasks, {"max_turns": 2}, sandbox)
        episode = _play(stub, sandbox, "bug")
    assert episode.error == "KeyError: 'an env bug'" and not episode.unanswered
    assert episode.transcript.truncation == "error" and episode.transcript.num_turns == 1


@pytest.mark.parametrize("mode, words", [("down", "HTTP 503"), ("notjson", "not a JSON object"),
                                         ("nochoices", "not a chat completion")])
def test_unusable_replies_end_the_episode_with_the_reason(server, sandbox, mode, words):
    episode = _play(server, sandbox, mode, retries=1, backoff_s=0.01)
    assert words in episode.error and episode.transcript.truncation == "error"


def test_refused_settings_name_the_fix(server, sandbox, monkeypatch):
    with pytest.raises(EndpointConfigError, match=r"HTTP 401.*set api_key_env to the environment variable"):
        _play(server, sandbox, "unauthorized")
    monkeypatch.setenv("CV_SERVED_KEY", "s3cret")
    with pytest.raises(EndpointConfigError, match=r"the key in \$CV_SERVED_KEY: export a valid key"):
        _play(server, sandbox, "unauthorized", api_key_env="CV_SERVED_KEY")
    assert server.requests[-1]["auth"] == "Bearer s3cret"
    with pytest.raises(EndpointConfigError, match=r"end in /v1.*no model 'stub-vlm'.*/notfound/v1/models"):
        _play(server, sandbox, "notfound")
    with pytest.raises(EndpointConfigError, match=r"tool choice requires.*set model.tool_mode=prompt"):
        _play(server, sandbox, "notools")
    with pytest.raises(ValueError, match="CV_UNSET_KEY.*is not set"):
        _backend(server, "native", api_key_env="CV_UNSET_KEY")


def test_run_served_plays_concurrently_in_task_order(server, sandbox):
    tasks = [_task(i) for i in range(6)]
    backend = _backend(server, "busy", max_concurrency=3)
    episodes = run_served(backend, tasks, {"max_turns": 2}, sandbox, samples=1)
    assert [e.task_id for e in episodes] == [t.id for t in tasks]
    assert all(e.success for e in episodes) and 2 <= server.max_inflight["busy"] <= 3
    figures = usage_metrics(episodes)
    assert figures["served/requests"] == 6 and figures["served/episode_errors"] == figures["served/unanswered"] == 0
    assert figures["served/prompt_tokens_per_episode"] == 100 and figures["served/latency_s"] >= 0.2


def test_run_served_stops_at_a_refusal_and_raises_when_nothing_answers(server, sandbox):
    tasks = [_task(i) for i in range(8)]
    before = len(server.requests)
    with pytest.raises(EndpointConfigError):
        run_served(_backend(server, "unauthorized", max_concurrency=2), tasks, {"max_turns": 2}, sandbox)
    assert len(server.requests) - before <= 3  # the jobs not started yet were skipped
    with pytest.raises(EndpointDown, match=r"every episode \(2\) ended without an answer.*HTTP 503"):
        run_served(_backend(server, "down", retries=0), tasks[:2], {"max_turns": 2}, sandbox)


def test_config_errors():
    with pytest.raises(ValueError, match=r"tool_mode 'hermes' is not one of native, prompt"):
        OpenAIConfig(url="http://h/v1", model="m", tool_mode="hermes")
    with pytest.raises(ValueError, match=r"unknown served-model option\(s\) \['timeout'\]"):
        OpenAIConfig.from_dict({"url": "http://h/v1", "model": "m", "timeout": 3})
    with pytest.raises(ValueError, match="must start with http"):
        OpenAIConfig(url="localhost:8000", model="m")
    with pytest.raises(ValueError, match="max_concurrency=0"):
        OpenAIConfig(url="http://h/v1", model="m", max_concurrency=0)


def test_tool_reply_layouts():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    native = tool_reply_messages("Image 1 created.", [image], "c7")
    assert native[0] == {"role": "tool", "tool_call_id": "c7", "content": "Image 1 created."}
    assert native[1]["content"][0]["type"] == "image_url"
    assert tool_reply_messages("Error: x", [], "c7") == [{"role": "tool", "tool_call_id": "c7", "content": "Error: x"}]
    text = tool_reply_messages("Error: x", [], None)[0]
    assert text["role"] == "user" and "".join(p["text"] for p in text["content"]) == \
        "<tool_response>\nError: x\n</tool_response>"


# -- properties of reply_action: whatever a server sends, an action the env can read ----------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=20)
MESSAGE = st.fixed_dictionaries({}, optional={
    "content": st.none() | st.text(max_size=200) | st.lists(JSON, max_size=3),
    "reasoning_content": st.none() | st.text(max_size=50) | JSON,
    "tool_calls": st.none() | JSON | st.lists(st.fixed_dictionaries({}, optional={
        "id": JSON, "function": JSON | st.fixed_dictionaries({"name": JSON | st.just(TOOL_NAME)}, optional={
            "arguments": JSON | st.text(max_size=60)})}), max_size=3),
})


@given(MESSAGE | JSON)
def test_any_reply_becomes_a_readable_action(message):
    action = reply_action(message)
    assert isinstance(action, str)
    turn = parse_action(action)  # never raises on model output
    assert turn.kind in ("tool_call", "answer", "invalid")


@given(code=st.text(min_size=1, max_size=200).filter(str.strip), index=st.integers(0, 50),
       thought=st.text(max_size=80), as_string=st.booleans())
def test_a_native_call_becomes_exactly_that_call(code, index, thought, as_string):
    arguments = {"code": code, "image_index": index}
    message = {"content": thought, "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": TOOL_NAME, "arguments": json.dumps(arguments) if as_string else arguments}}]}
    turn = parse_action(reply_action(message))
    assert (turn.kind, turn.code, turn.image_index) == ("tool_call", code, index) or "<tool_call>" in thought


@given(st.text(max_size=300))
def test_text_content_is_kept_as_written(content):
    assert reply_action({"role": "assistant", "content": content}) == content.rstrip()


@given(st.text(max_size=80).filter(lambda s: not s.strip().startswith("{")))
def test_malformed_arguments_say_so(arguments):
    message = {"tool_calls": [{"id": "c", "function": {"name": TOOL_NAME, "arguments": arguments}}]}
    turn = parse_action(reply_action(message))
    assert turn.kind == "invalid" and "arguments" in turn.error


# -- python -m algos.evaluate model=openai:<name> endpoint=... ------------------------------------


def test_evaluate_a_served_model_gives_the_same_report_without_torch(server, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from agents.transcript import read_transcripts
    from algos.tracking import read_metrics

    out, root = tmp_path / "eval", Path(__file__).resolve().parents[1]
    args = ["model=openai:stub-vlm", f"endpoint={server.url('native')}", "n=2", "max_turns=3", "max_pixels=65536",
            f"output_dir={out}", "logger=local", "sandbox.workers=2", "cases=1", "served.max_concurrency=4"]
    code = "import sys; from algos.evaluate import main; main(); assert 'torch' not in sys.modules, 'imported torch'"
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    served, oracle = report["agents"]["openai:stub-vlm"], report["agents"]["oracle"]
    assert served["episodes"] == oracle["episodes"] == 2 * 6 and oracle["accuracy"] == 1.0
    assert list(served["robustness"]) == list(oracle["robustness"]) and len(served["robustness"]) == 7
    assert served["tool_calls"] == 1.0 and served["exec_success"] == 1.0  # the stub rotates once, then answers
    assert report["served"]["served/requests"] == 2 * 12 and report["served"]["served/episode_errors"] == 0
    assert "| agent | original | rotate_90 | rotate_180 | rotate_270 | flip_horizontal | flip_vertical | average |" \
        in done.stdout and "| openai:stub-vlm |" in done.stdout and "| oracle |" in done.stdout
    assert "## Served endpoint" in done.stdout and "| requests | 24 |" in done.stdout
    assert read_metrics(out / "metrics.jsonl")[0]["val/served/prompt_tokens_per_episode"] == 200
    assert len(read_transcripts(out / "transcripts" / "openai_stub-vlm.jsonl")) == 12


@pytest.mark.parametrize("overrides, message", [
    (["model=openai:m"], r"endpoint: model=openai:m is served: give its base URL"),
    (["endpoint=http://h/v1"], "endpoint: is set but model=tiny:qwen2_5_vl is not served"),
    (["model=openai:m", "endpoint=h:8000"], "must start with http"),
    (["model=openai:m", "endpoint=http://h/v1", "model.tool_mode=xml"], "model.tool_mode: 'xml' is not one of"),
    (["model=openai:m", "endpoint=http://h/v1", "+served.timeout=3"], r"served: unknown key\(s\) \['timeout'\]"),
    (["model=openai:m", "endpoint=http://h/v1", "checkpoint=outputs/x"], "weights on the server"),
])
def test_evaluate_config_errors_name_the_key(overrides, message):
    from algos.eval_config import load_eval_config

    with pytest.raises(ValueError, match=message):
        load_eval_config(overrides)


def test_evaluate_config_builds_the_backend_settings():
    from algos.eval_config import load_eval_config

    cfg = load_eval_config(["model=openai:Qwen/Qwen2.5-VL-7B-Instruct", "endpoint=http://h:8000/v1",
                            "api_key_env=OPENAI_API_KEY", "temperature=0.7", "max_new_tokens=300",
                            "model.tool_mode=prompt", "served.retries=5"])
    assert cfg.openai_config() == OpenAIConfig(
        url="http://h:8000/v1", model="Qwen/Qwen2.5-VL-7B-Instruct", api_key_env="OPENAI_API_KEY", tool_mode="prompt",
        temperature=0.7, max_tokens=300, retries=5)


# -- python -m agents.collect --endpoint ... --model ...: a served teacher's demonstrations for SFT --


def _pixels_key(image):
    return hash(np.asarray(image.convert("RGB")).tobytes())


def test_a_served_teacher_writes_demonstrations_sft_trains_on(tmp_path):
    import base64
    import io

    from agents.collect import main as collect_main
    from cv_env.tasks import load_tasks

    tasks = load_tasks("synthetic", split="train", seed=0)
    index_of = {_pixels_key(tasks[i].images[0]): i for i in range(6)}

    def teacher(mode, body, nth):  # knows every answer; answers the odd tasks wrong; calls the tool once first
        url = body["messages"][1]["content"][0]["image_url"]["url"]
        index = index_of[_pixels_key(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))]
        if _turn(body) == 0:
            return _native_call(json.dumps({"code": "result = image", "image_index": 0}))
        answer = tasks[index].answer if index % 2 == 0 else "no idea"
        return {"role": "assistant", "content": f"<think>Now I see it.</think>\n<answer>{answer}</answer>"}

    out = tmp_path / "teacher.jsonl"
    with StubChatServer(teacher) as stub:
        assert collect_main(["--endpoint", stub.url("teacher"), "--model", "big-vlm", "--num-tasks", "6",
                             "--out", str(out), "--workers", "1"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in records] == [tasks[i].id for i in (0, 2, 4)]  # the wrong ones were filtered out
    assert all(r["success"] and r["teacher"] == "openai:big-vlm" for r in records)
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant", "tool", "assistant"]

    from agents.conversation import ChatRenderer
    from agents.loading import load_processor
    from algos.sft_data import read_records, record_to_example

    processor = load_processor("tiny:qwen2_5_vl")
    example = record_to_example(ChatRenderer(processor), read_records([out])[0])
    assert len(example.images) == 2 and example.num_turns == 2  # the input and the tool's output; two turns
    taught = processor.tokenizer.decode([t for t, m in zip(example.token_ids, example.loss_mask) if m])
    assert f"<answer>{tasks[0].answer}</answer>" in taught and "result = image" in taught


# -- the adapter for other harnesses (VLMEvalKit / lmms-eval model wrappers) ----------------------


def test_the_harness_adapter_answers_one_item_with_the_tool_loop(server, sandbox, tmp_path):
    from agents.harness import CodeVisionSolver

    path = tmp_path / "item.png"
    _task().images[0].save(path)
    with CodeVisionSolver(_backend(server, "native"), max_turns=4, sandbox=sandbox) as solver:
        result = solver.solve([str(path)], "Which digit is shown?", item_id="vqa-1")
        assert result.answer == "7" and result.error == ""
        assert solver.solve([_task().images[0]], "And now?").answer == "7"  # the env is reused
        assert result.transcript.turns[0].ops == ["rotate_90"] and result.transcript.task_id == "vqa-1"
        assert [m["role"] for m in result.messages] == ["system", "user", "assistant", "tool", "assistant"]
        unanswered = CodeVisionSolver(_backend(server, "down", retries=0), sandbox=sandbox).solve(
            [_task().images[0]], "Which digit?")
        assert unanswered.answer is None and "HTTP 503" in unanswered.error
    assert sandbox.run("result = image", [_task().images[0]]).ok  # a shared sandbox stays open
