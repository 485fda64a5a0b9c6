"""scripts/gpu_check.py on CPU, as far as it runs without vLLM: its GRPO configurations are valid,
and its family checks, given the transformers sampler (which shares the trainer's weights, so it
never serves stale vision features), pass the parity and stale-cache checks and FAIL the
counter-check: that counter-check cannot pass without a stale cache to catch."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest

from agents.generation import HFBackend
from agents.policy import Policy
from algos.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_checks_grpo_runs_are_valid_configurations(gpu_check):
    for variant, overrides in gpu_check.GRPO_VARIANTS.items():
        cfg = load_config(gpu_check.GRPO_BASE + overrides + ["trainer.output_dir=/tmp/unused"])
        assert cfg.rollout.backend == "vllm" and cfg.trainer.total_steps == 3 and cfg.model.dtype == "bfloat16"
    assert load_config(gpu_check.GRPO_BASE + gpu_check.GRPO_VARIANTS["lora"]).model.lora.enabled
    assert gpu_check.main([]) == 2  # usage


@pytest.mark.slow
def test_family_checks_pass_on_a_fresh_sampler_and_the_counter_check_fails(gpu_check, capsys):
    policy = Policy.load("tiny:qwen3_vl", dtype="bfloat16")
    assert not gpu_check.family_checks("qwen3_vl", policy, HFBackend(policy), contextlib.nullcontext, num_tasks=4)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split(":")[0] for line in lines] == [
        "PASS vllm-logprobs[qwen3_vl]",
        "PASS stale-encoder-cache[qwen3_vl]",
        "PASS stale-encoder-cache[qwen3_vl, reset disabled",  # nothing stale to serve: it matches
        "FAIL stale-check-catches-a-missing-reset[qwen3_vl]",
    ]
