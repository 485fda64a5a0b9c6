"""The README's commands run as printed: every command of its bash blocks names an entry point that
exists with options it accepts, and its Python quickstart prints the figures it shows.

Hydra commands are composed and validated as `--cfg job` would (the same override checks as the
command line, then the typed config); argparse commands run with `--help` and must list every
option the README passes; pip extras, pytest markers and files must exist.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

import algos.ppo_config  # noqa: F401  (registers the schemas, as the entry points do)
import algos.sft_config  # noqa: F401
from algos.cli import prepare_overrides
from algos.config import load_config
from algos.eval_config import normalize_overrides

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HYDRA_APPS = {"algos.grpo": "grpo", "algos.ppo": "ppo", "algos.sft": "sft", "algos.evaluate": "evaluate"}
OUR_PACKAGES = {"algos", "agents", "cv_env", "integrations", "pytest"}
PYTHONS = ("python", ".venv/bin/python", "torchrun")


def _blocks(language: str) -> list[tuple[int, str]]:
    """(offset in the README, text) of every fenced block of `language`."""
    return [(m.start(), m.group(1)) for m in re.finditer(rf"```{language}\n(.*?)```", README, re.S)]


def _commands() -> list[tuple[int, list[str]]]:
    """Every command of the bash blocks as an argv (comments, `&&` chains and env assignments split off)."""
    out = []
    for offset, block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                command = words[:words.index("&&")] if "&&" in words else words
                words = words[len(command) + 1:]
                while command and re.match(r"^[A-Z_]+=", command[0]):
                    command = command[1:]
                if command:
                    out.append((offset, command))
    return out


COMMANDS = _commands()


def _ids(command: list[str]) -> str:
    return " ".join(command)[:70]


def _module_and_args(command: list[str]) -> tuple[str, list[str]]:
    """`python -m module args` / `torchrun [flags] -m module args` / `python script.py args`."""
    if "-m" in command:
        at = command.index("-m")
        return command[at + 1], command[at + 2:]
    return command[1], command[2:]


def _help_text(target: str, args: list[str]) -> str:
    """What `python -m target args --help` (or `python target ...` for a script) prints: the
    entry point's `main(argv)` run in this process."""
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(target).stem, ROOT / target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
        if not hasattr(module, "main"):  # a package run with -m: its __main__
            module = importlib.import_module(f"{target}.__main__")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        module.main([*args, "--help"])
    assert exited.value.code in (0, None), f"{target} {' '.join(args)} --help exited with {exited.value.code}"
    return out.getvalue()


def _extras() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {key.value for key in node.value.keys}
    raise AssertionError("setup.py has no extras_require")


@pytest.mark.parametrize("offset, command", COMMANDS, ids=[_ids(c) for _, c in COMMANDS])
def test_every_readme_command_names_an_entry_point_and_options_that_exist(offset, command):
    program = command[0]
    if program == "bash":
        assert (ROOT / command[1]).is_file(), command
    elif program == "source":
        assert command[1] == ".venv/bin/activate" and "-m venv .venv" in (ROOT / "scripts" / "setup.sh").read_text()
    elif program == "pip":
        assert command[:3] == ["pip", "install", "-e"], command
        extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", command[3]).group(1)
        assert set((extras or "").split(",")) - {""} <= _extras(), command
    elif program in PYTHONS:
        module, args = _module_and_args(command)
        if "-m" in command and module.split(".")[0] not in OUR_PACKAGES:  # another project's entry point (verl):
            for arg in args:  # what it is given of ours must exist
                value = arg.split("=", 1)[-1]
                if value.startswith("pkg://"):
                    assert importlib.util.find_spec(value[len("pkg://"):]) is not None, arg
                elif re.fullmatch(r"[\w./-]+\.(yaml|yml|jsonl|json|parquet|py)", value):
                    assert (ROOT / value).is_file(), arg
        elif module in HYDRA_APPS:  # as `--cfg job`: every key exists, every value is valid
            name = HYDRA_APPS[module]
            overrides = prepare_overrides(name, args, normalize_overrides if name == "evaluate" else None)
            load_config(overrides, config_name=name)
        elif module == "pytest":
            markers = (ROOT / "pytest.ini").read_text()
            for i, arg in enumerate(args):
                if arg == "-m":
                    assert f"\n    {args[i + 1]}:" in markers, f"marker {args[i + 1]!r} is not registered"
                elif not arg.startswith("-") and args[i - 1:i] != ["-m"]:
                    assert (ROOT / arg).exists(), arg
        else:  # argparse: --help lists every option the README passes
            subcommands = [a for a in args[:1] if re.fullmatch(r"[a-z_]+", a)]
            text = _help_text(module, subcommands)
            for flag in (a for a in args if a.startswith("-")):
                assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", text), f"{module} has no option {flag}"
    else:
        pytest.fail(f"the README runs {program!r}, which this test does not know how to check")


def test_bare_python_commands_come_after_the_readme_says_to_activate_the_venv():
    activate = next(offset for offset, c in COMMANDS if c[0] == "source")
    bare = [(offset, c) for offset, c in COMMANDS if c[0] in ("python", "torchrun")]
    assert bare and all(offset > activate for offset, _ in bare), [_ids(c) for o, c in bare if o < activate]
    # The two commands stand alone: set-up, then the venv's own interpreter.
    for offset, command in COMMANDS:
        if offset < activate and command[0] != "bash":
            assert command[0] == ".venv/bin/python", command


def _expected_outputs(code: str) -> list[str]:
    """The `# -> ...` comments of a code block (continued on `#    ` lines), whitespace-normalised."""
    expected, current = [], None
    for line in code.splitlines():
        stripped = line.strip()
        if stripped.startswith("# -> "):
            current = [stripped[5:]]
            expected.append(current)
        elif current is not None and stripped.startswith("#    "):
            current.append(stripped[5:])
        else:
            current = None
    return [" ".join(" ".join(parts).split()) for parts in expected]


def test_the_quickstart_prints_what_the_readme_shows():
    quickstart = README.index("## Quickstart")
    code = next(block for offset, block in _blocks("python") if offset > quickstart)
    expected = _expected_outputs(code)
    assert len(expected) >= 3
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md quickstart", "exec"), {"__name__": "__readme__"})
    printed = " ".join(out.getvalue().split())
    for figures in expected:
        assert figures in printed, f"the README shows {figures!r}; the quickstart printed:\n{out.getvalue()}"
    assert len(out.getvalue()) < 2000  # nothing prints kilobytes (env.observation_space included)


@pytest.mark.parametrize("answer, fix, total", [("XA-375", True, 1.2), ("XA-357", False, 1.1), ("XA-375", False, 0.1)])
def test_the_quickstarts_other_outcomes_earn_what_the_readme_says(answer, fix, total):
    import gymnasium as gym

    import cv_env  # noqa: F401

    assert f"earn {total}" in README or f"earns {total}" in README or f"one {total}" in README
    env = gym.make("CodeVision-v0", tasks="orientation_ocr", max_turns=12, sandbox={"workers": 1})
    try:
        env.reset(seed=0, options={"index": 1})
        if fix:  # the quickstart's turn (a dict action would have no <think>, so no format credit)
            env.step('<think>The text is upside down.</think>\n<tool_call>\n{"name": "code_image_tool", '
                     '"arguments": {"code": "result = image.rotate(180, expand=True)", "image_index": 0}}\n</tool_call>')
        *_, info = env.step(f"<think>It reads {answer}.</think><answer>{answer}</answer>")
    finally:
        env.close()
    assert info["reward_components"]["total"] == pytest.approx(total)
