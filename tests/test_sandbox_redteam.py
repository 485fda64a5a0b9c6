"""Red-team suite: malicious and pathological snippets must fail safely, and the pool survives.

Each case asserts the safe outcome (an `ok=False` result with a message, or a harmless
success) and then that the same pool still runs a normal snippet correctly.
"""

import os
import signal
import time

import pytest

from cv_env.sandbox import Sandbox
from redteam import image  # noqa: F401  (fixture)

CANARY = "/tmp/cv_sandbox_redteam_canary"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=2.0, memory_mb=256) as sb:
        yield sb


def assert_pool_healthy(sandbox, image):
    r = sandbox.run("result = image.rotate(90, expand=True)", [image])
    assert r.ok, r.error
    assert r.image.size == (48, 64)
    assert r.ops == [{"name": "rotate_90"}]


ESCAPES = {
    "subclasses via dunder": "result = ().__class__.__bases__[0].__subclasses__()",
    "getattr dunder": "x = getattr((), '__class__')",
    "PIL.Image.os": "Image.os.system('touch " + CANARY + "')",
    "cv2.os": "cv2.os.system('touch " + CANARY + "')",
    "numpy ctypeslib": "x = np.ctypeslib",
    "as_strided via np.lib": "x = np.lib.stride_tricks.as_strided",
    "from numpy import lib": "from numpy import lib",
    "import numpy.lib": "import numpy.lib",
    "PIL core module": "import PIL.Image as I\nx = I.core",
    "generator frame": "g = (i for i in [1])\nf = getattr(g, 'gi_frame')",
    "frame globals": "g = (i for i in [1])\nf = g.gi_frame.f_back.f_globals",
    "traceback frame": "try:\n    1/0\nexcept Exception as e:\n    t = e.__traceback__",
    "format string traversal": "print('{0.__class__.__mro__}'.format(1))",
    "format_map traversal": "print('{x.__class__}'.format_map({'x': 1}))",
    "str.format unbound": "print(str.format('{0.__class__}', 1))",
    "f-string dunder": "print(f'{().__class__}')",
    "guard shadowing parameter": "def f(_getattr_=None):\n    return 1",
    "type builtin": "t = type(1)",
    "vars/globals": "g = globals()",
    "eval": "eval('1')",
    "exec": "exec('x = 1')",
    "__import__": "os = __import__('os')",
    "import os": "import os",
    "import subprocess": "import subprocess",
    "import importlib": "import importlib",
    "import sys": "import sys",
    "import ctypes": "import ctypes",
    "PIL ImageMath eval": "from PIL import ImageMath",
    "Image.im internals": "x = image.im",
    "Image.getim capsule": "x = image.getim()",
    "array ctypes": "x = np.zeros(3).ctypes",
    "class attribute of library": "x = Image.Image.save",
    "metaclass": "class M(type):\n    pass\nclass A(metaclass=M):\n    pass",
    "functools.update_wrapper copies dunders": (
        "import functools\nclass C:\n    pass\n"
        "functools.update_wrapper(C(), (), assigned=('__class__',), updated=())"),
    "ImageDraw core image": "d = ImageDraw.Draw(image)\nx = d.im",
    "ImageDraw core draw": "d = ImageDraw.Draw(image)\nx = d.draw",
    "font core": "from PIL import ImageFont\nx = ImageFont.load_default().font",
    "font_variant opens a path": "from PIL import ImageFont\nf = ImageFont.load_default().font_variant(font='/etc/passwd')",
    # numpy objects other than arrays that hand out raw memory (issue 16)
    "bit generator ctypes": "x = np.random.PCG64().ctypes",
    "bit generator cffi": "x = np.random.default_rng().bit_generator.cffi",
    "bit generator capsule": "x = np.random.MT19937().capsule",
    "global bit generator": "x = np.random.get_bit_generator()",
    "bit generator lock": "np.random.default_rng().bit_generator.lock.acquire()",
    "array data memoryview": "m = np.zeros(4).data",
    # arrays of Python objects over attacker-chosen bytes turn any address into an object
    "object array over a buffer": "a = np.ndarray((1,), dtype=object, buffer=np.zeros(8, np.uint8))",
    "object array over a buffer, positional": "a = np.ndarray((1,), object, np.zeros(8, np.uint8))",
    "structured object array over a buffer": "a = np.ndarray((1,), dtype=[('a', 'O')], buffer=np.zeros(8, np.uint8))",
    "recarray over a buffer": "a = np.recarray((1,), dtype=[('a', 'O')], buf=np.zeros(8, np.uint8))",
    "numeric array over a buffer": "a = np.ndarray((1,), np.int64, np.zeros(8, np.uint8))",
    "numeric array over an object array": "o = np.frompyfunc(lambda v: v, 1, 1)(np.arange(2))\na = np.frombuffer(o, np.int64)",
    "object array's raw memory": "o = np.frompyfunc(lambda v: v, 1, 1)(np.arange(2))\nm = o.data",
    "void over bytes": "v = np.void(b'\\0' * 8, dtype=[('a', 'O')])",
    "object array from a list": "a = np.array([None, 1])",
    "object astype": "a = np.zeros(2).astype(object)",
    "subclass of ndarray": "class A(np.ndarray):\n    pass",
    "subclass of recarray": "class A(np.recarray):\n    pass",
    # return values and other attribute walks
    "module returned by a call": "d, handler = ImageDraw.getdraw(image)",
    "UserString.format": "import collections\nprint(collections.UserString('{0.__class__}').format(1))",
    "UserString.format_map": "import collections\nprint(collections.UserString('{x.__class__}').format_map({'x': 1}))",
    "addresses of objects": "print(id(image))",
}

