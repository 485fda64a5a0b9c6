"""The vLLM backend's CPU-checkable parts: where each rank's engine goes, that every vLLM key of conf/
reaches `vllm.LLM`, the request arguments, and the weight chunks' journey into a worker. The calls
themselves are checked against vLLM's sources in tests/test_vllm_surface.py, and run on a GPU by
scripts/gpu_check.sh."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from agents.generation import GenerationRequest, SamplingParams
from agents.vllm_backend import (MULTIPROCESSING, VLLMBackend, engine_kwargs, engine_placement, sampling_kwargs,
                                 vllm_prompt)
from agents.vllm_worker import EXTENSION, WeightLoader, pack_chunk, unpack_chunk
from algos.config import GRPOConfig, load_config
from algos.ppo_config import PPOConfig
from algos.engines import vllm_options

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8"}


def test_one_process_keeps_the_engine_in_process_unless_the_user_said_otherwise():
    placement = engine_placement(1, world_size=1, visible_gpus=1, environ={})
    assert placement.in_process and dict(placement.environ) == {MULTIPROCESSING: "0"}
    assert dict(placement.llm_kwargs) == {}  # vLLM's one-process executor, on cuda:0
    # A shell's VLLM_ENABLE_V1_MULTIPROCESSING=1 is kept: weights then travel as bytes.
    placement = engine_placement(1, world_size=1, visible_gpus=1, environ={MULTIPROCESSING: "1"})
    assert not placement.in_process and dict(placement.environ) == {MULTIPROCESSING: "1"}
    # Tensor parallel workers are processes of their own: weights travel as bytes too.
    placement = engine_placement(2, world_size=1, visible_gpus=2, environ={})
    assert not placement.in_process and dict(placement.llm_kwargs) == {}
    with pytest.raises(ValueError, match="tensor_parallel_size=4 but this process sees 2 GPU"):
        engine_placement(4, world_size=1, visible_gpus=2, environ={})


def test_under_torchrun_each_rank_runs_its_own_engine_on_its_own_gpu():
    placement = engine_placement(1, world_size=8, visible_gpus=8, environ=TORCHRUN)
    # vLLM's torchrun executor places the engine on cuda:LOCAL_RANK and keeps ranks independent.
    assert dict(placement.llm_kwargs) == {"distributed_executor_backend": "external_launcher"}
    assert dict(placement.environ) == {MULTIPROCESSING: "0"} and placement.in_process
    # ... even against a shell's VLLM_ENABLE_V1_MULTIPROCESSING=1, which that executor cannot run with.
    assert dict(engine_placement(1, 8, 8, {**TORCHRUN, MULTIPROCESSING: "1"}).environ) == {MULTIPROCESSING: "0"}
    with pytest.raises(ValueError, match="tensor_parallel_size=2 under torchrun with 8 ranks"):
        engine_placement(2, world_size=8, visible_gpus=8, environ=TORCHRUN)
    with pytest.raises(RuntimeError, match="LOCAL_RANK unset: launch with torchrun"):
        engine_placement(1, world_size=2, visible_gpus=2, environ={"RANK": "0"})


def _vllm_keys(yaml_path: Path) -> list[str]:
    """The rollout keys a config file documents as vLLM's ("# vllm only: ...")."""
    return re.findall(r"^(\w+): .*# vllm only:", yaml_path.read_text(), flags=re.M)


def _rollout_file(conf_file: str) -> Path:
    """The `rollout/` group file a primary config composes (`- rollout: default`)."""
    (option,) = re.findall(r"^  - rollout: (\w+)", (REPO / "conf" / conf_file).read_text(), flags=re.M)
    return REPO / "conf" / "rollout" / f"{option}.yaml"


@pytest.mark.parametrize("config, conf_file", [(GRPOConfig, "grpo.yaml"), (PPOConfig, "ppo.yaml")])
def test_every_vllm_key_of_conf_reaches_the_engine(config, conf_file):
    keys = _vllm_keys(_rollout_file(conf_file))
    assert {"gpu_memory_utilization", "tensor_parallel_size", "max_images", "enable_prefix_caching",
            "enforce_eager"} <= set(keys)
    rollout = config().rollout
    baseline = engine_kwargs("ckpt", "bfloat16", **vllm_options(rollout))
    for key in keys + ["max_total_tokens"]:
        value = getattr(rollout, key)
        changed = (not value) if isinstance(value, bool) else value / 2 if isinstance(value, float) else value + 1
        setattr(rollout, key, changed)
        assert engine_kwargs("ckpt", "bfloat16", **vllm_options(rollout)) != baseline, f"rollout.{key} never reaches vllm.LLM"
        setattr(rollout, key, value)
    assert baseline["max_model_len"] == rollout.max_total_tokens
    assert baseline["limit_mm_per_prompt"] == {"image": rollout.max_images}
    assert baseline["worker_extension_cls"] == EXTENSION and baseline["logprobs_mode"] == "processed_logprobs"


