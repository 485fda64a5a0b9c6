"""Read and write the CodeVision-RL parquet schema (`train_group_*.parquet`, `mvtoolbench.parquet`).

One row is one task, in the verl-style layout the CodeVision data uses:

    data_source   str                       where the item comes from
    prompt        list<{role, content}>     the user turn: one `<image>` per image, then the question
    images        list<{bytes, path}>       encoded images (or paths relative to the file)
    ability       str
    reward_model  {style, ground_truth}
    extra_info    {question, transform (list | str | dict), bbox or bbox_2d, index, ...}

The release's files (`kkwok/CodeVision-RL`, MVToolBench) load with the release's semantics by
default: the required ops are the inverses of what `transform` lists and nothing else (a bbox
alone asks for no crop: `crop_from_bbox=True` changes that), the ground truth is
`reward_model.ground_truth` as written, and a row's category is its `extra_info.dataset_name`
(the paper's per-source table). The other `extra_info` fields (`dataset_name`, `split`,
`index`, ...) are kept in `Task.extra`. Loader options (`LOAD_OPTIONS`) reach users through
`gym.make(..., task_options={...})` and `env.tasks_options` in the trainers' config.

Reading is lenient about the forms real files use (a transform given as "rot90", "rotate_90,
crop" or {"rotate": 90}; `bbox` or `bbox_2d`, flat or nested) and strict about meaning: a row
that cannot become a valid `Task` raises `MalformedRowError` naming the file and row, or, with
`on_error="skip"`, is skipped and counted in `source.skipped`. Files are streamed: iteration
reads record batches, random access reads one row group (and keeps only the latest in memory).
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cv_env.task import ANSWER_TYPES, Task
from cv_env.tasks.base import TaskSource

SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
    ("extra_info", pa.struct([
        ("index", pa.int64()),
        ("task_id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answer_type", pa.string()),
        ("category", pa.string()),
        ("source", pa.string()),
        ("transform", pa.list_(pa.string())),
        ("bbox", pa.list_(pa.float64())),
        ("extra", pa.string()),  # the rest of Task.extra, as JSON
    ])),
])
IMAGE_PLACEHOLDER = "<image>"
# Options of `read_parquet` a user may set (`task_options`), with their defaults.
LOAD_OPTIONS: dict[str, Any] = {
    "on_error": "raise",  # raise | skip (count malformed rows in `skipped`)
    "crop_from_bbox": False,  # also require a crop at the bbox of rows whose transform lists none
    "image_column": "images",  # the column holding a row's images ({bytes, path} structs, bytes or paths)
    "answer_field": None,  # dotted path of the ground truth, e.g. "extra_info.answer" (None: reward_model.ground_truth)
}
_EXTRA_INFO_FIELDS = tuple(SCHEMA.field("extra_info").type.field(i).name for i in range(SCHEMA.field("extra_info").type.num_fields))


class MalformedRowError(ValueError):
    """A parquet row that cannot become a `Task`; the message names the file and the row."""


# ------------------------------------------------------------------------------ normalisation

_NAMES = {
    "rotate_90": ("rotate_90", "rotate90", "rot90", "rot_90", "rotation_90", "rotate_90_ccw", "ccw_90"),
    "rotate_180": ("rotate_180", "rotate180", "rot180", "rot_180", "rotation_180", "upside_down"),
    "rotate_270": ("rotate_270", "rotate270", "rot270", "rot_270", "rotation_270", "rotate_90_cw", "cw_90"),
    "flip_horizontal": ("flip_horizontal", "horizontal_flip", "hflip", "flip_h", "fliplr", "flip_lr",
                        "mirror", "horizontal", "flip_left_right"),
    "flip_vertical": ("flip_vertical", "vertical_flip", "vflip", "flip_v", "flipud", "flip_ud", "vertical",
                      "flip_top_bottom"),
    "crop": ("crop", "zoom", "zoom_in"),
}
_LOOKUP = {alias: name for name, aliases in _NAMES.items() for alias in aliases}
_NONE = {"", "none", "null", "identity", "original", "no_transform", "no", "0"}
_ROTATE_RE = re.compile(r"^(?:rot|rotate|rotation|rotated)_?(-?\d+)(?:_?deg(?:rees)?)?$")


def normalise_transform(value: Any) -> list[str]:
    """Turn a transform field (list, str or dict, in the forms real files use) into op names.

    Raises ValueError naming the value when it cannot be understood.
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [name for item in value for name in normalise_transform(item)]
    if isinstance(value, dict):
        angle = value.get("angle", value.get("degrees"))
        for key in ("transforms", "transform", "ops", "name", "type", "op"):
            inner = value.get(key)
            if isinstance(inner, (str, list, tuple, dict)):
                if angle is not None and isinstance(inner, str) and inner.strip().lower().startswith("rot"):
                    return _rotation(angle, value)  # {"type": "rotate", "angle": 90}
                return normalise_transform(inner)
        out = []
        for key in ("rotate", "rotation", "angle", "degrees"):
            if key in value and value[key] is not None:
                out += _rotation(value[key], value)
        flip = value.get("flip")
        if flip:
            out += normalise_transform(f"flip_{flip}" if str(flip).lower() in ("horizontal", "vertical", "h", "v") else flip)
        if value.get("crop"):
            out.append("crop")
        if out or all(v in (None, 0, False, "") for v in value.values()):
            return out
        raise ValueError(f"cannot read transform {value!r}")
    if isinstance(value, (int, float, np.integer)):
        return _rotation(value, value)
    text = str(value).strip()
    if text.startswith("[") or text.startswith("{"):
        try:
            return normalise_transform(json.loads(text))
        except json.JSONDecodeError:
            pass
    parts = [p for p in re.split(r"[,;+|]|\s+then\s+", text) if p.strip()]
    if len(parts) > 1:
        return [name for p in parts for name in normalise_transform(p)]
    key = re.sub(r"\s+|-(?!\d)", "_", text.lower())  # keep the sign of "rotate_-90"
    if key in _NONE:
        return []
    if key in _LOOKUP:
        return [_LOOKUP[key]]
    m = _ROTATE_RE.match(key)
    if m:
        return _rotation(int(m.group(1)), value)
    raise ValueError(f"cannot read transform {value!r}: expected names like rotate_90, flip_horizontal, crop")


