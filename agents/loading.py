"""Load a Qwen-VL model and its processor from one spec: `tiny:<family>`, a hub id or a local folder.

    processor = load_processor("tiny:qwen2_5_vl")            # or "Qwen/Qwen2.5-VL-7B-Instruct", "/ckpt/dir"
    model = load_model("tiny:qwen2_5_vl", dtype="float32", device="cpu")

Every spec goes through the same code: `tiny:<family>` only resolves to a cached folder (built
offline by `agents.tiny` on first use), which then loads exactly as a downloaded checkpoint does,
with the standard Auto classes.

Without torchvision, transformers 5 cannot build the stock Qwen-VL processors: their video
processor needs it. `load_processor` then builds the same processor class without its video
processor (images and text work unchanged; passing `videos=` is refused). Where torchvision is
installed the stock `AutoProcessor` result is returned, from the same folder.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TINY_PREFIX = "tiny:"

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def resolve_model_path(spec: str | os.PathLike) -> str:
    """The path or hub id that `from_pretrained` should read for `spec`.

    `tiny:<family>` (qwen2_vl, qwen2_5_vl, qwen3_vl) becomes its cached folder, built if missing;
    an existing local folder is returned as an absolute path; anything shaped like a hub id
    (`org/name`) is returned unchanged for transformers to resolve from its cache (or the hub when
    online). A path that looks local but does not exist is an error, not a hub lookup.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"model spec must be a non-empty string (tiny:<family>, a hub id or a local folder), got {spec!r}"
        )
    if spec.startswith(TINY_PREFIX):
        from agents.tiny import tiny_model_dir

        return str(tiny_model_dir(spec[len(TINY_PREFIX):]))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ValueError(
                f"{spec!r} is a folder but holds no checkpoint (no config.json or tokenizer_config.json): "
                "point to the folder that save_pretrained wrote"
            )
        return str(path.resolve())
    if path.exists():
        raise ValueError(f"{spec!r} is a file: give the checkpoint folder that contains it")
    if looks_local(spec):
        raise FileNotFoundError(
            f"model folder {spec!r} does not exist: give an existing folder, a hub id such as "
            "'Qwen/Qwen2.5-VL-7B-Instruct', or tiny:<family> (qwen2_vl, qwen2_5_vl, qwen3_vl)"
        )
    return spec


def looks_local(spec: str) -> bool:
    """True for a spec that can only mean a local path: hub ids are "name" or "org/name"."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def load_processor(spec: str | os.PathLike, chat_template: str | None = None, **kwargs: Any):
    """The processor (tokenizer + image processor + chat template) of `spec`.

    chat_template: None keeps the checkpoint's own template; a built-in name ("codevision") or
    the path of a .jinja file replaces it (`agents.templates.resolve_chat_template`), and a
    processor saved later keeps the replacement. `kwargs` go to `from_pretrained` (e.g.
    `revision=`). Without torchvision the processor has no video processor; everything else,
    saving included, behaves as the stock class.
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    from agents.templates import resolve_chat_template

    template = resolve_chat_template(chat_template) if chat_template else None  # a bad name fails before loading
    path = resolve_model_path(spec)
    check_hub_model_available(path, **kwargs)
    stock_class = _stock_processor_class(path, **kwargs)
    try:
        if is_torchvision_available() or stock_class is None or "video_processor" not in stock_class.get_attributes():
            processor = AutoProcessor.from_pretrained(path, **kwargs)
        else:
            processor = image_only_processor_class(stock_class).from_pretrained(path, **kwargs)
    except OSError as error:
        raise OSError(_not_found_message(spec, path, error)) from error
    if template is not None:
        processor.chat_template = template
        getattr(processor, "tokenizer", processor).chat_template = template
    return processor


def load_model(
    spec: str | os.PathLike,
    dtype: Any = "auto",
    device: Any = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
):
    """The image-text-to-text model of `spec` (e.g. `Qwen2_5_VLForConditionalGeneration`), in eval mode.

    dtype: "auto" (the checkpoint's own), a torch dtype, or "float32"/"bfloat16"/"float16".
    device: where to load the weights ("cpu", "cuda", "cuda:1", a torch.device); None keeps
    transformers' default (CPU). attn_implementation: "sdpa", "eager", "flash_attention_2", ... or
    None for transformers' default. Other `kwargs` go to `from_pretrained`.

    The model's generation config is made to suppress the vision placeholder tokens (see
    `suppressed_token_ids`): a sampled `<|image_pad|>` fed back as input would demand image features
    that do not exist and break the next forward pass.
    """
    from transformers import AutoModelForImageTextToText

    path = resolve_model_path(spec)
    check_hub_model_available(path, **kwargs)
    if device is not None:
        kwargs.setdefault("device_map", str(device))
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=_torch_dtype(dtype), **kwargs)
    except OSError as error:
        raise OSError(_not_found_message(spec, path, error)) from error
    suppress = set(model.generation_config.suppress_tokens or []) | set(suppressed_token_ids(model.config))
    model.generation_config.suppress_tokens = sorted(suppress)
    return model


def suppressed_token_ids(source) -> list[int]:
    """Ids of the vision tokens a model must never generate, from a processor, tokenizer, model or config.

    `<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>`, `<|video_pad|>`. Samplers other than
    `model.generate` (vLLM, a custom loop) and any log-prob computation that must match the
    sampler should mask the same ids.
    """
    from agents.tiny import VISION_TOKENS  # the names Qwen's own tokenizers use too

    tokenizer = getattr(source, "tokenizer", source)
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        unk = getattr(tokenizer, "unk_token_id", None)
        ids = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
        return sorted(i for i in ids if i is not None and i != unk)
    config = getattr(source, "config", source)
    fields = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
    if hasattr(config, "image_token_id"):
        return sorted({int(getattr(config, f)) for f in fields if getattr(config, f, None) is not None})
    raise TypeError(
        f"suppressed_token_ids needs a processor, a tokenizer, a model or its config, got {type(source).__name__}"
    )


