"""The images the model is shown: exact, private, and a task's input downscaled once per image."""

import gc
import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cv_env import shown
from cv_env.shown import shown_copy, shown_task_copy


def _image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@settings(max_examples=40, deadline=None)
@given(size=st.tuples(st.integers(1, 700), st.integers(1, 700)), max_pixels=st.integers(1, 300_000),
       mode=st.sampled_from(["RGB", "L", "RGBA", "P", "LA", "1"]), seed=st.integers(0, 1000))
def test_the_shown_copy_is_rgb_within_max_pixels_and_a_bicubic_downscale(size, max_pixels, mode, seed):
    image = _image(seed, size, mode)
    result = shown_copy(image, max_pixels)
    assert result.mode == "RGB" and result is not image
    assert result.width * result.height <= max_pixels and min(result.size) >= 1
    if size[0] * size[1] <= max_pixels:  # small enough: the pixels as they are
        assert result.tobytes() == image.convert("RGB").tobytes()
    elif min(result.size) > 1:  # the aspect is kept and the scaling is PIL's bicubic of the RGB image
        assert abs(result.width * size[1] - result.height * size[0]) < max(size)  # each side scaled, then floored
        assert result.tobytes() == image.convert("RGB").resize(result.size, Image.Resampling.BICUBIC).tobytes()


def test_a_task_image_is_downscaled_once_and_every_reset_gets_a_private_copy(monkeypatch):
    calls = []
    real = shown.shown_copy
    monkeypatch.setattr(shown, "shown_copy", lambda image, max_pixels: calls.append(1) or real(image, max_pixels))
    image = _image(0, (1200, 800))
    first, second = shown_task_copy(image, 65536), shown_task_copy(image, 65536)
    assert len(calls) == 1 and first is not second
    assert first.tobytes() == second.tobytes() == real(image, 65536).tobytes()
    first.paste((255, 0, 0), (0, 0, 50, 50))  # one episode's copy changed: the next one is not
    assert shown_task_copy(image, 65536).tobytes() == second.tobytes()
    shown_task_copy(image, 16384)  # another size is another entry
    assert len(calls) == 2


def test_a_new_image_is_never_mistaken_for_a_freed_one():
    for seed in range(20):  # ids of freed images are reused: the weak reference tells them apart
        image = _image(seed, (300, 200))
        assert shown_task_copy(image, 10_000).tobytes() == shown_copy(image, 10_000).tobytes()
        del image
        gc.collect()


def test_the_kept_images_stay_within_their_budget(monkeypatch):
    monkeypatch.setattr(shown, "CACHE_BYTES", 200 * 200 * 3 * 3)
    images = [_image(seed, (400, 400)) for seed in range(10)]
    for image in images:
        shown_task_copy(image, 200 * 200)
    assert shown._kept_bytes <= shown.CACHE_BYTES and len(shown._kept) == 3
    assert shown_task_copy(images[0], 200 * 200).tobytes() == shown_copy(images[0], 200 * 200).tobytes()


def test_concurrent_resets_get_the_right_images():
    images = [_image(seed, (500, 300)) for seed in range(8)]
    expected = [shown_copy(image, 20_000).tobytes() for image in images]
    wrong = []

    def reset_many(offset: int) -> None:
        for k in range(40):
            i = (k + offset) % len(images)
            if shown_task_copy(images[i], 20_000).tobytes() != expected[i]:
                wrong.append(i)

    threads = [threading.Thread(target=reset_many, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
