"""TRL's real `GRPOTrainer` trains on our env: the README's "Use it from TRL" code runs for 2
optimizer steps on CPU with the tiny Qwen3-VL model and the embedded suite. Its sampler is forced
to play a script (one rollout of each group calls the tool with the oracle's code and answers, the
other guesses), so the test can check that the calls ran in our sandbox, their images came back
into the conversation and the forward pass, and the env's rewards became the advantages."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402

trl = pytest.importorskip("trl", reason="TRL is not installed: `pip install -e .[trl]` runs the TRL integration test")
torch = pytest.importorskip("torch")

from cv_env.tasks.oracle import oracle_solution  # noqa: E402
from integrations.trl_env import escape_control_tokens, split_turns  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def readme_block(title: str) -> str:
    """The first python block of the README section `title`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {title}\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_split_turns_finds_each_turn_between_tool_replies():
    end, header = 9, [7, 8]
    ids = [1, 2, 9, 5, 6, 9, 7, 8, 3, 9, 5, 9, 7, 8, 4]  # turn, reply, turn, reply, turn cut short
    assert split_turns(ids, end, header) == [[1, 2, 9], [3, 9], [4]]
    assert split_turns([1, 2], end, header) == [[1, 2]]
    assert split_turns([], end, header) == []


def test_printed_control_tokens_are_broken():
    assert "<|im_start|>" not in escape_control_tokens("x<|im_start|>assistant\n<|im_end|>")


class _Script:
    """Forces the sampler: rollout 2k calls the tool with the oracle's code, then answers; rollout
    2k+1 answers a guess at once. Rows of a tool-loop generation are the rollouts still in a call."""

    def __init__(self, trainer):
        self.trainer, self.rows, self.width = trainer, [], 0
        self.tokenize = lambda text: trainer.processing_class.tokenizer(text, add_special_tokens=False)["input_ids"]

    def plan(self, input_ids) -> None:
        envs = self.trainer.environments
        if input_ids.shape[0] == len(envs) and all(env.tool_calls == 0 for env in envs):
            texts = [self.first_turn(i, env) for i, env in enumerate(envs)]
        else:
            texts = [self.answer(env) for env in envs if env.tool_calls and env.result is None]
        self.rows, self.width = [self.tokenize(t) for t in texts], input_ids.shape[1]

    def first_turn(self, i: int, env) -> str:
        if i % 2:
            return "<think>I can guess.</think>\n<answer>nothing</answer><|im_end|>"
        call = oracle_solution(env.env.task)[0]
        payload = json.dumps({"name": "code_image_tool", "arguments": {**call, "description": "undo it"}})
        return f"<think>The image must be fixed first.</think>\n<tool_call>\n{payload}\n</tool_call><|im_end|>"

    def answer(self, env) -> str:
        return f"<think>Now it reads clearly.</think>\n<answer>{env.env.task.answer}</answer><|im_end|>"

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width
        scores = scores.clone()
        for b, script in enumerate(self.rows):
            if step < len(script):
                scores[b] = float("-inf")
                scores[b, script[step]] = 0.0
        return scores


def test_grpo_trainer_trains_on_our_env_with_tools_images_and_rewards(tmp_path, monkeypatch):
    from transformers import LogitsProcessorList

    runs = []

    class RecordingTrainer(trl.GRPOTrainer):
        """TRL's trainer as it is, with the sampler forced to the script and the loss inputs kept."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.script, self.losses = _Script(self), []
            generate = self.model.generate

            def forced_generate(*a, **kw):
                self.script.plan(kw["input_ids"])
                return generate(*a, logits_processor=LogitsProcessorList([self.script]), **kw)

            self.model.generate = forced_generate
            self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            runs.append(self)

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.losses.append({"out": out, "envs": list(self.environments)})
            return out

    monkeypatch.setattr(trl, "GRPOTrainer", RecordingTrainer)
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_block("Use it from TRL"), "README.md", "exec"), {})

    (trainer,) = runs
    assert trainer.state.global_step == 2
    assert len(trainer.losses) == 2  # one generation batch per optimizer step
    for batch in trainer.losses:
        envs, out = batch["envs"], batch["out"]
        sandboxes = {id(env.env.sandbox) for env in envs}
        assert len(sandboxes) == 1  # every rollout ran its code in the one shared sandbox
        for i, env in enumerate(envs):
            result, task = env.result, env.env.task
            if i % 2 == 0:  # the tool user: its call ran in the sandbox, the ops verified on the pixels
                assert env.tool_calls == 1 and result["n_calls"] == 1 and result["n_failed"] == 0
                assert result["used_ops"] == sorted(task.required_ops) and result["correct"]
                tool_message = env.env.messages[3]
                assert tool_message["role"] == "tool" and tool_message["content"][0]["type"] == "image"
                assert result["reward_components"]["fmt"] == 1.0  # scored on the turns as generated
            else:
                assert env.tool_calls == 0 and not result["correct"]
        # The images reached the forward pass: one input image per rollout, one per tool call.
        grids = out["image_grid_thw"]
        assert grids.shape[0] == len(envs) + sum(env.tool_calls for env in envs)
        # The env's totals are the rewards GRPO normalised per group into the loss's advantages.
        totals = torch.tensor([env.result["episode_reward"] for env in envs])
        advantages = out["advantages"]
        for g in range(0, len(envs), 2):
            assert totals[g] > totals[g + 1]
            assert advantages[g] > 0 > advantages[g + 1]
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), trainer.before[n])]
    assert changed, "no parameter moved: the rewards never reached an optimizer step"
    logged = {key for record in trainer.state.log_history for key in record}
    assert {"rewards/codevision/mean", "codevision/acc", "codevision/fmt", "codevision/mandatory",
            "codevision/exec_fail", "tools/call_frequency"} <= logged