def model_type(spec: str | os.PathLike) -> str:
    """The checkpoint's `model_type` ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", ...), read from its config."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(spec)).model_type


_IMAGE_ONLY_CLASSES: dict[type, type] = {}


def image_only_processor_class(stock_class: type) -> type:
    """A subclass of the stock processor class `stock_class` that has no video processor.

    It keeps the stock class name, so what it saves (`processor_class` in processor_config.json and
    tokenizer_config.json) still loads with plain `AutoProcessor`; the video processor config read
    from the folder is written back unchanged.
    """
    if stock_class in _IMAGE_ONLY_CLASSES:
        return _IMAGE_ONLY_CLASSES[stock_class]

    @classmethod
    def get_attributes(cls):
        return [name for name in stock_class.get_attributes() if name != "video_processor"]

    @classmethod
    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        processor_dict = dict(processor_dict)
        video_config = processor_dict.pop("video_processor", None)
        result = super(image_only, cls).from_args_and_dict(args, processor_dict, **kwargs)
        processor = result[0] if isinstance(result, tuple) else result
        processor.video_processor_config = video_config
        return result

    def to_dict(self):
        output = super(image_only, self).to_dict()
        output.pop("video_processor_config", None)
        if getattr(self, "video_processor_config", None) is not None:
            output["video_processor"] = self.video_processor_config
        return output

    def __call__(self, *args, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(
                f"this {stock_class.__name__} was loaded without a video processor because torchvision is not "
                "installed: install torchvision to process videos"
            )
        return super(image_only, self).__call__(*args, **kwargs)

    def __reduce__(self):  # the class is made at run time: pickle rebuilds it from the stock class
        return (_new_image_only_processor, (stock_class,), self.__dict__)

    image_only = type(
        stock_class.__name__,
        (stock_class,),
        {
            "__module__": __name__,
            "__doc__": f"{stock_class.__name__} without a video processor (torchvision is not installed).",
            "get_attributes": get_attributes,
            "from_args_and_dict": from_args_and_dict,
            "to_dict": to_dict,
            "__call__": __call__,
            "__reduce__": __reduce__,
        },
    )
    _IMAGE_ONLY_CLASSES[stock_class] = image_only
    return image_only


def _new_image_only_processor(stock_class: type):
    cls = image_only_processor_class(stock_class)
    return cls.__new__(cls)


def _stock_processor_class(path: str, **kwargs: Any) -> type | None:
    """The processor class `AutoProcessor` would build for `path`, or None if it names none."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = None
    if os.path.isdir(path):
        for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
            file_path = os.path.join(path, file)
            if os.path.isfile(file_path):
                with open(file_path, encoding="utf-8") as f:
                    name = json.load(f).get("processor_class")
                if name:
                    break
    if not name:
        config_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only")}
        try:
            name = PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(path, **config_kwargs).model_type)
        except OSError as error:
            raise OSError(_not_found_message(path, path, error)) from error
    return getattr(transformers, name, None) if name else None


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return getattr(torch, _DTYPES[dtype.lower().removeprefix("torch.")])
    raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'float32', 'bfloat16', 'float16' or a torch.dtype")


def _not_found_message(spec: Any, path: str, error: Exception) -> str:
    offline = _hub_offline()
    where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the local cache or the Hub"
    return (
        f"could not load model {spec!r}: {path!r} is not a local checkpoint folder and was not found in {where}. "
        f"Give a folder written by save_pretrained, a downloaded hub id, or tiny:<family> "
        f"(qwen2_vl, qwen2_5_vl, qwen3_vl). Cause: {error}"
    )


# --------------------------------------------------------------------------------------------
# A hub id that cannot be had fails in seconds, in one paragraph (not after a minute of retries)
# --------------------------------------------------------------------------------------------

HUB_PROBE_TIMEOUT_S = 5.0


class ModelUnavailableError(OSError):
    """A hub id that is not in the local cache and cannot be downloaded: offline mode is on, or
    the hub cannot be reached. Entry points print its message alone."""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


@functools.lru_cache(maxsize=4)
def _hub_unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached (one request, no retries), or None when it answers at all."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))
    return None


def check_hub_model_available(path: str, cache_dir: str | None = None, revision: str | None = None,
                              local_files_only: bool = False, **_: Any) -> None:
    """Raise `ModelUnavailableError` at once when the hub id `path` is neither in the local
    Hugging Face cache nor downloadable. A local folder, or a hub id whose config is cached,
    passes (transformers then loads it, from the cache when offline)."""
    if os.path.isdir(path):
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json", cache_dir=cache_dir, revision=revision), str):
        return
    cache = cache_dir or constants.HF_HUB_CACHE
    fixes = (f"download it once where the hub is reachable (`hf download {path}`, into {cache}), give a local "
             "checkpoint folder, or use tiny:<family> (qwen2_vl, qwen2_5_vl, qwen3_vl) for an offline test model")
    if local_files_only or _hub_offline():
        raise ModelUnavailableError(
            f"model {path!r} is not in the local Hugging Face cache ({cache}) and offline mode is on (HF_HUB_OFFLINE=1), "
            f"so it cannot be downloaded: unset HF_HUB_OFFLINE on a machine with internet, {fixes}.")
    reason = _hub_unreachable(constants.ENDPOINT)
    if reason is not None:
        raise ModelUnavailableError(
            f"model {path!r} is not in the local Hugging Face cache ({cache}) and the hub at {constants.ENDPOINT} "
            f"cannot be reached ({reason}): {fixes}.")
