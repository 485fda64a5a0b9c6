"""verl's tool lifecycle and reward loading run our sandbox and reward (CPU, no Ray cluster, no GPU).

The tool is loaded by verl's own tool registry from `integrations/verl_tool_config.yaml`, the reward
by verl's own `get_custom_reward_fn`; the README's "Use it from verl" code runs as written. Slow:
verl is a heavy install that CI does not make (its transformers pin conflicts with ours)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed: `pip install -e .[verl]` (or verl==0.9.1 with --no-deps, "
                                   "plus ray and tensordict) runs the verl integration test")
from omegaconf import OmegaConf  # noqa: E402
from verl.experimental.agent_loop.tool_agent_loop import AgentData  # noqa: E402
from verl.tools.base_tool import BaseTool  # noqa: E402
from verl.tools.tool_registry import initialize_tools_from_config  # noqa: E402
from verl.trainer.ppo.reward import get_custom_reward_fn  # noqa: E402

from cv_env.env import CodeVisionEnv  # noqa: E402
from cv_env.protocol import TOOL_SCHEMA  # noqa: E402
from cv_env.tasks import load_tasks  # noqa: E402
from cv_env.tasks.oracle import oracle_code  # noqa: E402
from cv_env.tasks.parquet import task_to_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(f"## {title}\n"):], re.S).group(1)


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    """The tool as verl's registry builds it from our YAML (one sandbox worker for the test)."""
    config = OmegaConf.load(ROOT / "integrations" / "verl_tool_config.yaml")
    config.tools[0].config.workers = 1
    path = tmp_path_factory.mktemp("verl") / "tool_config.yaml"
    OmegaConf.save(config, path)
    (tool,) = initialize_tools_from_config(str(path))
    yield tool
    tool.sandbox.close()


def reward_fn(preset: str):
    """compute_score as verl loads a custom reward function from its config."""
    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://integrations.verl_tool", "name": "compute_score", "reward_kwargs": {"reward": preset}}}})
    return get_custom_reward_fn(config)


def crop_task():
    """A task that needs a crop and a flip: ops are verified and crops mapped to the input's frame."""
    return next(t for t in load_tasks("tiny_ocr") if len(t.transforms) == 2 and t.transforms[-1] == "crop")


def undo_orientation(task) -> str:
    """The oracle's code for the task's orientation fix alone, on `image`."""
    return oracle_code(dataclasses.replace(task, transforms=[t for t in task.transforms if t != "crop"]))


def test_the_tool_is_verls_base_tool_with_our_schema(tool):
    assert isinstance(tool, BaseTool) and tool.name == "code_image_tool"
    assert tool.get_openai_tool_schema().model_dump(exclude_none=True)["function"]["parameters"]["required"] == ["code"]
    assert tool.tool_schema.function.description == TOOL_SCHEMA["function"]["description"]


def test_full_lifecycle_runs_in_our_sandbox_with_verified_ops_and_the_penalty(tool):
    task = crop_task()
    x1, y1, x2, y2 = (int(v) for v in task.bbox)
    undo = undo_orientation(task)

    async def lifecycle():
        instance_id, _ = await tool.create(create_kwargs={"images": task_to_row(task, 0)["images"]})
        failed = await tool.execute(instance_id, {"code": "result = image.rotate(", "image_index": 0})
        crop = await tool.execute(instance_id, {"code": f"result = image.crop(({x1}, {y1}, {x2}, {y2}))"})
        fix = await tool.execute(instance_id, {"code": undo, "image_index": 1})  # the crop's output
        paid = await tool.calc_reward(instance_id)
        record = tool.record(instance_id)
        await tool.release(instance_id)
        return failed, crop, fix, paid, record

    failed, crop, fix, paid, record = asyncio.run(lifecycle())
    (response, reward, metrics) = failed
    assert response.text.startswith("Error") and not response.image and metrics["ok"] is False
    assert reward == 0.0 and paid == 0.0  # codevision_release: the release's per-call penalty is 0
    assert crop[0].image[0].size == (x2 - x1, y2 - y1) and crop[2]["ops"] == ["crop"]
    assert fix[0].image and fix[2]["ops"] == [task.required_ops[0]] and fix[1] == 0.0
    assert record["used_ops"] == sorted(task.required_ops) and record["n_calls"] == 3 and record["n_failed"] == 1
    assert record["crop_boxes"] == [[x1, y1, x2, y2]]  # in image 0's frame, as the bbox
    assert not tool._episodes and not tool._instances  # released


