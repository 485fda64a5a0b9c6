"""The vLLM calls of agents/vllm_backend.py and agents/vllm_worker.py, checked against the sources of
every release in `VERIFIED_VLLM` (what setup.py admits), without importing vLLM: it needs a GPU and
pins its own torch. Each release's wheel is fetched from PyPI once (~330 MB, hence `slow`), and only
the few source files read here are kept, under `$CODEVISION_CACHE/real/vllm-<version>`; where PyPI
cannot be reached the tests skip, naming the package (CI, with CODEVISION_REQUIRE_REAL_ARTIFACTS=1,
fails instead).

What a GPU run would meet first is checked here: every `LLM(...)` and `SamplingParams(...)`
argument is accepted, every method the backend calls exists with the arguments it passes, the
placement under torchrun exists, the worker extension cannot collide with the worker's own
methods, vLLM's Qwen-VL loaders map the names the weight stream sends, and the release accepts the
transformers this project runs with.
"""

from __future__ import annotations

import ast
import functools
import re
import tempfile
import zipfile
from pathlib import Path

import pytest

from agents import tiny, vllm_backend, vllm_worker
from agents.generation import SamplingParams
from agents.vllm_backend import VERIFIED_VLLM, engine_kwargs, engine_placement, sampling_kwargs
from real_artifacts import cache_dir, download_wheel, move_into_place

pytestmark = pytest.mark.slow

SOURCES = (
    "vllm/entrypoints/llm.py",
    "vllm/engine/arg_utils.py",
    "vllm/v1/engine/llm_engine.py",
    "vllm/sampling_params.py",
    "vllm/outputs.py",
    "vllm/logprobs.py",
    "vllm/config/model.py",
    "vllm/config/parallel.py",
    "vllm/v1/executor/uniproc_executor.py",
    "vllm/v1/worker/gpu_worker.py",
    "vllm/v1/worker/worker_base.py",
    "vllm/model_executor/models/registry.py",
    "vllm/model_executor/models/qwen2_vl.py",
    "vllm/model_executor/models/qwen2_5_vl.py",
    "vllm/model_executor/models/qwen3_vl.py",
)


class Release:
    """The kept sources of one vLLM release, parsed on demand."""

    def __init__(self, root: Path, version: str):
        self.root, self.version = root, version

    @functools.cache
    def tree(self, path: str) -> ast.Module:
        return ast.parse((self.root / path).read_text(encoding="utf-8"))

    def cls(self, path: str, name: str) -> ast.ClassDef:
        for node in self.tree(path).body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
        raise AssertionError(f"vllm {self.version}: no class {name} in {path}")

    def metadata(self) -> str:
        return (self.root / "METADATA").read_text(encoding="utf-8")


def release_sources(version: str) -> Path:
    """The kept source files of vllm==version (downloaded and cut down on first use)."""
    target = cache_dir() / f"vllm-{version}"
    if (target / "METADATA").is_file():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        wheel = download_wheel(("vllm", version), Path(scratch))  # skips (or fails in CI) without PyPI
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".vllm-{version}-", dir=target.parent))
        with zipfile.ZipFile(wheel) as archive:
            for path in SOURCES:
                (staging / path).parent.mkdir(parents=True, exist_ok=True)
                (staging / path).write_bytes(archive.read(path))
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            (staging / "METADATA").write_bytes(archive.read(metadata))
    move_into_place(staging, target)
    return target


@pytest.fixture(scope="module", params=VERIFIED_VLLM)
def release(request) -> Release:
    return Release(release_sources(request.param), request.param)


# -- small readers of the syntax tree ---------------------------------------------------------------


def methods(node: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {f.name: f for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}


def params(function: ast.FunctionDef) -> set[str]:
    a = function.args
    return {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs}


def fields(node: ast.ClassDef) -> set[str]:
    """A dataclass's (or msgspec struct's) annotated fields."""
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}


