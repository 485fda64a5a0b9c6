"""SFT (stage 1): data formats, assistant-only loss masks, training, validation loss, HF export."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from agents.chat_records import chat_messages  # noqa: E402
from agents.collect import collect  # noqa: E402
from agents.conversation import ChatRenderer  # noqa: E402
from agents.loading import load_model, load_processor  # noqa: E402
from agents.policy import Policy  # noqa: E402
from agents.rollout import play  # noqa: E402
from agents.scripted import OracleAgent  # noqa: E402
from algos.sft import export_hf, run, sft_loss, validation_loss  # noqa: E402
from algos.sft_config import load_sft_config  # noqa: E402
from algos.sft_data import build_examples, micro_batches, read_records, record_to_example  # noqa: E402
from algos.optim import build_optimizer, build_scheduler  # noqa: E402
from algos.update import update_step  # noqa: E402
from cv_env.protocol import get_prompt  # noqa: E402
from cv_env.sandbox import Sandbox  # noqa: E402
from cv_env.tasks import load_tasks  # noqa: E402
from spans import masked_spans  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MODEL = "tiny:qwen2_5_vl"


@pytest.fixture(scope="module")
def processor():
    return load_processor(MODEL)


@pytest.fixture(scope="module")
def episode():
    """A real oracle episode: the input image, a tool call whose reply shows a second image, an answer."""
    task = load_tasks("orientation_ocr", split="train")[0]
    with Sandbox(workers=1) as sandbox:
        (played,) = play(lambda index: OracleAgent(), [task], sandbox, max_pixels=50176)
    return {"messages": chat_messages(played, get_prompt("full").system)}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Oracle demonstrations recorded by `agents.collect` (token-exact trajectory records)."""
    path = tmp_path_factory.mktemp("demos") / "oracle.jsonl"
    result = collect(MODEL, "synthetic", "train", 8, str(path), max_turns=3, max_pixels=50176, workers=1)
    assert result["kept"] >= 6
    return path


def _save_chat_record(messages, folder):
    """The episode as an OpenAI/Qwen-style JSONL chat record with PNG paths."""
    out, k = [], 0
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "image":
                    name = f"img{k}.png"
                    p["image"].save(folder / name)
                    parts.append({"type": "image", "image": name})
                    k += 1
                else:
                    parts.append(p)
            content = parts
        out.append({"role": m["role"], "content": content})
    path = folder / "chat.jsonl"
    path.write_text(json.dumps({"id": "ep0", "messages": out}) + "\n")
    return path, k


