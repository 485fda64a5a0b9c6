"""The rollout engine: sampler log-probs equal the trainer's recomputation, rewards sit on the right
tokens, the token budget never cuts an image, trajectories round-trip through JSONL."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from agents.conversation import check_image_tokens, image_token_spans  # noqa: E402
from agents.collect import collect  # noqa: E402
from agents.generation import HFBackend, SamplingParams, ScriptedBackend  # noqa: E402
from agents.policy import Policy  # noqa: E402
from agents.jsonl import read_jsonl, trajectory_to_json, write_jsonl  # noqa: E402
from agents.rollout import RolloutEngine  # noqa: E402
from agents.trajectory import Trajectory  # noqa: E402
from agents.scripted import OracleAgent, ideal_reward  # noqa: E402
from agents.tiny import FAMILIES  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from cv_env.tasks import load_tasks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ENV = dict(max_turns=3, max_pixels=128 * 128)
# The shortest well-formed tool call (31 tokens): the forced turn fits max_new_tokens=32.
ROTATE = '<tool_call>\n{"name": "code_image_tool", "arguments": {"code": "result = image.rotate(90, expand=True)"}}\n</tool_call>'



@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=10.0) as shared:
        yield shared


@pytest.fixture(scope="module")
def tasks():
    source = load_tasks("synthetic", split="test")
    return [source[i] for i in range(3)]


@pytest.fixture(scope="module", params=FAMILIES)
def policy(request):
    return Policy.load(f"tiny:{request.param}", dtype="float32", device="cpu")


class _ForceTurn:
    """A constraint that makes every row write `script` (a random tiny model never calls the tool)."""

    def __init__(self, script):
        self.script, self.width, self.active = script, 0, False

    def __call__(self, input_ids, scores):
        if not self.active:
            return scores
        step = input_ids.shape[1] - self.width
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[min(step, len(self.script) - 1)]] = 0.0
        return forced


class ForcedFirstTurnBackend(HFBackend):
    """HF sampling whose first call of a rollout is constrained to a tool call; later turns are free.

    The constraint runs after the log-prob recorder, so the reported log-probs stay the policy's.
    """

    def __init__(self, policy, text=ROTATE):
        ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.forcer = _ForceTurn(ids)
        super().__init__(policy, logits_processors=[self.forcer])
        self.calls = 0

    def generate(self, requests, sampling, seed=None, on_finish=None):
        self.forcer.active = self.calls == 0
        self.forcer.width = max(len(r.token_ids) for r in requests)
        self.calls += 1
        return super().generate(requests, sampling, seed, on_finish)


def _check_rewards(trajectory: Trajectory):
    rewarded = [i for i, r in enumerate(trajectory.token_rewards) if r != 0]
    assert set(rewarded) <= set(trajectory.turn_ends)
    assert all(trajectory.loss_mask[i] == 1 for i in trajectory.turn_ends)
    for position, reward in zip(trajectory.turn_ends, trajectory.turn_rewards):
        assert trajectory.token_rewards[position] == pytest.approx(reward)
    assert sum(trajectory.token_rewards) == pytest.approx(trajectory.reward)
    assert trajectory.reward == pytest.approx(trajectory.reward_components["total"])


def test_sampler_logprobs_equal_the_trainers_recomputation(policy, sandbox, tasks):
    engine = RolloutEngine(ForcedFirstTurnBackend(policy), sandbox=sandbox, env_kwargs=ENV,
                           sampling=dict(temperature=1.0, top_p=0.9, max_new_tokens=32), max_total_tokens=4096)
    trajectories = engine.rollout(tasks[:2], n=2, seed=3)
    assert [t.group_id for t in trajectories] == [tasks[0].id] * 2 + [tasks[1].id] * 2
    assert [t.sample_index for t in trajectories] == [0, 1, 0, 1]
    for t in trajectories:
        assert t.num_turns == 2 and t.num_tool_calls == 1  # the forced call, then a free turn
        assert len(t.images) == 2 and len(t.image_grid_thw) == 2  # the input and the tool's output
        check_image_tokens(t.token_ids, t.image_grid_thw, policy.image_token_id, policy.merge_size)
        assert t.loss_mask[: t.prompt_length] == [0] * t.prompt_length
        assert all(lp == 0 for lp, m in zip(t.sampler_logprobs, t.loss_mask) if not m)
        _check_rewards(t)
    # The two free second turns of a group were sampled, not copied.
    assert trajectories[0].token_ids != trajectories[1].token_ids

    batch = policy.collate(trajectories)
    with torch.no_grad():
        logprobs, entropy = policy.logprobs(batch, chunk_size=64)
    mask = batch["loss_mask"] > 0
    assert int(mask.sum()) == sum(t.num_sampled_tokens for t in trajectories)
    assert torch.allclose(logprobs[mask], batch["old_logprobs"][mask], atol=1e-4, rtol=0)
    assert (logprobs[~mask] == 0).all() and (entropy[mask] > 0).all()
    engine.close()


def test_greedy_rollouts_repeat_and_score_at_temperature_one(sandbox, tasks):
    policy = Policy.load("tiny:qwen2_5_vl")
    runs = []
    for _ in range(2):
        engine = RolloutEngine(ForcedFirstTurnBackend(policy), sandbox=sandbox, env_kwargs=ENV,
                               sampling=dict(temperature=0.0, max_new_tokens=32), max_total_tokens=4096)
        runs.append(engine.rollout(tasks[:1], n=2, seed=0))
        engine.close()
    first, second = runs
    assert [t.token_ids for t in first] == [t.token_ids for t in second]
    assert first[0].token_ids == first[1].token_ids  # greedy: both samples agree
    assert first[0].temperature == 1.0
    batch = policy.collate(first)
    with torch.no_grad():
        logprobs, _ = policy.logprobs(batch)
    mask = batch["loss_mask"] > 0
    assert torch.allclose(logprobs[mask], batch["old_logprobs"][mask], atol=1e-4, rtol=0)


def test_token_budget_ends_the_episode_without_cutting_an_image(sandbox, tasks):
    policy = Policy.load("tiny:qwen2_vl")
    backend = ForcedFirstTurnBackend(policy)
    probe = RolloutEngine(backend, sandbox=sandbox, env_kwargs=ENV, sampling=dict(max_new_tokens=64))
    prompt = len(probe.renderer.start(_reset_messages(probe, tasks[0])))
    forced = len(backend.forcer.script)
    probe.close()

    # Room for the forced tool call and a little more, not for the tool's reply with its image.
    backend.calls = 0
    engine = RolloutEngine(backend, sandbox=sandbox, env_kwargs=ENV, sampling=dict(max_new_tokens=64),
                           max_total_tokens=prompt + forced + 8)
    (trajectory,) = engine.rollout(tasks[:1], n=1)
    assert trajectory.truncated and trajectory.truncation == "token_budget"
    assert len(trajectory) <= prompt + forced + 8
    assert len(trajectory.images) == 1  # the output image was not appended at all ...
    assert len(image_token_spans(trajectory.token_ids, policy.image_token_id)) == 1  # ... nor a part of it
    check_image_tokens(trajectory.token_ids, trajectory.image_grid_thw, policy.image_token_id, policy.merge_size)
    assert trajectory.num_turns == 1 and trajectory.num_tool_calls == 1
    assert trajectory.reward_components["acc"] == 0 and "total" in trajectory.reward_components
    _check_rewards(trajectory)

    # A budget that ends inside the first turn: the turn is cut, the env judges what was written.
    backend.calls = 0
    engine = RolloutEngine(backend, sandbox=sandbox, env_kwargs=ENV, sampling=dict(max_new_tokens=64),
                           max_total_tokens=prompt + 5)
    (trajectory,) = engine.rollout(tasks[:1], n=1)
    assert len(trajectory) <= prompt + 5 and trajectory.num_sampled_tokens == 5
    _check_rewards(trajectory)
    engine.close()

    with pytest.raises(ValueError, match="leaves no room in max_total_tokens"):
        RolloutEngine(policy, sandbox=sandbox, env_kwargs=ENV, max_total_tokens=prompt).rollout(tasks[:1])


def _reset_messages(engine, task):
    env = gym.make("CodeVision-v0", tasks=[task], sandbox=engine.sandbox, **ENV)
    env.reset(options={"task": task})
    return env.unwrapped.messages


def test_trajectories_round_trip_through_jsonl(sandbox, tasks, tmp_path):
    policy = Policy.load("tiny:qwen3_vl")
    engine = RolloutEngine(ForcedFirstTurnBackend(policy), sandbox=sandbox, env_kwargs=ENV,
                           sampling=dict(temperature=1.0, max_new_tokens=32))
    trajectories = engine.rollout(tasks[:2], n=1, group_ids=["g0", "g1"], seed=1)
    engine.close()
    path = write_jsonl(trajectories, tmp_path / "rollouts.jsonl")
    assert len(list((tmp_path / "rollouts_images").iterdir())) == sum(len(t.images) for t in trajectories)
    record = json.loads(path.read_text().splitlines()[0])
    assert record["group_id"] == "g0" and record["prompt_images"][0].endswith(".png")
    again = read_jsonl(path)
    for a, b in zip(trajectories, again):
        assert trajectory_to_json(a) == trajectory_to_json(b)
        assert b.pixel_values is None
    original, reread = policy.collate(trajectories), policy.collate(again)
    for key in ("input_ids", "loss_mask", "old_logprobs", "token_rewards", "image_grid_thw", "pixel_values"):
        assert torch.equal(original[key], reread[key]), key
    with pytest.raises(ValueError, match="not a JSON line"):
        (tmp_path / "bad.jsonl").write_text("{oops\n")
        read_jsonl(tmp_path / "bad.jsonl")


def _env_conversation(env, task) -> list[dict]:
    """The oracle's episode of `task` stepped on `env` directly, and the conversation as the env
    itself recorded it: a reference independent of the engine's loop and its chat messages."""
    agent = OracleAgent()
    agent.reset(task)
    env.reset(options={"task": task})
    done = False
    while not done:
        _, _, terminated, truncated, _ = env.step(agent.act())
        done = terminated or truncated
    return env.unwrapped.messages


