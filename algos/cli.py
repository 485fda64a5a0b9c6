"""The command line of every Hydra entry point (`algos.grpo`, `algos.ppo`, `algos.sft`, `algos.evaluate`).

    @hydra_main("grpo")
    def main(cfg: GRPOConfig) -> None: ...

    if __name__ == "__main__":
        main()                      # python -m algos.grpo +exp=tiny algo.lr=1e-5

Before Hydra composes the config, the overrides on the command line are checked against the
keys the config really has, so a misspelt key fails with the closest valid one
(`trainer.totl_steps` -> "did you mean trainer.total_steps?"), never with Hydra's advice to
append it with `+`. `output_dir=<folder>` means the run folder on every entry point (the
trainers keep it as `trainer.output_dir`). Before the job starts, every path the config names
(task files, demonstrations, checkpoints, a local model folder) must exist, or the error names
the key and the path. Errors a user fixes by changing the command (`ConfigError`,
`agents.loading.ModelUnavailableError`) print as one paragraph, without a traceback
(`HYDRA_FULL_ERROR=1` shows it).
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from omegaconf import DictConfig

from algos.config import ConfigError, conf_dir, config_keys, to_config, unknown_key_message

__all__ = ["hydra_main", "prepare_overrides", "check_paths", "user_errors"]

RUN_FOLDER_ALIAS = "output_dir"  # `output_dir=` on every entry point; the trainers call it trainer.output_dir


def _groups() -> set[str]:
    """The config groups (`model`, `exp`, ...): the sub-folders of conf/, and Hydra's own."""
    return {p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith(("_", "."))} | {"hydra"}


def _compose_groups(config_name: str, group_overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name=config_name):
        return compose(config_name=config_name, overrides=list(group_overrides))