FILES = {
    "open builtin": f"open('{CANARY}', 'w')",
    "Image.open": "x = Image.open('/etc/passwd')",
    "Image.save": f"image.save('{CANARY}.png')",
    "Image.save via class": f"Image.Image.save(image, '{CANARY}.png')",
    "np.save": f"np.save('{CANARY}', np.zeros(3))",
    "np.load": "np.load('/etc/passwd')",
    "np.fromfile": "x = np.fromfile('/etc/passwd')",
    "np.loadtxt": "x = np.loadtxt('/etc/passwd')",
    "np.genfromtxt": "x = np.genfromtxt('/etc/passwd')",
    "np.memmap": f"x = np.memmap('{CANARY}', mode='w+', shape=(4,))",
    "ndarray.tofile": f"np.zeros(3).tofile('{CANARY}')",
    "ndarray.dump": f"np.zeros(3).dump('{CANARY}')",
    "cv2.imread": "x = cv2.imread('/etc/passwd')",
    "cv2.imwrite": f"cv2.imwrite('{CANARY}.png', np.zeros((4, 4), np.uint8))",
    "cv2.VideoCapture": "x = cv2.VideoCapture(0)",
    "cv2.FileStorage": f"x = cv2.FileStorage('{CANARY}', 1)",
    "cv2.CascadeClassifier": "x = cv2.CascadeClassifier('/etc/passwd')",
    "cv2 object save": f"c = cv2.createCLAHE()\nc.save('{CANARY}')",
    "ImageFont.truetype": "from PIL import ImageFont\nf = ImageFont.truetype('/etc/passwd')",
    "json.load": "import json\nx = json.load(None)",
    "print to file": "print('x', file=image)",
}

PROCESSES = {
    "import socket": "import socket",
    "import threading": "import threading",
    "import multiprocessing": "import multiprocessing",
    "import signal": "import signal",
    "SystemRandom": "import random\nr = random.SystemRandom()",
}


@pytest.mark.parametrize("code", list(ESCAPES.values()) + list(FILES.values()) + list(PROCESSES.values()),
                         ids=list(ESCAPES) + list(FILES) + list(PROCESSES))
def test_escape_attempt_is_refused(sandbox, image, code):
    r = sandbox.run(code, [image])
    assert not r.ok
    assert r.error and len(r.error) <= 2000
    assert r.image is None and r.ops == []
    assert not os.path.exists(CANARY) and not os.path.exists(CANARY + ".png")


def test_pool_healthy_after_escapes(sandbox, image):
    assert_pool_healthy(sandbox, image)


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "try:\n    while True:\n        pass\nexcept BaseException:\n    pass",
    "x = 10 ** 10 ** 9",  # a single long C-level call: no Python-level signal can stop it
], ids=["loop", "loop catching BaseException", "bigint C call"])
def test_cpu_bombs_are_killed_from_outside(sandbox, image, code):
    r = sandbox.run(code, [image])
    assert not r.ok and "TimeoutError" in r.error
    assert r.elapsed_s < 2.0 + 3.0
    assert_pool_healthy(sandbox, image)


@pytest.mark.parametrize("code", [
    "a = np.zeros((100000, 100000))",
    "s = 'a' * (10 ** 10)",
    "xs = []\nwhile True:\n    xs.append(bytes(10 ** 7))",
], ids=["numpy", "string", "growing list"])
def test_memory_bombs_fail_cleanly(sandbox, image, code):
    r = sandbox.run(code, [image])
    assert not r.ok
    assert "MemoryError" in r.error or "crashed" in r.error
    assert_pool_healthy(sandbox, image)


def test_output_flood_is_bounded(sandbox, image):
    r = sandbox.run("for i in range(200000):\n    print('x' * 100)", [image])
    assert r.ok
    assert len(r.stdout) <= sandbox.max_stdout + 100
    assert "truncated" in r.stdout


@pytest.mark.parametrize("code,needle", [
    ("result = np.zeros((5000, 5000, 3), np.uint8)", "more than"),
    ("result = np.zeros((1, 5000), np.uint8)", "aspect ratio"),
    ("result = np.zeros((8, 8), np.float64)", "astype(np.uint8)"),
    ("result = np.zeros((8, 8, 7), np.uint8)", "shape"),
    ("result = [1, 2, 3]", "list"),
    ("class A(np.ndarray):\n    pass\nresult = np.zeros((4, 4), np.uint8).view(A)", "subclass"),
    ("class H:\n    def __eq__(self, other):\n        while True:\n            pass\nresult = H()", "H"),
], ids=["too many pixels", "aspect", "float", "channels", "list", "array subclass", "hostile eq"])
def test_hostile_or_giant_results_are_rejected(sandbox, image, code, needle):
    r = sandbox.run(code, [image])
    assert not r.ok and needle in r.error


