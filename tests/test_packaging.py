"""The package installs light, imports one way, and its README commands are what CI runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter in which torch and transformers cannot be imported.
_BLOCK_HEAVY = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "vllm", "peft"}:
            raise ImportError(f"blocked heavy import: {name}")
        return None
sys.meta_path.insert(0, _Block())
"""


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_HEAVY + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_env_works_without_torch_or_transformers():
    proc = _run_python(
        "import gymnasium as gym, cv_env\n"
        "from agents.scripted import OracleAgent\n"
        "env = gym.make('CodeVision-v0', tasks='orientation_ocr', sandbox={'workers': 1})\n"
        "obs, info = env.reset(seed=0)\n"
        "agent = OracleAgent(); agent.reset(env.unwrapped.task)\n"
        "done = False\n"
        "while not done:\n"
        "    obs, reward, terminated, truncated, info = env.step(agent.act(obs))\n"
        "    done = terminated or truncated\n"
        "assert info['correct'], info\n"
        "assert not any(m.split('.')[0] in {'torch', 'transformers'} for m in sys.modules)\n"
        "env.close()\n"
        "print('ok')\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_the_blocker_really_blocks():
    proc = _run_python("import torch")
    assert proc.returncode != 0 and "blocked heavy import: torch" in proc.stderr


def test_imports_run_one_way():
    """cv_env never imports agents/algos; agents never imports algos; nothing imports integrations."""
    for package, forbidden in (("cv_env", ("agents", "algos", "integrations")), ("agents", ("algos", "integrations")),
                               ("algos", ("integrations",))):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for name in forbidden:
                assert not re.search(rf"^\s*(from|import)\s+{name}\b", text, re.M), f"{path} imports {name}"


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", readme, re.S)]
    return next(b for b in blocks if b.endswith("-m pytest"))


def test_ci_runs_the_readme_test_command():
    command = _readme_test_command()
    assert command == "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_test_command_fails_when_a_test_fails(tmp_path):
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert 1 == 2\n")
    command = _readme_test_command() + f" {failing} -q -p no:cacheprovider"
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 failed" in proc.stdout


def test_algos_without_the_train_extra_names_the_extra():
    """The environment-only install has no Hydra: `python -m algos.evaluate model=oracle` must say
    to install [train], not fail on a bare import deep inside."""
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['hydra'] = None\nimport algos.evaluate"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "ModuleNotFoundError: algos (trainers and evaluation) needs the [train] extra, and hydra is missing" in proc.stderr
    assert "pip install -e '.[train]'" in proc.stderr
