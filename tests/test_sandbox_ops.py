"""Op detection: every op name, the conventions, and the tricky cases (no text is ever read)."""

import numpy as np
import pytest
from PIL import Image

from cv_env.sandbox import Sandbox


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=10.0, memory_mb=512) as sb:
        yield sb


@pytest.fixture(scope="module")
def image():
    """64x48, every pixel a different colour and no symmetry, so geometry is checkable."""
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, (x * 7 + y * 3) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def names(result):
    assert result.ok, result.error
    return [op["name"] for op in result.ops]


A = "a = np.array(image)\n"
G = "g = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2GRAY)\n"

CASES = {
    # orientation (counter-clockwise, as PIL rotate(d, expand=True))
    "pil rotate 90": ("result = image.rotate(90, expand=True)", ["rotate_90"]),
    "pil rotate -90": ("result = image.rotate(-90, expand=True)", ["rotate_270"]),
    "pil rotate 180": ("result = image.rotate(180)", ["rotate_180"]),
    "pil transpose 270": ("result = image.transpose(Image.Transpose.ROTATE_270)", ["rotate_270"]),
    "pil flip lr": ("result = image.transpose(Image.FLIP_LEFT_RIGHT)", ["flip_horizontal"]),
    "pil flip tb": ("result = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)", ["flip_vertical"]),
    "imageops mirror": ("result = ImageOps.mirror(image)", ["flip_horizontal"]),
    "imageops flip": ("result = ImageOps.flip(image)", ["flip_vertical"]),
    "np rot90 k=1": (A + "result = np.rot90(a)", ["rotate_90"]),
    "np rot90 k=3": (A + "result = Image.fromarray(np.rot90(a, k=3))", ["rotate_270"]),
    "np rot90 k=-1": (A + "result = np.rot90(a, -1)", ["rotate_270"]),
    "np rot90 k=2": (A + "result = np.rot90(a, 2)", ["rotate_180"]),
    "np fliplr": (A + "result = np.fliplr(a)", ["flip_horizontal"]),
    "np flipud": (A + "result = np.flipud(a)", ["flip_vertical"]),
    "np flip axis 1": (A + "result = np.flip(a, axis=1)", ["flip_horizontal"]),
    "slice ::-1 cols": (A + "result = a[:, ::-1]", ["flip_horizontal"]),
    "slice ::-1 rows": (A + "result = a[::-1]", ["flip_vertical"]),
    "cv2 rotate cw": (A + "result = cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE)", ["rotate_270"]),
    "cv2 rotate ccw": (A + "result = cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)", ["rotate_90"]),
    "cv2 flip 1": (A + "result = cv2.flip(a, 1)", ["flip_horizontal"]),
    "cv2 flip 0": (A + "result = cv2.flip(a, 0)", ["flip_vertical"]),
    "cv2 flip -1": (A + "result = cv2.flip(a, -1)", ["rotate_180"]),
    "cv2 warpAffine 90": (A + "M = cv2.getRotationMatrix2D((31.5, 23.5), 90, 1.0)\n"
                          "result = cv2.warpAffine(a, M, (64, 48))", ["rotate_90"]),
    "np transpose": (A + "result = np.transpose(a, (1, 0, 2))", ["rotate_90", "flip_vertical"]),
    # crop and resize
    "pil crop from size": ("w, h = image.size\nresult = image.crop((w // 4, h // 4, w // 2, h // 2))", ["crop"]),
    "numpy crop": (A + "result = a[10:30, 5:40]", ["crop"]),
    "pil resize": ("result = image.resize((32, 24))", ["resize"]),
    "cv2 resize": (A + "result = cv2.resize(a, None, fx=2, fy=2)", ["resize"]),
    "pad": (A + "result = cv2.copyMakeBorder(a, 2, 3, 4, 5, cv2.BORDER_CONSTANT)", ["pad"]),
    "imageops expand": ("result = ImageOps.expand(image, 4)", ["pad"]),
    "imageops crop border": ("result = ImageOps.crop(image, 5)", ["crop"]),
    "pil resize with box": ("result = image.resize((20, 10), box=(10, 10, 50, 30))", ["crop", "resize"]),
    "pil reduce": ("result = image.reduce(2)", ["resize"]),
    "pil thumbnail in place": ("c = image.copy()\nc.thumbnail((32, 32))\nresult = c", ["resize"]),
    "imageops contain": ("result = ImageOps.contain(image, (32, 32))", ["resize"]),
    "cv2 pyrDown": (A + "result = cv2.pyrDown(a)", ["resize"]),
    # photometric
    "brightness": ("result = ImageEnhance.Brightness(image).enhance(1.4)", ["brightness"]),
    "contrast": ("result = ImageEnhance.Contrast(image).enhance(1.6)", ["contrast"]),
    "sharpness": ("result = ImageEnhance.Sharpness(image).enhance(3.0)", ["sharpness"]),
    "color": ("result = ImageEnhance.Color(image).enhance(0.3)", ["color"]),
    "grayscale pil": ("result = ImageOps.grayscale(image)", ["grayscale"]),
    "grayscale convert": ("result = image.convert('L')", ["grayscale"]),
    "grayscale cv2": (G + "result = g", ["grayscale"]),
    "blur pil": ("result = image.filter(ImageFilter.GaussianBlur(2))", ["blur"]),
    "blur cv2": (A + "result = cv2.GaussianBlur(a, (5, 5), 0)", ["blur"]),
    "sharpen": ("result = image.filter(ImageFilter.SHARPEN)", ["sharpen"]),
    "threshold point": ("result = image.convert('L').point(lambda p: 255 if p > 100 else 0)",
                        ["grayscale", "threshold"]),
    "threshold cv2": (G + "t, result = cv2.threshold(g, 100, 255, cv2.THRESH_BINARY)", ["grayscale", "threshold"]),
    "invert pil": ("result = ImageOps.invert(image)", ["invert"]),
    "invert cv2": (A + "result = cv2.bitwise_not(a)", ["invert"]),
    "invert numpy arithmetic": (A + "result = 255 - a", ["invert"]),
    "brightness numpy arithmetic": (A + "result = np.clip(a.astype(np.int16) + 30, 0, 255).astype(np.uint8)",
                                    ["brightness"]),
    "grayscale numpy mean": (A + "result = a.mean(axis=2).astype(np.uint8)", ["grayscale"]),
    "contrast numpy arithmetic": (A + "m = a.mean()\nresult = np.clip((a - m) * 1.5 + m, 0, 255).astype(np.uint8)",
                                  ["contrast"]),
    "threshold numpy": (A + "result = np.where(a[:, :, 0] > 128, 255, 0).astype(np.uint8)", ["threshold"]),
    "equalize pil": ("result = ImageOps.equalize(image)", ["equalize"]),
    "equalize cv2": (G + "result = cv2.equalizeHist(g)", ["grayscale", "equalize"]),
    "clahe": (G + "c = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4))\nresult = c.apply(g)",
              ["grayscale", "equalize"]),
    "autocontrast": ("result = ImageOps.autocontrast(image, cutoff=5)", ["autocontrast"]),
    "denoise cv2": (A + "result = cv2.medianBlur(a, 3)", ["denoise"]),
    "denoise pil": ("result = image.filter(ImageFilter.MedianFilter(3))", ["denoise"]),
    "edges cv2": (G + "result = cv2.Canny(g, 50, 150)", ["grayscale", "edges"]),
    "edges pil": ("result = image.filter(ImageFilter.FIND_EDGES)", ["edges"]),
    "draw pil": ("c = image.copy()\nd = ImageDraw.Draw(c)\nd.rectangle((2, 2, 20, 20), outline=(255, 0, 0))\n"
                 "result = c", ["draw"]),
    "draw pixel access": ("c = image.copy()\npx = c.load()\npx[3, 4] = (255, 0, 0)\nresult = c", ["draw"]),
    "draw numpy region": (A + "a[2:10, 2:10] = 0\nresult = a", ["draw"]),
    "draw cv2": (A + "cv2.rectangle(a, (2, 2), (20, 20), (255, 0, 0), 1)\nresult = a", ["draw"]),
    # chains keep their order
    "rotate then crop": ("r = image.rotate(90, expand=True)\nresult = r.crop((0, 0, 20, 30))", ["rotate_90", "crop"]),
    "contrast then rotate": ("c = ImageEnhance.Contrast(image).enhance(1.5)\n"
                             "result = c.transpose(Image.Transpose.ROTATE_180)", ["contrast", "rotate_180"]),
}


