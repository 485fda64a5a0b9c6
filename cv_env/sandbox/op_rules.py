"""Rules naming what a PIL / numpy / cv2 call did, in the shared op vocabulary.

A rule takes the call (`Context`) and returns a `Step`: the ops (`rotate_90`, `crop` with its
box, `contrast`, ...) and the geometry as a `Frame` from the output's pixels to the input's
(`KEEP` for ops that move no pixel, None when the geometry cannot be followed). Geometric
steps ask to be verified against the pixels; pixel ops ask to be dropped when no pixel changed.

Conventions (DESIGN.md "Vocabulary"): rotations are counter-clockwise as
`PIL.Image.rotate(d, expand=True)`; `np.rot90(a, k)` turns counter-clockwise, so k=3 is
`rotate_270`; `cv2.ROTATE_90_CLOCKWISE` is `rotate_270`; a left-right mirror is
`flip_horizontal`; a transpose is `rotate_90` then `flip_vertical`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import ImageDraw, ImageEnhance

from cv_env.frames import Frame
from cv_env.sandbox.pixels import KEEP, Step, is_image, is_pixels, size_of


@dataclass
class Context:
    inp: Any
    out: Any
    in_size: tuple[int, int]
    args: tuple
    kwargs: dict
    self_obj: Any = None
    in_place: bool = False

    def arg(self, index: int, name: str, default=None):
        """Argument by position (counting after the image) or keyword."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if len(self.args) > index else default

    @property
    def identity(self) -> Frame:
        return Frame.identity(self.in_size)


def primary_input(args: tuple, kwargs: dict, tracker) -> Any:
    """The first tracked image/array among a call's arguments (the one the op works on)."""
    for value in list(args) + list(kwargs.values()):
        if is_pixels(value) and tracker.node(value) is not None:
            return value
    return None


def owner_key(obj: Any) -> str | None:
    """The rule-table prefix for methods of `obj`, or None if its methods are not tracked."""
    if is_image(obj):
        return "Image"
    if isinstance(obj, np.ndarray):
        return "ndarray"
    if isinstance(obj, ImageEnhance._Enhance):
        return "enhance." + type(obj).__name__
    if isinstance(obj, ImageDraw.ImageDraw):
        return "ImageDraw"
    if type(obj).__name__ == "CLAHE":
        return "CLAHE"
    return None


def method_input(obj: Any, args: tuple, kwargs: dict) -> Any:
    """The image a method works on: the object itself, or the image an enhancer/drawer holds."""
    if is_pixels(obj):
        return obj
    if isinstance(obj, ImageEnhance._Enhance):
        return obj.image
    if isinstance(obj, ImageDraw.ImageDraw):
        return getattr(obj, "_image", None)
    for value in args:
        if is_pixels(value):
            return value
    return None


# -- building blocks --------------------------------------------------------------------------


def pixel_op(name: str | None) -> Callable[[Context], Step]:
    """An op that keeps geometry (contrast, blur, ...); dropped if no pixel changed."""
    return lambda ctx: Step([{"name": name}] if name else [], KEEP, pixel_op=True)


def draw_op(ctx: Context) -> Step:
    return Step([{"name": "draw"}], KEEP)


def identity_op(ctx: Context) -> Step:
    """Conversions that keep every pixel (np.array(img), Image.fromarray, copy, astype)."""
    if size_of(ctx.out) != ctx.in_size:
        return None
    return Step([], KEEP)


def rotation(ctx: Context, degrees: int) -> Step:
    d = degrees % 360
    if d == 0:
        return Step([], KEEP)
    return Step([{"name": f"rotate_{d}"}], ctx.identity.rotate(d), verify=True)


def flip(ctx: Context, horizontal: bool) -> Step:
    frame = ctx.identity.flip_horizontal() if horizontal else ctx.identity.flip_vertical()
    return Step([{"name": "flip_horizontal" if horizontal else "flip_vertical"}], frame, verify=True)


def transpose(ctx: Context) -> Step:
    """(x, y) -> (y, x): rotate_90 then flip_vertical."""
    frame = ctx.identity.rotate(90).flip_vertical()
    return Step([{"name": "rotate_90"}, {"name": "flip_vertical"}], frame, verify=True)


