"""Tiny, randomly initialised Qwen-VL checkpoints built offline, for tests, demos and CPU runs.

`tiny_model_dir("qwen2_5_vl")` returns a folder laid out like a real Hugging Face checkpoint
(config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
processor_config.json, chat_template.jinja) that the standard Auto classes load. Each of the three
families — Qwen2-VL, Qwen2.5-VL, Qwen3-VL — uses its real model class with a few-layer config, the
family's real patch size (14, 14, 16) and merge size (2), and a small byte-level BPE tokenizer
trained here in code with Qwen's special tokens. Everything is seeded: building twice gives
byte-identical files.

Folders are cached under `$CODEVISION_CACHE/tiny` (default `~/.cache/codevision_gym/tiny`), named
`<family>-<hash of the recipe and library versions>`, so a changed recipe never reuses a stale
folder. A build writes to a temporary folder and renames it into place, so processes that build the
same model at once never see a half-written folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Bump when the recipe below changes in a way the hash of its inputs cannot see.
RECIPE_VERSION = 1
SEED = 0
BPE_VOCAB_SIZE = 1024  # byte alphabet (256) + merges; small enough for a 64-wide model

# Qwen's control tokens (special: dropped by `decode(skip_special_tokens=True)`).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The placeholders the processor expands around image/video features; never generated.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Tokens Qwen adds as ordinary (non-special) added tokens: they survive decoding, so a decoded
# action still carries its <think>/<tool_call> structure. <answer> is ours: CodeVision's answer tag.
TEXT_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
)

# Qwen2's pre-tokenizer split: digits one by one, letters with one leading non-letter, punctuation
# runs, newlines apart from other whitespace.
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Per family: the real model's vision patch size and image normalisation, and the tiny text and
# vision towers. Sizes keep a forward+backward of a two-image conversation well under a second.
# Heads are 32 wide (not smaller) because fused attention kernels (flash-attention, vLLM's
# backends) only take common head sizes; the mrope sections are the real ones scaled to 32.
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
FAMILY_SPECS = {
    "qwen2_vl": dict(
        model_class="Qwen2VLForConditionalGeneration",
        config_class="Qwen2VLConfig",
        processor_class="Qwen2VLProcessor",
        video_processor_type="Qwen2VLVideoProcessor",
        patch_size=14,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        text=dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}),
        vision=dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=64),
    ),
    "qwen2_5_vl": dict(
        model_class="Qwen2_5_VLForConditionalGeneration",
        config_class="Qwen2_5_VLConfig",
        processor_class="Qwen2_5_VLProcessor",
        video_processor_type="Qwen2VLVideoProcessor",
        patch_size=14,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        text=dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}),
        # Layer 0 uses windowed attention, layer 1 full attention, as the real tower alternates.
        vision=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
            window_size=112, fullatt_block_indexes=[1],
        ),
    ),
    "qwen3_vl": dict(
        model_class="Qwen3VLForConditionalGeneration",
        config_class="Qwen3VLConfig",
        processor_class="Qwen3VLProcessor",
        video_processor_type="Qwen3VLVideoProcessor",
        patch_size=16,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        text=dict(
            _TEXT, head_dim=32,
            rope_parameters={
                "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True,
            },
        ),
        # Deepstack: features of vision layer 0 are added into the first text layer.
        vision=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
            num_position_embeddings=256, deepstack_visual_indexes=[0],
        ),
    ),
}
MERGE_SIZE = 2
# An image becomes between 4 and 64 tokens (one token per merged 2x2 patch block): a 64x64 image
# costs 4 tokens, a 512x512 one is downscaled to 64 tokens, so tiny runs stay fast on CPU.
MIN_IMAGE_TOKENS = 4
MAX_IMAGE_TOKENS = 64


def _corpus() -> list[str]:
    """Training text for the tokenizer: English, vision Python code and JSON tool calls.

    The merges follow what the policy reads and writes, so code and tool calls tokenise into
    plausible pieces rather than single bytes.
    """
    english = (
        "The image shows a red car parked next to a tall building. What colour is the sign on the left?\n"
        "Look carefully at the picture. The text in the image is upside down, so rotate it before reading.\n"
        "Answer the question with a single word or number. How many people are standing near the door?\n"
        "The chart compares the monthly sales of three stores. Which store sold the most in March?\n"
        "I need to crop the top right corner to read the small label, then answer the question.\n"
        "The photo was taken at night and it is too dark; increasing the brightness and contrast helps.\n"
        "The document is rotated by 90 degrees counter-clockwise. After rotating it back the title reads clearly.\n"
        "There is a small object in the bottom left of the image. Zoom in to identify it.\n"
        "You are a helpful assistant. Think step by step, use the tool when it helps, then give the answer.\n"
        "Is the traffic light green or red? The scene is mirrored, so the writing on the shop window is reversed.\n"
        "Read the number written on the blue board. The board is far away and the image has low resolution.\n"
        "Which animal is sitting on the chair? Options: A. a cat B. a dog C. a bird D. a rabbit.\n"
        "The bounding box of the answer region is given in pixel coordinates of the original image.\n"
        "After the crop, the printed output says the new image is larger, and the words are easy to read.\n"
    )
    code = (
        "from PIL import Image, ImageEnhance, ImageFilter, ImageOps\n"
        "import numpy as np\n"
        "import cv2\n"
        "image = Image.open(path).convert('RGB')\n"
        "width, height = image.size\n"
        "rotated = image.rotate(90, expand=True)\n"
        "flipped = image.transpose(Image.FLIP_LEFT_RIGHT)\n"
        "cropped = image.crop((left, top, right, bottom))\n"
        "resized = cropped.resize((width * 2, height * 2), Image.BICUBIC)\n"
        "enhanced = ImageEnhance.Contrast(image).enhance(1.5)\n"
        "bright = ImageEnhance.Brightness(image).enhance(1.8)\n"
        "sharp = image.filter(ImageFilter.SHARPEN)\n"
        "gray = ImageOps.grayscale(image)\n"
        "array = np.array(image, dtype=np.uint8)\n"
        "mask = (array[:, :, 0] > 128) & (array[:, :, 1] < 64)\n"
        "ys, xs = np.nonzero(mask)\n"
        "box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)\n"
        "img = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)\n"
        "edges = cv2.Canny(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 100, 200)\n"
        "blurred = cv2.GaussianBlur(img, (5, 5), 0)\n"
        "_, thresh = cv2.threshold(gray_array, 127, 255, cv2.THRESH_BINARY)\n"
        "contours, _ = cv2.findContours(thresh, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)\n"
        "result = Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))\n"
        "for index, contour in enumerate(contours):\n"
        "    x, y, w, h = cv2.boundingRect(contour)\n"
        "    if w * h > 100:\n"
        "        print(index, x, y, w, h)\n"
        "def crop_center(image, size):\n"
        "    width, height = image.size\n"
        "    left, top = (width - size) // 2, (height - size) // 2\n"
        "    return image.crop((left, top, left + size, top + size))\n"
        "print(result.size)\n"
        "result.save(output_path)\n"
    )
    tool_calls = (
        '<tool_call>\n{"name": "code_image_tool", "arguments": {"code": "image = image.rotate(180, expand=True)", '
        '"description": "rotate the image upright", "image_index": 0}}\n</tool_call>\n'
        '<tool_call>\n{"name": "code_image_tool", "arguments": {"code": "image = image.crop((10, 20, 120, 96))", '
        '"description": "crop the label", "image_index": 1}}\n</tool_call>\n'
        '<tool_response>\n{"status": "ok", "output": "Image 2 created (128x96)", "stdout": "(128, 96)"}\n'
        "</tool_response>\n"
        '<tool_response>\n{"status": "error", "error": "NameError: name \'img\' is not defined"}\n</tool_response>\n'
        '{"type": "function", "function": {"name": "code_image_tool", "description": "Run Python code on an image", '
        '"parameters": {"type": "object", "properties": {"code": {"type": "string"}, '
        '"image_index": {"type": "integer"}}, "required": ["code"]}}}\n'
        "<think>The text is upside down, so I rotate the image by 180 degrees first.</think>\n"
        "<think>The label is small; cropping the top left region makes it readable.</think>\n"
        "<answer>42</answer>\n<answer>B</answer>\n<answer>the red car</answer>\n"
    )
    numbers = " ".join(str(n) for n in range(0, 1000, 7)) + "\n"
    return [english, code, tool_calls, numbers] * 4


def train_tokenizer():
    """Train the tiny byte-level BPE and wrap it as a `PreTrainedTokenizerFast`.

    Token ids: 0..BPE_VOCAB_SIZE-1 are the BPE vocabulary (bytes first), then SPECIAL_TOKENS, then
    TEXT_TOKENS, as Qwen places its added tokens after the BPE vocabulary.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    if bpe.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(
            f"the tiny tokenizer corpus yields {bpe.get_vocab_size()} BPE tokens, not {BPE_VOCAB_SIZE}: "
            "add text to agents.tiny._corpus or lower BPE_VOCAB_SIZE"
        )
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=chat_template(),
    )


