"""Tiny offline Qwen-VL checkpoints and the model/processor loader that also takes real checkpoints."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agents import tiny
from agents.loading import load_model, load_processor, model_type, resolve_model_path, suppressed_token_ids
from spans import masked_spans

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAMILIES = tiny.FAMILIES
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "code_image_tool",
            "description": "Run Python code on an image.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string"}, "image_index": {"type": "integer"}},
                "required": ["code"],
            },
        },
    }
]
FIRST_REPLY = "<think>The sign is upside down.</think>"
CALL = {"code": "image = image.rotate(180, expand=True)", "image_index": 0}
FINAL_REPLY = "<think>Now it reads STOP.</think><answer>STOP</answer>"
# What the model must produce in each assistant turn (all the assistant mask may cover), by hand.
EXPECTED_ASSISTANT_TEXTS = [
    FIRST_REPLY + '\n<tool_call>\n{"name": "code_image_tool", "arguments": {"code": '
    '"image = image.rotate(180, expand=True)", "image_index": 0}}\n</tool_call><|im_end|>',
    FINAL_REPLY + "<|im_end|>",
]


def _image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _conversation():
    """Two images: one in the user turn, one returned by the tool; a tool call and an answer."""
    return [
        {"role": "system", "content": "You answer questions about images."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _image(64, 64, 0)},
                {"type": "text", "text": "What does the sign say?"},
            ],
        },
        {
            "role": "assistant",
            "content": FIRST_REPLY,
            "tool_calls": [{"type": "function", "function": {"name": "code_image_tool", "arguments": CALL}}],
        },
        {
            "role": "tool",
            "content": [
                {"type": "text", "text": "Image 1 created (96x64)."},
                {"type": "image", "image": _image(96, 64, 1)},
            ],
        },
        {"role": "assistant", "content": FINAL_REPLY},
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private tiny-model cache, so the tests exercise the build itself."""
    root = tmp_path_factory.mktemp("codevision_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CODEVISION_CACHE", str(root))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield root


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_has_qwen_tokens_and_round_trips_code():
    tokenizer = tiny.train_tokenizer()
    for token in tiny.SPECIAL_TOKENS + tiny.TEXT_TOKENS:
        assert tokenizer.tokenize(token) == [token], token
    # Qwen's layout: added tokens come right after the BPE vocabulary.
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == tiny.BPE_VOCAB_SIZE
    assert len(tokenizer) == tiny.BPE_VOCAB_SIZE + len(tiny.SPECIAL_TOKENS) + len(tiny.TEXT_TOKENS)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"

    code = 'from PIL import Image\nimage = image.rotate(90, expand=True)\nprint(image.size)  # é → ✓\n'
    ids = tokenizer(code, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == code
    assert len(ids) < len(code.encode()) / 2, "code should tokenise into multi-byte pieces"
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]  # Qwen splits digits

    # Control tokens vanish when decoding for humans; the action structure stays.
    text = "<|im_start|>assistant\n<think>a</think><tool_call>\n{}\n</tool_call><answer>b</answer><|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "assistant\n<think>a</think><tool_call>\n{}\n</tool_call><answer>b</answer>"
    )


# --------------------------------------------------------------------------- building and caching


def test_build_is_deterministic_across_processes(tmp_path):
    # The second build runs in a fresh interpreter: different hash seeds, no shared state.
    script = (
        "import sys; from agents.tiny import FAMILIES, build_tiny_model\n"
        "for family in FAMILIES: build_tiny_model(family, sys.argv[1] + '/' + family)"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "b")], check=True, env=env)
    for family in FAMILIES:
        first = tiny.build_tiny_model(family, tmp_path / "a" / family)
        second = tmp_path / "b" / family
        names = sorted(p.name for p in first.iterdir())
        assert names == sorted(p.name for p in second.iterdir())
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= set(names)
        for name in names:
            assert (first / name).read_bytes() == (second / name).read_bytes(), (family, name)


def test_build_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        tiny.build_tiny_model("qwen2_vl", tmp_path)