def crop(ctx: Context, box) -> Step:
    w, h = ctx.in_size
    box = [int(round(float(v))) for v in box]
    if box == [0, 0, w, h]:
        return Step([], KEEP)
    return Step([{"name": "crop", "box": box}], ctx.identity.crop(box), verify=True)


def resize(ctx: Context) -> Step:
    out_size = size_of(ctx.out)
    if out_size == ctx.in_size:
        return Step([{"name": "resize"}], KEEP, pixel_op=True)
    return Step([{"name": "resize", "size": list(out_size)}], ctx.identity.resize(out_size))


def pad(ctx: Context, left: int, top: int, right: int, bottom: int) -> Step:
    w, h = ctx.in_size
    box = [-int(left), -int(top), w + int(right), h + int(bottom)]
    return Step([{"name": "pad", "box": box}], ctx.identity.crop(box), verify=True)


# -- PIL ---------------------------------------------------------------------------------------

_TRANSPOSE_METHODS = {0: ("flip", True), 1: ("flip", False), 2: ("rot", 90), 3: ("rot", 180),
                      4: ("rot", 270), 5: ("transpose", None), 6: ("transverse", None)}


def pil_transpose(ctx: Context) -> Step:
    kind, value = _TRANSPOSE_METHODS[int(ctx.arg(0, "method"))]
    if kind == "flip":
        return flip(ctx, value)
    if kind == "rot":
        return rotation(ctx, value)
    if kind == "transpose":
        return transpose(ctx)
    frame = ctx.identity.rotate(90).flip_horizontal()  # (x, y) -> (w - y, h - x)
    return Step([{"name": "rotate_90"}, {"name": "flip_horizontal"}], frame, verify=True)


def pil_rotate(ctx: Context) -> Step:
    angle = float(ctx.arg(0, "angle"))
    expand = bool(ctx.arg(2, "expand", False))
    if ctx.arg(3, "center") is not None or ctx.arg(4, "translate") is not None:
        return Step([{"name": "rotate", "angle": angle}], None)
    d = angle % 360
    w, h = ctx.in_size
    if d == 0:
        return Step([], KEEP)
    if d in (90.0, 180.0, 270.0):
        d = int(d)
        if expand or d == 180 or w == h:
            return rotation(ctx, d)
        # Without expand the canvas keeps its size and turns about its centre.
        if d == 90:
            m = ((0.0, -1.0, (w + h) / 2), (1.0, 0.0, (h - w) / 2))
        else:
            m = ((0.0, 1.0, (w - h) / 2), (-1.0, 0.0, (w + h) / 2))
        return Step([{"name": f"rotate_{d}"}], Frame((w, h), (w, h), m), verify=True)
    return Step([{"name": "rotate", "angle": round(angle, 3)}], None)


def pil_crop(ctx: Context) -> Step:
    box = ctx.arg(0, "box")
    return Step([], KEEP) if box is None else crop(ctx, box)


def pil_resize(ctx: Context) -> Step:
    box = ctx.arg(2, "box")
    if box is None:
        return resize(ctx)
    step = crop(ctx, box)
    out_size = size_of(ctx.out)
    frame = ctx.identity.crop(box).resize(out_size) if step.ops else ctx.identity.resize(out_size)
    return Step(step.ops + [{"name": "resize", "size": list(out_size)}], frame)


def pil_convert(ctx: Context) -> Step:
    mode_in = ctx.inp.mode if is_image(ctx.inp) else None
    mode_out = ctx.out.mode
    if mode_out == "L" and mode_in not in ("L", "1", None):
        return Step([{"name": "grayscale"}], KEEP)
    if mode_out == "1":
        return Step([{"name": "threshold"}], KEEP)
    return Step([], KEEP)


