"""The worker pool: concurrency, lifecycle, cleanup, result transport and input validation."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cv_env.sandbox import Sandbox, SandboxResult


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=10.0, memory_mb=512) as sb:
        yield sb


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(1)
    return Image.fromarray(rng.randint(0, 255, (30, 40, 3), dtype=np.uint8))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_result_fields(sandbox, image):
    r = sandbox.run("result = image.crop((5, 5, 25, 15))\nprint('size', result.size)", [image])
    assert isinstance(r, SandboxResult) and r.ok and r.error is None
    assert r.image.mode == "RGB" and r.image.size == (20, 10)
    assert np.array_equal(np.asarray(r.image), np.asarray(image)[5:15, 5:25])
    assert r.stdout == "size (20, 10)\n"
    assert r.source_index == 0 and r.elapsed_s > 0


def test_snippet_namespace(sandbox, image):
    code = ("print(img is image, len(images), math.pi > 3)\n"
            "import numpy\nfrom PIL import Image as I2\nimport PIL.ImageOps\n"
            "result = np.asarray(ImageOps.grayscale(image))\n"
            "squares = [x * len(images) for x in range(3)]\nf = lambda k: k + len(images)\nprint(squares, f(1))")
    r = sandbox.run(code, [image, image])
    assert r.ok, r.error
    assert r.stdout == "True 2 True\n[0, 2, 4] 3\n"
    assert r.image.mode == "L"


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "1", "I;16"])
def test_input_modes_are_delivered(sandbox, image, mode):
    src = image.convert(mode)
    r = sandbox.run("result = image", [src])
    assert r.ok, r.error
    assert r.image.mode in ("RGB", "L") and r.image.size == src.size


def test_bool_and_rgba_array_results(sandbox, image):
    r = sandbox.run("result = np.array(image)[:, :, 0] > 128", [image])
    assert r.ok and r.image.mode == "L" and set(np.unique(np.asarray(r.image))) <= {0, 255}
    r = sandbox.run("a = np.array(image.convert('RGBA'))\nresult = a", [image])
    assert r.ok and r.image.mode == "RGB"


def test_model_mistakes_are_results_not_exceptions(sandbox, image):
    r = sandbox.run("result = image", [image], image_index=3)
    assert not r.ok and "image_index 3 is out of range" in r.error and "0..0" in r.error
    r = sandbox.run("x = 1\ny = undefined_name", [image])
    assert not r.ok and r.error == "line 2: NameError: name 'undefined_name' is not defined"
    r = sandbox.run("if True print(1)", [image])
    assert not r.ok and r.error.startswith("SyntaxError")
    r = sandbox.run("x" * (sandbox.max_code_chars + 1), [image])
    assert not r.ok and "limit" in r.error


def test_programming_errors_raise(sandbox, image):
    with pytest.raises(TypeError, match="code must be a str"):
        sandbox.run(b"result = image", [image])
    with pytest.raises(TypeError, match="list of PIL images"):
        sandbox.run("result = image", [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="workers"):
        Sandbox(workers=0)


def test_too_large_inputs_are_refused(image):
    with Sandbox(workers=1, max_input_bytes=3000) as sb:
        r = sb.run("result = image", [image, image])
        assert not r.ok and "max_input_bytes" in r.error
        assert sb.run("result = image", [image.resize((10, 10))]).ok


def test_concurrent_threads_share_one_pool(sandbox):
    errors = []

    def worker(k: int):
        rng = np.random.RandomState(k)
        img = Image.fromarray(rng.randint(0, 255, (16 + k, 24, 3), dtype=np.uint8))
        for _ in range(5):
            r = sandbox.run("result = np.rot90(np.array(image), 3)", [img])
            expected = np.rot90(np.asarray(img), 3)
            if not (r.ok and np.array_equal(np.asarray(r.image), expected) and r.ops == [{"name": "rotate_270"}]):
                errors.append((k, r.error))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_workers_retire_and_are_replaced(image):
    with Sandbox(workers=1, max_calls_per_worker=2) as sb:
        pids = []
        for _ in range(5):
            assert sb.run("result = image", [image]).ok
            pids.append(sb.worker_pids[0])
        assert len(set(pids)) >= 2


def test_close_ends_every_process(image):
    sb = Sandbox(workers=2)
    assert sb.run("result = image", [image]).ok
    pids = sb.worker_pids + [sb.zygote_pid]
    assert all(_alive(p) for p in pids)
    sb.close()
    sb.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        sb.run("result = image", [image])


def test_workers_end_at_interpreter_exit():
    script = textwrap.dedent("""
        from cv_env.sandbox import Sandbox
        sb = Sandbox(workers=2)
        print(*sb.worker_pids, sb.zygote_pid)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 3
    assert not any(_alive(p) for p in pids)


def test_sandbox_made_in_a_short_lived_thread_keeps_working(image):
    made = []
    t = threading.Thread(target=lambda: made.append(Sandbox(workers=1)))
    t.start()
    t.join()
    with made[0] as sb:
        assert sb.run("result = image", [image]).ok