def _rotation(angle: Any, context: Any) -> list[str]:
    try:
        d = int(round(float(angle))) % 360
    except (TypeError, ValueError):
        raise ValueError(f"cannot read rotation angle {angle!r} in {context!r}") from None
    if d == 0:
        return []
    if d not in (90, 180, 270):
        raise ValueError(f"rotation of {angle} degrees in {context!r} is not a multiple of 90")
    return [f"rotate_{d}"]


def normalise_bbox(value: Any) -> list[float] | None:
    """[x1, y1, x2, y2] from a flat list, a nested [[...]], a JSON string or an {x1,...} dict."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value or value.lower() in ("none", "null"):
            return None
        value = json.loads(value)
    if isinstance(value, dict):
        value = [value[k] for k in ("x1", "y1", "x2", "y2")]
    value = list(value)
    if len(value) == 0:
        return None
    if len(value) == 1 and isinstance(value[0], (list, tuple, np.ndarray)):
        value = list(value[0])
    if len(value) != 4:
        raise ValueError(f"bbox must have 4 numbers [x1, y1, x2, y2], got {value!r}")
    box = [float(v) for v in value]
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"bbox {box} has x2 < x1 or y2 < y1")
    return box


def _infer_answer_type(answer: str, question: str) -> str:
    if re.fullmatch(r"[A-E]", answer) and re.search(r"(^|\s|\()A[.)]", question):
        return "choice"
    try:
        float(answer.replace(",", ""))
        return "number"
    except ValueError:
        return "text"


# -------------------------------------------------------------------------------- row -> Task

def _load_image(item: Any, base_dir: Path) -> Image.Image:
    data, path = None, None
    if isinstance(item, dict):
        data, path = item.get("bytes"), item.get("path")
    elif isinstance(item, (bytes, bytearray)):
        data = item
    elif isinstance(item, str):
        path = item
    else:
        raise ValueError(f"an image entry is {type(item).__name__}; expected {{bytes, path}}, bytes or a path")
    if data:
        image = Image.open(io.BytesIO(data))
    elif path:
        full = Path(path) if Path(path).is_absolute() else base_dir / path
        if not full.exists():
            raise ValueError(f"image file {str(full)!r} does not exist")
        image = Image.open(full)
    else:
        raise ValueError("an image entry has neither bytes nor a path")
    image.load()
    return image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")


def _question_from_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        try:
            prompt = json.loads(prompt)
        except json.JSONDecodeError:
            return prompt.replace(IMAGE_PLACEHOLDER, "").strip()
    user = [m for m in (prompt or []) if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        return ""
    content = user[-1].get("content")
    if isinstance(content, list):  # OpenAI-style content parts
        content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "").replace(IMAGE_PLACEHOLDER, "").strip()


def _ground_truth(row: dict, info: dict, answer_field: str | None) -> Any:
    """The ground truth at `answer_field` ("column.key..."), or by default the release's
    `reward_model.ground_truth`, else `extra_info.answer`, else an `answer` column."""
    if answer_field is None:
        reward = row.get("reward_model") or {}
        truth = reward.get("ground_truth") if isinstance(reward, dict) else None
        return truth if truth is not None else info.get("answer", row.get("answer"))
    value: Any = row
    for key in answer_field.split("."):
        if isinstance(value, str) and value.strip().startswith("{"):
            value = json.loads(value)  # a struct stored as JSON text
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"answer_field {answer_field!r}: the row has no {key!r} there")
        value = value[key]
    return value


def row_to_task(row: dict, *, where: str, base_dir: Path, crop_from_bbox: bool = False,
                image_column: str = "images", answer_field: str | None = None) -> Task:
    """Build a `Task` from one row (a dict of the schema's columns); `where` names it in errors.

    See `LOAD_OPTIONS` for the keyword arguments.
    """
    try:
        info = row.get("extra_info") or {}
        if isinstance(info, str):
            info = json.loads(info)
        images_field = row.get(image_column)
        if images_field is None or len(images_field) == 0:
            columns = ", ".join(sorted(row))
            raise ValueError(f"the row has no images in column {image_column!r} (columns: {columns}); "
                             "name the image column with the task option image_column")
        if isinstance(images_field, dict):
            images_field = [images_field]
        images = [_load_image(item, base_dir) for item in images_field]
        question = info.get("question") or _question_from_prompt(row.get("prompt"))
        if not question:
            raise ValueError("no question: extra_info.question is empty and the prompt has no user turn")
        truth = _ground_truth(row, info, answer_field)
        if isinstance(truth, (list, tuple, np.ndarray)) and len(truth) == 1:
            truth = truth[0]
        if truth is None or str(truth).strip() == "":
            raise ValueError(f"no ground truth: {answer_field or 'reward_model.ground_truth'} is missing or empty")
        answer = str(truth)  # as written: the release's rules compare it unstripped
        transforms = normalise_transform(info.get("transform", info.get("transforms")))
        bbox = normalise_bbox(info.get("bbox", info.get("bbox_2d")))
        if bbox is not None and crop_from_bbox and "crop" not in transforms:
            transforms.append("crop")  # a target box means the answer needs a crop there
        # A crop listed without a bbox stays required: the reward config decides what it pays.
        answer_type = info.get("answer_type") or _infer_answer_type(answer.strip(), question)
        if answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type {answer_type!r} is not one of {ANSWER_TYPES}")
        extra = json.loads(info["extra"]) if info.get("extra") else {}
        # Keep a foreign file's other extra_info fields (its `index`, ...); rows we wrote carry
        # everything in `extra` already.
        known = set(_EXTRA_INFO_FIELDS) | {"transforms", "bbox_2d"}
        if "extra" not in info:
            known.discard("index")
        extra.update({k: v for k, v in info.items() if k not in known and v is not None and not isinstance(v, bytes)})
        data_source = row.get("data_source") or ""
        index = info.get("index")
        task_id = info.get("task_id") or (f"{data_source}/{index}" if index is not None else where)
        category = info.get("category") or info.get("dataset_name") or data_source or "general"
        return Task(id=str(task_id), images=images, question=str(question), answer=answer,
                    answer_type=answer_type, category=str(category),
                    transforms=transforms, bbox=bbox, source=info.get("source") or data_source, extra=extra)
    except MalformedRowError:
        raise
    except Exception as exc:  # every failure of a row becomes one error that says where
        raise MalformedRowError(f"{where}: {exc}") from exc


# ----------------------------------------------------------------------------------- reading

class ParquetTasks(TaskSource):
    """Tasks from one or more CodeVision-RL parquet files, streamed.

    Iteration and `sample` skip malformed rows and count them (`skipped`, with the first
    messages in `errors`) when `on_error="skip"`; indexing a malformed row always raises
    `MalformedRowError`, since `src[i]` has no task to return.
    """

    def __init__(self, paths: Iterable[str | Path], on_error: str = "raise", crop_from_bbox: bool = False,
                 batch_size: int = 64, image_column: str = "images", answer_field: str | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no parquet files given")
        self.on_error, self.batch_size = on_error, batch_size
        self.row_options = {"crop_from_bbox": bool(crop_from_bbox), "image_column": image_column,
                            "answer_field": answer_field}
        self.skipped, self.errors = 0, []
        self._files: list[pq.ParquetFile] = []
        self._file_starts: list[int] = []  # global index of each file's first row
        self._groups: list[tuple[int, int, int]] = []  # (global start, file, row group), ascending
        total = 0
        for path in self.paths:
            if not path.exists():
                raise FileNotFoundError(f"parquet file {str(path)!r} does not exist")
            try:
                pf = pq.ParquetFile(path)
            except Exception as exc:
                raise ValueError(f"{path}: not a readable parquet file ({exc})") from exc
            self._file_starts.append(total)
            for rg in range(pf.metadata.num_row_groups):
                self._groups.append((total, len(self._files), rg))
                total += pf.metadata.row_group(rg).num_rows
            self._files.append(pf)
        self._len = total
        self._group_starts = [start for start, _, _ in self._groups]
        self._cached: tuple[tuple[int, int], pa.Table] | None = None

    def __getstate__(self) -> dict:
        # Open file handles do not pickle; vector envs ship sources to worker processes.
        state = dict(self.__dict__)
        state["_files"], state["_cached"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._files = [pq.ParquetFile(p) for p in self.paths]

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"ParquetTasks({[str(p) for p in self.paths]}, rows={self._len})"

    def _locate(self, index: int) -> tuple[int, int, int]:
        """(file, row group, offset in the group) of a global row index (empty groups skipped)."""
        # The last group starting at or before `index`; an empty group shares its start with
        # the next one, so it is never the last such group for an in-range index.
        g = bisect.bisect_right(self._group_starts, index) - 1
        start, f, rg = self._groups[g]
        return f, rg, index - start

    def _row_where(self, f: int, row: int) -> str:
        return f"{self.paths[f]}: row {row}"

    def _get(self, index: int) -> Task:
        f, rg, offset = self._locate(index)
        if self._cached is None or self._cached[0] != (f, rg):
            self._cached = ((f, rg), self._files[f].read_row_group(rg))
        row = self._cached[1].slice(offset, 1).to_pylist()[0]
        file_row = index - self._file_starts[f]
        return row_to_task(row, where=self._row_where(f, file_row), base_dir=self.paths[f].parent,
                           **self.row_options)

    def _skip(self, err: MalformedRowError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped += 1
        if len(self.errors) < 20:
            self.errors.append(str(err))

    def __iter__(self) -> Iterator[Task]:
        for f, pf in enumerate(self._files):
            row = 0
            for batch in pf.iter_batches(batch_size=self.batch_size):
                for record in batch.to_pylist():
                    try:
                        yield row_to_task(record, where=self._row_where(f, row), base_dir=self.paths[f].parent,
                                          **self.row_options)
                    except MalformedRowError as err:
                        self._skip(err)
                    row += 1

    def sample(self, rng: np.random.Generator) -> Task:
        for _ in range(100):
            try:
                return super().sample(rng)
            except MalformedRowError as err:
                self._skip(err)
        raise ValueError(f"100 sampled rows of {self!r} were all malformed; see .errors")


def read_parquet(path: str | Path | Iterable[str | Path], on_error: str = "raise", crop_from_bbox: bool = False,
                 batch_size: int = 64, image_column: str = "images", answer_field: str | None = None) -> ParquetTasks:
    """Open CodeVision-RL parquet file(s) as a task source.

    `path` is a file, a glob (`data/train_group_*.parquet`), a directory (all its `*.parquet`),
    or a list of those. `on_error="skip"` skips and counts malformed rows while iterating or
    sampling. `crop_from_bbox` adds "crop" to the transforms of a row with a bbox (the release
    does not). `image_column` names the images' column, `answer_field` the ground truth's
    dotted path (default `reward_model.ground_truth`, else `extra_info.answer`).
    """
    items = [path] if isinstance(path, (str, Path)) else list(path)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
        elif any(ch in str(item) for ch in "*?["):
            found = [Path(x) for x in sorted(glob.glob(str(item)))]
        else:
            found = [p]
        if not found:
            raise FileNotFoundError(f"no parquet files match {str(item)!r}")
        files += found
    return ParquetTasks(files, on_error=on_error, crop_from_bbox=crop_from_bbox, batch_size=batch_size,
                        image_column=image_column, answer_field=answer_field)


# ----------------------------------------------------------------------------------- writing

def _encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless, so round trips are pixel-exact
    return buf.getvalue()


def task_to_row(task: Task, index: int, data_source: str | None = None) -> dict:
    """One row of the schema for `task` (images PNG-encoded)."""
    content = IMAGE_PLACEHOLDER * len(task.images) + "\n" + task.question
    return {
        "data_source": data_source or task.source or "codevision_gym",
        "prompt": [{"role": "user", "content": content}],
        "images": [{"bytes": _encode(im), "path": None} for im in task.images],
        "ability": task.category,
        "reward_model": {"style": "rule", "ground_truth": task.answer},
        "extra_info": {
            "index": index, "task_id": task.id, "question": task.question, "answer": task.answer,
            "answer_type": task.answer_type, "category": task.category, "source": task.source,
            "transform": list(task.transforms), "bbox": task.bbox,
            "extra": json.dumps(task.extra, default=_json_default),
        },
    }


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"task.extra holds a {type(value).__name__}, which parquet export cannot store as JSON")


def write_parquet(tasks: Iterable[Task], path: str | Path, batch_size: int = 64, data_source: str | None = None) -> int:
    """Write tasks to `path` in the CodeVision-RL schema, one row group per `batch_size` rows.

    Streams: at most `batch_size` encoded rows are in memory. Returns the number of rows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with pq.ParquetWriter(path, SCHEMA) as writer:
        rows: list[dict] = []
        for task in tasks:
            rows.append(task_to_row(task, n, data_source))
            n += 1
            if len(rows) == batch_size:
                writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
                rows = []
        if rows:
            writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
    return n
