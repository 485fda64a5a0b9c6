"""Weights streamed to a separate generator (vLLM): every weight once, in the generator's dtype, one
layer at a time (so a sync costs one layer of memory, not a model), LoRA merged without touching the
trainer's weights, FSDP2 shards gathered a layer at a time. The receiving end here is a second copy
of the checkpoint, loaded as vLLM loads it, into which each chunk is copied by name."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from agents.policy import Policy
from agents.tensor_memory import TensorMemoryMeter
from agents.weight_stream import chunk_bytes, export_name, layer_of, stream_weights

REPO = Path(__file__).resolve().parents[1]


def test_layer_of_and_export_name():
    assert layer_of("model.language_model.layers.11.mlp.up_proj.weight") == "model.language_model.layers.11"
    assert layer_of("model.visual.blocks.0.attn.qkv.bias") == "model.visual.blocks.0"
    assert layer_of("model.language_model.embed_tokens.weight") == "model.language_model.embed_tokens"
    assert layer_of("lm_head.weight") == "lm_head"
    peft_name = "base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"
    assert export_name(peft_name) == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert export_name("lm_head.weight") == "lm_head.weight"
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        export_name("base_model.model.lm_head.modules_to_save.default.weight")


def test_the_meter_counts_new_storage_while_it_lives():
    kept = torch.zeros(1000)  # made before: its views and in-place updates are not new memory
    with TensorMemoryMeter() as meter:
        a = torch.ones(256, dtype=torch.float32)  # 1024 bytes
        view = a[:10]
        kept.add_(1.0)
        b = kept[:500].clone()  # 2000 bytes
        del a  # the view still holds a's storage
        assert meter.live_bytes == 3024
        del view, b
        c = torch.empty(100, dtype=torch.float64)  # 800 bytes, after 3024 were freed
        assert meter.live_bytes == 800
    assert meter.peak_bytes == 3024
    del c


def _generator_copy(spec: str, dtype: torch.dtype):
    """What the generator holds: the checkpoint's own weights, zeroed so only what arrives shows."""
    model = Policy.load(spec, dtype=str(dtype).removeprefix("torch.")).model
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    return model


def _loader(model, received: list):
    """A `send` that copies each chunk into `model` by name (as vLLM's load_weights does)."""
    params = dict(model.named_parameters())

    def send(chunk):
        received.append([name for name, _ in chunk])
        for name, tensor in chunk:
            params[name].copy_(tensor)
    return send


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_every_weight_arrives_once_in_the_generators_dtype_one_layer_at_a_time(family):
    policy = Policy.load(f"tiny:{family}")  # float32, as the trainer on CPU
    with torch.no_grad():  # a trained model, not the checkpoint the generator starts from
        for param in policy.model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    generator = _generator_copy(f"tiny:{family}", torch.bfloat16)
    received: list[list[str]] = []
    with TensorMemoryMeter() as meter:
        stats = stream_weights(policy.model, _loader(generator, received), dtype=torch.bfloat16)

    sent = [name for chunk in received for name in chunk]
    trained = dict(policy.model.named_parameters())
    assert sorted(sent) == sorted(trained)  # every weight, once
    for name, param in generator.named_parameters():
        assert torch.equal(param, trained[name].detach().to(torch.bfloat16)), name
    assert all(len({layer_of(name) for name in chunk}) == 1 for chunk in received)  # one layer per chunk
    assert stats.chunks == len(received) == len({layer_of(name) for name in sent})
    model_bytes = sum(p.numel() for p in trained.values()) * 2
    assert stats.bytes == model_bytes
    # The extra memory of the sync, measured: the largest layer's bf16 copy, not the model's.
    assert meter.peak_bytes == stats.largest_chunk_bytes < model_bytes / 4
    assert meter.live_bytes == 0


def test_a_tensor_already_in_the_generators_dtype_is_sent_without_a_copy():
    policy = Policy.load("tiny:qwen3_vl", dtype="bfloat16")
    with TensorMemoryMeter() as meter:
        stats = stream_weights(policy.model, lambda chunk: None, dtype=torch.bfloat16)
    assert stats.tensors == len(list(policy.model.parameters())) and meter.peak_bytes == 0