def chat_template() -> str:
    """Our Qwen/Hermes-style chat template (agents/chat_template.jinja)."""
    return resources.files("agents").joinpath("chat_template.jinja").read_text(encoding="utf-8")


def tiny_config(family: str, tokenizer):
    """The tiny model config of `family`, with token ids taken from `tokenizer`."""
    import transformers

    spec = _family_spec(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = dict(spec["vision"], patch_size=spec["patch_size"], spatial_merge_size=MERGE_SIZE, temporal_patch_size=2)
    text = dict(
        spec["text"],
        vocab_size=len(tokenizer),  # exact: no unused rows the random model could sample
        max_position_embeddings=32768,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        dtype="float32",
    )
    config_class = getattr(transformers, spec["config_class"])
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def tiny_image_processor(family: str):
    """The PIL image processor of `family`, sized so an image costs 4..64 tokens."""
    from transformers import Qwen2VLImageProcessorPil

    spec = _family_spec(family)
    factor = spec["patch_size"] * MERGE_SIZE
    return Qwen2VLImageProcessorPil(
        patch_size=spec["patch_size"],
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        size={"shortest_edge": MIN_IMAGE_TOKENS * factor**2, "longest_edge": MAX_IMAGE_TOKENS * factor**2},
        image_mean=spec["image_mean"],
        image_std=spec["image_std"],
    )


def processor_config(family: str, image_processor) -> dict:
    """The processor_config.json that `processor.save_pretrained` writes for `family`.

    Written by hand because the stock processor cannot be built without torchvision (its video
    processor needs it). The video entry matches the image processor, so where torchvision exists
    plain `AutoProcessor.from_pretrained` builds the full stock processor from this folder.
    """
    spec = _family_spec(family)
    image = image_processor.to_dict()
    video = {
        key: image[key]
        for key in ("patch_size", "merge_size", "temporal_patch_size", "size", "image_mean", "image_std")
    }
    video["video_processor_type"] = spec["video_processor_type"]
    return {"image_processor": image, "processor_class": spec["processor_class"], "video_processor": video}


def build_tiny_model(family: str, out_dir: str | os.PathLike) -> Path:
    """Build the tiny `family` checkpoint into `out_dir` (created; must not exist or be empty).

    Deterministic: the same library versions give byte-identical files.
    """
    import torch
    import transformers
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    spec = _family_spec(family)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: build_tiny_model writes a fresh checkpoint into an empty folder")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer()
    config = tiny_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG stream alone
        torch.manual_seed(SEED)
        model = getattr(transformers, spec["model_class"])(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        # A random model samples vision placeholders; fed back, they would demand image features.
        suppress_tokens=vision_token_ids(tokenizer),
    )
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard save needs no progress bar in every test log
    try:
        model.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()

    tokenizer.init_kwargs["processor_class"] = spec["processor_class"]
    tokenizer.save_pretrained(out)
    image_processor = tiny_image_processor(family)
    (out / "processor_config.json").write_text(
        json.dumps(processor_config(family, image_processor), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    (out / "chat_template.jinja").write_text(chat_template(), encoding="utf-8")
    return out


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the VISION_TOKENS in `tokenizer`, which a model must never generate."""
    return sorted(tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)


def cache_root() -> Path:
    """Where tiny checkpoints are cached: `$CODEVISION_CACHE/tiny` or `~/.cache/codevision_gym/tiny`."""
    base = os.environ.get("CODEVISION_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "codevision_gym") / "tiny"


def recipe_hash(family: str) -> str:
    """A short hash of everything the `family` build depends on (recipe, template, library versions)."""
    import tokenizers
    import torch
    import transformers

    parts = {
        "recipe": RECIPE_VERSION,
        "family": family,
        "spec": _family_spec(family),
        "sizes": [BPE_VOCAB_SIZE, MERGE_SIZE, MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS, SEED],
        "tokens": [SPECIAL_TOKENS, TEXT_TOKENS, QWEN_SPLIT_REGEX],
        "corpus": _corpus(),
        "template": chat_template(),
        "versions": [transformers.__version__, tokenizers.__version__, torch.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def tiny_model_dir(family: str) -> Path:
    """The cached tiny `family` checkpoint, built (in a few seconds) the first time it is asked for."""
    target = cache_root() / f"{family}-{recipe_hash(family)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        build_tiny_model(family, staging)
        try:
            staging.rename(target)  # atomic: readers see no folder or a complete one
        except OSError:
            if not (target / "config.json").is_file():  # not "another process won the race"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _family_spec(family: str) -> dict:
    if family not in FAMILY_SPECS:
        raise ValueError(f"unknown tiny model family {family!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILY_SPECS[family]