def prepare_overrides(config_name: str, overrides: Sequence[str],
                      normalize: Callable[[Sequence[str]], list[str]] | None = None) -> list[str]:
    """The command line's overrides as Hydra should get them, checked against the config's keys.

    normalize: the entry point's own rewriting first (evaluate: `model=<spec>` -> `model.path=<spec>`).
    Then `output_dir=` becomes `trainer.output_dir=` where the run folder lives under `trainer`,
    and every key that is set, appended or forced must exist in the config composed with the
    command's groups (`+exp=tiny`, `model=tiny`, ...).

    Raises:
        ConfigError: an unknown key, naming the closest valid one.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(normalize(overrides) if normalize else overrides)
    groups = _groups()
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        in_group = [o.key_or_group.split("/")[0].split("@")[0] in groups for o in parsed]
        composed = _compose_groups(config_name, [text for text, group in zip(overrides, in_group) if group])
    except (HydraException, OmegaConfBaseException):
        return overrides  # a syntax error or a missing group option: Hydra's own message says it best
    known = set(config_keys(composed))
    known_nodes = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    out = []
    for text, override, group in zip(overrides, parsed, in_group):
        key = override.key_or_group
        hydras_own = key.startswith("hydra.")  # hydra.run.dir=..., checked by Hydra itself
        if not group and not hydras_own and not override.is_delete():
            if key == RUN_FOLDER_ALIAS and key not in known and f"trainer.{key}" in known:
                text, key = f"trainer.{text.lstrip('+')}", f"trainer.{key}"
            if key not in known and key not in known_nodes:
                raise ConfigError(unknown_key_message(key, known, f"python -m algos.{config_name}"))
        out.append(text)
    return out


def _replace_overrides(argv: Sequence[str], old: Sequence[str], new: Sequence[str]) -> list[str]:
    """`argv` with the overrides `old` (its positional arguments, in order) replaced by `new`."""
    out, pending = [], list(zip(old, new))
    for arg in argv:
        if pending and arg == pending[0][0]:
            arg = pending.pop(0)[1]
        out.append(arg)
    return out


# --------------------------------------------------------------------------------------------
# Paths the config names must exist
# --------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def _task_path_problem(spec: str) -> str | None:
    from cv_env.tasks import CATEGORIES

    names = [n.strip() for n in spec.split(",")]
    if spec.strip() in ("synthetic", "default") or all(n in CATEGORIES for n in names):
        return None
    if any(c in spec for c in "*?["):
        return None if glob.glob(os.path.expanduser(spec)) else "no file matches this pattern"
    if Path(spec).expanduser().exists():
        return None
    if spec.endswith(".parquet") or os.sep in spec:
        return "no such file or folder"
    return (f"not a task source: give synthetic, a category ({', '.join(CATEGORIES)}), "
            "or a .parquet file, glob or folder")


def _checkpoint_path_problem(value: str) -> str | None:
    if value in ("auto", "never") or Path(value).expanduser().exists():
        return None
    return "no such checkpoint or run folder"


def _model_path_problem(spec: str) -> str | None:
    from agents.loading import TINY_PREFIX, looks_local
    from agents.openai_backend import MODEL_PREFIX

    # openai:<name> is whatever name the endpoint serves (a path on the server's machine, maybe).
    if spec.startswith((TINY_PREFIX, MODEL_PREFIX)) or spec in ("oracle", "random") or not looks_local(spec):
        return None
    return None if Path(spec).expanduser().exists() else "no such folder (a local model path)"


# key -> (what checks it, what the key takes)
PATH_KEYS: dict[str, tuple[Callable[[str], str | None], str]] = {
    "env.tasks": (_task_path_problem, "a task source"),
    "env.val_tasks": (_task_path_problem, "a task source"),
    "tasks": (_task_path_problem, "a task source"),
    "data.oracle.tasks": (_task_path_problem, "a task source"),
    "data.train_files": (lambda p: None if Path(p).expanduser().exists() else "no such file or folder",
                         ".jsonl/.parquet demonstration files or folders"),
    "data.val_files": (lambda p: None if Path(p).expanduser().exists() else "no such file or folder",
                       ".jsonl/.parquet demonstration files or folders"),
    "trainer.resume": (_checkpoint_path_problem, "auto, never, a checkpoints/step_<n>/ folder or a run folder"),
    "checkpoint": (_checkpoint_path_problem, "a checkpoints/step_<n>/ folder or a run folder (null: none)"),
    "model.path": (_model_path_problem, "tiny:<family>, a hub id or a local checkpoint folder"),
}


def check_paths(cfg: Any) -> None:
    """Raise `ConfigError` naming the key and the path for the first path `cfg` names that does not exist."""
    for key, (problem_of, expected) in PATH_KEYS.items():
        value = _get(cfg, key)
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, str) and item.strip():
                problem = problem_of(item)
                if problem:
                    raise ConfigError(f"config {key}={item}: {problem}; {key} takes {expected}")


# --------------------------------------------------------------------------------------------
# Errors the user fixes: one paragraph
# --------------------------------------------------------------------------------------------


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message alone tells the user what to change."""
    from agents.loading import ModelUnavailableError
    from agents.openai_backend import EndpointConfigError, EndpointDown

    return ConfigError, ModelUnavailableError, EndpointConfigError, EndpointDown


def _fail(error: BaseException) -> NoReturn:
    from algos.tracking import say

    say(f"error: {error}", level=logging.ERROR)
    sys.exit(1)


def _full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


# --------------------------------------------------------------------------------------------
# The decorator
# --------------------------------------------------------------------------------------------


def hydra_main(config_name: str, normalize: Callable[[Sequence[str]], list[str]] | None = None
               ) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """Decorator for an entry point that takes the typed config.

    Hydra parses the command line (`--help`, `--cfg job`, overrides), composes
    `conf/<config_name>.yaml` in struct mode, writes the composed config under the run folder's
    `.hydra/` and logs to `<run folder>/<config_name>.log`; the function receives the validated
    dataclass. See the module docstring for the checks before it runs.
    """

    def decorator(task: Callable[[Any], Any]) -> Callable[[], Any]:
        import hydra
        from hydra._internal.utils import get_args_parser

        @functools.wraps(task)
        def entry() -> Any:
            argv = sys.argv[1:]
            known, rest = get_args_parser().parse_known_args(argv)
            overrides = known.overrides + [arg for arg in rest if not arg.startswith("-")]
            try:
                prepared = prepare_overrides(config_name, overrides, normalize)
            except ConfigError as error:
                if _full_errors():
                    raise
                _fail(error)
            sys.argv[1:] = _replace_overrides(argv, overrides, prepared)

            @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
            def _composed(cfg: DictConfig) -> Any:
                logging.captureWarnings(True)  # warnings land in the run log too
                try:
                    typed = to_config(cfg)
                    check_paths(typed)
                    return task(typed)
                except user_errors() as error:
                    if _full_errors():
                        raise
                    _fail(error)

            return _composed()

        return entry

    return decorator
