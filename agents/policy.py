"""`Policy`: a Qwen-VL model with its processor, ready for rollouts and for training.

    policy = Policy.load("tiny:qwen2_5_vl", dtype="float32", device="cpu",
                         lora=dict(r=16, alpha=32, dropout=0.0), freeze_vision=True)
    batch = policy.collate(trajectories)             # right-padded model inputs + masks
    logprobs_BT, entropy_BT = policy.logprobs(batch) # target-aligned: [b, t] scores input_ids[b, t]

`logprobs` runs the model to its last hidden states and applies the LM head in chunks
(`agents.logprobs`), on the loss-mask positions only, with the sampler's conventions (float32,
temperature, vision placeholders suppressed), so it reproduces the rollout's sampler log-probs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from agents.conversation import ChatRenderer, check_image_tokens
from agents.image_patches import image_patches
from agents.loading import load_model, load_processor, suppressed_token_ids
from agents.logprobs import sequence_logprobs

# The decoder projections of Qwen2/2.5/3 language models (the vision towers use other names or
# live under `visual`; the default pattern keeps LoRA off the vision tower).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Policy:
    """A model + processor pair with the helpers the rollout engine and the trainers share.

    model: the (possibly peft-wrapped) `...ForConditionalGeneration`; processor: its processor.
    renderer: how conversations become tokens (default: `ChatRenderer(processor)`, which probes
    the processor's chat template and refuses one that cannot be extended token-exactly).
    Build with `Policy.load`, or wrap an existing pair with `Policy(model, processor)`.
    """

    def __init__(self, model, processor, spec: str | None = None, renderer: ChatRenderer | None = None):
        self.model = model
        self.processor = processor
        self.spec = spec
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.renderer = renderer or ChatRenderer(processor)
        self.image_token_id = self.renderer.image_token_id
        self.merge_size = self.renderer.merge_size
        self.suppressed_ids = suppressed_token_ids(processor)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.is_peft = hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        spec: str,
        dtype: Any = "float32",
        device: Any = "cpu",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        lora: dict | None = None,
        freeze_vision: bool = False,
        chat_template: str | None = None,
        tool_response_format: str = "codevision",
    ) -> "Policy":
        """Load model and processor from `tiny:<family>`, a hub id or a local folder.

        The chat template is probed before the weights load, so a template that cannot be
        extended token-exactly is refused at once (`agents.templates.TemplateError`).
        chat_template: None (the checkpoint's own), a built-in name ("codevision") or a .jinja path.
        tool_response_format: "codevision" or "default" (see `agents.conversation.ChatRenderer`).
        dtype / device / attn_implementation: as `agents.loading.load_model`.
        gradient_checkpointing: recompute decoder activations in backward (non-reentrant).
        lora: None for full fine-tuning, or a dict `r` (16), `alpha` (2r), `dropout` (0.0),
        `target_modules` (a list of module names, applied to the language model only; or a regex
        string passed to peft unchanged). Only the adapters are trainable then.
        freeze_vision: keep the vision tower (and its merger) fixed.
        """
        processor = load_processor(spec, chat_template=chat_template)
        renderer = ChatRenderer(processor, tool_response_format=tool_response_format)
        model = load_model(spec, dtype=dtype, device=device, attn_implementation=attn_implementation)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if lora is not None:
            model = _with_lora(model, lora)
        if freeze_vision:
            visual = _core(model).model.visual
            for p in visual.parameters():
                p.requires_grad_(False)
        return cls(model, processor, spec=spec, renderer=renderer)

    # -- torch-module-like surface --------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "Policy":
        self.model.train(mode)
        return self

    def eval(self) -> "Policy":
        return self.train(False)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The trainable parameters (LoRA adapters only under LoRA; no frozen vision tower)."""
        return (p for p in self.model.parameters() if p.requires_grad)

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    @contextlib.contextmanager
    def with_adapter_disabled(self):
        """Run the base model without the LoRA adapters (the reference policy, for the KL term)."""
        if not self.is_peft:
            raise RuntimeError(
                "this policy has no LoRA adapter to disable: load it with lora=... or use a separate reference Policy"
            )
        with self.model.disable_adapter():
            yield self

    # -- batches --------------------------------------------------------------------------------

    def collate(self, trajectories: Sequence, device: Any = None) -> dict[str, Any]:
        """Right-pad trajectories into one batch of model inputs and per-token training data.

        Keys: input_ids, attention_mask, mm_token_type_ids [B, T] (long); pixel_values (all images,
        in batch order) and image_grid_thw [num_images, 3] (absent without images); loss_mask,
        old_logprobs, token_rewards [B, T] (float32; 0 on padding); rewards [B]; temperature.
        """
        if not trajectories:
            raise ValueError("collate needs at least one trajectory")
        temperatures = {float(t.temperature) for t in trajectories}
        if len(temperatures) > 1:
            raise ValueError(f"trajectories were sampled at different temperatures {sorted(temperatures)}: "
                             "score them in separate batches")
        device = torch.device(device) if device is not None else self.device
        B, T = len(trajectories), max(len(t.token_ids) for t in trajectories)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        per_token = {k: torch.zeros(B, T, dtype=torch.float32) for k in ("loss_mask", "old_logprobs", "token_rewards")}
        pixel_values, grids = [], []
        for b, traj in enumerate(trajectories):
            n = len(traj.token_ids)
            input_ids[b, :n] = torch.tensor(traj.token_ids, dtype=torch.long)
            attention_mask[b, :n] = 1
            per_token["loss_mask"][b, :n] = torch.tensor(traj.loss_mask, dtype=torch.float32)
            per_token["old_logprobs"][b, :n] = torch.tensor(traj.sampler_logprobs, dtype=torch.float32)
            per_token["token_rewards"][b, :n] = torch.tensor(traj.token_rewards, dtype=torch.float32)
            check_image_tokens(traj.token_ids, traj.image_grid_thw, self.image_token_id, self.merge_size,
                               f"trajectory {b} (task {traj.task_id!r})")
            if traj.images:
                pixel_values.append(traj.pixel_values if traj.pixel_values is not None else self.pixel_values(traj.images))
                grids.extend(traj.image_grid_thw)
        batch: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "mm_token_type_ids": (input_ids == self.image_token_id).long().to(device),
            **{k: v.to(device) for k, v in per_token.items()},
            "rewards": torch.tensor([float(t.reward) for t in trajectories], dtype=torch.float32, device=device),
            "temperature": temperatures.pop(),
        }
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values, 0).to(device)
            batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long, device=device)
        return batch

    def pixel_values(self, images: list) -> torch.Tensor:
        """The processor's pixel patches for `images` (what the rollout computed, recomputed)."""
        return image_patches(self.processor.image_processor, images)[0]

    # -- scoring --------------------------------------------------------------------------------

    def hidden_states(self, batch: dict[str, Any]) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H] for a collated batch (images checked first)."""
        input_ids = batch["input_ids"]
        grids = batch.get("image_grid_thw")
        mask = batch["attention_mask"].bool()
        # Rows were checked one by one in collate; here the batch as a whole must line up.
        total_expected = 0 if grids is None else int((grids.prod(-1) // self.merge_size**2).sum())
        total_found = int(((input_ids == self.image_token_id) & mask).sum())
        if total_found != total_expected:
            check_image_tokens(input_ids[mask].tolist(), grids, self.image_token_id, self.merge_size, "batch")
        # Run the whole model (so wrappers such as peft or FSDP see a normal forward) with an
        # empty logits selection, and take the decoder's last hidden states from a hook.
        captured: dict[str, torch.Tensor] = {}

        def keep_hidden(module, args, output) -> None:  # returns None: the output passes unchanged
            captured["h"] = output.last_hidden_state

        handle = _core(self.model).model.register_forward_hook(keep_hidden)
        try:
            self.model(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"),
                image_grid_thw=grids,
                mm_token_type_ids=batch.get("mm_token_type_ids", (input_ids == self.image_token_id).long()),
                logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
                use_cache=False,
            )
        finally:
            handle.remove()
        return captured["h"]

    def logprobs(
        self,
        batch: dict[str, Any],
        chunk_size: int = 1024,
        temperature: float | None = None,
        positions: str | torch.Tensor = "loss_mask",
        hidden_BTH: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs_BT, entropy_BT), float32, target-aligned (position 0 and unscored positions are 0).

        temperature: defaults to the batch's sampling temperature, so the result is comparable
        with `batch["old_logprobs"]`. positions: "loss_mask" (sampled tokens only, the cheap
        default), "all" (every real token), or a [B, T] bool tensor.
        hidden_BTH: the batch's last hidden states when the caller already ran the model
        (`hidden_states(batch)`, e.g. to feed a value head from the same forward); default: run it.
        Differentiable when grad is enabled; the full [T x vocab] logits never exist at once.
        Under FSDP2 the LM head's weight is gathered for the head computation (`_gathered_root`).
        """
        if isinstance(positions, str):
            if positions == "loss_mask":
                positions = batch["loss_mask"] > 0
            elif positions == "all":
                positions = batch["attention_mask"] > 0
            else:
                raise ValueError(f"positions must be 'loss_mask', 'all' or a bool tensor, got {positions!r}")
        hidden = self.hidden_states(batch) if hidden_BTH is None else hidden_BTH
        with _gathered_root(self.model):
            head = _core(self.model).lm_head
            return sequence_logprobs(
                hidden, batch["input_ids"], head.weight, head.bias,
                positions_BT=positions,
                temperature=float(batch.get("temperature", 1.0) if temperature is None else temperature),
                suppressed_ids=self.suppressed_ids,
                chunk_size=chunk_size,
            )