def test_max_images_must_cover_an_episode():
    with pytest.raises(ValueError, match=r"rollout\.max_images: 4 is fewer than an episode can show.*at least 12"):
        load_config(["rollout.backend=vllm", "rollout.max_images=4"])
    assert load_config(["rollout.max_images=4"]).rollout.max_images == 4  # transformers sampling has no such limit


def test_a_prompt_reaches_vllm_with_one_placeholder_per_image_and_its_images():
    image = Image.new("RGB", (28, 28))
    ids = [1, 9, 9, 9, 2, 9, 9, 3]
    prompt = vllm_prompt(GenerationRequest(ids, [image, image], None, [[1, 2, 2], [1, 2, 2]], 16), image_token_id=9)
    assert prompt == {"prompt_token_ids": [1, 9, 2, 9, 3], "multi_modal_data": {"image": [image, image]}}
    assert ids == [1, 9, 9, 9, 2, 9, 9, 3]  # the episode's own ids are left as they are
    assert vllm_prompt(GenerationRequest([1, 2], [], None, [], 16), image_token_id=9) == {"prompt_token_ids": [1, 2]}


def test_sampling_arguments_keep_the_samplers_log_probs_recomputable():
    kwargs = sampling_kwargs(SamplingParams(temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=64), max_tokens=32,
                             stop_ids=[7, 8], logit_bias={5: -100.0}, seed=11)
    assert kwargs == dict(n=1, temperature=0.7, top_p=1.0, top_k=0, max_tokens=32, stop_token_ids=[7, 8],
                          logit_bias={5: -100.0}, logprobs=0, seed=11, skip_special_tokens=False, detokenize=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 5), min_size=0, max_size=3),
                          st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), st.booleans()),
                min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))
def test_a_weight_chunk_crosses_processes_as_bytes_unchanged(specs, seed):
    generator = torch.Generator().manual_seed(seed)
    chunk = []
    for i, (shape, dtype, transposed) in enumerate(specs):
        tensor = torch.randn(shape, generator=generator).to(dtype)
        chunk.append((f"model.language_model.layers.{i}.w", tensor.T if transposed and tensor.dim() == 2 else tensor))
    back = unpack_chunk(memoryview(pack_chunk(chunk)))
    assert sorted(name for name, _ in back) == sorted(name for name, _ in chunk)
    for (_, sent), (_, got) in zip(sorted(chunk, key=lambda p: p[0]), sorted(back, key=lambda p: p[0])):
        assert got.dtype == sent.dtype and torch.equal(got, sent)


def test_a_chunk_naming_a_tensor_twice_is_refused():
    with pytest.raises(ValueError, match="names a tensor twice"):
        pack_chunk([("a", torch.zeros(1)), ("a", torch.ones(1))])


class _Model(nn.Module):
    """A model with vLLM's loading interface: load_weights(pairs) -> the names it loaded."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)
        return {name for name, _ in weights}


class _Worker(WeightLoader):
    def __init__(self):
        self.model = _Model()

    def get_model(self):
        return self.model


@pytest.mark.parametrize("as_bytes", [False, True])
def test_the_worker_extension_loads_a_chunk_into_the_model(as_bytes):
    worker = _Worker()
    chunk = [("proj.weight", torch.ones(2, 3)), ("proj.bias", torch.full((2,), 2.0))]
    assert worker.codevision_load_weights(pack_chunk(chunk) if as_bytes else chunk) == 2
    assert torch.equal(worker.model.proj.weight, torch.ones(2, 3)) and torch.equal(worker.model.proj.bias, torch.full((2,), 2.0))
    # vLLM refuses an extension that shadows a worker attribute: ours are all namespaced.
    assert all(name.startswith("codevision_") for name in vars(WeightLoader) if not name.startswith("__"))


def test_without_vllm_the_backend_names_the_fix():
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        VLLMBackend(object())
