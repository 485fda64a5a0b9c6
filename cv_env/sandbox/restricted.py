"""Restricted compilation of model-written snippets and the guards the compiled code calls.

RestrictedPython rewrites `a.b` into `_getattr_(a, "b")`, `a[k]` into `_getitem_(a, k)`,
`a.b = v` / `a[k] = v` into `_write_(a)...`, `print` into a collector, and refuses names that
start with `_` at compile time. This module supplies those guards. It is one layer: the OS
layer (worker processes with rlimits, namespaces, seccomp) holds when this one does not.
"""

from __future__ import annotations

import builtins
import operator
import types
from collections import OrderedDict
from typing import Any

from RestrictedPython import compile_restricted_exec
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence, safe_builtins

from cv_env.sandbox.proxies import ALLOWED_MODULES, ModuleProxy, SandboxViolation, guard_calls, guard_value

SNIPPET_FILENAME = "<code>"

# Attribute names refused on every object: interpreter internals reachable without an
# underscore, and raw-memory handles (numpy arrays and bit generators: `ctypes`, `cffi`,
# `capsule`; bit generators' `lock`, which a snippet could keep to hang the next one).
_BLOCKED_ATTRS = frozenset("""
gi_frame gi_code gi_yieldfrom gi_running gi_suspended cr_frame cr_code cr_await cr_origin
ag_frame ag_code ag_await f_back f_globals f_locals f_builtins f_code f_trace tb_frame tb_next
co_code co_consts co_names mro func_globals ctypes cffi capsule lock
""".split())
# Per-type refusals: writing files, opening viewers, raw handles to C internals.
_IMAGE_BLOCKED = frozenset({"save", "show", "im", "fp", "getim", "tobitmap"})
_PIL_OBJECT_BLOCKED = frozenset({"im", "ptr", "font_variant", "save", "fp"})  # fonts, drawers, ...
_ARRAY_BLOCKED = frozenset({"tofile", "dump", "dumps", "data"})  # `data`: a memoryview of raw memory
_CV2_OBJECT_BLOCKED = frozenset({"save", "write", "read", "load", "open", "release"})
# Methods that walk attributes from a template ("{0.__class__}".format(x)), on any object:
# str, collections.UserString, and whatever else carries such a method.
_FORMAT_METHODS = frozenset({"format", "format_map"})
# Iterating these yields nothing that needs a check.
_PLAIN_ITERABLES = (range, str, bytes, bytearray)