def test_verls_per_call_instances_share_one_episode_per_trajectory_and_the_score_matches_the_env(tool):
    """verl 0.9's agent loop creates and releases an instance for every call; the trajectory's
    episode lives on, and compute_score on its record pays what our env pays for the same turns."""
    task = crop_task()
    row = task_to_row(task, 0)
    agent_data = AgentData(messages=[], image_data=list(task.images), video_data=None, audio_data=None,
                           mm_processor_kwargs=None, metrics={}, request_id="req-1",
                           tools_kwargs={"code_image_tool": {"create_kwargs": {"images": row["images"]}}})
    x1, y1, x2, y2 = (int(v) for v in task.bbox)
    calls = [{"code": f"result = image.crop(({x1}, {y1}, {x2}, {y2}))", "image_index": 0},
             {"code": undo_orientation(task), "image_index": 1}]
    thinking = "<think>Look closer first.</think>\n"

    async def agent_loop():
        for call in calls:  # what ToolAgentLoop._call_tool does for each call
            agent_data.messages.append({"role": "assistant", "content": thinking})
            instance_id, _ = await tool.create(create_kwargs=agent_data.tools_kwargs["code_image_tool"]["create_kwargs"])
            result = await tool.execute(instance_id, call, agent_data=agent_data)
            await tool.release(instance_id)
            assert result[2]["ok"], result[0].text

    asyncio.run(agent_loop())
    record = agent_data.extra_fields["codevision"]
    assert record["used_ops"] == sorted(task.required_ops) and record["n_calls"] == 2
    final = f"<think>It reads clearly now.</think>\n<answer>{task.answer}</answer>"
    solution = "".join(t + "\nuser\n<tool_response>\nImage created.\n</tool_response>\n" for t in record["turns"])
    solution += "assistant\n" + final
    extra_info = {**row["extra_info"], "tool_rewards": [0.0, 0.0]}
    extra_info.update({"codevision": record})  # as verl's reward manager merges tool_extra_fields
    score = reward_fn("codevision_release")(data_source=row["data_source"], solution_str=solution,
                                             ground_truth=row["reward_model"]["ground_truth"], extra_info=extra_info)

    # The same turns played straight through our env.
    env = CodeVisionEnv(tasks=[task], sandbox=tool.sandbox, reward="codevision_release")
    env.reset(options={"index": 0})
    for turn in record["turns"] + [final]:
        *_, info = env.step(turn)
    assert score["score"] == pytest.approx(info["reward_components"]["total"])
    assert {k: score[k] for k in ("acc", "fmt", "mandatory", "exact")} == {"acc": 1.0, "fmt": 1.0, "mandatory": 1.0,
                                                                           "exact": 0.1}
    assert score["score"] == pytest.approx(1.0 + 0.1 + 1.0 + 0.1)


def test_a_tool_free_answer_to_a_crop_task_is_gated_by_the_rows_metadata():
    task = crop_task()
    row = task_to_row(task, 0)
    score = reward_fn("codevision")(data_source=row["data_source"], ground_truth=task.answer,
                                    solution_str=f"<think>I can read it.</think><answer>{task.answer}</answer>",
                                    extra_info=row["extra_info"])
    assert score["acc"] == 0.0 and score["fmt"] == 1.0  # a required crop that was skipped gates acc
    assert score["score"] == pytest.approx(0.1)


def test_readme_verl_code_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(readme_block("Use it from verl"), "README.md", "exec"), namespace)
    try:
        assert namespace["metrics"] == {"ok": True, "ops": ["flip_horizontal"]}
        assert namespace["response"].image
        score = namespace["score"]
        assert score["acc"] == 1.0 and score["mandatory"] == 1.0 and score["score"] > 2.0
    finally:
        namespace["tool"].sandbox.close()
