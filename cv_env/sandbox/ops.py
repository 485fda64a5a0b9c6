"""Op detection from execution, and the frame of the output image: `LineageTracker`.

Every function a snippet reaches through a module proxy, and every method of an image, array,
enhancer or drawing object, is wrapped (see `LineageTracker`). When a wrapped call takes a tracked
image/array and returns a new one, a rule from `op_rules` names the op and the geometric step
(a `Frame` from the output's pixels to the input's), and the step is checked against the
pixels: a rotation must really be that rotation of the input, a crop that region, and an op
that changed no pixel (`enhance(1.0)`, a full-image crop) is not an op. The lineage (source
image index, frame, ops) follows each object, so `result` carries exactly the ops that made it.
Nothing here reads the snippet's text.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from cv_env.frames import Frame
from cv_env.sandbox import op_rules
from cv_env.sandbox.pixels import KEEP, is_pixels, same_pixels, size_of, verify_geometry
from cv_env.sandbox.proxies import is_pil_core


@dataclass(frozen=True)
class Node:
    """Lineage of one image/array: which input it derives from, its frame, the ops so far."""

    source_index: int | None
    frame: Frame | None
    ops: tuple[dict, ...] = ()


class LineageTracker:
    """Follows images and arrays through one execution and records their lineage."""

    def __init__(self, images: list[Image.Image]):
        self._nodes: dict[int, tuple[weakref.ref, Node]] = {}
        self._order: list[int] = []
        self.images = images
        self.pixel_access: dict[int, tuple] = {}  # id(PixelAccess) -> (it, its image)
        for i, image in enumerate(images):
            self.set_node(image, Node(i, Frame.identity(image.size)))

    # -- registry -----------------------------------------------------------------------------

    def node(self, obj: Any) -> Node | None:
        entry = self._nodes.get(id(obj))
        if entry is None or entry[0]() is not obj:
            return None
        return entry[1]

    def set_node(self, obj: Any, node: Node) -> None:
        try:
            ref = weakref.ref(obj)
        except TypeError:
            return
        self._nodes[id(obj)] = (ref, node)
        self._order.append(id(obj))

    def live_nodes(self):
        """(object, node) of tracked objects still alive, newest first."""
        seen = set()
        for key in reversed(self._order):
            if key in seen:
                continue
            seen.add(key)
            entry = self._nodes.get(key)
            obj = entry[0]() if entry else None
            if obj is not None:
                yield obj, entry[1]

    # -- hooks the guards and proxies call ----------------------------------------------------

    def wrap(self, key: str, fn: Callable) -> Callable:
        """Wrap a module function so its calls on tracked pixels are recorded."""
        rule = op_rules.FUNCTION_RULES.get(key)
        tracker = self

        def tracked(*args, **kwargs):
            inp = op_rules.primary_input(args, kwargs, tracker)
            before = size_of(inp) if inp is not None else None
            out = fn(*args, **kwargs)
            if inp is not None:
                tracker._after(key, rule, inp, before, args, kwargs, out)
            return out

        tracked.__name__ = getattr(fn, "__name__", key.rsplit(".", 1)[-1])
        tracked.__doc__ = getattr(fn, "__doc__", None)
        return tracked

    def on_attribute(self, obj: Any, name: str, value: Any) -> Any:
        if isinstance(obj, np.ndarray) and name in ("T", "mT") and is_pixels(value):
            self._after("ndarray.T", op_rules.METHOD_RULES.get("ndarray.T"), obj, size_of(obj), (), {}, value)
            return value
        if not callable(value) or isinstance(value, type):
            return value
        owner_key = op_rules.owner_key(obj)
        if owner_key is None:
            return value
        key = f"{owner_key}.{name}"
        rule = op_rules.METHOD_RULES.get(key)
        tracker = self

        def tracked(*args, **kwargs):
            inp = op_rules.method_input(obj, args, kwargs)
            before = size_of(inp) if inp is not None else None
            out = value(*args, **kwargs)
            if is_pil_core(out):  # image.getdata(): hand out plain values, not Pillow's C object
                return tuple(out)
            if key == "Image.load" and out is not None:
                tracker.pixel_access[id(out)] = (out, obj)  # `px[x, y] = c` draws on `obj`
            if inp is not None:
                tracker._after(key, rule, inp, before, args, kwargs, out, self_obj=obj)
            return out

        tracked.__name__ = name
        tracked.__doc__ = getattr(value, "__doc__", None)
        return tracked

    def on_getitem(self, obj: Any, key: Any, value: Any) -> Any:
        if isinstance(obj, np.ndarray) and is_pixels(obj) and isinstance(value, np.ndarray):
                self._after("ndarray.getitem", op_rules.slice_rule(key), obj, size_of(obj), (key,), {}, value)
        return value

    def on_write(self, obj: Any, key: Any) -> None:
        entry = self.pixel_access.get(id(obj))
        if entry is not None and entry[0] is obj:
            obj = entry[1]
        node = self.node(obj)
        if node is not None:
            self.set_node(obj, Node(node.source_index, node.frame, node.ops + ({"name": "draw"},)))

    # -- recording ------------------------------------------------------------------------------

    def _after(self, key, rule, inp, before, args, kwargs, out, self_obj=None) -> None:
        try:
            self._record(key, rule, inp, before, args, kwargs, out, self_obj)
        except Exception:
            # Analysis must never change what the snippet sees; the output just loses lineage.
            pass

    def _record(self, key, rule, inp, before, args, kwargs, out, self_obj) -> None:
        node = self.node(inp)
        if node is None:
            return
        if isinstance(out, tuple):  # cv2.threshold returns (retval, image)
            candidates = [o for o in out if is_pixels(o)]
            out = candidates[-1] if candidates else None
        in_place = out is None or out is inp or out is self_obj
        if out is None:
            out = inp  # in-place: ImageDraw, Image.paste, thumbnail, cv2.rectangle(img, ...)
        if not is_pixels(out):
            return
        ctx = op_rules.Context(inp=inp, out=out, in_size=before, args=args, kwargs=kwargs,
                               self_obj=self_obj, in_place=in_place)
        step = rule(ctx) if rule is not None else op_rules.unknown_rule(ctx)
        if step is None:
            self.set_node(out, Node(node.source_index, None, node.ops))
            return
        geometry = step.geometry
        ops = step.ops
        if step.pixel_op and ops and not in_place and same_pixels(inp, out):
            ops = []
        if step.classify and not in_place and not same_pixels(inp, out):
            name = op_rules.classify_pixel_change(np.asarray(inp), np.asarray(out))
            ops = [{"name": name}] if name else []
        if isinstance(geometry, Frame):
            if step.verify and not in_place and not verify_geometry(inp, out, geometry):
                self.set_node(out, Node(node.source_index, None, node.ops))
                return
            if tuple(geometry.size) == tuple(before) and not in_place and same_pixels(inp, out):
                ops, geometry = [], KEEP  # e.g. rotate_180 of a symmetric image: no pixel moved
        frame = node.frame
        full_ops = []
        for op in ops:
            op = dict(op)
            if op["name"] == "crop" and "box" in op and frame is not None:
                op["source_box"] = [round(v, 3) for v in frame.box_to_source(op["box"])]
            full_ops.append(op)
        if geometry is None:
            frame = None
        elif isinstance(geometry, Frame) and frame is not None:
            frame = frame.then(geometry)
        self.set_node(out, Node(node.source_index, frame, node.ops + tuple(full_ops)))


def resolve_result(tracker: LineageTracker, result: Any, image_index: int) -> Node:
    """The lineage of the snippet's `result`; pixels decide when the code went untracked.

    Untracked results (numpy arithmetic such as `(a * 1.3).clip(0, 255)`) are matched against
    the tracked images of the same size, newest first, and the pixel change is named.
    """
    node = tracker.node(result)
    if node is not None:
        return node
    size = size_of(result)
    for obj, candidate in tracker.live_nodes():
        if obj is result or candidate.frame is None or not is_pixels(obj) or size_of(obj) != size:
            continue
        if same_pixels(obj, result):
            return candidate
        name = op_rules.classify_pixel_change(np.asarray(obj), np.asarray(result))
        ops = candidate.ops + (({"name": name},) if name else ())
        return Node(candidate.source_index, candidate.frame, ops)
    return Node(None, None, ())
