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
the harness scores the answer itself) played by `agents.served.play_served`: the model's code
runs in our sandbox, its results come back as observations. `solve` is thread-safe.
"""

from __future__ import annotations

import os
import queue
from dataclasses import dataclass
from typing import Any, Sequence

import gymnasium as gym
from PIL import Image

import cv_env  # noqa: F401  (registers CodeVision-v0)
from agents.served import ServedAgent, play_served
from agents.transcript import Transcript
from cv_env.protocol import get_prompt
from cv_env.sandbox import Sandbox
from cv_env.task import Task

__all__ = ["CodeVisionSolver", "VQAResult"]


@dataclass(frozen=True)
class VQAResult:
    """One item's outcome: the final answer (None: none given), the episode, and its conversation.

    error: why the episode ended without an answer from the endpoint ("" otherwise).
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
        self._preset = get_prompt(prompt)
        self._owns_sandbox = sandbox is None
        self.sandbox = Sandbox(workers=workers) if sandbox is None else sandbox
        self._envs: queue.SimpleQueue = queue.SimpleQueue()  # idle envs, one made per concurrent caller

    def solve(self, images: Sequence[Image.Image | str | os.PathLike], question: str, item_id: str = "item",
              seed: int = 0) -> VQAResult:
        """Answer `question` about `images` (PIL images or file paths) with the tool loop."""
        task = Task(id=str(item_id), images=[_image(im) for im in images], question=str(question), answer="",
                    category="vqa")
        try:
            env = self._envs.get_nowait()
        except queue.Empty:
            env = gym.make("CodeVision-v0", tasks=[task], sandbox=self.sandbox, max_turns=self.max_turns,
                           max_pixels=self.max_pixels, prompt=self.prompt, disable_env_checker=True)
        try:
            episode = play_served(env, ServedAgent(self.backend, self._preset.system, self._preset.tools), task,
                                  seed=seed, agent_name=getattr(self.backend, "name", ""))
        finally:
            self._envs.put(env)
        return VQAResult(episode.transcript.answer, episode.transcript, episode.messages, episode.error)

    def close(self) -> None:
        """Close the solver's envs and its own sandbox (a shared one stays open)."""
        while not self._envs.empty():
            self._envs.get_nowait().close()
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