class PrintCollector:
    """Bounded replacement for RestrictedPython's print collector (output floods stay small)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.truncated = False

    def write(self, text: str) -> None:
        if self.size >= self.limit:
            self.truncated = True
            return
        text = str(text)
        room = self.limit - self.size
        if len(text) > room:
            text, self.truncated = text[:room], True
        self.parts.append(text)
        self.size += len(text)

    def text(self) -> str:
        out = "".join(self.parts)
        if self.truncated:
            out += f"\n... [output truncated at {self.limit} characters]"
        return out


class _PrintFactory:
    """What `_print_` names: RestrictedPython calls it with `_getattr_` at the top of the snippet."""

    def __init__(self, collector: PrintCollector):
        self.collector = collector

    def __call__(self, _getattr_=None):
        return self

    def _call_print(self, *objects, sep=" ", end="\n", file=None, flush=False):
        if file is not None:
            raise SandboxViolation("print(file=...) is not available in the sandbox; print to stdout")
        self.collector.write(str(sep).join(str(o) for o in objects) + str(end))

    def __call_printed__(self):  # pragma: no cover - `printed` is rarely used
        return "".join(self.collector.parts)


_compile_cache: "OrderedDict[str, types.CodeType]" = OrderedDict()


def compile_snippet(code: str) -> types.CodeType:
    """Compile a snippet under RestrictedPython; raise SyntaxError with a readable message.

    Compiled code is cached per worker (RL groups often repeat the same snippet).
    """
    cached = _compile_cache.get(code)
    if cached is not None:
        _compile_cache.move_to_end(code)
        return cached
    result = compile_restricted_exec(code, filename=SNIPPET_FILENAME)
    if result.errors or result.code is None:
        raise SyntaxError("; ".join(result.errors) or "the code could not be compiled")
    compiled = result.code
    _compile_cache[code] = compiled
    if len(_compile_cache) > 64:
        _compile_cache.popitem(last=False)
    return compiled


_INPLACE = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift,
    ">>=": operator.irshift, "&=": operator.iand, "|=": operator.ior, "^=": operator.ixor,
    "@=": operator.imatmul,
}


class Guards:
    """The guard functions of one execution, bound to its proxies and op tracker.

    `tracker` (an `ops.LineageTracker`) sees every attribute read (`on_attribute`), subscript
    (`on_getitem`) and item write (`on_write`), which is how ops are detected.
    """

    def __init__(self, proxies: dict[str, ModuleProxy], tracker, image_types: tuple, array_type: type):
        self.proxies = proxies
        self.tracker = tracker
        self.image_types = image_types
        self.array_type = array_type
        self.snippet_classes: set[type] = set()

    # -- attribute reads ----------------------------------------------------------------------

    def getattr(self, obj: Any, name: str, *default):
        if type(name) is not str:
            raise TypeError("attribute name must be a string")
        if name.startswith("_") or name in _BLOCKED_ATTRS:
            raise SandboxViolation(f"attribute {name!r} is not available in the sandbox")
        if isinstance(obj, ModuleProxy):
            return getattr(obj, name, *default)
        cls = obj if isinstance(obj, type) else type(obj)
        if name in _FORMAT_METHODS and issubclass(cls, str):
            raise SandboxViolation("str.format is not available in the sandbox; use f-strings or %")
        if name in _IMAGE_BLOCKED and issubclass(cls, self.image_types):
            raise SandboxViolation(
                f"Image.{name} is not available in the sandbox (no files or viewers): "
                f"assign the image to `result` instead"
            )
        if name in _ARRAY_BLOCKED and issubclass(cls, self.array_type):
            raise SandboxViolation(f"ndarray.{name} is not available in the sandbox (no files or raw memory)")
        if name in _PIL_OBJECT_BLOCKED and (cls.__module__ or "").startswith("PIL"):
            raise SandboxViolation(f"{cls.__name__}.{name} is not available in the sandbox")
        if name in _CV2_OBJECT_BLOCKED and (cls.__module__ or "").startswith("cv2"):
            raise SandboxViolation(f"cv2 object method {name!r} is not available in the sandbox (no files)")
        try:
            value = getattr(obj, name)
        except AttributeError:
            if default:
                return default[0]
            raise
        if name in _FORMAT_METHODS and callable(value):
            raise SandboxViolation(f"{cls.__name__}.{name} is not available in the sandbox; use f-strings or %")
        value = guard_value(value, self.proxies, name)
        if isinstance(obj, type) and cls not in self.snippet_classes and isinstance(value, (list, dict, set)):
            return value.copy()  # class-level containers of library classes stay unpoisoned
        value = self.tracker.on_attribute(obj, name, value)
        if callable(value) and not isinstance(value, (type, ModuleProxy)) and type(obj) not in self.snippet_classes:
            value = guard_calls(value, self.proxies, f"{cls.__name__}.{name}")  # what a method returns is checked too
        return value

    def hasattr(self, obj: Any, name: str) -> bool:
        try:
            self.getattr(obj, name)
        except Exception:
            return False
        return True

    def getitem(self, obj: Any, key: Any):
        if isinstance(obj, ModuleProxy):
            raise SandboxViolation("modules cannot be indexed")
        value = guard_value(obj[key], self.proxies, "an item")
        return self.tracker.on_getitem(obj, key, value)

    def iter(self, obj: Any):
        """`for x in obj`: each element is checked like any other value a snippet receives."""
        if isinstance(obj, _PLAIN_ITERABLES):
            return iter(obj)
        if isinstance(obj, self.array_type):
            guard_value(obj, self.proxies, "an iterated array")
            return iter(obj)
        return map(self._guard_element, iter(obj))

    def _guard_element(self, value: Any) -> Any:
        return guard_value(value, self.proxies, "an iterated value")

    # -- writes ---------------------------------------------------------------------------------

    def write(self, obj: Any):
        if isinstance(obj, (list, dict, set, bytearray)):
            return obj
        if isinstance(obj, self.array_type):
            return _ItemWriter(obj, self.tracker)
        if type(obj).__name__ == "PixelAccess":  # px = image.load(); px[x, y] = colour
            return _ItemWriter(obj, self.tracker)
        if type(obj) in self.snippet_classes or (isinstance(obj, type) and obj in self.snippet_classes):
            return obj
        raise SandboxViolation(
            f"cannot modify attributes or items of {type(obj).__name__} objects in the sandbox; "
            f"make a new object instead"
        )

    def inplacevar(self, op: str, target: Any, value: Any):
        fn = _INPLACE.get(op)
        if fn is None:
            raise SandboxViolation(f"operator {op} is not supported")
        return fn(target, value)

    # -- imports and classes -----------------------------------------------------------------

    def import_(self, name: str, globals=None, locals=None, fromlist=(), level=0):
        if level != 0:
            raise ImportError("relative imports are not available in the sandbox")
        if name not in ALLOWED_MODULES:
            raise ImportError(
                f"import of {name!r} is not allowed in the sandbox; available modules: "
                + ", ".join(m for m in ALLOWED_MODULES if "." not in m or m.startswith("PIL."))
            )
        if fromlist:
            for item in fromlist:
                full = f"{name}.{item}"
                if full in self.proxies:
                    continue
                if not item.isidentifier() or item.startswith("_"):
                    raise ImportError(f"cannot import {item!r} from {name!r} in the sandbox")
            return self.proxies[name]
        return self.proxies[name.split(".")[0]]

    def build_class(self, func, name, *bases, **kwargs):
        if kwargs.pop("metaclass", type) is not type or kwargs:
            raise SandboxViolation("metaclasses and class keywords are not available in the sandbox")
        cls = builtins.__build_class__(func, name, *bases)
        self.snippet_classes.add(cls)
        return cls

    # -- the namespace the snippet runs in --------------------------------------------------

    def namespace(self, printer: PrintCollector, names: dict[str, Any]) -> dict[str, Any]:
        safe = dict(safe_builtins)
        for name in ("setattr", "delattr", "_getattr_", "compile", "open", "exec", "eval", "id"):
            safe.pop(name, None)
        safe.update({
            "__build_class__": self.build_class, "__import__": self.import_,
            "getattr": self.getattr, "hasattr": self.hasattr,
            "all": all, "any": any, "enumerate": enumerate, "filter": filter, "map": map,
            "max": max, "min": min, "sum": sum, "sorted": sorted, "reversed": reversed,
            "zip": zip, "list": list, "tuple": tuple, "dict": dict, "set": set,
            "frozenset": frozenset, "bytes": bytes, "iter": iter, "next": next, "object": object,
            "bin": bin, "property": property, "staticmethod": staticmethod, "classmethod": classmethod,
        })
        glb: dict[str, Any] = {
            "__builtins__": safe, "__name__": "snippet", "__metaclass__": type,
            "_getattr_": self.getattr, "_getitem_": self.getitem, "_write_": self.write,
            "_inplacevar_": self.inplacevar, "_getiter_": self.iter,
            "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
            "_unpack_sequence_": guarded_unpack_sequence,
            "_apply_": lambda f, *a, **k: f(*a, **k), "_print_": _PrintFactory(printer),
        }
        glb.update(names)
        return glb


class _ItemWriter:
    """What `_write_` returns for arrays and pixel access: item assignment works and is recorded."""

    __slots__ = ("array", "tracker")

    def __init__(self, array, tracker):
        self.array = array
        self.tracker = tracker

    def __setitem__(self, key, value):
        self.array[key] = value
        self.tracker.on_write(self.array, key)

    def __delitem__(self, key):
        raise SandboxViolation("cannot delete items of an array")

    def __getattr__(self, name):  # `a.flags.writeable = ...` style writes are refused
        raise SandboxViolation(f"cannot set array attribute {name!r} in the sandbox")

    def __setattr__(self, name, value):
        if name in self.__slots__:
            return object.__setattr__(self, name, value)
        raise SandboxViolation(f"cannot set array attribute {name!r} in the sandbox")