def test_oracle_through_the_engine_is_token_exact_and_ideal(sandbox):
    source = [load_tasks("synthetic", split="validation")[i] for i in range(60)]
    answer_only = [t for t in source if not t.required_ops and not t.extra.get("corruption")]
    tasks = source[:6] + answer_only[:1]
    policy = Policy.load("tiny:qwen2_5_vl")
    engine = RolloutEngine(ScriptedBackend(policy.processor), sandbox=sandbox, env_kwargs=ENV,
                           sampling=dict(max_new_tokens=1024))
    trajectories = engine.rollout(tasks, n=2)
    assert engine.last_timings["env_steps"] == sum(t.num_turns for t in trajectories)
    engine.close()
    env = gym.make("CodeVision-v0", tasks=tasks, sandbox=sandbox, **ENV)
    for trajectory, task in zip(trajectories, [t for t in tasks for _ in range(2)]):
        assert trajectory.reward == pytest.approx(ideal_reward(task)["total"]) and trajectory.success
        _check_rewards(trajectory)
        # The engine's incremental tokens equal a full render of the conversation the env itself recorded.
        messages = _env_conversation(env, task)
        full = policy.renderer.render_full(messages)
        assert trajectory.token_ids == full.ids
        assert torch.equal(trajectory.pixel_values, full.pixel_values)
    assert any(t.num_tool_calls for t in trajectories) and any(not t.num_tool_calls for t in trajectories)