_FILTER_NAMES = {
    "GaussianBlur": "blur", "BoxBlur": "blur", "BLUR": "blur", "SMOOTH": "blur", "SMOOTH_MORE": "blur",
    "SHARPEN": "sharpen", "UnsharpMask": "sharpen", "DETAIL": "sharpen", "EDGE_ENHANCE": "sharpen",
    "EDGE_ENHANCE_MORE": "sharpen", "FIND_EDGES": "edges", "CONTOUR": "edges",
    "MedianFilter": "denoise", "ModeFilter": "denoise", "RankFilter": "denoise",
    "MinFilter": "morphology", "MaxFilter": "morphology", "EMBOSS": "emboss", "Kernel": "filter",
}


def pil_filter(ctx: Context) -> Step:
    f = ctx.arg(0, "filter")
    name = f.__name__ if isinstance(f, type) else type(f).__name__
    return pixel_op(_FILTER_NAMES.get(name, "filter"))(ctx)


def pil_point(ctx: Context) -> Step:
    out = ctx.out
    binary = is_image(out) and out.getcolors(2) is not None
    return pixel_op("threshold" if binary else "point")(ctx)


def pil_thumbnail(ctx: Context) -> Step:
    return resize(Context(ctx.inp, ctx.out, ctx.in_size, ctx.args, ctx.kwargs))


def imageops_crop(ctx: Context) -> Step:
    b = int(ctx.arg(1, "border", 0))
    w, h = ctx.in_size
    return crop(ctx, [b, b, w - b, h - b])


def imageops_expand(ctx: Context) -> Step:
    b = ctx.arg(1, "border", 0)
    if not isinstance(b, int):
        return None
    return pad(ctx, b, b, b, b)


def imageops_exif(ctx: Context) -> Step:
    return Step([], KEEP) if size_of(ctx.out) == ctx.in_size else None


# -- numpy ---------------------------------------------------------------------------------------


def np_rot90(ctx: Context) -> Step:
    k = int(ctx.arg(1, "k", 1))
    axes = tuple(ctx.arg(2, "axes", (0, 1)))
    if axes == (1, 0):
        k = -k
    elif axes != (0, 1):
        return None
    return rotation(ctx, 90 * k)


def np_flip(ctx: Context) -> Step:
    axis = ctx.arg(1, "axis", None)
    axes = {0, 1} if axis is None else ({axis} if isinstance(axis, int) else set(axis))
    ndim = np.ndim(ctx.inp)
    axes = {a % ndim for a in axes}
    geo = axes & {0, 1}
    if geo == {0, 1}:
        return rotation(ctx, 180)
    if geo == {0}:
        return flip(ctx, horizontal=False)
    if geo == {1}:
        return flip(ctx, horizontal=True)
    return Step([], KEEP)  # channel order only (RGB <-> BGR)


def np_transpose(ctx: Context) -> Step:
    axes = ctx.arg(1, "axes", None)
    ndim = np.ndim(ctx.inp)
    if axes is None:
        return transpose(ctx) if ndim == 2 else None
    return transpose(ctx) if tuple(axes)[:2] == (1, 0) and list(axes)[2:] == list(range(2, ndim)) else None


def ndarray_transpose(ctx: Context) -> Step:
    axes = ctx.args[0] if len(ctx.args) == 1 and not isinstance(ctx.args[0], int) else ctx.args
    ndim = ctx.inp.ndim
    if not axes:
        return transpose(ctx) if ndim == 2 else None
    return transpose(ctx) if tuple(axes)[:2] == (1, 0) and list(axes)[2:] == list(range(2, ndim)) else None


def np_swapaxes(ctx: Context) -> Step:
    pair = {int(ctx.arg(1, "axis1")), int(ctx.arg(2, "axis2"))}
    return transpose(ctx) if pair == {0, 1} else None


