"""The host's check of a worker's claims (`verify.py`), on hand-made claims: what is true passes,
what the pixels contradict is a lie, and what they cannot settle is shown but never paid."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from cv_env.frames import Frame
from cv_env.sandbox.verify import ClaimError, verify_claims


@pytest.fixture(scope="module")
def source():
    """96x64 with texture at every scale (a photo-like image: geometry is checkable)."""
    rng = np.random.RandomState(3)
    smooth = np.asarray(Image.fromarray(rng.randint(0, 255, (8, 12, 3), np.uint8)).resize((96, 64), Image.BICUBIC))
    noise = rng.randint(-20, 20, (64, 96, 3))
    return np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def crop_op(box):
    return {"name": "crop", "box": list(box)}


def test_an_exact_crop_is_verified_and_its_box_recomputed(source, rng):
    box = (10, 5, 50, 45)
    frame = Frame.identity((96, 64)).crop(box)
    out = source[5:45, 10:50]
    verified = verify_claims(source, out, frame, [{**crop_op(box), "source_box": [0, 0, 1, 1]}], rng)
    assert verified.frame == frame
    assert verified.ops == [{"name": "crop", "box": [10, 5, 50, 45], "source_box": [10.0, 5.0, 50.0, 45.0]}]


def test_rotations_and_flips_are_verified_in_every_combination(source, rng):
    image = Image.fromarray(source)
    for ops, made in (([{"name": "rotate_90"}], image.rotate(90, expand=True)),
                      ([{"name": "rotate_270"}], image.rotate(270, expand=True)),
                      ([{"name": "flip_horizontal"}], image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
                      ([{"name": "rotate_90"}, {"name": "flip_vertical"}], image.transpose(Image.Transpose.TRANSPOSE))):
        frame = Frame.identity((96, 64))
        for op in ops:
            frame = frame.apply_op(op["name"])
        assert verify_claims(source, np.asarray(made), frame, ops, rng).ops == ops


def test_a_claim_the_pixels_contradict_is_a_lie(source, rng):
    frame = Frame.identity((96, 64)).crop((10, 5, 50, 45))
    with pytest.raises(ClaimError, match="does not show"):
        verify_claims(source, np.zeros((40, 40, 3), np.uint8), frame, [crop_op((10, 5, 50, 45))], rng)
    rotated = Frame.identity((96, 64)).rotate(90)
    with pytest.raises(ClaimError, match="does not show"):  # the right shape, but not rotated
        verify_claims(source, np.asarray(Image.fromarray(source).resize((64, 96))), rotated, [{"name": "rotate_90"}], rng)


def test_ops_must_compose_to_the_frame(source, rng):
    with pytest.raises(ClaimError, match="compose"):
        verify_claims(source, source, Frame.identity((96, 64)), [{"name": "rotate_180"}], rng)


def test_sizes_must_agree(source, rng):
    with pytest.raises(ClaimError, match="frame is for"):
        verify_claims(source, source[:1, :1], Frame.identity((96, 64)), [crop_op((0, 0, 1, 1))], rng)
    with pytest.raises(ClaimError, match="source size"):
        verify_claims(source, source, Frame.identity((960, 640)).crop((0, 0, 96, 64)), [crop_op((0, 0, 96, 64))], rng)


def test_a_pixel_change_on_top_of_geometry_is_verified_by_correlation(source, rng):
    image = Image.fromarray(source)
    made = ImageEnhance.Contrast(image.rotate(180)).enhance(1.8).filter(ImageFilter.GaussianBlur(1))
    ops = [{"name": "rotate_180"}, {"name": "contrast"}, {"name": "blur"}]
    frame = Frame.identity((96, 64)).rotate(180)
    verified = verify_claims(source, np.asarray(made), frame, ops, rng)
    assert verified.ops == ops and verified.frame == frame
    made = image.crop((10, 5, 50, 45)).resize((80, 80))  # resampled: no pixel is exact any more
    frame = Frame.identity((96, 64)).crop((10, 5, 50, 45)).resize((80, 80))
    verified = verify_claims(source, np.asarray(made), frame, [crop_op((10, 5, 50, 45)), {"name": "resize"}], rng)
    assert [op["name"] for op in verified.ops] == ["crop", "resize"]
    assert verified.ops[0]["source_box"] == [10.0, 5.0, 50.0, 45.0]


def test_a_changed_image_that_fits_another_orientation_better_is_a_lie(source, rng):
    made = ImageEnhance.Contrast(Image.fromarray(source)).enhance(1.5)  # not rotated at all
    frame = Frame.identity((96, 64)).rotate(180)
    with pytest.raises(ClaimError, match="fits another"):
        verify_claims(source, np.asarray(made), frame, [{"name": "rotate_180"}, {"name": "contrast"}], rng)


def test_what_the_pixels_cannot_settle_is_shown_but_not_paid(source, rng):
    edges = np.asarray(Image.fromarray(source).rotate(180).convert("L").filter(ImageFilter.FIND_EDGES))
    edges = (edges > 40).astype(np.uint8) * 255
    verified = verify_claims(source, edges, Frame.identity((96, 64)).rotate(180),
                             [{"name": "rotate_180"}, {"name": "grayscale"}, {"name": "edges"}], rng)
    assert verified.frame is None  # untraceable from here on
    assert verified.ops == [{"name": "grayscale"}, {"name": "edges"}]


def test_no_frame_means_no_rotation_flip_or_crop(source, rng):
    verified = verify_claims(source, source, None, [crop_op((0, 0, 5, 5)), {"name": "rotate_90"}, {"name": "draw"}], rng)
    assert verified.ops == [{"name": "draw"}] and verified.frame is None


def test_an_odd_angle_in_the_end_earns_no_quarter_turn(source, rng):
    image = Image.fromarray(source)
    made = image.rotate(90, expand=True).rotate(20)  # canvas kept: a 110 degree turn in all
    theta = np.radians(20)
    c, s = np.cos(theta), np.sin(theta)
    w, h = 64, 96
    # PIL's rotate about the centre: source = R(-angle) (out - centre) + centre, composed with rotate_90
    inner = Frame((w, h), (w, h), ((c, -s, w / 2 - c * w / 2 + s * h / 2), (s, c, h / 2 - s * w / 2 - c * h / 2)))
    frame = Frame.identity((96, 64)).rotate(90).then(inner)
    ops = [{"name": "rotate_90"}, {"name": "rotate", "angle": 20.0}]
    verified = verify_claims(source, np.asarray(made), frame, ops, rng)
    assert verified.frame == frame  # the geometry checks out (by correlation) ...
    assert verified.ops == [{"name": "rotate", "angle": 20.0}]  # ... but it is no quarter turn


def test_whole_image_crop_is_no_crop(source, rng):
    frame = Frame.identity((96, 64)).crop((0, 0, 96, 64))
    verified = verify_claims(source, source, frame, [crop_op((0, 0, 96, 64))], rng)
    assert verified.ops == []
