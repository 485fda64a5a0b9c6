"""Frames of sandbox results: map output pixels back to the source and check the colours match."""

import numpy as np
import pytest
from PIL import Image

from cv_env.frames import Frame
from cv_env.sandbox import Sandbox

W, H = 200, 120


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=10.0, memory_mb=512) as sb:
        yield sb


@pytest.fixture(scope="module")
def coords():
    """Each pixel's colour encodes its own (x, y): R = x, G = y, B = x + y (mod 256)."""
    y, x = np.mgrid[0:H, 0:W]
    return Image.fromarray(np.stack([x, y, (x + y) % 256], axis=-1).astype(np.uint8))


def assert_frame_matches_pixels(out: Image.Image, frame: Frame, source: Image.Image):
    """Every sampled output pixel shows the source pixel its centre maps to."""
    assert frame is not None and frame.size == out.size and frame.source_size == source.size
    out_a, src_a = np.asarray(out.convert("RGB")), np.asarray(source)
    w, h = out.size
    checked = 0
    for x in np.linspace(0, w - 1, 9).astype(int):
        for y in np.linspace(0, h - 1, 9).astype(int):
            u, v = frame.point_to_source(x + 0.5, y + 0.5)
            iu, iv = int(np.floor(u)), int(np.floor(v))
            if 0 <= iu < source.width and 0 <= iv < source.height:
                assert tuple(out_a[y, x]) == tuple(src_a[iv, iu]), (x, y, iu, iv)
                checked += 1
    assert checked > 20


GEOMETRY = {
    "rotate 90": "result = image.rotate(90, expand=True)",
    "rotate 270 np": "result = np.rot90(np.array(image), 3)",
    "rotate 180 cv2": "result = cv2.rotate(np.array(image), cv2.ROTATE_180)",
    "rotate 90 no expand": "result = image.rotate(90)",
    "flip h": "result = image.transpose(Image.FLIP_LEFT_RIGHT)",
    "flip v slice": "result = np.array(image)[::-1]",
    "transpose": "result = np.array(image).transpose(1, 0, 2)",
    "transverse": "result = image.transpose(Image.Transpose.TRANSVERSE)",
    "crop": "result = image.crop((30, 20, 150, 100))",
    "crop past border": "result = image.crop((-10, -5, 60, 40))",
    "np crop flipped": "result = np.array(image)[90:10:-1, 20:180]",
    "rotate then crop": "r = image.rotate(90, expand=True)\nresult = r.crop((10, 30, 100, 170))",
    "cv2 rotate then numpy crop": ("a = cv2.rotate(np.array(image), cv2.ROTATE_90_CLOCKWISE)\n"
                                   "result = a[20:150, 5:100]"),
    "crop rotate flip crop": ("c = image.crop((20, 10, 180, 110))\nr = c.rotate(270, expand=True)\n"
                              "f = ImageOps.mirror(r)\nresult = f.crop((5, 5, 60, 120))"),
    "contrast keeps the frame of a crop": "result = ImageOps.invert(image.crop((30, 20, 150, 100)))",
    "pad": "result = cv2.copyMakeBorder(np.array(image), 4, 6, 8, 2, cv2.BORDER_CONSTANT)",
    "warpAffine 180": ("M = cv2.getRotationMatrix2D((99.5, 59.5), 180, 1.0)\n"
                       "result = cv2.warpAffine(np.array(image), M, (200, 120))"),
}


@pytest.mark.parametrize("code", list(GEOMETRY.values()), ids=list(GEOMETRY))
def test_frame_maps_output_pixels_to_source_pixels(sandbox, coords, code):
    r = sandbox.run(code, [coords])
    assert r.ok, r.error
    if "invert" in code:
        r.image = Image.fromarray(255 - np.asarray(r.image))
    assert_frame_matches_pixels(r.image, r.frame, coords)


def test_resize_frame_maps_corners_to_corners(sandbox, coords):
    r = sandbox.run("result = image.crop((40, 20, 140, 70)).resize((300, 150))", [coords])
    assert [op["name"] for op in r.ops] == ["crop", "resize"]
    assert r.frame.box_to_source([0, 0, 300, 150]) == [40.0, 20.0, 140.0, 70.0]
    assert r.frame.point_to_source(150, 75) == (90.0, 45.0)


def test_frames_chain_across_tool_calls(sandbox, coords):
    """A crop made on a rotated copy is scored against a box given on the original."""
    first = sandbox.run("result = image.rotate(90, expand=True)", [coords])
    second = sandbox.run("result = image.crop((10, 50, 60, 150))", [coords, first.image], image_index=1)
    assert second.source_index == 1 and second.ops[0]["box"] == [10, 50, 60, 150]
    chained = first.frame.then(second.frame)
    assert_frame_matches_pixels(second.image, chained, coords)
    # The rotated copy's rows 50..150, columns 10..60 are the original's columns 50..150,
    # rows 10..60 (x_orig = W - y_rot for a counter-clockwise quarter turn).
    assert chained.box_to_source([0, 0, 50, 100]) == [50.0, 10.0, 150.0, 60.0]
    bbox_in_second = chained.box_from_source([60, 20, 100, 40])
    assert bbox_in_second == [10.0, 50.0, 30.0, 90.0]  # x: 20..40 - 10, y: (200 - 100..60) - 50