def _assistant_texts(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


def test_loss_mask_is_exactly_the_assistant_tokens_of_a_two_image_multi_turn_episode(processor, episode, tmp_path):
    messages = episode["messages"]
    path, num_images = _save_chat_record(messages, tmp_path)
    assert num_images == 2 and [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    renderer = ChatRenderer(processor)
    example = record_to_example(renderer, read_records([path])[0])

    # Token-exact: the same ids and images as rendering the whole conversation at once ...
    full = renderer.render_full(messages)
    assert example.token_ids == full.ids and example.image_grid_thw == full.image_grid_thw
    assert len(example.images) == 2
    # ... and the mask is the template's own {% generation %} mask: each assistant turn and its <|im_end|>.
    reference = processor.apply_chat_template(messages, tools=renderer.tools, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    mask = reference["assistant_masks"]
    assert example.loss_mask == list(mask[0] if isinstance(mask[0], list) else mask)
    # Read back as text: exactly the two assistant turns, nothing of the prompt or the tool reply.
    decoded = masked_spans(example.token_ids, example.loss_mask, processor.tokenizer)
    assert decoded == [text + "<|im_end|>" for text in _assistant_texts(messages)]
    assert example.num_turns == 2 and example.num_tool_calls == 1


def test_sharegpt_and_parquet_records_render_like_messages(processor, episode, tmp_path):
    renderer = ChatRenderer(processor)
    messages = episode["messages"]
    images = [p["image"] for m in messages if isinstance(m["content"], list)
              for p in m["content"] if p["type"] == "image"]
    for k, image in enumerate(images):
        image.save(tmp_path / f"s{k}.png")

    def text_of(m):
        if isinstance(m["content"], str):
            return m["content"]
        return "".join("<image>" if p["type"] == "image" else p["text"] for p in m["content"])

    speaker = {"user": "human", "assistant": "gpt", "tool": "observation"}
    sharegpt = {"system": text_of(messages[0]),
                "conversations": [{"from": speaker[m["role"]], "value": text_of(m)} for m in messages[1:]],
                "images": [f"s{k}.png" for k in range(len(images))]}
    (tmp_path / "sharegpt.jsonl").write_text(json.dumps(sharegpt) + "\n")
    # parquet: messages as a JSON string, images as datasets' {"bytes", "path"} structs
    pngs = [(tmp_path / f"s{k}.png").read_bytes() for k in range(len(images))]
    openai = [{"role": m["role"], "content": text_of(m)} for m in messages]
    pq.write_table(pa.table({"messages": [json.dumps(openai)],
                             "images": [[{"bytes": b, "path": None} for b in pngs]]}), tmp_path / "chat.parquet")

    expected = renderer.render_full(messages).ids
    records = read_records([tmp_path])  # a folder: every .jsonl and .parquet in it
    assert len(records) == 2
    for record in records:
        example = record_to_example(renderer, record)
        assert example.token_ids == expected, record.source
        assert sum(example.loss_mask) > 0


def test_tool_calls_field_and_missing_system_prompt(processor, tmp_path):
    from cv_env.protocol import SYSTEM_PROMPT

    renderer = ChatRenderer(processor)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.png")
    call = {"type": "function", "function": {"name": "code_image_tool",
                                             "arguments": {"code": "result = image", "image_index": 0}}}
    record = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "<think>Look closer.</think>", "tool_calls": [call]},
        {"role": "tool", "content": "Error: nothing changed."},
        {"role": "assistant", "content": "<answer>red</answer>"}], "images": ["a.png"]}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    example = record_to_example(renderer, read_records([tmp_path / "r.jsonl"])[0])
    text = processor.tokenizer.decode(example.token_ids)
    assert text.count(SYSTEM_PROMPT) == 1  # the env's system prompt, added as RL will show it
    learned = processor.tokenizer.decode([t for t, m in zip(example.token_ids, example.loss_mask) if m])
    assert learned == ('<think>Look closer.</think>\n<tool_call>\n{"name": "code_image_tool", "arguments": '
                       '{"code": "result = image", "image_index": 0}}\n</tool_call><|im_end|>'
                       '<answer>red</answer><|im_end|>')
    assert example.num_tool_calls == 1


def test_compact_prompt_renders_chat_records_as_the_compact_env_does(processor, tmp_path):
    """data.prompt=compact: the compact system message and no schema block, token for token what
    a rollout of the env with prompt="compact" shows (so SFT and RL see the same prompt)."""
    from cv_env.protocol import COMPACT_SYSTEM_PROMPT, get_prompt

    Image.new("RGB", (64, 48), (10, 10, 200)).save(tmp_path / "a.png")
    record = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                           {"role": "assistant", "content": "<answer>blue</answer>"}], "images": ["a.png"]}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    compact = ChatRenderer(processor, tools=list(get_prompt("compact").tools))
    example = record_to_example(compact, read_records([tmp_path / "r.jsonl"])[0], prompt="compact")
    text = processor.tokenizer.decode(example.token_ids)
    assert text.count(COMPACT_SYSTEM_PROMPT) == 1 and "# Tools" not in text
    full = record_to_example(ChatRenderer(processor), read_records([tmp_path / "r.jsonl"])[0])
    assert len(example.token_ids) < len(full.token_ids) - 400  # the compact prompt saves ~600 tokens here
    assert sum(example.loss_mask) == sum(full.loss_mask)  # the same assistant targets


def test_bad_records_are_explained_or_skipped(processor, tmp_path):
    renderer = ChatRenderer(processor)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    user = {"role": "user", "content": "<image>What?"}
    answer = {"role": "assistant", "content": "<answer>A</answer>"}
    bad = {
        "missing.jsonl": ({"messages": [user, answer], "images": ["nope.png"]}, "does not exist"),
        "count.jsonl": ({"messages": [user, answer], "images": ["a.png", "a.png"]}, "lists 2 images but"),
        "url.jsonl": ({"messages": [user, answer], "images": ["https://x.org/a.png"]}, "is a URL"),
        "noassistant.jsonl": ({"messages": [user], "images": ["a.png"]}, "no assistant message"),
        "role.jsonl": ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
        "forged.jsonl": ({"messages": [user, {"role": "assistant", "content": "<|image_pad|>"}],
                          "images": ["a.png"]}, "vision token"),
    }
    for name, (record, message) in bad.items():
        (tmp_path / name).write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=message):
            build_examples(renderer, read_records([tmp_path / name]), max_tokens=4096)
    (tmp_path / "good.jsonl").write_text(json.dumps({"messages": [user, answer], "images": ["a.png"]}) + "\n")
    examples, stats = build_examples(renderer, read_records([tmp_path]), max_tokens=4096, on_invalid="skip")
    assert (len(examples), stats["invalid"], stats["too_long"]) == (1, len(bad), 0)
    _, stats = build_examples(renderer, read_records([tmp_path / "good.jsonl"]), max_tokens=16)
    assert stats["too_long"] == 1
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1 is not a JSON line"):
        read_records([tmp_path / "broken.jsonl"])


