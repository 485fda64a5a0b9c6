"""GRPO on the tiny model whose sampler is forced to write the turns of issue 17 (code without
`result`, syntax errors, unreadable calls, tag spam, ...) completes every step: the env turns each
into an observation, and the one episode per step that a stand-in env bug ends is logged
(rollout/episode_errors), left out of the loss, and the run goes on."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

import algos.engines  # noqa: E402
from agents.generation import HFBackend  # noqa: E402
from algos.config import load_config  # noqa: E402
from algos.grpo import run  # noqa: E402
from algos.tracking import read_metrics  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

def _call(code_json: str) -> str:
    return '<tool_call>\n{"name": "code_image_tool", "arguments": {"code": ' + code_json + "}}\n</tool_call>"


# The turns a model writes that issue 17 found crashing or stalling a step; None: the model samples freely.
MISTAKES = [
    _call('"print(image.size)"'),  # runs, assigns no result, prints
    _call('"x = image.rotate(90)"'),  # runs, assigns no result, prints nothing
    None,
    _call('"pass"'),
    _call('"result = image.rotate("'),  # a syntax error
    _call('"r\\u00e9sultat = image"'),  # a Unicode identifier
    None,
    _call('"print(\'y\' * 100000)"'),  # printed output far past what is shown
    _call('"result = Image.new(\'F\', (5, 4), 3.5)"'),  # an odd image mode
    '<tool_call>\n{"name": "code_image_tool", "arguments": {"code": </tool_call>',  # truncated JSON
    _call('5, "image_index": "\u00b2"'),  # wrong types inside the JSON
    "<answer>" * 40 + "<|im_end|>",  # a looping model's tag spam
    _call('"result = image.rotate(90, expand=True)"'),
]


class _ForceRows:
    """A logits processor that makes row b write `rows[b]` (token ids) when it is not None."""

    def __init__(self):
        self.rows: list[list[int] | None] = []
        self.width = 0

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width
        scores = scores.clone()
        for b, script in enumerate(self.rows):
            if script is not None and step < len(script):
                scores[b] = float("-inf")
                scores[b, script[step]] = 0.0
        return scores


class MistakesBackend(HFBackend):
    """The policy's own sampling, with turns forced to `MISTAKES` in turn (the log-probs stay the
    policy's: the forcing runs after the recorder). In a training batch (4 rows), the first turn
    of episode 1 is forced to an answer that trips the stand-in env bug (`bug`: its trigger text)."""

    def __init__(self, policy, bug: str):
        self.forcer = _ForceRows()
        super().__init__(policy, logits_processors=[self.forcer])
        tokenize = lambda text: policy.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.scripts = [None if text is None else tokenize(text) for text in MISTAKES]
        self.bug = tokenize(f"<answer>{bug}</answer><|im_end|>")
        self.turns_of: dict[str, int] = {}
        self.forced = 0
        self.next_script = 0

    def reset(self) -> None:
        self.turns_of = {}

    def generate(self, requests, sampling, seed=None, on_finish=None):
        rows = []
        for request in requests:
            turn = self.turns_of.get(request.key, 0)
            self.turns_of[request.key] = turn + 1
            if len(requests) == 4 and request.key == "1" and turn == 0:
                rows.append(self.bug)
                continue
            rows.append(self.scripts[self.next_script % len(self.scripts)])
            self.next_script += 1
        self.forced += sum(row is not None and row is not self.bug for row in rows)
        self.forcer.rows, self.forcer.width = rows, max(len(r.token_ids) for r in requests)
        return super().generate(requests, sampling, seed, on_finish)


def test_grpo_completes_every_step_while_the_sampler_writes_mistakes(tmp_path, monkeypatch, capsys, env_bug):
    backends = []

    def make_generator(policy, rollout):
        backends.append(MistakesBackend(policy, env_bug))
        return backends[-1]

    monkeypatch.setattr(algos.engines, "make_generator", make_generator)
    out = tmp_path / "run"
    summary = run(load_config([
        "+exp=tiny", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=48",
        "algo.mini_batch_size=1", "algo.micro_batch_size=2", "algo.lr=1e-3", "env.max_turns=2",
        "env.sandbox.workers=1", "trainer.total_steps=3", "trainer.val_size=2", "trainer.val_every=3",
        "trainer.save_every=0", "trainer.sample_table_every=0", "logger.mode=disabled",
        "logger.progress_bar=false", f"trainer.output_dir={out}",
    ]))
    assert summary["steps"] == 3
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["step"] >= 1 and "reward/total" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    # Only the stand-in bug ended an episode: every forced mistake became an observation.
    assert [r["rollout/episode_errors"] for r in train] == [1.0, 1.0, 1.0]
    assert all(r["val/rollout/episode_errors"] == 0.0 for r in records if "val/acc" in r)
    assert all(r["data/trajectories_in_loss"] <= 3 for r in train)  # never the episode the bug ended
    assert backends[0].forced >= len(MISTAKES)  # every mistake was written at least once
    assert capsys.readouterr().out.count("1 of 4 episodes ended by an error and are left out of the loss") == 3
