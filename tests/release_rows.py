"""Rows in the exact layout of the CodeVision release's parquet files (`kkwok/CodeVision-RL`,
MVToolBench), written the way its data was: one `<image>` placeholder per image in the prompt,
images as {bytes, path}, the truth in `reward_model`, the rest in `extra_info`."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

RELEASE_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([
        ("answer", pa.string()),
        ("bbox", pa.list_(pa.float64())),
        ("dataset_name", pa.string()),
        ("index", pa.int64()),
        ("question", pa.string()),
        ("split", pa.string()),
        ("transform", pa.list_(pa.string())),
    ])),
])


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random image without symmetries, smooth enough that blur and contrast keep it recognisable."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return coarse.resize(size, Image.Resampling.BICUBIC)


def release_row(index: int, image: Image.Image, truth: str, *, transform: Sequence[str] = (),
                bbox: Sequence[float] | None = None, dataset_name: str = "chartqa",
                question: str = "What does the image show?") -> dict:
    return {
        "data_source": "codevision_rl",
        "prompt": [{"role": "user", "content": "<image>\n" + question}],
        "images": [{"bytes": png(image), "path": None}],
        "ability": "visual_reasoning",
        "reward_model": {"ground_truth": truth, "style": "rule"},
        "extra_info": {"answer": truth, "bbox": None if bbox is None else [float(v) for v in bbox],
                       "dataset_name": dataset_name, "index": index, "question": question, "split": "train",
                       "transform": list(transform)},
    }


def write_release_rows(path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=RELEASE_SCHEMA), path)