def test_trajectory_records_from_another_tokenizer_are_refused(demos):
    renderer = ChatRenderer(load_processor("tiny:qwen2_vl"))
    record = read_records([demos])[0]
    record.data["prompt_ids"] = [t + 100_000 for t in record.data["prompt_ids"]]  # recorded by another tokenizer
    with pytest.raises(ValueError, match="another model's tokenizer"):
        record_to_example(renderer, record)


def test_micro_batches_fixed_size_and_packing_by_padded_tokens():
    lengths = {0: 900, 1: 100, 2: 450, 3: 500, 4: 120, 5: 2000}
    assert micro_batches([0, 1, 2, 3, 4], lengths, 2) == [[0, 1], [2, 3], [4]]
    # First-fit decreasing with bins of rows x longest <= 1000: 5 alone (too long), then
    # [0] (900; a second row would make 2 x 900), [3, 2] (2 x 500), [4, 1] (2 x 120).
    assert micro_batches([0, 1, 2, 3, 4, 5], lengths, 2, max_tokens=1000) == [[5], [0], [3, 2], [4, 1]]


def test_sft_steps_on_oracle_demonstrations_lower_the_loss(demos):
    policy = Policy.load(MODEL, dtype="float32", device="cpu")
    examples, stats = build_examples(policy.renderer, read_records([demos])[:3], max_tokens=4096)
    assert stats["kept"] == len(examples) == 3 and stats["invalid"] == 0
    assert all(sum(e.loss_mask) > 0 for e in examples)
    train, val = examples[:2], examples[2:3]
    cfg = load_sft_config(["+exp=tiny_sft", "algo.micro_batch_size=2"])
    algo = cfg.algo
    algo.lr = 3e-3
    optimizer = build_optimizer(policy.named_parameters(), algo)
    scheduler = build_scheduler(optimizer, algo, 3)
    params = list(policy.parameters())
    val_before = validation_loss(policy, val, cfg)["val/loss"]
    batches = [policy.collate(train[:1]), policy.collate(train[1:])]  # gradient accumulation over two
    losses = []
    policy.train()
    for _ in range(3):
        stats = update_step(batches, lambda b: sft_loss(policy, b), params, optimizer, scheduler,
                            grad_clip=1.0, agg="token-mean")
        losses.append(stats["loss"])
    with torch.no_grad():
        after = [float(sft_loss(policy, b)[0]) for b in batches]
    tokens = [float(b["loss_mask"].sum()) for b in batches]
    final = sum(a * t for a, t in zip(after, tokens)) / sum(tokens)
    assert losses[1] < losses[0] and final < losses[0] - 0.3, (losses, final)
    # A random model starts near log(vocab) nats per token; the validation loss of held-out
    # demonstrations of the same protocol falls too.
    assert abs(losses[0] - torch.log(torch.tensor(float(len(policy.tokenizer)))).item()) < 0.5
    assert validation_loss(policy, val, cfg)["val/loss"] < val_before