def slice_rule(key: Any) -> Callable[[Context], Step]:
    """`a[y1:y2, x1:x2]` is a crop; a step of -1 is a flip; other indexing loses the geometry."""

    def rule(ctx: Context) -> Step:
        k = key if isinstance(key, tuple) else (key,)
        ndim = ctx.inp.ndim
        if len(k) == 2 and k[0] is Ellipsis and ndim == 3:  # a[..., ::-1], a[..., 0]: channels only
            return Step([], KEEP) if size_of(ctx.out) == ctx.in_size else None
        if any(v is Ellipsis for v in k):
            return None
        rows = k[0] if len(k) > 0 else slice(None)
        cols = k[1] if len(k) > 1 else slice(None)
        if not isinstance(rows, slice) or not isinstance(cols, slice) or ctx.out.ndim < 2:
            return None
        w, h = ctx.in_size
        y0, y1, ys = rows.indices(h)
        x0, x1, xs = cols.indices(w)
        if ys not in (1, -1) or xs not in (1, -1):
            return None
        top, bottom = (y0, max(y1, y0)) if ys == 1 else (y1 + 1, y0 + 1)
        left, right = (x0, max(x1, x0)) if xs == 1 else (x1 + 1, x0 + 1)
        step = crop(ctx, [left, top, right, bottom])
        frame = ctx.identity.crop([left, top, right, bottom]) if step.ops else ctx.identity
        ops = list(step.ops)
        if ys == -1 and xs == -1:
            frame, ops = frame.rotate(180), ops + [{"name": "rotate_180"}]
        elif ys == -1:
            frame, ops = frame.flip_vertical(), ops + [{"name": "flip_vertical"}]
        elif xs == -1:
            frame, ops = frame.flip_horizontal(), ops + [{"name": "flip_horizontal"}]
        if not ops:
            return Step([], KEEP)
        return Step(ops, frame, verify=True)

    return rule


# -- cv2 -----------------------------------------------------------------------------------------

_CV2_ROTATE = {0: 270, 1: 180, 2: 90}  # ROTATE_90_CLOCKWISE, ROTATE_180, ROTATE_90_COUNTERCLOCKWISE
_CV2_GRAY_CODES = {6, 7, 10, 11}  # BGR2GRAY, RGB2GRAY, BGRA2GRAY, RGBA2GRAY


def cv2_rotate(ctx: Context) -> Step:
    return rotation(ctx, _CV2_ROTATE[int(ctx.arg(1, "rotateCode"))])


def cv2_flip(ctx: Context) -> Step:
    code = int(ctx.arg(1, "flipCode"))
    if code == 0:
        return flip(ctx, horizontal=False)
    if code > 0:
        return flip(ctx, horizontal=True)
    return rotation(ctx, 180)


def cv2_cvtcolor(ctx: Context) -> Step:
    code = int(ctx.arg(1, "code"))
    if code in _CV2_GRAY_CODES:
        return Step([{"name": "grayscale"}], KEEP)
    return Step([], KEEP) if size_of(ctx.out) == ctx.in_size else None


def cv2_scale_abs(ctx: Context) -> Step:
    alpha, beta = float(ctx.arg(2, "alpha", 1.0)), float(ctx.arg(3, "beta", 0.0))  # (src, dst, alpha, beta)
    ops = ([{"name": "contrast"}] if alpha != 1.0 else []) + ([{"name": "brightness"}] if beta != 0.0 else [])
    return Step(ops, KEEP, pixel_op=True)