def test_cache_builds_once_under_codevision_cache(cache):
    folder = tiny.tiny_model_dir("qwen2_vl")
    assert folder.parent == cache / "tiny"
    assert folder.name == f"qwen2_vl-{tiny.recipe_hash('qwen2_vl')}"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert tiny.tiny_model_dir("qwen2_vl") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert len({tiny.recipe_hash(f) for f in FAMILIES}) == 3


def test_two_processes_building_at_once_get_one_complete_folder(tmp_path):
    script = "from agents.tiny import tiny_model_dir; print(tiny_model_dir('qwen3_vl'))"
    env = dict(os.environ, CODEVISION_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    folders = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(folders) == 1
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [Path(folders.pop()).name]


def test_unknown_family_is_a_clear_error(cache):
    with pytest.raises(ValueError, match="qwen2_vl, qwen2_5_vl, qwen3_vl"):
        resolve_model_path("tiny:qwen4_vl")


# --------------------------------------------------------------------------- one conversation, every family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family, cache):
    from transformers import AutoModelForImageTextToText

    spec = f"tiny:{family}"
    path = resolve_model_path(spec)
    processor = load_processor(spec)
    model = AutoModelForImageTextToText.from_pretrained(path)  # the plain Auto class reads the folder
    assert type(model).__name__ == tiny.FAMILY_SPECS[family]["model_class"]
    assert type(processor).__name__ == tiny.FAMILY_SPECS[family]["processor_class"]
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    inputs = processor.apply_chat_template(
        _conversation(), tools=TOOLS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs["input_ids"][0], inputs.pop("assistant_masks")[0].bool()

    # Each image's placeholder run matches its patch grid (one token per merged 2x2 block).
    grids = inputs["image_grid_thw"]
    assert grids.shape == (2, 3)
    tokens_per_image = (grids.prod(-1) // tiny.MERGE_SIZE**2).tolist()
    image_id = model.config.image_token_id
    runs, run = [], 0
    for token in ids.tolist() + [-1]:
        if token == image_id:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert runs == tokens_per_image
    assert tokens_per_image[0] == tiny.MIN_IMAGE_TOKENS  # a 64x64 image costs the minimum: 4 tokens

    # The assistant mask covers exactly the two assistant turns, <|im_end|> included.
    assert masked_spans(ids.tolist(), mask.tolist(), processor.tokenizer) == EXPECTED_ASSISTANT_TEXTS
    text = processor.tokenizer.decode(ids)
    assert text.count("<|im_start|>assistant\n") == 2 and text.count("<tool_response>") == 1

    # Forward + backward on the assistant tokens: finite loss near log(vocab) for a random model,
    # gradients reach both the language model and the vision tower.
    model.train()
    labels = torch.where(mask, ids, torch.full_like(ids, -100)).unsqueeze(0)
    loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss)
    assert abs(loss.item() - np.log(len(processor.tokenizer))) < 1.0
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    vision = [g for n, g in grads.items() if "visual" in n]
    assert vision and any(g.abs().sum() > 0 for g in vision)
    assert grads[next(n for n in grads if "embed_tokens" in n)].abs().sum() > 0

    # Generation never emits vision tokens, even when they are pushed up by +100 logits.
    model = load_model(spec, dtype="float32", device="cpu")
    vision_ids = suppressed_token_ids(processor)
    assert vision_ids == sorted(processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    assert set(vision_ids) <= set(model.generation_config.suppress_tokens)
    prompt = processor.apply_chat_template(
        _conversation()[:4], tools=TOOLS, tokenize=True, return_dict=True, add_generation_prompt=True,
        return_tensors="pt",
    )
    torch.manual_seed(0)
    generated = model.generate(
        **prompt, max_new_tokens=6, min_new_tokens=6, do_sample=True,
        sequence_bias={(i,): 100.0 for i in vision_ids},
    )[0, prompt["input_ids"].shape[1]:]
    assert len(generated) == 6
    assert not set(generated.tolist()) & set(vision_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(family, cache):
    processor, model = load_processor(f"tiny:{family}"), load_model(f"tiny:{family}")
    processor.tokenizer.padding_side = "left"
    images = [[_image(64, 64, 2)], [_image(128, 64, 3)]]  # 4 and 8 image tokens: different lengths
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it. " * (1 + 3 * i)}]}],
            add_generation_prompt=True,
        )
        for i in range(2)
    ]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the shorter prompt really is padded
    together = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for i in range(2):
        alone = processor(text=[texts[i]], images=images[i], return_tensors="pt")
        expected = model.generate(**alone, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert together[i, batch["input_ids"].shape[1]:].tolist() == expected[0, alone["input_ids"].shape[1]:].tolist()


# --------------------------------------------------------------------------- the chat template


@pytest.fixture(scope="module")
def tokenizer(cache):
    return load_processor("tiny:qwen2_5_vl").tokenizer


def test_template_renders_the_qwen_format(tokenizer):
    conversation = _conversation()
    text = tokenizer.apply_chat_template(conversation, tools=TOOLS, tokenize=False)
    tools_json = json.dumps(TOOLS[0], ensure_ascii=False)
    assert text == (
        "<|im_start|>system\nYou answer questions about images.\n\n# Tools\n\nYou may call one or more functions "
        "to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML "
        f"tags:\n<tools>\n{tools_json}\n</tools>\n\nFor each function call, return a json object with function "
        "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
        "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What does the sign say?<|im_end|>\n"
        "<|im_start|>assistant\n" + EXPECTED_ASSISTANT_TEXTS[0] + "\n"
        "<|im_start|>user\n<tool_response>\nImage 1 created (96x64).<|vision_start|><|image_pad|><|vision_end|>\n"
        "</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n" + EXPECTED_ASSISTANT_TEXTS[1] + "\n"
    )


def test_template_history_is_a_prefix_of_every_longer_render(tokenizer):
    conversation = _conversation()
    full = tokenizer.apply_chat_template(conversation, tools=TOOLS, tokenize=False)
    for end, message in enumerate(conversation):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(conversation[:end], tools=TOOLS, tokenize=False,
                                                   add_generation_prompt=True)
            assert full.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
        cut = tokenizer.apply_chat_template(conversation[: end + 1], tools=TOOLS, tokenize=False)
        assert full.startswith(cut)


def test_tokenizer_alone_gives_the_assistant_mask_too(tokenizer):
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>x</think><answer>1</answer>"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "<answer>2</answer>"},
    ]
    out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert masked_spans(out["input_ids"], out["assistant_masks"], tokenizer) == [
        "<think>x</think><answer>1</answer><|im_end|>", "<answer>2</answer><|im_end|>"]


def test_template_variants(tokenizer):
    render = lambda messages, **kw: tokenizer.apply_chat_template(messages, tokenize=False, **kw)  # noqa: E731
    # No system message and no tools: no system turn (no invented prompt).
    assert render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"
    # Tools without a system message get a default one.
    assert render([{"role": "user", "content": "hi"}], tools=TOOLS).startswith(
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    # Arguments given as a JSON string (OpenAI style) are written verbatim; no content, no leading newline;
    # consecutive tool responses share one user turn.
    messages = [
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": '{"x": 1}'}}, {"name": "g", "arguments": {"y": [2]}}]},
        {"role": "tool", "content": "one"},
        {"role": "tool", "content": "two"},
    ]
    assert render(messages) == (
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {"y": [2]}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\none\n</tool_response>\n<tool_response>\ntwo\n</tool_response><|im_end|>\n"
    )
    with pytest.raises(Exception, match="Unknown message role \"robot\""):
        render([{"role": "robot", "content": "x"}])
    with pytest.raises(Exception, match="Unsupported content part type \"audio\""):
        render([{"role": "user", "content": [{"type": "audio"}]}])


# --------------------------------------------------------------------------- the loader


def test_loader_takes_a_local_folder_and_round_trips_a_saved_processor(cache, tmp_path):
    folder = resolve_model_path("tiny:qwen3_vl")
    conversation = _conversation()
    by_spec = load_processor("tiny:qwen3_vl").apply_chat_template(conversation, tokenize=True, return_dict=True)
    for spec in (folder, Path(folder)):
        by_path = load_processor(spec).apply_chat_template(conversation, tokenize=True, return_dict=True)
        assert by_path["input_ids"] == by_spec["input_ids"]
        assert np.array_equal(by_path["pixel_values"], by_spec["pixel_values"])
    assert model_type(folder) == model_type("tiny:qwen3_vl") == "qwen3_vl"
    model = load_model(Path(folder), dtype="bfloat16")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and model.dtype == torch.bfloat16

    # A processor saved by the loader keeps the stock layout (video processor config included) and reloads.
    processor = load_processor(folder)
    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen3VLProcessor"
    assert saved["video_processor"]["video_processor_type"] == "Qwen3VLVideoProcessor"
    tokenizer_config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert tokenizer_config["processor_class"] == "Qwen3VLProcessor"
    again = load_processor(tmp_path / "saved").apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert again["input_ids"] == by_spec["input_ids"]

    # Data loaders pickle processors into worker processes.
    copy = pickle.loads(pickle.dumps(processor))
    assert copy.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"] == by_spec["input_ids"]


def _as_hub_snapshot(folder, cache_dir, repo_id):
    """Lay out `folder` as a Hugging Face hub cache entry, in the older format of the real Qwen repos."""
    snapshot = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    processor = json.loads((snapshot / "processor_config.json").read_text())
    image = processor["image_processor"]
    # Real Qwen2.5-VL snapshots: preprocessor_config.json with min/max_pixels, chat_template.json.
    image.update(min_pixels=image["size"]["shortest_edge"], max_pixels=image["size"]["longest_edge"],
                 processor_class=processor["processor_class"])
    del image["size"]
    (snapshot / "preprocessor_config.json").write_text(json.dumps(image))
    template = (snapshot / "chat_template.jinja").read_text()
    (snapshot / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (snapshot / "processor_config.json").unlink()
    (snapshot / "chat_template.jinja").unlink()


def test_loader_takes_a_hub_id_from_the_cache_unchanged(cache, tmp_path):
    _as_hub_snapshot(resolve_model_path("tiny:qwen2_5_vl"), tmp_path, "Qwen/Tiny-VL-Instruct")
    assert resolve_model_path("Qwen/Tiny-VL-Instruct") == "Qwen/Tiny-VL-Instruct"
    processor = load_processor("Qwen/Tiny-VL-Instruct", cache_dir=str(tmp_path))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    conversation = _conversation()
    expected = load_processor("tiny:qwen2_5_vl").apply_chat_template(conversation, tokenize=True, return_dict=True)
    got = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert got["input_ids"] == expected["input_ids"]
    model = load_model("Qwen/Tiny-VL-Instruct", cache_dir=str(tmp_path), dtype="float32")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_loader_errors_say_what_to_do(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="holds no checkpoint"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_model_path("")
    with pytest.raises(OSError, match="tiny:<family>"):
        load_processor("nobody/not-a-cached-model")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny:qwen2_vl", dtype="float8")
    with pytest.raises(TypeError, match="a processor, a tokenizer, a model or its config"):
        suppressed_token_ids(42)


HAS_TORCHVISION = __import__("transformers").utils.is_torchvision_available()


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed: the stock processor handles videos")
def test_without_torchvision_videos_are_refused_clearly(cache):
    processor = load_processor("tiny:qwen2_vl")
    assert not hasattr(processor, "video_processor")
    with pytest.raises(ValueError, match="install torchvision"):
        processor(text="x", videos=[np.zeros((2, 32, 32, 3), np.uint8)])


def test_suppressed_ids_agree_across_config_processor_and_tokenizer(cache):
    processor = load_processor("tiny:qwen2_vl")
    model = load_model("tiny:qwen2_vl")
    expected = tiny.vision_token_ids(processor.tokenizer)
    assert len(expected) == 4
    for source in (processor, processor.tokenizer, model, model.config):
        assert suppressed_token_ids(source) == expected


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")
def test_stock_auto_processor_reads_the_same_folder_where_torchvision_exists(cache):
    from transformers import AutoProcessor

    for family in FAMILIES:
        processor = AutoProcessor.from_pretrained(resolve_model_path(f"tiny:{family}"))
        assert type(processor).__module__.startswith("transformers.")
        assert processor.video_processor is not None