def test_compact_prompt_episodes_are_token_exact_and_much_shorter(sandbox):
    from cv_env.protocol import TOOL_SCHEMA

    tasks = [load_tasks("glyph_orientation", split="validation")[i] for i in range(3)]
    processor = Policy.load("tiny:qwen2_5_vl").processor
    lengths = {}
    for prompt in ("full", "compact"):
        env_kwargs = dict(ENV, prompt=prompt)
        with RolloutEngine(ScriptedBackend(processor), sandbox=sandbox, env_kwargs=env_kwargs,
                           sampling=dict(max_new_tokens=1024)) as engine:
            trajectories = engine.rollout(tasks)
            renderer = engine.renderer
        env = gym.make("CodeVision-v0", tasks=tasks, sandbox=sandbox, **env_kwargs)
        for trajectory, task in zip(trajectories, tasks):
            assert trajectory.reward == pytest.approx(ideal_reward(task)["total"])
            assert trajectory.token_ids == renderer.render_full(_env_conversation(env, task)).ids
        env.close()
        assert renderer.tools == ([] if prompt == "compact" else [TOOL_SCHEMA])
        lengths[prompt] = [t.prompt_length for t in trajectories]
    text = processor.tokenizer.decode(trajectories[0].token_ids)
    assert "# Tools" not in text and "<tools>" not in text
    assert all(c < 0.5 * f for c, f in zip(lengths["compact"], lengths["full"])), lengths