def self_attributes(function: ast.FunctionDef) -> set[str]:
    return {t.attr for node in ast.walk(function) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def literal_strings(release: Release, path: str, alias: str) -> set[str]:
    """The strings of a `Name = Literal[...]` alias."""
    for node in release.tree(path).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == alias for t in node.targets):
            return {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    raise AssertionError(f"vllm {release.version}: no {alias} in {path}")


def our_llm_calls() -> set[tuple[str, ...]]:
    """Every attribute chain our backend reads from its `vllm.LLM` (`self.llm.<a>[.<b>]`)."""
    chains = set()
    for node in ast.walk(ast.parse(Path(vllm_backend.__file__).read_text(encoding="utf-8"))):
        chain, value = [], node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id == "self" and chain and chain[-1] == "llm" and len(chain) > 1:
            chains.add(tuple(reversed(chain[:-1])))
    return {c for c in chains if not any(other != c and other[:len(c)] == c for other in chains)}


# -- the checks -----------------------------------------------------------------------------------


def test_llm_accepts_every_argument_the_backend_passes(release):
    llm_init = methods(release.cls("vllm/entrypoints/llm.py", "LLM"))["__init__"]
    accepted = params(llm_init) | fields(release.cls("vllm/engine/arg_utils.py", "EngineArgs"))
    one_process = engine_kwargs("ckpt", "bfloat16", tensor_parallel_size=2)
    torchrun = engine_kwargs("ckpt", "bfloat16", **engine_placement(1, 2, 2, {"RANK": "0", "LOCAL_RANK": "0"}).llm_kwargs)
    passed = set(one_process) | set(torchrun)
    assert passed <= accepted, passed - accepted
    assert "processed_logprobs" in literal_strings(release, "vllm/config/model.py", "LogprobsMode")
    assert "external_launcher" in literal_strings(release, "vllm/config/parallel.py", "DistributedExecutorBackend")


def test_every_method_the_backend_calls_exists(release):
    llm = release.cls("vllm/entrypoints/llm.py", "LLM")
    engine = release.cls("vllm/v1/engine/llm_engine.py", "LLMEngine")
    assert "llm_engine" in self_attributes(methods(llm)["__init__"])
    reachable = {("llm_engine", name) for name in methods(engine)} | {(name,) for name in methods(llm)}
    calls = our_llm_calls()
    assert {("generate",), ("collective_rpc",), ("reset_prefix_cache",), ("llm_engine", "reset_encoder_cache")} <= calls
    assert calls <= reachable, calls - reachable
    assert {"prompts", "sampling_params", "use_tqdm"} <= params(methods(llm)["generate"])
    assert {"method", "args"} <= params(methods(llm)["collective_rpc"])


def test_request_and_output_fields_exist(release):
    request = sampling_kwargs(SamplingParams(), 8, [1], {2: -100.0}, seed=0)
    # min_tokens and ignore_eos: scripts/gpu_check.py's raw replay of the engine's requests.
    assert set(request) | {"min_tokens", "ignore_eos"} <= fields(release.cls("vllm/sampling_params.py", "SamplingParams"))
    assert {"prompt_token_ids", "outputs"} <= params(methods(release.cls("vllm/outputs.py", "RequestOutput"))["__init__"])
    assert {"token_ids", "logprobs"} <= fields(release.cls("vllm/outputs.py", "CompletionOutput"))
    assert "logprob" in fields(release.cls("vllm/logprobs.py", "Logprob"))


def test_the_worker_extension_fits_every_worker(release):
    worker = release.cls("vllm/v1/worker/gpu_worker.py", "Worker")
    worker_base = release.cls("vllm/v1/worker/worker_base.py", "WorkerBase")
    wrapper = release.cls("vllm/v1/worker/worker_base.py", "WorkerWrapperBase")
    ours = {name for name in vars(vllm_worker.WeightLoader) if not name.startswith("__")}
    assert not ours & (set(methods(worker)) | set(methods(worker_base)))  # vLLM refuses a shadowing extension
    assert "get_model" in methods(worker)  # what codevision_load_weights loads into
    assert "worker_extension_cls" in ast.unparse(methods(wrapper)["init_worker"])
    assert "__getattr__" in methods(wrapper)  # collective_rpc's method names reach the worker through it
    launcher = release.cls("vllm/v1/executor/uniproc_executor.py", "ExecutorWithExternalLauncher")
    assert "LOCAL_RANK" in ast.unparse(methods(launcher)["_distributed_args"])  # torchrun's rank picks the GPU


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_vllms_loader_takes_the_names_the_weight_stream_sends(release, family):
    # The stream sends transformers' names (model.language_model.*, model.visual.*, lm_head.*).
    path = f"vllm/model_executor/models/{family}.py"  # vLLM names its modules as we name the families
    model_class = tiny.FAMILY_SPECS[family]["model_class"]
    assert model_class in ast.unparse(release.tree("vllm/model_executor/models/registry.py"))
    node = release.cls(path, model_class)
    assert "load_weights" in methods(node)
    mapper = next(s for s in node.body if isinstance(s, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "hf_to_vllm_mapper" for t in s.targets))
    prefixes = {k.value for d in ast.walk(mapper) if isinstance(d, ast.Dict) for k in d.keys if isinstance(k, ast.Constant)}
    assert {"model.language_model.", "model.visual.", "lm_head."} <= prefixes


def test_the_release_accepts_this_projects_transformers(release):
    from importlib.metadata import version

    from packaging.requirements import Requirement

    requirements = {r.name: r for r in (Requirement(line.removeprefix("Requires-Dist: "))
                                        for line in release.metadata().splitlines()
                                        if line.startswith("Requires-Dist: ") and "extra ==" not in line)}
    assert version("transformers") in requirements["transformers"].specifier, requirements["transformers"]
    assert re.fullmatch(r"==\d+\.\d+\.\d+", str(requirements["torch"].specifier))  # vLLM brings its own torch