def test_lora_export_merges_the_adapters_into_a_plain_checkpoint(demos, tmp_path):
    policy = Policy.load(MODEL, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    with torch.no_grad():  # trained adapters: B is zero at initialisation, so give it values
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    examples, _ = build_examples(policy.renderer, read_records([demos])[:1], max_tokens=4096)
    batch = policy.collate(examples)
    with torch.no_grad():
        expected, _ = policy.logprobs(batch, temperature=1.0)
    path = export_hf(policy, tmp_path / "merged")
    assert not any("lora" in f.name for f in path.iterdir())
    merged = Policy.load(str(path))
    assert not merged.is_peft
    with torch.no_grad():
        got, _ = merged.logprobs(merged.collate(examples), temperature=1.0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert policy.is_peft and any("lora_A" in n for n, _ in policy.named_parameters())  # live model unchanged


def test_run_trains_validates_exports_and_resumes(demos, tmp_path):
    out = tmp_path / "run"
    overrides = ["+exp=tiny_sft", f"data.train_files=[{demos}]", "data.oracle.tasks=null", "data.val_fraction=0.25",
                 "algo.batch_size=2", "algo.micro_batch_size=1", "algo.packing=true",
                 "algo.max_tokens_per_micro_batch=4096", "model.freeze_vision=true", "trainer.total_steps=2",
                 "trainer.val_every=2", "trainer.save_every=1", "logger=local", f"trainer.output_dir={out}"]
    summary = run(load_sft_config(overrides))
    assert summary["steps"] == 2 and summary["hf_model"].endswith("hf/step_00000002")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert "val/loss" in lines[0] and "val/loss" in lines[2] and lines[1]["actor/loss"] > 0
    assert lines[0]["data/val_examples"] == 2  # 25% of the 6-8 demonstrations

    # The export is a plain HF folder: load_model / Policy.load read it and it generates.
    model = load_model(summary["hf_model"], dtype="float32")
    processor = load_processor(summary["hf_model"])
    original = load_model(MODEL, dtype="float32")
    trained, base = dict(model.named_parameters()), dict(original.named_parameters())
    assert all(torch.equal(trained[n], base[n]) for n in base if ".visual." in n or n.startswith("model.visual"))
    assert any(not torch.equal(trained[n], base[n]) for n in base if "language_model" in n)
    inputs = processor(text=["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    # Same command with a longer horizon: it continues from step 2's checkpoint.
    resumed = run(load_sft_config([o if not o.startswith("trainer.total_steps") else "trainer.total_steps=3"
                                   for o in overrides]))
    assert resumed["resumed_from"].endswith("step_00000002") and resumed["steps"] == 3
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["step_00000002", "step_00000003"]


def test_demonstrations_of_a_teacher_that_often_skips_the_tool(tmp_path):
    """data.oracle.tool_rate: the recorded episodes mix tool calls and direct answers, every one kept
    (a direct answer earns the tool-free reward, not the ideal one), and all answers right."""
    from agents.jsonl import read_jsonl

    path = tmp_path / "half.jsonl"
    result = collect(MODEL, "corner_orientation", "train", 24, str(path), max_turns=3, max_pixels=12544,
                     workers=1, prompt="compact", tool_rate=0.5)
    assert result["kept"] == 24 and result["skipped"] == 0
    records = read_jsonl(path)
    calls = [r.num_tool_calls for r in records]
    assert set(calls) == {0, 1} and 6 <= calls.count(1) <= 18
    assert all(r.reward_components["acc"] == 1 for r in records)
    assert all(r.reward_components["mandatory"] == 1 for r in records if r.num_tool_calls)
    assert any(r.reward_components["mandatory"] == 0 for r in records)  # fixes the teacher skipped
    with pytest.raises(ValueError, match="data.oracle.tool_rate"):
        load_sft_config(["+exp=tiny_sft", "data.oracle.tool_rate=2"])


def test_configs_compose_and_demand_data():
    cfg = load_sft_config(["+exp=tiny_sft"])
    assert (cfg.model.path, cfg.data.oracle.tasks, cfg.trainer.output_dir) == (MODEL, "synthetic", "outputs/sft-tiny")
    for exp, model in (("qwen3vl_sft", "Qwen/Qwen3-VL-8B-Instruct"), ("qwen25vl_sft", "Qwen/Qwen2.5-VL-7B-Instruct")):
        cfg = load_sft_config([f"+exp={exp}", "data.train_files=[/data/sft.jsonl]"])
        assert cfg.model.path == model and cfg.model.freeze_vision and cfg.algo.packing
        with pytest.raises(ValueError, match="data.train_files"):
            load_sft_config([f"+exp={exp}"])
    with pytest.raises(Exception, match="lrr"):
        load_sft_config(["+exp=tiny_sft", "algo.lrr=1"])
    with pytest.raises(ValueError, match="data.on_invalid"):
        load_sft_config(["+exp=tiny_sft", "data.on_invalid=ignore"])
    with pytest.raises(ValueError, match="data.prompt"):
        load_sft_config(["+exp=tiny_sft", "data.prompt=short"])
