"""Run one snippet inside a worker: compile, execute, validate `result`, name its ops and frame."""

from __future__ import annotations

import builtins
import traceback
from typing import Any

import numpy as np
from PIL import Image

from cv_env.sandbox.ops import LineageTracker, resolve_result
from cv_env.sandbox.pixels import size_of
from cv_env.sandbox.proxies import build_proxies
from cv_env.sandbox.reply import OUTPUT_LAYOUTS
from cv_env.sandbox.restricted import SNIPPET_FILENAME, Guards, PrintCollector, compile_snippet

RESULT_HELP = "assign a PIL image or an HxW / HxWx3 uint8 numpy array to `result`"


class ResultError(ValueError):
    """The snippet ran, but its `result` cannot be shown to the model."""


def _to_pixels(result: Any, max_pixels: int, max_aspect: float) -> Image.Image | np.ndarray:
    """Validate `result`: an RGB/L image, or an HxW / HxWx3 uint8 array (no snippet code runs)."""
    if type(result) is np.ndarray:
        arr = result
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            raise ResultError(
                f"result is a {arr.dtype} array; convert it with np.clip(a, 0, 255).astype(np.uint8)"
            )
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[:, :, :3]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
            raise ResultError(f"result array has shape {tuple(result.shape)}; {RESULT_HELP}")
        h, w = arr.shape[:2]
        _check_size(w, h, max_pixels, max_aspect)
        return arr
    if type(result) is Image.Image:
        w, h = result.size
        _check_size(w, h, max_pixels, max_aspect)
        if result.mode in ("RGB", "L"):
            return result
        if result.mode in ("1", "I", "I;16", "F", "LA"):
            return result.convert("L")
        return result.convert("RGB")
    if isinstance(result, (Image.Image, np.ndarray)):
        raise ResultError(f"result is a subclass ({type(result).__name__}); {RESULT_HELP}")
    raise ResultError(f"result is a {type(result).__name__}; {RESULT_HELP}")


def _check_size(w: int, h: int, max_pixels: int, max_aspect: float) -> None:
    if w < 1 or h < 1:
        raise ResultError(f"result is {w}x{h} pixels; an image needs at least 1x1")
    if w * h > max_pixels:
        raise ResultError(f"result is {w}x{h} pixels, more than the {max_pixels} allowed; resize it down")
    if max(w, h) / min(w, h) > max_aspect:
        raise ResultError(f"result is {w}x{h} pixels; its aspect ratio must be at most {max_aspect:g}:1")


# The names every snippet starts with, besides its images.
_SHORT_NAMES = {"Image": "PIL.Image", "ImageOps": "PIL.ImageOps", "ImageEnhance": "PIL.ImageEnhance",
                "ImageFilter": "PIL.ImageFilter", "ImageDraw": "PIL.ImageDraw", "np": "numpy", "cv2": "cv2",
                "math": "math"}


def _plain_builtins(printer: PrintCollector) -> dict:
    """Every builtin, with `print` collected (for `restricted=False`, the OS-layer test mode)."""
    def collected_print(*objects, sep=" ", end="\n", file=None, flush=False):
        if file is not None:
            return builtins.print(*objects, sep=sep, end=end, file=file, flush=flush)
        printer.write(str(sep).join(str(o) for o in objects) + str(end))

    return {**vars(builtins), "print": collected_print}


