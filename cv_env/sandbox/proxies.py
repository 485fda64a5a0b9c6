"""Module proxies: what a snippet gets when it imports an allowed module.

Allowing a module exposes everything it imported (`PIL.Image.os`, `cv2.os`, `np.ctypeslib`,
`np.lib.stride_tricks.as_strided` carry no underscore), so a proxy never hands out the real
module: every attribute goes through a per-module policy, and what the attribute *returns* is
checked too (a module becomes a proxy or is refused; a module-level list/dict is copied so a
snippet cannot poison the worker's state; a function is wrapped by the op tracker).
"""

from __future__ import annotations

import types
from typing import Callable

import numpy as np

_UFUNC = np.ufunc

# Whole module names a snippet may import. Nothing else: `import numpy.lib` or `import os` fail.
ALLOWED_MODULES: tuple[str, ...] = (
    "numpy", "numpy.random", "numpy.linalg", "numpy.fft",
    "PIL", "PIL.Image", "PIL.ImageOps", "PIL.ImageEnhance", "PIL.ImageFilter", "PIL.ImageDraw",
    "PIL.ImageFont", "PIL.ImageChops", "PIL.ImageStat", "PIL.ImageColor",
    "cv2",
    "math", "cmath", "random", "statistics", "itertools", "functools", "collections", "colorsys",
    "re", "json",
)

# Names refused on a module although they are public: file/network I/O, raw memory, state.
_NUMPY_DENY = frozenset("""
load save savez savez_compressed loadtxt savetxt genfromtxt fromfile fromregex memmap DataSource
ctypeslib lib testing f2py distutils show_config show_runtime get_include info source who
setbufsize seterrcall geterrcall typing core char rec ma matlib polynomial strings dtypes
exceptions version os sys
""".split())
_PIL_IMAGE_DENY = frozenset("""
open core register_open register_mime register_save register_save_all register_extension
register_extensions register_decoder register_encoder registered_extensions init preinit
ID OPEN SAVE SAVE_ALL EXTENSION MIME DECODERS ENCODERS warnings logging
""".split())
_PIL_FONT_ALLOW = frozenset({"load_default"})
_RANDOM_DENY = frozenset({"SystemRandom"})
# update_wrapper/wraps copy attributes by name with the real getattr/setattr, dunders included.
_FUNCTOOLS_ALLOW = frozenset({"reduce", "partial", "lru_cache", "cache", "cmp_to_key", "total_ordering"})
_JSON_DENY = frozenset({"load", "dump"})

# cv2 exposes ~2500 names including imread/imwrite/VideoCapture/FileStorage/dnn/CascadeClassifier:
# only image-processing functions listed here are offered (plus upper-case constants).
_CV2_ALLOW = frozenset("""
resize rotate flip transpose cvtColor GaussianBlur blur medianBlur bilateralFilter boxFilter
filter2D sepFilter2D Canny Sobel Scharr Laplacian threshold adaptiveThreshold equalizeHist
createCLAHE warpAffine warpPerspective getRotationMatrix2D getAffineTransform
getPerspectiveTransform invertAffineTransform copyMakeBorder addWeighted add subtract multiply
divide absdiff bitwise_and bitwise_or bitwise_not bitwise_xor convertScaleAbs normalize LUT
split merge inRange erode dilate morphologyEx getStructuringElement findContours drawContours
contourArea boundingRect minAreaRect boxPoints arcLength approxPolyDP convexHull moments
HoughLines HoughLinesP HoughCircles rectangle circle line putText ellipse polylines fillPoly
fillConvexPoly arrowedLine getTextSize fastNlMeansDenoising fastNlMeansDenoisingColored
detailEnhance edgePreservingFilter stylization pencilSketch pyrDown pyrUp matchTemplate
minMaxLoc mean meanStdDev countNonZero calcHist connectedComponents
connectedComponentsWithStats distanceTransform goodFeaturesToTrack cornerHarris kmeans sqrt
pow magnitude phase cartToPolar dft idft imencode imdecode hconcat vconcat remap
findNonZero reduce sumElems minEnclosingCircle fitLine transform perspectiveTransform
floodFill inpaint applyColorMap getGaussianKernel max min exp log
""".split())


def _cv2_allows(name: str, value: object) -> bool:
    if name in _CV2_ALLOW:
        return True
    # Constants (COLOR_BGR2GRAY, ROTATE_90_CLOCKWISE, ...) are plain numbers.
    return name[:1].isupper() and isinstance(value, (int, float))


