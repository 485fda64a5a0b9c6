"""The learning-proof recipe (issue 9): its configs validate and its small model fits the demos.

The experiment itself (bench/learn_curve.py) takes ~30 CPU minutes and is not a test; these
check the cheap things it relies on.
"""

from __future__ import annotations

import json

from agents import small, tiny
from algos.config import load_config
from algos.sft_config import load_sft_config


def test_tiny_learn_configs_validate_and_target_the_glyph_category():
    grpo = load_config(["+exp=tiny_learn", "model.path=/models/sft"])
    sft = load_sft_config(["+exp=tiny_learn_sft"])
    assert grpo.env.tasks == grpo.env.val_tasks == sft.data.oracle.tasks == "glyph_orientation"
    # The test split stays held out: training and validation never draw from it.
    assert grpo.env.split == "train" and grpo.env.val_split == "validation" and sft.data.oracle.split == "train"
    # RL rollouts show the images at the size SFT trained on, with a KL anchor to the SFT policy.
    assert grpo.env.max_pixels == sft.data.max_pixels == 112 * 112
    assert grpo.algo.kl.coef > 0 and grpo.algo.kl.in_loss


def test_small_model_shares_the_tiny_tokenizer_and_is_larger(tmp_path):
    folder = small.build_small_model(tmp_path / "small")
    tiny_folder = tiny.tiny_model_dir(small.FAMILY)
    # Same tokenizer: oracle demonstrations recorded with tiny:qwen2_5_vl token ids train it.
    assert (folder / "tokenizer.json").read_text() == (tiny_folder / "tokenizer.json").read_text()
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    assert text["hidden_size"] == 128 and text["num_hidden_layers"] == 4
    assert config["vision_config"]["hidden_size"] == 128
