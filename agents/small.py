"""A "small" randomly initialised Qwen-VL, bigger than `agents.tiny`, for CPU learning runs.

The tiny models (64 wide, 2 layers, ~0.3 M parameters) are sized for tests: they run, but they
are too weak to learn a visual decision in a few CPU minutes. `small_model_dir(family)` builds the
same checkpoint layout with the same tokenizer, image processor and chat template as
`tiny:<family>` (so token ids of oracle demonstrations recorded with it are valid), and a 128-wide,
4-layer text tower over a 2-layer vision tower (~2 M parameters):

    from agents.small import small_model_dir
    path = small_model_dir()                 # Qwen3-VL (the default); small_model_dir("qwen2_5_vl")

Folders are cached beside the tiny ones (`agents.tiny.cache_root()`), named by a hash of the
size recipe and the tiny recipe it builds on, and written atomically like `tiny_model_dir`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from agents import tiny

# The default family. Qwen3-VL, because it can see *where* an image token is: its M-RoPE
# interleaves the t/h/w axes over all frequencies and its vision tower adds absolute position
# embeddings. Qwen2.5-VL's sections give the image axes only the slowest frequencies (one column
# turns the phase by ~2e-4 rad), and a small one trained from scratch read "which corner" at
# chance where Qwen3-VL read it on every held-out item (issue 9; tests/test_learn.py).
FAMILY = "qwen3_vl"
# 128 wide, 4 layers: ~1 M parameters, the size of the throwaway measurement. Heads stay
# 32 wide like the tiny model's (see agents.tiny); mrope sections scaled to a 32-wide head.
SMALL_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)
_VISION = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128)
SMALL_VISION: dict[str, dict] = {
    "qwen2_vl": dict(depth=2, embed_dim=128, hidden_size=128, num_heads=4, mlp_ratio=2),
    "qwen2_5_vl": dict(_VISION, window_size=112, fullatt_block_indexes=[1]),
    # Learned absolute position embeddings in the vision tower (a 16 x 16 grid, interpolated) and
    # interleaved M-RoPE in the text model: where an image token sits is part of its features.
    "qwen3_vl": dict(_VISION, num_position_embeddings=256, deepstack_visual_indexes=[0]),
}


def small_config(tokenizer, family: str = FAMILY):
    """The small config of `family`: the tiny one with wider/deeper text and vision towers."""
    import transformers

    base = tiny.tiny_config(family, tokenizer)
    text = base.text_config.to_dict()
    text.update(SMALL_TEXT)
    text.pop("layer_types", None)  # derived from num_hidden_layers again
    vision = base.vision_config.to_dict()
    vision.update(SMALL_VISION[family])
    return getattr(transformers, tiny.FAMILY_SPECS[family]["config_class"])(
        text_config=text, vision_config=vision, image_token_id=base.image_token_id,
        video_token_id=base.video_token_id, vision_start_token_id=base.vision_start_token_id,
        vision_end_token_id=base.vision_end_token_id, tie_word_embeddings=False, dtype="float32",
    )


def build_small_model(out_dir: str | Path, family: str = FAMILY) -> Path:
    """Build the small checkpoint of `family` into `out_dir` (created; must not exist or be empty)."""
    import torch
    import transformers
    from transformers import GenerationConfig

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: build_small_model writes into an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny.train_tokenizer()
    config = small_config(tokenizer, family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.SEED)
        model = getattr(transformers, tiny.FAMILY_SPECS[family]["model_class"])(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=tiny.vision_token_ids(tokenizer),  # never generate image placeholders
    )
    model.save_pretrained(out)
    tokenizer.init_kwargs["processor_class"] = tiny.FAMILY_SPECS[family]["processor_class"]
    tokenizer.save_pretrained(out)
    image_processor = tiny.tiny_image_processor(family)
    (out / "processor_config.json").write_text(
        json.dumps(tiny.processor_config(family, image_processor), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    (out / "chat_template.jinja").write_text(tiny.chat_template(), encoding="utf-8")
    return out


def small_model_dir(family: str = FAMILY) -> Path:
    """The cached small checkpoint folder of `family`, built (in seconds) the first time it is asked for."""
    if family not in SMALL_VISION:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(SMALL_VISION)}")
    recipe = json.dumps({"tiny": tiny.recipe_hash(family), "text": SMALL_TEXT, "vision": SMALL_VISION[family]},
                        sort_keys=True)
    target = tiny.cache_root() / f"small-{family}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".small-", dir=target.parent))
    try:
        build_small_model(staging, family)
        try:
            staging.rename(target)  # atomic: readers see no folder or a complete one
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