def test_workers_end_when_the_host_is_killed():
    script = textwrap.dedent("""
        import os, signal
        from cv_env.sandbox import Sandbox
        sb = Sandbox(workers=2)
        print(*sb.worker_pids, sb.zygote_pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 3
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


COMMON = [  # typical model code: every lazy import inside the libraries must already be done
    "a = np.array(image).astype(float)\nprint(np.percentile(a, 50) >= 0, np.polyfit([0, 1, 2], [1, 3, 5], 1).round(3).tolist())",
    "a = np.array(image)[:, :, 0].astype(float)\nu, s, v = np.linalg.svd(a)\nprint(s.shape, np.fft.fft2(a).shape)",
    "rng = np.random.default_rng(0)\nprint(rng.integers(0, 10, 3).shape, np.pad(np.zeros((2, 2)), 1).shape)",
    "g = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2GRAY)\n"
    "cs, h = cv2.findContours((g > 128).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)\n"
    "k = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))\nm = cv2.morphologyEx(g, cv2.MORPH_OPEN, k)\n"
    "print(cv2.calcHist([g], [0], None, [16], [0, 256]).shape)",
    "from PIL import ImageStat, ImageChops, ImageColor\n"
    "print(len(ImageStat.Stat(image).mean), ImageChops.difference(image, image).getbbox(), ImageColor.getrgb('red'))",
    "print(len(image.getexif()), ImageOps.fit(image, (20, 20)).size, ImageOps.pad(image, (80, 80)).size)",
    "print(image.quantize(8).mode, image.convert('P').mode, Image.blend(image, image, 0.5).size, image.convert('HSV').mode)",
    "import statistics, re, json, collections, itertools, colorsys, random\n"
    "print(statistics.mean([1, 2, 3]), re.findall(r'[0-9]', 'a1b2'), json.dumps({'a': 1}), collections.Counter('aab'))",
    "from PIL import ImageFont\nd = ImageDraw.Draw(image)\nd.text((2, 2), 'hello', fill=(255, 0, 0))\n"
    "d.text((2, 10), 'x', font=ImageFont.load_default(size=20))\nresult = image",
    "ok, png = cv2.imencode('.png', np.array(image))\nprint(cv2.imdecode(png, cv2.IMREAD_COLOR).shape)",
    "result = image.resize((32, 24), Image.Resampling.LANCZOS).filter(ImageFilter.UnsharpMask(2, 150, 3))",
    "lab = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2LAB)\n"
    "z = cv2.kmeans(np.float32(lab.reshape(-1, 3)), 3, None, (3, 10, 1.0), 2, cv2.KMEANS_RANDOM_CENTERS)",
]


@pytest.mark.parametrize("code", COMMON)
def test_common_library_calls_work(sandbox, image, code):
    r = sandbox.run(code, [image])
    assert r.ok, r.error


def test_a_dead_zygote_is_replaced(image):
    with Sandbox(workers=1) as sb:
        old, workers = sb.zygote_pid, sb.worker_pids
        os.kill(old, signal.SIGKILL)
        deadline = time.time() + 10  # its workers follow it (parent-death signal)
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.05)
        results = [sb.run("result = image", [image]) for _ in range(2)]
        assert all(r.ok for r in results), [r.error for r in results]
        assert sb.zygote_pid != old


def test_copies_share_the_pool_and_pickling_is_refused(sandbox):
    import copy
    import pickle

    assert copy.deepcopy({"sandbox": sandbox})["sandbox"] is sandbox
    assert copy.copy(sandbox) is sandbox
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(sandbox)


def test_close_while_threads_wait_for_a_worker(image):
    sb = Sandbox(workers=1, timeout_s=5.0)
    outcomes = []

    def call(code):
        try:
            outcomes.append(sb.run(code, [image]).ok)
        except RuntimeError as exc:
            outcomes.append(str(exc))

    slow = threading.Thread(target=call, args=("x = sum(range(3 * 10 ** 6))",))
    waiting = threading.Thread(target=call, args=("result = image",))
    slow.start()
    time.sleep(0.05)
    waiting.start()
    sb.close()
    slow.join(10)
    waiting.join(10)
    assert not slow.is_alive() and not waiting.is_alive()
    assert len(outcomes) == 2


def test_unicode_identifiers_compile(sandbox, image):
    """Non-ASCII names need `unicodedata`, which a locked-down worker cannot import lazily."""
    r = sandbox.run("résultat = image.crop((0, 0, 10, 10))\nnombre_de_píxeles = 100\nresult = résultat", [image])
    assert r.ok, r.error
    assert r.image.size == (10, 10)


def test_printed_text_is_always_utf8(sandbox, image):
    r = sandbox.run("print('a\\udcff b \\ud800')\nraise ValueError('\\udfff')", [image])
    assert not r.ok
    r.stdout.encode("utf-8")
    r.error.encode("utf-8")
    assert r.stdout == "a\ufffd b \ufffd\n" and "\ufffd" in r.error


def test_a_timed_out_worker_is_gone_even_without_the_os_layer(image):
    """The wall-clock kill does not depend on the OS layer: a snippet that ignores signals and
    loops forever is gone after its deadline, with every layer switched off."""
    code = ("import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
            "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass")
    with Sandbox(workers=1, timeout_s=1.0, isolate=False, restricted=False) as sb:
        pid = sb.worker_pids[0]
        r = sb.run(code, [image])
        assert not r.ok and "TimeoutError" in r.error
        deadline = time.time() + 5
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
