"""The transformers generation backend: stops, per-request limits, early completion reports, log-probs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from agents.generation import GenerationRequest, HFBackend, SamplingParams  # noqa: E402
from agents.policy import Policy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def policy():
    return Policy.load("tiny:qwen2_vl")


def _requests(policy, limits):
    requests = []
    for i, limit in enumerate(limits):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 256, (64, 64 + 32 * i, 3), dtype=np.uint8))
        state = policy.renderer.start([{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": "Read it. " * (1 + 2 * i)}]}])
        requests.append(GenerationRequest(state.token_ids, state.images, list(state.pixel_values),
                                          state.image_grid_thw, limit))
    return requests


class _Script:
    """Row b writes scripts[b] (then keeps repeating its last token); counts decoding steps."""

    def __init__(self, scripts, width):
        self.scripts, self.width, self.calls = scripts, width, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        step = input_ids.shape[1] - self.width
        forced = torch.full_like(scores, float("-inf"))
        for b, script in enumerate(self.scripts):
            forced[b, script[min(step, len(script) - 1)]] = 0.0
        return forced


def test_rows_stop_at_their_own_stop_token_or_limit_and_report_early(policy):
    tool_end = policy.tokenizer.convert_tokens_to_ids("</tool_call>")
    im_end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = policy.tokenizer("a b c d e f g h i j", add_special_tokens=False)["input_ids"]
    requests = _requests(policy, [20, 20, 5])
    width = max(len(r.token_ids) for r in requests)
    script = _Script([text[:2] + [tool_end], text[:6] + [im_end], text], width)
    backend = HFBackend(policy, logits_processors=[script])
    reported = {}

    def on_finish(i, result):
        reported[i] = (script.calls, result)

    results = backend.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=20), seed=0,
                               on_finish=on_finish)
    assert [r.token_ids for r in results] == [text[:2] + [tool_end], text[:6] + [im_end], text[:5]]
    assert [r.finish_reason for r in results] == ["stop", "stop", "length"]
    assert all(len(r.logprobs) == len(r.token_ids) and max(r.logprobs) < 0 for r in results)
    # Each row was handed over once, as soon as it was complete (seen at the next decoding step):
    # row 0 during step 3, row 2 (its limit) during step 5,
    # while the batch went on to generate row 1's 7 tokens.
    assert sorted(reported) == [0, 1, 2] and all(reported[i][1] == results[i] for i in range(3))
    assert reported[0][0] == 3 and reported[2][0] == 5 and script.calls == 7


def test_log_probs_are_the_policys_and_batching_changes_nothing(policy):
    requests = _requests(policy, [6, 6])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    together = HFBackend(policy, stop_tokens=("<|endoftext|>",)).generate(requests, greedy)
    for request, result in zip(requests, together):
        (alone,) = HFBackend(policy, stop_tokens=("<|endoftext|>",)).generate([request], greedy)
        assert alone.token_ids == result.token_ids
        assert np.allclose(alone.logprobs, result.logprobs, atol=1e-5)
        # Teacher-forced scoring of the same tokens by the trainer's path gives the same numbers.
        ids = torch.tensor([request.token_ids + result.token_ids])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "mm_token_type_ids": (ids == policy.image_token_id).long(),
                 "pixel_values": torch.cat(request.pixel_values), "image_grid_thw": torch.tensor(request.image_grid_thw)}
        with torch.no_grad():
            logprobs, _ = policy.logprobs(batch, positions="all", temperature=1.0)
        assert np.allclose(logprobs[0, len(request.token_ids):].tolist(), result.logprobs, atol=1e-4)


def test_bad_requests_are_explained(policy):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="is not a single token"):
        HFBackend(policy, stop_tokens=("<stop here>",))
    (request,) = _requests(policy, [4])
    first = request.token_ids.index(policy.image_token_id)
    ids = request.token_ids[:first] + request.token_ids[first + 2:]  # two placeholders cut out of the span
    cut = GenerationRequest(ids, request.images, request.pixel_values, request.image_grid_thw, 4)
    with pytest.raises(ValueError, match="generation prompt 0: image placeholder runs"):
        HFBackend(policy).generate([cut], SamplingParams())