def _policy(module_name: str) -> Callable[[str, object], bool]:
    if module_name == "numpy":
        return lambda n, v: n not in _NUMPY_DENY
    if module_name == "PIL.Image":
        return lambda n, v: n not in _PIL_IMAGE_DENY
    if module_name == "PIL.ImageFont":
        return lambda n, v: n in _PIL_FONT_ALLOW
    if module_name == "cv2":
        return _cv2_allows
    if module_name == "random":
        return lambda n, v: n not in _RANDOM_DENY
    if module_name == "functools":
        return lambda n, v: n in _FUNCTOOLS_ALLOW
    if module_name == "json":
        return lambda n, v: n not in _JSON_DENY
    return lambda n, v: True


class SandboxViolation(AttributeError):
    """Raised when a snippet reaches for something the sandbox does not offer."""


_MUTABLE = (list, dict, set, bytearray)


class ModuleProxy:
    """Stands in for an allowed module; only its image-processing API is reachable.

    `wrap` is called on every function handed out, so the op tracker sees each call.
    """

    __slots__ = ("_name", "_module", "_allows", "_wrap", "_cache", "_proxies", "_tracked")

    def __init__(self, module: types.ModuleType, wrap: Callable, proxies: dict[str, "ModuleProxy"]):
        object.__setattr__(self, "_name", module.__name__)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_allows", _policy(module.__name__))
        object.__setattr__(self, "_wrap", wrap)
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_proxies", proxies)
        # Only image libraries are instrumented; math, re, json, ... are handed out as they are.
        object.__setattr__(self, "_tracked", module.__name__.split(".")[0] in ("numpy", "PIL", "cv2"))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise SandboxViolation(f"{self._name}.{name} is not available in the sandbox")
        cache = self._cache
        if name in cache:
            return cache[name]
        try:
            value = getattr(self._module, name)
        except AttributeError:
            raise AttributeError(f"module {self._name!r} has no attribute {name!r}") from None
        if not self._allows(name, value):
            raise SandboxViolation(
                f"{self._name}.{name} is not available in the sandbox (no files, processes or "
                f"raw memory); use the image-processing API instead"
            )
        value = guard_value(value, self._proxies, f"{self._name}.{name}")
        if isinstance(value, _MUTABLE):
            return value.copy()  # a copy each time: the snippet cannot poison module state
        if self._tracked and callable(value) and not isinstance(value, (type, ModuleProxy, _UFUNC)):
            # Ufuncs stay unwrapped: they are elementwise and carry methods (np.add.reduce).
            value = self._wrap(f"{self._name}.{name}", value)
        cache[name] = value
        return value

    def __setattr__(self, name, value):
        raise SandboxViolation(f"cannot change {self._name}.{name}: modules are read-only in the sandbox")

    def __delattr__(self, name):
        raise SandboxViolation(f"cannot delete {self._name}.{name}: modules are read-only in the sandbox")

    def __dir__(self):
        names = [n for n in dir(self._module) if not n.startswith("_")]
        return [n for n in names if self._allows(n, getattr(self._module, n, None))]

    def __repr__(self) -> str:
        return f"<sandboxed module {self._name}>"


_FORBIDDEN_TYPES = (types.FrameType, types.CodeType, types.TracebackType)
# Pillow's C objects (`draw.im`, `draw.draw`, `font.font`) expose unchecked low-level methods.
_PIL_CORE_TYPES = frozenset({"ImagingCore", "ImagingDraw", "ImagingFont", "Font", "ImagingDecoder",
                             "ImagingEncoder"})


def is_pil_core(value: object) -> bool:
    cls = type(value)
    return cls.__module__ == "builtins" and cls.__name__ in _PIL_CORE_TYPES


def guard_value(value: object, proxies: dict[str, ModuleProxy], where: str) -> object:
    """Check what an attribute access returns: modules become proxies or are refused."""
    if isinstance(value, types.ModuleType):
        proxy = proxies.get(value.__name__)
        if proxy is None:
            raise SandboxViolation(f"{where} is the module {value.__name__!r}, which the sandbox does not offer")
        return proxy
    if isinstance(value, _FORBIDDEN_TYPES):
        raise SandboxViolation(f"{where} is an interpreter internal; the sandbox does not offer it")
    if is_pil_core(value):
        raise SandboxViolation(f"{where} is a Pillow internal; use the public Image API instead")
    return value


def build_proxies(modules: dict[str, types.ModuleType], wrap: Callable) -> dict[str, ModuleProxy]:
    """One proxy per allowed module, sharing one table so `PIL.Image` from `PIL` is the same proxy."""
    proxies: dict[str, ModuleProxy] = {}
    for name, module in modules.items():
        proxies[name] = ModuleProxy(module, wrap, proxies)
    return proxies


def import_allowed_modules() -> dict[str, types.ModuleType]:
    """Import every allowed module (done once in the zygote, before any worker forks)."""
    import importlib

    return {name: importlib.import_module(name) for name in ALLOWED_MODULES}