def cv2_filter2d(ctx: Context) -> Step:
    kernel = np.asarray(ctx.arg(2, "kernel"), dtype=float)
    if kernel.ndim == 2 and kernel.size > 1:
        centre = kernel[kernel.shape[0] // 2, kernel.shape[1] // 2]
        if abs(kernel.sum() - 1) < 1e-6 and centre > 1:
            return pixel_op("sharpen")(ctx)
        if (kernel >= 0).all():
            return pixel_op("blur")(ctx)
    return pixel_op("filter")(ctx)


def cv2_warp_affine(ctx: Context) -> Step:
    m = np.asarray(ctx.arg(1, "M"), dtype=float)
    flags = int(ctx.arg(3, "flags", 0) or 0)
    a = np.vstack([m, [0.0, 0.0, 1.0]])
    inv = a if flags & 16 else np.linalg.inv(a)  # WARP_INVERSE_MAP: M already maps dst -> src
    # cv2 puts pixel centres on integers; frames put them at +0.5.
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    unshift = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
    cont = shift @ inv @ unshift
    matrix = (tuple(float(v) for v in cont[0]), tuple(float(v) for v in cont[1]))
    frame = Frame(size_of(ctx.out), ctx.in_size, matrix)
    angle = math.degrees(math.atan2(a[0, 1], a[0, 0])) % 360  # getRotationMatrix2D: + is CCW
    for d in (0, 90, 180, 270, 360):
        if abs(angle - d) < 1e-6:
            name = f"rotate_{d % 360}" if d % 360 else "warp"
            return Step([{"name": name}], frame, verify=d % 360 != 0)
    return Step([{"name": "rotate", "angle": round(angle, 3)}], frame)


def cv2_border(ctx: Context) -> Step:
    top, bottom, left, right = (int(ctx.arg(i, n)) for i, n in enumerate(("top", "bottom", "left", "right"), 1))
    return pad(ctx, left, top, right, bottom)


def unknown_rule(ctx: Context) -> Step:
    """A call no rule names: same-size output keeps the geometry (its pixel change is named
    from the pixels, e.g. `a.mean(axis=2)` is grayscale); anything else loses the geometry."""
    return Step([], KEEP, classify=True) if size_of(ctx.out) == ctx.in_size else None


FUNCTION_RULES: dict[str, Callable[[Context], Step]] = {
    # PIL.Image
    "PIL.Image.fromarray": identity_op, "PIL.Image.blend": pixel_op("blend"),
    "PIL.Image.composite": pixel_op("blend"), "PIL.Image.eval": pixel_op("point"),
    # PIL.ImageOps
    "PIL.ImageOps.grayscale": pixel_op("grayscale"), "PIL.ImageOps.invert": pixel_op("invert"),
    "PIL.ImageOps.equalize": pixel_op("equalize"), "PIL.ImageOps.autocontrast": pixel_op("autocontrast"),
    "PIL.ImageOps.posterize": pixel_op("posterize"), "PIL.ImageOps.solarize": pixel_op("solarize"),
    "PIL.ImageOps.colorize": pixel_op("colorize"),
    "PIL.ImageOps.mirror": lambda c: flip(c, True), "PIL.ImageOps.flip": lambda c: flip(c, False),
    "PIL.ImageOps.crop": imageops_crop, "PIL.ImageOps.expand": imageops_expand,
    "PIL.ImageOps.contain": resize, "PIL.ImageOps.scale": resize, "PIL.ImageOps.cover": resize,
    "PIL.ImageOps.exif_transpose": imageops_exif,
    "PIL.ImageChops.invert": pixel_op("invert"),
    # numpy
    "numpy.array": identity_op, "numpy.asarray": identity_op, "numpy.ascontiguousarray": identity_op,
    "numpy.copy": identity_op, "numpy.rot90": np_rot90, "numpy.flip": np_flip,
    "numpy.fliplr": lambda c: flip(c, True), "numpy.flipud": lambda c: flip(c, False),
    "numpy.transpose": np_transpose, "numpy.swapaxes": np_swapaxes,
    "numpy.invert": pixel_op("invert"),
    # cv2
    "cv2.rotate": cv2_rotate, "cv2.flip": cv2_flip, "cv2.transpose": transpose, "cv2.resize": resize,
    "cv2.pyrDown": resize, "cv2.pyrUp": resize, "cv2.cvtColor": cv2_cvtcolor,
    "cv2.GaussianBlur": pixel_op("blur"), "cv2.blur": pixel_op("blur"), "cv2.boxFilter": pixel_op("blur"),
    "cv2.medianBlur": pixel_op("denoise"), "cv2.bilateralFilter": pixel_op("denoise"),
    "cv2.fastNlMeansDenoising": pixel_op("denoise"), "cv2.fastNlMeansDenoisingColored": pixel_op("denoise"),
    "cv2.Canny": pixel_op("edges"), "cv2.Sobel": pixel_op("edges"), "cv2.Scharr": pixel_op("edges"),
    "cv2.Laplacian": pixel_op("edges"), "cv2.threshold": pixel_op("threshold"),
    "cv2.adaptiveThreshold": pixel_op("threshold"), "cv2.inRange": pixel_op("threshold"),
    "cv2.equalizeHist": pixel_op("equalize"), "cv2.bitwise_not": pixel_op("invert"),
    "cv2.convertScaleAbs": cv2_scale_abs, "cv2.normalize": pixel_op("autocontrast"),
    "cv2.LUT": pixel_op("point"), "cv2.filter2D": cv2_filter2d, "cv2.detailEnhance": pixel_op("sharpen"),
    "cv2.erode": pixel_op("morphology"), "cv2.dilate": pixel_op("morphology"),
    "cv2.morphologyEx": pixel_op("morphology"), "cv2.addWeighted": pixel_op("blend"),
    "cv2.warpAffine": cv2_warp_affine, "cv2.copyMakeBorder": cv2_border,
    **{f"cv2.{n}": draw_op for n in ("rectangle", "circle", "line", "putText", "ellipse", "polylines",
                                      "fillPoly", "fillConvexPoly", "arrowedLine", "drawContours")},
}

METHOD_RULES: dict[str, Callable[[Context], Step]] = {
    "Image.rotate": pil_rotate, "Image.transpose": pil_transpose, "Image.crop": pil_crop,
    "Image.resize": pil_resize, "Image.reduce": resize, "Image.thumbnail": pil_thumbnail,
    "Image.convert": pil_convert, "Image.filter": pil_filter, "Image.point": pil_point,
    "Image.copy": identity_op, "Image.paste": draw_op, "Image.putpixel": draw_op,
    "Image.putdata": draw_op, "Image.quantize": pixel_op("quantize"),
    "ndarray.copy": identity_op, "ndarray.astype": identity_op, "ndarray.transpose": ndarray_transpose,
    "ndarray.T": lambda c: transpose(c) if c.inp.ndim == 2 else None,
    "ndarray.swapaxes": lambda c: transpose(c) if {int(a) for a in c.args[:2]} == {0, 1} else None,
    "ndarray.clip": pixel_op(None),
    "enhance.Brightness.enhance": pixel_op("brightness"), "enhance.Contrast.enhance": pixel_op("contrast"),
    "enhance.Color.enhance": pixel_op("color"), "enhance.Sharpness.enhance": pixel_op("sharpness"),
    "CLAHE.apply": pixel_op("equalize"),
    **{f"ImageDraw.{n}": draw_op for n in (
        "rectangle", "rounded_rectangle", "line", "ellipse", "circle", "text", "multiline_text",
        "polygon", "regular_polygon", "point", "arc", "chord", "pieslice", "bitmap")},
}


def classify_pixel_change(before: np.ndarray, after: np.ndarray) -> str | None:
    """Name a same-size pixel change made outside the tracked API (numpy arithmetic)."""
    step = max(1, int(math.sqrt(before.shape[0] * before.shape[1] / 65536)))
    x = before[::step, ::step].astype(np.float64)
    y = after[::step, ::step].astype(np.float64)
    colour_in = x.ndim == 3 and x.shape[2] >= 3 and not np.allclose(x[..., 0], x[..., 1])
    grey_out = y.ndim == 2 or (y.shape[2] >= 3 and np.array_equal(y[..., 0], y[..., 1]) and np.array_equal(y[..., 1], y[..., 2]))
    if len(np.unique(y)) <= 2 < len(np.unique(x)):
        return "threshold"
    if colour_in and grey_out:
        return "grayscale"
    if x.shape != y.shape:
        return None
    if np.abs(y - (255.0 - x)).mean() < 2.0:
        return "invert"
    xf, yf = x.ravel(), y.ravel()
    unclipped = (yf > 0) & (yf < 255)  # clipping at 0/255 bends an otherwise linear change
    if unclipped.sum() > 100:
        xf, yf = xf[unclipped], yf[unclipped]
    if xf.std() < 1e-9:
        return "brightness"
    a, b = np.polyfit(xf, yf, 1)
    fit = np.abs(a * xf + b - yf).mean()
    if fit < 4.0:
        return "brightness" if abs(a - 1) < 0.05 else "contrast"
    return "filter"