def test_trainable_only_sends_what_training_can_change():
    frozen_vision = Policy.load("tiny:qwen3_vl", freeze_vision=True)
    received: list[list[str]] = []
    stream_weights(frozen_vision.model, lambda chunk: received.append([n for n, _ in chunk]), trainable_only=True)
    sent = {name for chunk in received for name in chunk}
    assert sent and not any(name.startswith("model.visual.") for name in sent)
    assert sent == {n for n, p in frozen_vision.model.named_parameters() if p.requires_grad}

    lora = Policy.load("tiny:qwen3_vl", lora=dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    received.clear()
    stream_weights(lora.model, lambda chunk: received.append([n for n, _ in chunk]), trainable_only=True)
    sent = sorted(name for chunk in received for name in chunk)
    assert sent == sorted(f"model.language_model.layers.{i}.self_attn.{proj}.weight" for i in (0, 1)
                          for proj in ("q_proj", "v_proj"))


def test_lora_weights_arrive_merged_and_the_trainers_weights_never_move():
    policy = Policy.load("tiny:qwen2_5_vl", dtype="bfloat16", lora=dict(r=4, alpha=8))
    with torch.no_grad():  # trained adapters (peft starts B at zero, which would merge to nothing)
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    before = {name: param.detach().clone() for name, param in policy.model.named_parameters()}
    # peft's own merge, in float32, of a copy: what the generator must hold.
    expected = {name: param.detach().to(torch.bfloat16) for name, param
                in copy.deepcopy(policy.model).float().merge_and_unload().named_parameters()}

    generator = _generator_copy("tiny:qwen2_5_vl", torch.bfloat16)
    received: list[list[str]] = []
    for _ in range(5):  # one sync per training step
        stream_weights(policy.model, _loader(generator, received), dtype=torch.bfloat16)
    for name, param in generator.named_parameters():
        assert torch.equal(param, expected[name]), name
    assert not any("lora_" in name for chunk in received for name in chunk)
    # Merging in place and back would round the bf16 base weights at every sync; nothing moved here.
    for name, param in policy.model.named_parameters():
        assert torch.equal(param, before[name]), name


FSDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from agents.policy import Policy
    from agents.tensor_memory import TensorMemoryMeter
    from agents.weight_stream import layer_of, stream_weights
    from algos import distributed as D

    out, spec = sys.argv[1], "tiny:qwen3_vl"
    D.init_distributed()
    reference = Policy.load(spec)  # the unsharded weights: what the generator must end up with
    policy = Policy.load(spec)
    D.fsdp2_wrap(policy.model, mixed_precision=None)
    generator = Policy.load(spec).model
    with torch.no_grad():
        for param in generator.parameters():
            param.zero_()
    params = dict(generator.named_parameters())

    def send(chunk):
        for name, tensor in chunk:
            params[name].copy_(tensor)

    with TensorMemoryMeter() as streamed:
        stats = stream_weights(policy.model, send)
    with TensorMemoryMeter() as whole:  # the full state dict gathered at once (the old update_weights)
        state = {name: tensor.full_tensor() for name, tensor in policy.model.state_dict().items()}
    del state
    layers = {}
    for name, param in reference.model.named_parameters():
        layers[layer_of(name)] = layers.get(layer_of(name), 0) + param.numel() * param.element_size()
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({
            "equal": all(torch.equal(params[n], p) for n, p in reference.model.named_parameters()),
            "chunks": stats.chunks, "layers": len(layers), "largest_layer": max(layers.values()),
            "model": sum(layers.values()), "streamed_peak": streamed.peak_bytes, "whole_peak": whole.peak_bytes,
        }, f)
    dist.barrier()  # no rank tears down gloo while its peer may still be reading
    dist.destroy_process_group()
    """
)


def test_fsdp2_weights_are_gathered_one_layer_at_a_time_on_cpu(tmp_path):
    # Two gloo ranks shard the tiny model with FSDP2; each streams the full weights to its own
    # generator copy. Measured: the stream's extra memory is one layer, the whole state dict's is the model.
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["equal"] and r["chunks"] == r["layers"]
        # FSDP2 pads a shard to equal sizes, so a gathered layer may be a little larger than its weights.
        assert r["streamed_peak"] <= 1.05 * r["largest_layer"] < r["model"] / 4
        assert r["whole_peak"] >= r["model"]


def test_chunk_bytes():
    assert chunk_bytes([("a", torch.zeros(3, dtype=torch.bfloat16)), ("b", torch.zeros(2, 2))]) == 6 + 16
