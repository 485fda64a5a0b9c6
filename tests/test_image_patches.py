"""`agents.image_patches` gives exactly what the image processor gives, for every family and input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from agents.image_patches import image_patches  # noqa: E402
from agents.loading import load_processor  # noqa: E402
from agents.tiny import FAMILIES  # noqa: E402

MODES = ("RGB", "L", "RGBA", "P", "LA", "CMYK", "1", "I;16")


@pytest.fixture(scope="module", params=FAMILIES)
def image_processor(request):
    return load_processor(f"tiny:{request.param}").image_processor


def _image(seed: int, width: int, height: int, mode: str) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _processor_output(image_processor, images):
    out = image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"].tolist()


def _assert_same(image_processor, images):
    try:
        expected = _processor_output(image_processor, images)
    except Exception as error:  # the processor refuses: so must we, the same way
        with pytest.raises(type(error)):
            image_patches(image_processor, images)
        return
    pixel_values, grids = image_patches(image_processor, images)
    assert grids == expected[1]
    assert pixel_values.dtype == expected[0].dtype and pixel_values.shape == expected[0].shape
    assert torch.equal(pixel_values, expected[0])  # bit for bit, not approximately


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.tuples(st.integers(1, 900), st.integers(1, 900)), min_size=1, max_size=3),
       modes=st.lists(st.sampled_from(MODES), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_equal_to_the_processor_on_any_image(image_processor, sizes, modes, seed):
    images = [_image(seed + k, w, h, modes[k]) for k, (w, h) in enumerate(sizes)]
    _assert_same(image_processor, images)


@pytest.mark.parametrize("settings_change", [
    {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16},  # a checkpoint's own limits
    {"do_normalize": False},  # anything but the standard steps: the processor's own call
    {"do_convert_rgb": False},
    {"resample": Image.Resampling.BILINEAR},
])
def test_equal_to_the_processor_under_other_settings(image_processor, settings_change):
    changed = copy.deepcopy(image_processor)
    if "min_pixels" in settings_change:
        changed.size = type(changed.size)(shortest_edge=settings_change["min_pixels"],
                                          longest_edge=settings_change["max_pixels"])
    else:
        for key, value in settings_change.items():
            setattr(changed, key, value)
    images = [_image(1, 317, 211, "RGB"), _image(2, 90, 700, "RGB")]
    _assert_same(changed, images)
    if not settings_change.get("do_convert_rgb", True):
        _assert_same(changed, [_image(3, 64, 64, "L")])  # grey stays grey: the processor decides


def test_an_extreme_aspect_is_refused_as_the_processor_refuses_it(image_processor):
    _assert_same(image_processor, [_image(0, 5000, 10, "RGB")])


def test_arrays_go_through_the_processor(image_processor):
    pixels = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    pixel_values, grids = image_patches(image_processor, [pixels])
    expected = _processor_output(image_processor, [pixels])
    assert grids == expected[1] and torch.equal(pixel_values, expected[0])