def test_collect_writes_ideal_oracle_demonstrations(tmp_path):
    result = collect("tiny:qwen2_vl", "tiny_ocr", "validation", 3, str(tmp_path / "demos.jsonl"),
                     max_pixels=128 * 128, batch=2)
    assert (result["kept"], result["skipped"]) == (3, 0)
    demos = read_jsonl(tmp_path / "demos.jsonl")
    assert [d.category for d in demos] == ["tiny_ocr"] * 3
    assert all(d.num_tool_calls == 1 and len(d.images) == 2 and d.reward == pytest.approx(2.2) for d in demos)
    with pytest.raises(FileExistsError, match="appends"):
        collect("tiny:qwen2_vl", "tiny_ocr", "validation", 1, str(tmp_path / "demos.jsonl"))
    # Demonstrations for a run with env.prompt=compact are recorded under that prompt.
    from cv_env.protocol import COMPACT_SYSTEM_PROMPT

    collect("tiny:qwen2_vl", "tiny_ocr", "validation", 1, str(tmp_path / "compact.jsonl"), max_pixels=128 * 128,
            prompt="compact")
    text = Policy.load("tiny:qwen2_vl").tokenizer.decode(read_jsonl(tmp_path / "compact.jsonl")[0].token_ids)
    assert COMPACT_SYSTEM_PROMPT in text and "<tools>" not in text


def test_misuse_is_explained(sandbox, tasks):
    policy = Policy.load("tiny:qwen2_vl")
    with pytest.raises(TypeError, match="needs a Policy or a generation backend"):
        RolloutEngine(object(), sandbox=sandbox)
    with pytest.raises(ValueError, match="must not set 'tasks'"):
        RolloutEngine(policy, sandbox=sandbox, env_kwargs=dict(tasks="synthetic"))
    with pytest.raises(ValueError, match="unknown sampling option"):
        RolloutEngine(policy, sandbox=sandbox, sampling=dict(temprature=1.0))
    engine = RolloutEngine(policy, sandbox=sandbox, env_kwargs=ENV)
    with pytest.raises(ValueError, match="n must be >= 1"):
        engine.rollout(tasks, n=0)
    with pytest.raises(ValueError, match="one per task"):
        engine.rollout(tasks, group_ids=["only-one"])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    engine.close()


def test_collapse_image_spans_for_vllm():
    from agents.vllm_backend import collapse_image_spans

    assert collapse_image_spans([1, 9, 9, 9, 2, 9, 9, 3], 9) == [1, 9, 2, 9, 3]
    assert collapse_image_spans([9, 9], 9) == [9] and collapse_image_spans([1, 2], 9) == [1, 2]


@pytest.mark.gpu
def test_vllm_backend_log_probs_and_weight_updates(sandbox, tasks):
    # The full GPU check (every family, the stale-encoder-cache check, GRPO, FSDP2) is scripts/gpu_check.sh.
    from agents.vllm_backend import VLLMBackend, vllm_available

    if not vllm_available():
        pytest.skip("needs vLLM and a CUDA GPU")
    policy = Policy.load("tiny:qwen2_5_vl", dtype="bfloat16", device="cuda")
    backend = VLLMBackend(policy, gpu_memory_utilization=0.3, max_model_len=4096, enforce_eager=True)
    engine = RolloutEngine(backend, sandbox=sandbox, env_kwargs=ENV,
                           sampling=dict(temperature=1.0, max_new_tokens=24), max_total_tokens=4096)

    def gap_to_trainer():
        batch = policy.collate(engine.rollout(tasks[:2], n=2, seed=0))
        with torch.no_grad():
            logprobs, _ = policy.logprobs(batch)
        mask = batch["loss_mask"] > 0
        return (logprobs[mask] - batch["old_logprobs"][mask]).abs()

    gap = gap_to_trainer()
    assert gap.max() < 0.1 and gap.mean() < 0.01  # bf16 sampler vs bf16 trainer
    # After an in-place update vLLM samples from the new weights.
    with torch.no_grad():
        policy.model.lm_head.weight.add_(0.5 * torch.randn_like(policy.model.lm_head.weight))
    engine.update_weights(policy.model)
    gap = gap_to_trainer()
    assert gap.max() < 0.1 and gap.mean() < 0.01
