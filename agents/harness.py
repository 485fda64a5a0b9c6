"""The CodeVision tool loop for other evaluation harnesses: one VQA item in, the answer and the
trajectory out. What a VLMEvalKit or lmms-eval model wrapper calls from its `generate`.

    from agents.harness import CodeVisionSolver
    from agents.openai_backend import OpenAIBackend, OpenAIConfig

    backend = OpenAIBackend(OpenAIConfig(url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-VL-7B-Instruct"))
    with CodeVisionSolver(backend, max_turns=12) as solver:      # one sandbox for every item
        result = solver.solve(["chart.png"], "What is the value of the tallest bar?")
        result.answer            # "42" (None when the model gave none)
        result.transcript        # agents.transcript.Transcript: every turn, its code and the sandbox's replies

Each item is one episode of `CodeVision-v0` (the item's images and question, no ground truth:
the harness scores the answer itself) played by the episode loop (`agents.rollout.RolloutEngine`,
the backend as its chat backend): the model's code runs in our sandbox, its results come back as
observations. An item whose episode failed (the endpoint gave no answer, or the env's step
raised) is a result with `error` set, not an exception. `solve` is thread-safe.
"""

from __future__ import annotations

import os
import queue
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from agents.chat_records import chat_messages
from agents.rollout import EpisodesFailed, RolloutEngine
from agents.transcript import Transcript
from cv_env.protocol import get_prompt
from cv_env.sandbox import Sandbox
from cv_env.task import Task

__all__ = ["CodeVisionSolver", "VQAResult"]


@dataclass(frozen=True)
class VQAResult:
    """One item's outcome: the final answer (None: none given), the episode, and its conversation.

    error: what ended the episode early: the endpoint gave no answer, or the env's step raised
    ("" when nothing did).
    """

    answer: str | None
    transcript: Transcript
    messages: list[dict[str, Any]]
    error: str = ""


class CodeVisionSolver:
    """Runs the CodeVision tool loop on VQA items with a backend (e.g. `OpenAIBackend`).

    max_turns: assistant turns per item; prompt: the env's prompt preset ("full" | "compact");
    max_pixels: the largest image the model is shown; sandbox: a shared `Sandbox` (default: one
    of `workers` processes, owned and closed by the solver).
    """

    def __init__(self, backend, max_turns: int = 12, prompt: str = "full", max_pixels: int = 1024 * 28 * 28,
                 sandbox: Sandbox | None = None, workers: int = 2):
        self.backend, self.max_turns, self.prompt, self.max_pixels = backend, int(max_turns), prompt, int(max_pixels)
        self._system_prompt = get_prompt(prompt).system
        self._owns_sandbox = sandbox is None
        self.sandbox = Sandbox(workers=workers) if sandbox is None else sandbox
        self._engines: queue.SimpleQueue = queue.SimpleQueue()  # idle engines, one made per concurrent caller

    def solve(self, images: Sequence[Image.Image | str | os.PathLike], question: str, item_id: str = "item",
              seed: int = 0) -> VQAResult:
        """Answer `question` about `images` (PIL images or file paths) with the tool loop."""
        task = Task(id=str(item_id), images=[_image(im) for im in images], question=str(question), answer="",
                    category="vqa")
        try:
            engine = self._engines.get_nowait()
        except queue.Empty:
            engine = RolloutEngine(self.backend, sandbox=self.sandbox, env_kwargs=dict(
                max_turns=self.max_turns, max_pixels=self.max_pixels, prompt=self.prompt))
        try:
            (trajectory,) = engine.rollout([task], seed=seed)
        except EpisodesFailed as failed:  # this item's one episode failed: its outcome, not the caller's error
            (trajectory,) = failed.trajectories
        finally:
            self._engines.put(engine)
        transcript = Transcript.of(trajectory, task, getattr(self.backend, "name", ""))
        return VQAResult(transcript.answer, transcript, chat_messages(trajectory, self._system_prompt), trajectory.error)

    def close(self) -> None:
        """Close the solver's engines and its own sandbox (a shared one stays open)."""
        while not self._engines.empty():
            self._engines.get_nowait().close()
        if self._owns_sandbox:
            self.sandbox.close()

    def __enter__(self) -> "CodeVisionSolver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _image(value: Image.Image | str | os.PathLike) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        with Image.open(value) as image:
            return image.convert("RGB")
    raise TypeError(f"an image must be a PIL image or a file path, got {type(value).__name__}")
