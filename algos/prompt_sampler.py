"""The data position of a run: which prompts come next, epoch by epoch, resumable.

    sampler = PromptSampler(len(tasks), seed=0)
    indices = sampler.draw(64)                 # the next 64 prompts
    state = sampler.state_dict()               # saved with each checkpoint
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["PromptSampler"]


class PromptSampler:
    """Draws prompt indices from a task source of `num_tasks` items: a fresh seeded permutation
    per epoch, consumed in order, so every task is seen once per epoch and a resumed run
    continues from the exact next prompt (`state_dict` / `load_state_dict`, JSON-ready).
    """

    def __init__(self, num_tasks: int, seed: int = 0):
        if num_tasks < 1:
            raise ValueError("the training task source is empty (0 tasks): check env.tasks and env.split")
        self.num_tasks = int(num_tasks)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_tasks)

    def draw(self, count: int) -> list[int]:
        """The next `count` task indices (crossing into the next epoch's order when needed)."""
        if count < 1:
            raise ValueError(f"draw needs count >= 1, got {count}")
        out: list[int] = []
        while len(out) < count:
            order = self._order(self.epoch)
            take = min(count - len(out), self.num_tasks - self.position)
            out.extend(int(i) for i in order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_tasks:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"num_tasks": self.num_tasks, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_tasks"]) != self.num_tasks or int(state["seed"]) != self.seed:
            raise ValueError(
                f"the checkpoint's prompt order was over {state['num_tasks']} tasks with seed {state['seed']}, but this "
                f"run has {self.num_tasks} tasks with seed {self.seed}: resume with the same env.tasks, env.split and "
                "trainer.seed, or start a new run (trainer.resume=never or another trainer.output_dir)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