@pytest.mark.parametrize("code,expected", list(CASES.values()), ids=list(CASES))
def test_op_is_detected(sandbox, image, code, expected):
    assert names(sandbox.run(code, [image])) == expected


def test_crop_box_is_recorded_in_both_frames(sandbox, image):
    r = sandbox.run("w, h = image.size\nresult = image.crop((w // 4, h // 4, w // 2, h // 2))", [image])
    assert r.ops == [{"name": "crop", "box": [16, 12, 32, 24], "source_box": [16.0, 12.0, 32.0, 24.0]}]
    r = sandbox.run("r = image.rotate(90, expand=True)\nresult = r.crop((0, 0, 20, 30))", [image])
    crop = r.ops[1]
    # The rotated copy is 48x64; its top-left 20x30 is the original's right edge, rows 0..20.
    assert crop["box"] == [0, 0, 20, 30]
    assert crop["source_box"] == [34.0, 0.0, 64.0, 20.0]


@pytest.mark.parametrize("code", [
    "result = ImageEnhance.Contrast(image).enhance(1.0)",
    "result = ImageEnhance.Brightness(image).enhance(1.0)",
    "result = image.crop((0, 0, image.width, image.height))",
    "result = image.rotate(0)",
    "result = image.resize(image.size)",
    "# crop the image, then rotate it by 90 degrees and flip it\nresult = image",
    "print('I rotated and cropped the image')\nresult = image.copy()",
    "result = np.array(image)",
    "a = np.array(image)\nresult = Image.fromarray(a[:, :, ::-1][:, :, ::-1])",
])
def test_no_pixel_changed_means_no_op(sandbox, image, code):
    r = sandbox.run(code, [image])
    assert names(r) == []
    assert r.source_index == 0
    assert r.frame.size == image.size and r.frame.point_to_source(3, 4) == (3.0, 4.0)


