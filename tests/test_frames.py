"""Frames map pixel coordinates back through chains of crops, rotations, flips and resizes."""

import numpy as np
import pytest
from PIL import Image

from cv_env.frames import Frame


def _random_image(w=37, h=23, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _assert_pixels_map(source: Image.Image, derived: Image.Image, frame: Frame):
    """Every derived pixel centre maps to a source pixel with the same value."""
    assert derived.size == frame.size
    src, dst = np.asarray(source), np.asarray(derived)
    for y in range(derived.height):
        for x in range(derived.width):
            sx, sy = frame.point_to_source(x + 0.5, y + 0.5)
            assert (dst[y, x] == src[int(np.floor(sy)), int(np.floor(sx))]).all(), (x, y, sx, sy)


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_maps_pixels(degrees):
    image = _random_image()
    _assert_pixels_map(image, image.rotate(degrees, expand=True),
                       Frame.identity(image.size).rotate(degrees))


def test_flips_map_pixels():
    image = _random_image()
    frame = Frame.identity(image.size)
    _assert_pixels_map(image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), frame.flip_horizontal())
    _assert_pixels_map(image, image.transpose(Image.Transpose.FLIP_TOP_BOTTOM), frame.flip_vertical())


def test_chain_rotate_crop_flip_then_rotate_maps_pixels():
    image = _random_image()
    frame = Frame.identity(image.size)
    step = image.rotate(90, expand=True)
    frame = frame.rotate(90)
    step = step.crop((3, 5, 17, 30))
    frame = frame.crop((3, 5, 17, 30))
    step = step.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    frame = frame.flip_vertical()
    step = step.rotate(270, expand=True)
    frame = frame.rotate(270)
    _assert_pixels_map(image, step, frame)


def test_chaining_two_frames_equals_one_long_chain():
    first = Frame.identity((40, 30)).rotate(90).crop((2, 4, 22, 34))
    second = Frame.identity(first.size).flip_horizontal().crop((1, 1, 10, 10))
    direct = first.flip_horizontal().crop((1, 1, 10, 10))
    assert first.then(second).box_to_source([0, 0, 9, 9]) == pytest.approx(direct.box_to_source([0, 0, 9, 9]))


def test_resize_maps_corners_and_boxes():
    frame = Frame.identity((200, 100)).resize((100, 50))
    assert frame.box_to_source([10, 10, 20, 20]) == pytest.approx([20, 20, 40, 40])
    assert frame.box_from_source([20, 20, 40, 40]) == pytest.approx([10, 10, 20, 20])


def test_box_round_trip_through_rotation():
    frame = Frame.identity((300, 200)).rotate(90)  # the rotated image is 200 x 300
    assert frame.size == (200, 300)
    box_in_source = [10, 20, 60, 40]
    shown = frame.box_from_source(box_in_source)
    # rotate 90 ccw: source (x, y) -> new (y, w - x)
    assert shown == pytest.approx([20, 240, 40, 290])
    assert frame.box_to_source(shown) == pytest.approx(box_in_source)


def test_serialisation_round_trip_and_errors():
    frame = Frame.identity((5, 7)).rotate(270).crop((1, 1, 4, 3))
    assert Frame.from_dict(frame.to_dict()) == frame
    with pytest.raises(ValueError, match="multiples of 90"):
        Frame.identity((5, 5)).rotate(45)
    with pytest.raises(ValueError, match="cannot chain"):
        Frame.identity((5, 5)).then(Frame.identity((6, 6)))
