"""In-process checks of the sandbox's pieces: pixel verification, pixel classification, proxies."""

import numpy as np
import pytest
from PIL import Image

from cv_env.frames import Frame
from cv_env.sandbox import op_rules
from cv_env.sandbox.executor import execute_snippet
from cv_env.sandbox.pixels import same_pixels, verify_geometry
from cv_env.sandbox.proxies import SandboxViolation, build_proxies, import_allowed_modules


@pytest.fixture(scope="module")
def modules():
    return import_allowed_modules()


@pytest.fixture(scope="module")
def image():
    y, x = np.mgrid[0:30, 0:40]
    return Image.fromarray(np.stack([x * 6, y * 8, (x + y) * 3], axis=-1).astype(np.uint8))


def test_verify_geometry_accepts_the_truth_and_rejects_a_wrong_convention(image):
    turned = image.rotate(90, expand=True)
    assert verify_geometry(image, turned, Frame.identity(image.size).rotate(90))
    assert not verify_geometry(image, turned, Frame.identity(image.size).rotate(270))
    crop = image.crop((5, 6, 25, 20))
    assert verify_geometry(image, crop, Frame.identity(image.size).crop((5, 6, 25, 20)))
    assert not verify_geometry(image, crop, Frame.identity(image.size).crop((6, 5, 26, 19)))


def test_a_rule_that_lies_is_caught_by_the_pixels(modules, image, monkeypatch):
    # Pretend np.rot90 turned clockwise: the pixels disagree, so no op and no frame are claimed.
    monkeypatch.setitem(op_rules.FUNCTION_RULES, "numpy.rot90", lambda c: op_rules.rotation(c, 270))
    r = execute_snippet(modules, "result = np.rot90(np.array(image))", [image], 0, stdout_limit=100)
    assert r["ok"] and r["ops"] == [] and r["frame"] is None


def test_same_pixels(image):
    assert same_pixels(image, image.copy())
    assert same_pixels(image, np.asarray(image))
    changed = np.array(image)
    changed[13, 11, 2] ^= 1  # one bit of one pixel off the sampled grid is still found
    assert not same_pixels(image, changed)


@pytest.mark.parametrize("after,name", [
    (lambda a: 255 - a, "invert"),
    (lambda a: np.clip(a.astype(int) + 25, 0, 255), "brightness"),
    (lambda a: np.clip((a.astype(float) - 100) * 1.8 + 100, 0, 255), "contrast"),
    (lambda a: a.mean(axis=2), "grayscale"),
    (lambda a: np.where(a > 120, 255, 0), "threshold"),
])
def test_classify_pixel_change(image, after, name):
    a = np.asarray(image)
    assert op_rules.classify_pixel_change(a, after(a)) == name


def test_module_proxies_copy_containers_and_refuse_modules(modules):
    proxies = build_proxies(modules, lambda key, fn: fn)
    np_proxy = proxies["numpy"]
    d = np_proxy.sctypeDict
    d.clear()
    assert len(np_proxy.sctypeDict) > 10
    assert np_proxy.random is proxies["numpy.random"]
    with pytest.raises(SandboxViolation):
        np_proxy.lib
    with pytest.raises(SandboxViolation):
        proxies["PIL.Image"].os
    with pytest.raises(SandboxViolation):
        np_proxy.float64 = None
    assert "imread" not in dir(proxies["cv2"]) and "resize" in dir(proxies["cv2"])


def test_module_fingerprint_notices_a_rebinding(modules):
    from cv_env.sandbox.worker import _module_fingerprint

    before = _module_fingerprint(modules)
    original = modules["numpy"].rot90
    try:
        modules["numpy"].rot90 = lambda *a, **k: None  # what an escaped snippet could do
        assert _module_fingerprint(modules) != before
    finally:
        modules["numpy"].rot90 = original
    assert _module_fingerprint(modules) == before


def test_a_held_global_lock_makes_the_worker_unclean():
    """A worker checks numpy's global generator lock before replying: kept, the worker retires
    (in its guilty call) rather than hanging the next call's np.random."""
    from cv_env.sandbox.worker import _global_locks_free

    assert _global_locks_free()
    lock = np.random.get_bit_generator().lock
    lock.acquire()
    try:
        assert not _global_locks_free()
    finally:
        lock.release()
    assert _global_locks_free()