@pytest.mark.parametrize("code,needle", [
    ("raise SystemExit(3)", "SystemExit"),
    ("raise KeyboardInterrupt()", "KeyboardInterrupt"),
    ("def f(n):\n    return f(n + 1)\nf(0)", "RecursionError"),
    ("x = " + "(" * 5000 + ")" * 5000, "SyntaxError"),
])
def test_interpreter_exits_become_messages(sandbox, image, code, needle):
    r = sandbox.run(code, [image])
    assert not r.ok and needle in r.error
    assert_pool_healthy(sandbox, image)


def test_poisoned_state_does_not_reach_the_next_snippet(sandbox, image):
    poison = (
        "np.seterr(all='raise')\n"
        "np.set_printoptions(precision=1)\n"
        "d = np.sctypeDict\nd.clear()\n"
        "np.random.seed(0)\n"
    )
    for _ in range(4):  # every worker of the pool gets poisoned at least once
        assert sandbox.run(poison, [image]).ok
    probe = "x = np.float64(1.0) / 0\nprint(len(np.sctypeDict) > 10, np.array([1.23456]), np.random.randint(1 << 30))"
    outs = [sandbox.run(probe, [image]) for _ in range(4)]
    assert all(o.ok for o in outs), [o.error for o in outs]
    assert all(o.stdout.startswith("True [1.23456]") for o in outs)
    assert len({o.stdout for o in outs}) > 1  # the RNG is reseeded per call, not stuck at seed 0


def test_module_rebinding_is_refused(sandbox, image):
    for code in ("np.array = None", "Image.MAX_IMAGE_PIXELS = None", "cv2.resize = None",
                 "Image.Image.rotate = None"):
        r = sandbox.run(code, [image])
        assert not r.ok and "cannot" in r.error
    assert_pool_healthy(sandbox, image)


def test_snippet_cannot_change_the_callers_images(sandbox, image):
    before = image.tobytes()
    r = sandbox.run("d = ImageDraw.Draw(image)\nd.rectangle((0, 0, 20, 20), fill=(255, 0, 0))\n"
                    "images.append(1)\nimages[0] = None", [image])
    assert r.ok
    assert image.tobytes() == before


def test_worker_killed_while_idle_is_replaced_transparently(sandbox, image):
    pids = sandbox.worker_pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    results = [sandbox.run("result = image", [image]) for _ in range(2)]
    assert all(r.ok for r in results), [r.error for r in results]
    assert not set(pids) & set(sandbox.worker_pids)
    assert_pool_healthy(sandbox, image)


def test_library_code_that_looks_alike_still_works(sandbox, image):
    """The refusals above are narrow: ordinary uses of the same objects keep working."""
    code = ("rng = np.random.default_rng(0)\nx = rng.integers(0, 9, 3)\na = np.ndarray((2, 2), np.uint8)\n"
            "b = np.frombuffer(np.asarray(image).tobytes(), np.uint8)\nprint(isinstance(b, np.ndarray), b.shape, "
            "image.format, '%d-%s' % (1, 'a'), f'{x.shape}')\n"
            "s = sum(v for v in [1, 2, 3])\nfor row in np.zeros((2, 2)):\n    s += row.sum()\nprint(s)")
    r = sandbox.run(code, [image])
    assert r.ok, r.error
    assert r.stdout == "True (9216,) None 1-a (3,)\n6.0\n"


@pytest.mark.slow
def test_soak_mixed_snippets_from_threads(image):
    """Many benign and hostile snippets from 4 threads: the pool keeps serving, nothing leaks."""
    import random
    import threading

    snippets = [
        ("result = image.rotate(90, expand=True)", True),
        ("result = np.array(image)[5:30, 10:50]", True),
        ("result = ImageEnhance.Contrast(image).enhance(1.7)", True),
        ("import os", False),
        ("x = 10 ** 10 ** 9", False),
        ("a = np.zeros((100000, 100000))", False),
        ("raise SystemExit(1)", False),
        ("for i in range(10 ** 5):\n    print(i)", True),
        ("result = np.zeros((8, 8), np.float64)", False),
    ]
    fds_before = len(os.listdir("/proc/self/fd"))
    failures = []
    with Sandbox(workers=2, timeout_s=1.0, memory_mb=256, max_calls_per_worker=25) as sb:
        def loop(seed):
            rng = random.Random(seed)
            for _ in range(60):
                code, ok = rng.choice(snippets)
                r = sb.run(code, [image])
                if r.ok != ok:
                    failures.append((code, r.error))

        threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert_pool_healthy(sb, image)
    assert failures == []
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