@contextlib.contextmanager
def _gathered_root(model):
    """The LM head's full weight while the chunked head runs, for a model sharded with FSDP2.

    `sequence_logprobs` reads `lm_head.weight` outside any module's forward, so FSDP2's hooks do
    not gather it: it would be this rank's shard (a DTensor). The head lives in the root FSDP
    unit (`algos.distributed.fsdp2_wrap` shards only the repeated blocks separately), so the
    root is gathered here. With gradients the root stays gathered: backward reads the same
    weight, and FSDP2's post-backward reduce-scatters its gradient and reshards it. Without
    gradients (scoring) it is resharded at once to free the memory. A no-op for other models and
    when the root is gathered already (e.g. inside `algos.distributed.fsdp2_gathered`).
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(model, FSDPModule) or not isinstance(_core(model).lm_head.weight, DTensor):
        yield
        return
    model.unshard()  # a collective: every rank calls logprobs together, as it calls forward
    try:
        yield
    finally:
        if not torch.is_grad_enabled():
            model.reshard()


def _core(model):
    """The `...ForConditionalGeneration` inside a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _with_lora(model, lora: dict):
    from peft import LoraConfig, get_peft_model

    unknown = set(lora) - {"r", "alpha", "dropout", "target_modules"}
    if unknown:
        raise ValueError(f"unknown LoRA option(s) {sorted(unknown)}: use r, alpha, dropout, target_modules")
    r = int(lora.get("r", 16))
    targets = lora.get("target_modules") or DEFAULT_LORA_TARGETS
    if not isinstance(targets, str):
        targets = rf".*language_model.*\.({'|'.join(targets)})"
    config = LoraConfig(r=r, lora_alpha=float(lora.get("alpha", 2 * r)), lora_dropout=float(lora.get("dropout", 0.0)),
                        target_modules=targets, bias="none")
    return get_peft_model(model, config)
