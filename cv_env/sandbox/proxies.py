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
# (`void`/`record` build structured scalars over raw bytes; the bit generator accessors hand out
# numpy's global generator, its lock and its raw-memory interfaces.)
_NUMPY_DENY = frozenset("""
load save savez savez_compressed loadtxt savetxt genfromtxt fromfile fromregex memmap DataSource
ctypeslib lib testing f2py distutils show_config show_runtime get_include info source who
setbufsize seterrcall geterrcall typing core char rec ma matlib polynomial strings dtypes
exceptions version os sys void record get_bit_generator set_bit_generator bit_generator
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
    if module_name in ("numpy", "numpy.random"):
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
        where = f"{self._name}.{name}"
        value = guard_value(value, self._proxies, where)
        if isinstance(value, _MUTABLE):
            return value.copy()  # a copy each time: the snippet cannot poison module state
        if any(value is t for t in _BUFFER_TYPES):
            value = ArrayTypeProxy(value, self._proxies)
        elif callable(value) and not isinstance(value, (type, ModuleProxy, _UFUNC)):
            # Ufuncs stay unwrapped: they are elementwise and carry methods (np.add.reduce).
            if self._tracked:
                value = self._wrap(where, value)
            value = guard_calls(value, self._proxies, where)
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
# Values that need no check (the fast path of `guard_value`), and containers of them.
_PLAIN = frozenset({int, float, bool, str, bytes, complex, type(None)})
_PLAIN_OR_CONTAINER = _PLAIN | {tuple, list, dict}


def is_pil_core(value: object) -> bool:
    cls = type(value)
    return cls.__module__ == "builtins" and cls.__name__ in _PIL_CORE_TYPES


def guard_value(value: object, proxies: dict[str, ModuleProxy], where: str, nested: bool = True) -> object:
    """Check a value a snippet is about to hold (an attribute, a call's result, an item, an
    iterated element): modules become proxies or are refused, interpreter internals, Pillow's
    C objects and arrays of Python objects are refused. The elements of a tuple, list or dict
    are checked too, one level deep (a library function that returns a module in a tuple is
    caught; deeper containers are checked when the snippet takes them out)."""
    cls = type(value)
    if cls in _PLAIN:
        return value
    if isinstance(value, types.ModuleType):
        proxy = proxies.get(value.__name__)
        if proxy is None:
            raise SandboxViolation(f"{where} is the module {value.__name__!r}, which the sandbox does not offer")
        return proxy
    if isinstance(value, _FORBIDDEN_TYPES):
        raise SandboxViolation(f"{where} is an interpreter internal; the sandbox does not offer it")
    if is_pil_core(value):
        raise SandboxViolation(f"{where} is a Pillow internal; use the public Image API instead")
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise SandboxViolation(f"{where} is an array of Python objects, which the sandbox does not offer; "
                               "use numeric arrays")
    if not nested:
        return value
    if cls in (tuple, list) and value and not set(map(type, value)) <= _PLAIN_OR_CONTAINER:
        checked = [guard_value(v, proxies, where, nested=False) for v in value]
        if any(c is not v for c, v in zip(checked, value)):
            value = cls(checked)
    elif cls is dict and value and not set(map(type, value.values())) <= _PLAIN_OR_CONTAINER:
        for v in value.values():
            if guard_value(v, proxies, where, nested=False) is not v:
                raise SandboxViolation(f"{where} holds a module, which the sandbox does not offer")
    return value


def guard_calls(fn: Callable, proxies: dict[str, ModuleProxy], where: str) -> Callable:
    """`fn`, with every argument and result checked: no array of Python objects goes in (it
    could be read as raw memory) and what comes out passes `guard_value`."""

    def guarded(*args, **kwargs):
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, np.ndarray) and arg.dtype.hasobject:
                raise SandboxViolation(f"{where}: arrays of Python objects are not available in the sandbox")
        return guard_value(fn(*args, **kwargs), proxies, where)

    guarded.__name__ = getattr(fn, "__name__", where.rsplit(".", 1)[-1])
    guarded.__doc__ = getattr(fn, "__doc__", None)
    return guarded


class ArrayTypeProxy:
    """`np.ndarray` / `np.recarray` for snippets: `isinstance` works and arrays can be made,
    but never over a raw buffer, with Python-object elements, or by subclassing."""

    __slots__ = ("_type", "_proxies")

    def __init__(self, array_type: type, proxies: dict[str, ModuleProxy]):
        object.__setattr__(self, "_type", array_type)
        object.__setattr__(self, "_proxies", proxies)

    def __call__(self, *args, **kwargs):
        name = self._type.__name__
        if len(args) > 2 or {"buffer", "buf", "offset", "strides"} & set(kwargs):
            raise SandboxViolation(f"np.{name} over a buffer is not available in the sandbox; use np.zeros, "
                                   f"np.array or np.frombuffer")
        dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
        if dtype is not None and np.dtype(dtype).hasobject:
            raise SandboxViolation(f"np.{name} of Python objects is not available in the sandbox")
        return guard_value(self._type(*args, **kwargs), self._proxies, f"np.{name}")

    def __instancecheck__(self, obj) -> bool:
        return isinstance(obj, self._type)

    def __subclasscheck__(self, cls) -> bool:
        return issubclass(cls, self._type)

    def __mro_entries__(self, bases):
        raise SandboxViolation(f"a subclass of np.{self._type.__name__} is not available in the sandbox; "
                               "use plain arrays")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise SandboxViolation(f"np.{self._type.__name__}.{name} is not available in the sandbox")
        return guard_value(getattr(self._type, name), self._proxies, f"np.{self._type.__name__}.{name}")

    def __setattr__(self, name, value):
        raise SandboxViolation(f"cannot change np.{self._type.__name__}: modules are read-only in the sandbox")

    def __repr__(self) -> str:
        return f"<class 'numpy.{self._type.__name__}'>"


# numpy's array types whose constructors take a raw buffer.
_BUFFER_TYPES = (np.ndarray, np.recarray)


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
