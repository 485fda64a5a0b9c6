"""Our environment inside the trainers people already use (thin adapters; optional extras).

* `integrations.trl_env`: TRL's `GRPOTrainer` (`pip install -e .[trl]`): a stateful multi-turn
  environment for `environment_factory`, the dataset that routes each rollout to its task, and
  the reward function that settles each episode in our env.
* `integrations.verl_tool`: verl (`pip install -e .[verl]`): `CodeVisionTool`, a `BaseTool` for
  `code_image_tool` backed by our `Sandbox`, and `compute_score`, a custom reward function with
  our reward presets; `integrations/verl_tool_config.yaml` is verl's own tool config for it.

The adapters translate between a trainer's interfaces and `cv_env`; they never re-implement the
env, the sandbox or the reward. Importing `integrations` imports neither TRL nor verl.
"""
