"""Policy loading options, batch collation and log-probs against the model's own full logits."""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from agents.logprobs import naive_sequence_logprobs  # noqa: E402
from agents.policy import Policy  # noqa: E402
from agents.tiny import FAMILIES  # noqa: E402
from agents.trajectory import Trajectory, Turn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _trajectory(policy, seed=0, reply="<think>It is upside down.</think>\n<answer>STOP</answer>", temperature=1.0):
    """A two-image conversation rendered by the policy's renderer, the reply as the sampled turn."""
    renderer = policy.renderer
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer."}]},
        {"role": "user", "content": [{"type": "image", "image": _image(64, 64, seed)},
                                     {"type": "image", "image": _image(96 + 32 * seed, 64, seed + 1)},
                                     {"type": "text", "text": "What does the sign say?" * (1 + seed)}]},
    ]
    state = renderer.start(messages)
    ids = policy.tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    state.append_sampled(ids, [-1.0] * len(ids))
    renderer.close_turn(state)
    prompt_ids, ((sampled, logprobs, context),) = state.turns()
    return Trajectory(
        task_id=f"t{seed}", group_id="g", category="unit", prompt_text="", prompt_images=tuple(state.images),
        turns=(Turn(reply, 1.5, sampled, logprobs, context),), reward_components={"total": 1.5}, success=True,
        prompt_ids=prompt_ids, image_grid_thw=[list(g) for g in state.image_grid_thw],
        pixel_values=state.all_pixel_values(), temperature=temperature,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_equal_the_models_full_logits(family):
    policy = Policy.load(f"tiny:{family}")
    trajectories = [_trajectory(policy, 0), _trajectory(policy, 1)]  # different lengths: right padding
    batch = policy.collate(trajectories)
    assert batch["input_ids"].shape == (2, max(len(t) for t in trajectories))
    assert batch["attention_mask"].sum().item() == sum(len(t) for t in trajectories)
    with torch.no_grad():
        logprobs, entropy = policy.logprobs(batch, chunk_size=5, positions="all", temperature=0.8)
        logits = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                              mm_token_type_ids=batch["mm_token_type_ids"]).logits
    ref_lp, ref_ent = naive_sequence_logprobs(logits, batch["input_ids"], temperature=0.8,
                                              suppressed_ids=policy.suppressed_ids)
    real = batch["attention_mask"].bool()
    real[:, 0] = False
    assert torch.allclose(entropy[real], ref_ent[real], atol=1e-5, rtol=0)
    assert (logprobs[~real] == 0).all()
    # Vision placeholders can never be sampled: their log-prob is the float32 floor (finite, so a
    # zero mask still zeroes it), -inf in the naive computation.
    placeholder = torch.isin(batch["input_ids"], torch.tensor(policy.suppressed_ids)) & real
    assert placeholder.any() and (logprobs[placeholder] < -1e30).all() and torch.isinf(ref_lp[placeholder]).all()
    text = real & ~placeholder
    assert torch.allclose(logprobs[text], ref_lp[text], atol=1e-5, rtol=0)
    # The default scores sampled tokens only, at the batch's temperature.
    with torch.no_grad():
        sampled, _ = policy.logprobs(batch)
    mask = batch["loss_mask"] > 0
    assert (sampled[~mask] == 0).all() and (sampled[mask] < 0).all()


def test_collate_layout_and_recomputed_pixels():
    policy = Policy.load("tiny:qwen2_vl")
    a, b = _trajectory(policy, 0), _trajectory(policy, 1)
    batch = policy.collate([a, b])
    n = len(a)
    assert batch["input_ids"][0, :n].tolist() == a.token_ids
    assert (batch["input_ids"][0, n:] == policy.pad_token_id).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert batch["loss_mask"][0, :n].tolist() == a.loss_mask
    assert batch["token_rewards"][1].sum().item() == pytest.approx(1.5)
    assert batch["rewards"].tolist() == [1.5, 1.5] and batch["temperature"] == 1.0
    assert batch["image_grid_thw"].tolist() == a.image_grid_thw + b.image_grid_thw
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == policy.image_token_id).long())
    # Trajectories read back from JSONL carry images only: the pixels are recomputed identically.
    stripped = dataclasses.replace(a, pixel_values=None)
    assert torch.equal(policy.collate([stripped])["pixel_values"], a.pixel_values)

    with pytest.raises(ValueError, match="different temperatures"):
        policy.collate([a, _trajectory(policy, 1, temperature=0.7)])
    with pytest.raises(ValueError, match="at least one trajectory"):
        policy.collate([])
    cut = dataclasses.replace(a, image_grid_thw=a.image_grid_thw[:1])
    with pytest.raises(ValueError, match=r"trajectory 0 \(task 't0'\): image placeholder runs"):
        policy.collate([cut])


def test_lora_frozen_vision_and_the_reference_model():
    policy = Policy.load("tiny:qwen2_5_vl", lora=dict(r=4, alpha=8), freeze_vision=True, gradient_checkpointing=True)
    names = [name for name, _ in policy.named_parameters()]
    assert names and all("lora_" in name for name in names)
    assert not any("visual" in name for name in names)  # LoRA stays on the language model
    assert sum(p.numel() for p in policy.parameters()) == sum(p.numel() for _, p in policy.named_parameters())
    plain = Policy.load("tiny:qwen2_5_vl")
    batch = policy.collate([_trajectory(policy, 0)])

    with torch.no_grad():
        for _, p in policy.named_parameters():  # move the adapters away from their zero init
            p.add_(0.05 * torch.randn_like(p))
        adapted, _ = policy.logprobs(batch)
        with policy.with_adapter_disabled():
            reference, _ = policy.logprobs(batch)
        base, _ = plain.logprobs(batch)
    assert torch.allclose(reference, base, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-3)

    # Training through checkpointed decoder layers and chunked log-probs reaches the adapters.
    policy.train()
    logprobs, _ = policy.logprobs(batch, chunk_size=3)
    (-(logprobs * batch["loss_mask"]).sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters())
    assert any(p.grad.abs().sum() > 0 for p in policy.parameters())
    with pytest.raises(RuntimeError, match="no LoRA adapter"):
        with plain.with_adapter_disabled():
            pass
    with pytest.raises(ValueError, match="unknown LoRA option"):
        Policy.load("tiny:qwen2_vl", lora=dict(rank=4))


def test_full_finetuning_with_frozen_vision():
    policy = Policy.load("tiny:qwen3_vl", freeze_vision=True)
    trainable = dict(policy.named_parameters())
    assert not any(".visual." in name for name in trainable)
    assert any("lm_head" in name for name in trainable)
    assert policy.train() is policy and policy.model.training and not policy.eval().model.training