def execute_snippet(modules: dict, code: str, images: list[Image.Image], image_index: int, *,
                    stdout_limit: int, output=None, output_offset: int = 0,
                    max_output_pixels: int = 4096 * 4096, max_aspect: float = 200.0,
                    memory_mb: int = 0, restricted: bool = True) -> dict:
    """Execute `code` and describe the outcome as plain data (the worker's response).

    The output pixels are written to `output[output_offset:]` (shared memory) when given.
    `restricted=False` runs the code as plain Python (the OS layer is then all that holds).
    """
    printer = PrintCollector(stdout_limit)
    response: dict[str, Any] = {"ok": False, "error": None, "stdout": "", "ops": [], "image": None,
                                "frame": None, "source_index": None}
    try:
        compiled = compile_snippet(code) if restricted else compile(code, SNIPPET_FILENAME, "exec")
    except SyntaxError as exc:
        response["error"] = f"SyntaxError: {exc}"[:2000]
        return response
    except (MemoryError, RecursionError, ValueError, OverflowError) as exc:
        response["error"] = f"the code could not be compiled ({type(exc).__name__}): it is too deeply nested or too large"
        return response
    tracker = LineageTracker(images)
    selected = images[image_index]
    names = {"image": selected, "img": selected, "images": list(images)}
    if restricted:
        proxies = build_proxies(modules, tracker.wrap)
        guards = Guards(proxies, tracker, (Image.Image,), np.ndarray)
        names.update({short: proxies[name] for short, name in _SHORT_NAMES.items()})
        namespace = guards.namespace(printer, names)
    else:  # the OS layer alone: plain Python, real modules, every builtin (op detection by pixels only)
        names.update({short: modules[name] for short, name in _SHORT_NAMES.items()})
        namespace = {"__builtins__": _plain_builtins(printer), "__name__": "snippet", **names}
    try:
        exec(compiled, namespace)  # noqa: S102 - restricted code, in a locked-down worker
        result = namespace.get("result")
        if result is not None:
            pixels = _to_pixels(result, max_output_pixels, max_aspect)
            node = resolve_result(tracker, result, image_index)
            response.update(_describe(node, pixels))
            if output is not None:
                response["image"] = _write_pixels(pixels, output, output_offset)
        response["ok"] = True
    except ResultError as exc:
        response["error"] = str(exc)
    except MemoryError:
        response["error"] = f"MemoryError: the code ran out of memory (limit {memory_mb} MB); work on smaller arrays"
    except RecursionError:
        response["error"] = "RecursionError: maximum recursion depth exceeded"
    except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the model sees a message
        response["error"] = format_exception(exc, SNIPPET_FILENAME)
    response["stdout"] = printer.text()
    if not response["ok"]:
        response.update(ops=[], frame=None, source_index=None, image=None)
    return response


def _describe(node, pixels) -> dict:
    frame = node.frame
    if frame is not None and tuple(frame.size) != tuple(size_of(pixels)):
        frame = None
    return {"ops": [dict(op) for op in node.ops], "frame": frame.to_dict() if frame else None,
            "source_index": node.source_index}


def _write_pixels(pixels, output, offset: int) -> dict:
    """Copy the result's raw pixels into shared memory in one copy: an array as it is, an
    image in Pillow's own layout (4 bytes per RGB pixel, nothing repacked on either side)."""
    w, h = size_of(pixels)
    if isinstance(pixels, np.ndarray):
        layout = "L" if pixels.ndim == 2 else "RGB"
    else:
        layout = "L" if pixels.mode == "L" else "RGBX"
    nbytes = w * h * OUTPUT_LAYOUTS[layout]
    if offset + nbytes > len(output):
        raise ResultError("result is too large for the sandbox's output buffer; resize it down")
    if isinstance(pixels, np.ndarray):
        np.frombuffer(output, np.uint8, count=nbytes, offset=offset).reshape(pixels.shape)[...] = pixels
    elif not _paste_into(pixels, output, offset, nbytes, layout):  # a Pillow that will not paste RGB into RGBX
        layout, nbytes = "RGB", w * h * OUTPUT_LAYOUTS["RGB"]
        output[offset: offset + nbytes] = pixels.tobytes()
    return {"mode": layout, "width": w, "height": h, "offset": offset, "nbytes": nbytes}


def _paste_into(image: Image.Image, output, offset: int, nbytes: int, layout: str) -> bool:
    """Copy `image` into `output[offset:]` through an image mapped onto it (Pillow's paste fills
    it row by row); False when this Pillow refuses the paste."""
    view = memoryview(output)[offset: offset + nbytes]
    target = Image.frombuffer(layout, image.size, view, "raw", layout, 0, 1)
    try:
        target.im.paste(image.im, (0, 0, *image.size))
        return True
    except ValueError:
        return False
    finally:
        del target  # the mapped image holds the view: it goes first
        view.release()


def format_exception(exc: BaseException, filename: str) -> str:
    """One readable line for the model: where in its code, what went wrong."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename:
            line = frame.lineno
    text = str(exc)
    package = (type(exc).__module__ or "").split(".")[0]
    name = f"{package}.{type(exc).__name__}" if package in ("cv2", "numpy", "PIL") else type(exc).__name__
    message = f"{name}: {text}" if text else name
    return (f"line {line}: {message}" if line else message)[:2000]