def test_uniform_image_rotation_changes_no_pixel(sandbox):
    flat = Image.new("RGB", (40, 40), (9, 9, 9))
    assert names(sandbox.run("result = image.rotate(180)", [flat])) == []


def test_failed_execution_reports_no_ops(sandbox, image):
    r = sandbox.run("x = image.rotate(90, expand=True)\nresult = x\nraise ValueError('boom')", [image])
    assert not r.ok and r.ops == [] and r.frame is None
    assert "line 3" in r.error and "boom" in r.error


def test_only_ops_that_made_the_result_count(sandbox, image):
    r = sandbox.run("t = image.rotate(90, expand=True)\nresult = image.crop((0, 0, 10, 10))", [image])
    assert names(r) == ["crop"]


def test_other_input_is_the_source(sandbox, image):
    other = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    r = sandbox.run("result = images[1].rotate(180)", [image, other], image_index=0)
    assert names(r) == ["rotate_180"] and r.source_index == 1
    r = sandbox.run("result = img.rotate(180)", [image, other], image_index=1)
    assert r.source_index == 1


def test_arbitrary_angle_rotation_is_named_without_frame(sandbox, image):
    r = sandbox.run("result = image.rotate(15, expand=True)", [image])
    assert r.ops == [{"name": "rotate", "angle": 15.0}]
    assert r.frame is None


def test_result_drawn_from_scratch_has_no_source(sandbox, image):
    r = sandbox.run("result = np.zeros((10, 20, 3), np.uint8)", [image])
    assert r.ok and r.ops == [] and r.frame is None and r.source_index is None
    assert r.image.size == (20, 10)


def test_result_without_image_is_fine(sandbox, image):
    r = sandbox.run("print(image.size)", [image])
    assert r.ok and r.image is None and r.stdout == "(64, 48)\n" and r.ops == []


def test_getdata_gives_plain_values(sandbox, image):
    r = sandbox.run("d = image.getdata()\nprint(isinstance(d, tuple), len(d), d[0] == image.getpixel((0, 0)))",
                    [image])
    assert r.ok, r.error
    assert r.stdout == "True 3072 True\n"


def test_library_callables_keep_their_interface(sandbox, image):
    code = ("a = np.array(image)\nm = np.maximum.reduce([a, 255 - a])\n"
            "print(m.shape, np.add.accumulate([1, 2, 3]).tolist(), math.floor(2.5))")
    r = sandbox.run(code, [image])
    assert r.ok, r.error
    assert r.stdout == "(48, 64, 3) [1, 3, 6] 2\n"


def test_resize_with_box_frame(sandbox, image):
    r = sandbox.run("result = image.resize((20, 10), box=(10, 10, 50, 30))", [image])
    assert r.ops[0] == {"name": "crop", "box": [10, 10, 50, 30], "source_box": [10.0, 10.0, 50.0, 30.0]}
    assert r.frame.box_to_source([0, 0, 20, 10]) == [10.0, 10.0, 50.0, 30.0]


def test_imageops_crop_box(sandbox, image):
    r = sandbox.run("result = ImageOps.crop(image, 5)", [image])
    assert r.ops[0]["box"] == [5, 5, 59, 43] and r.image.size == (54, 38)


def test_every_vocabulary_op_has_a_case():
    from cv_env.task import CORE_OPS

    vocabulary = set(CORE_OPS) | {"resize", "brightness", "contrast", "sharpness", "color", "grayscale", "blur",
                                  "sharpen", "threshold", "invert", "equalize", "autocontrast", "denoise",
                                  "edges", "draw"}
    covered = {name for _, expected in CASES.values() for name in expected}
    assert vocabulary <= covered, vocabulary - covered
