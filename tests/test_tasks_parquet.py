"""CodeVision-RL parquet I/O: round trips, the forms real files use, malformed rows, streaming."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cv_env.task import Task
from cv_env.tasks import CATEGORIES, MalformedRowError, SyntheticSuite, load_tasks, read_parquet, write_parquet
from cv_env.tasks.parquet import SCHEMA, normalise_bbox, normalise_transform
from release_rows import release_row, smooth_image, write_release_rows


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def same_task(a: Task, b: Task) -> bool:
    return (
        (a.id, a.question, a.answer, a.answer_type, a.category, a.transforms, a.bbox, a.source, a.extra)
        == (b.id, b.question, b.answer, b.answer_type, b.category, b.transforms, b.bbox, b.source, b.extra)
        and len(a.images) == len(b.images)
        and all(x.mode == y.mode and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    )


def test_round_trip_of_every_category(tmp_path):
    tasks = [SyntheticSuite(name, split="test", size=2)[i] for name in CATEGORIES for i in range(2)]
    path = tmp_path / "suite.parquet"
    assert write_parquet(tasks, path, batch_size=3) == len(tasks)
    assert pq.ParquetFile(path).metadata.num_row_groups == (len(tasks) + 2) // 3  # streamed in batches
    back = read_parquet(path)
    assert len(back) == len(tasks)
    for original, random_access, streamed in zip(tasks, [back[i] for i in range(len(back))], back):
        assert same_task(original, random_access), original.id
        assert same_task(original, streamed), original.id
    assert load_tasks(str(path)).paths == [path]


def test_written_rows_follow_the_codevision_schema(tmp_path):
    task = SyntheticSuite("multi_image", size=1)[0]
    path = tmp_path / "one.parquet"
    write_parquet([task], path)
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA)
    row = table.to_pylist()[0]
    assert row["prompt"] == [{"role": "user", "content": "<image>" * len(task.images) + "\n" + task.question}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": task.answer}
    assert row["extra_info"]["transform"] == task.transforms and row["extra_info"]["question"] == task.question
    assert len(row["images"]) == len(task.images) and row["images"][0]["path"] is None


def foreign_row(image_bytes: bytes | None = None, path: str | None = None, **info) -> dict:
    return {
        "data_source": "mvtoolbench",
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<image>\nWhat is on the sign?"}],
        "images": [{"bytes": image_bytes, "path": path}],
        "reward_model": {"style": "rule", "ground_truth": "STOP"},
        "extra_info": info,
    }


def write_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_reads_the_forms_real_files_use(tmp_path):
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    image.save(tmp_path / "sign.png")
    rows = [
        foreign_row(png(image), index=7, transform="rot90", bbox_2d=[[1, 2, 11, 12]]),
        foreign_row(None, path="sign.png", index=8, transform="none"),
    ]
    path = tmp_path / "mvtoolbench.parquet"
    write_rows(path, rows)
    first, second = read_parquet(path)
    assert first.question == "What is on the sign?"  # from the prompt: no extra_info.question
    assert first.answer == "STOP" and first.answer_type == "text"
    assert first.transforms == ["rotate_90"] and first.bbox == [1.0, 2.0, 11.0, 12.0]  # no crop inferred
    assert first.id == "mvtoolbench/7" and first.category == "mvtoolbench" and first.extra == {"index": 7}
    assert np.array_equal(np.asarray(second.images[0]), np.asarray(image))  # path relative to the file
    assert second.transforms == [] and second.bbox is None
    assert read_parquet(path, crop_from_bbox=True)[0].transforms == ["rotate_90", "crop"]


@pytest.mark.parametrize("value, expected", [
    ("rotate_90", ["rotate_90"]), ("rot180", ["rotate_180"]), ("Rotate 270", ["rotate_270"]),
    ("rotate_-90", ["rotate_270"]), ("hflip", ["flip_horizontal"]), ("flip_ud", ["flip_vertical"]),
    ("rotate_90, crop", ["rotate_90", "crop"]), ('["vflip"]', ["flip_vertical"]), ("none", []), (None, []),
    (["rotate_180", "crop"], ["rotate_180", "crop"]), ({"rotate": 90}, ["rotate_90"]),
    ({"type": "rotate", "angle": 180}, ["rotate_180"]), ({"flip": "horizontal"}, ["flip_horizontal"]),
    ({"transforms": ["hflip", "crop"]}, ["flip_horizontal", "crop"]), (270, ["rotate_270"]),
])
def test_transform_field_forms(value, expected):
    assert normalise_transform(value) == expected


@pytest.mark.parametrize("value", ["rotate_45", "shear", {"rotate": "left"}, {"colour": "red"}])
def test_unreadable_transforms_are_errors(value):
    with pytest.raises(ValueError, match="cannot read|not a multiple of 90"):
        normalise_transform(value)


def test_bbox_forms():
    assert normalise_bbox([1, 2, 3, 4]) == [1.0, 2.0, 3.0, 4.0]
    assert normalise_bbox([[1, 2, 3, 4]]) == [1.0, 2.0, 3.0, 4.0]
    assert normalise_bbox("[1, 2, 3, 4]") == [1.0, 2.0, 3.0, 4.0]
    assert normalise_bbox({"x1": 1, "y1": 2, "x2": 3, "y2": 4}) == [1.0, 2.0, 3.0, 4.0]
    assert normalise_bbox([]) is None and normalise_bbox(None) is None
    with pytest.raises(ValueError, match="4 numbers"):
        normalise_bbox([1, 2, 3])
    with pytest.raises(ValueError, match="x2 < x1"):
        normalise_bbox([5, 2, 3, 4])


@pytest.fixture
def mixed_file(tmp_path):
    good = png(Image.new("RGB", (8, 8), (0, 0, 255)))
    rows = [
        foreign_row(good, index=0, transform="rotate_90"),
        {**foreign_row(good, index=1), "reward_model": {"style": "rule", "ground_truth": None}},
        foreign_row(b"not an image", index=2),
        foreign_row(good, index=3, transform="rotate_45"),
        foreign_row(good, index=4, transform="flip_horizontal"),
    ]
    path = tmp_path / "mixed.parquet"
    write_rows(path, rows)
    return path


def test_malformed_row_error_names_the_file_and_row(mixed_file):
    src = read_parquet(mixed_file)
    assert len(src) == 5
    with pytest.raises(MalformedRowError, match=r"mixed\.parquet: row 1: no ground truth"):
        list(src)
    with pytest.raises(MalformedRowError, match=r"mixed\.parquet: row 2: .*cannot identify image"):
        src[2]
    with pytest.raises(MalformedRowError, match=r"row 3: cannot read transform 'rotate_45'|row 3: rotation of 45"):
        src[3]
    assert src[4].transforms == ["flip_horizontal"]


def test_malformed_rows_are_skipped_and_counted_on_request(mixed_file):
    src = read_parquet(mixed_file, on_error="skip")
    assert [t.extra["index"] for t in src] == [0, 4]
    assert src.skipped == 3 and "row 1" in src.errors[0]
    rng = np.random.default_rng(0)
    assert all(src.sample(rng).extra["index"] in (0, 4) for _ in range(10))


def test_missing_files_and_bad_options_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no parquet files match"):
        read_parquet(str(tmp_path / "train_group_*.parquet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_parquet(tmp_path / "absent.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        read_parquet(tmp_path / "junk.parquet")
    with pytest.raises(ValueError, match="on_error must be"):
        read_parquet(tmp_path / "junk.parquet", on_error="ignore")


def test_globs_and_directories_read_several_files_in_order(tmp_path):
    suite = SyntheticSuite("glyph_orientation", size=5)
    write_parquet([suite[i] for i in range(3)], tmp_path / "train_group_0.parquet", batch_size=2)
    write_parquet([suite[i] for i in range(3, 5)], tmp_path / "train_group_1.parquet")
    for spec in (str(tmp_path / "train_group_*.parquet"), str(tmp_path)):
        src = load_tasks(spec)
        assert len(src) == 5
        assert [src[i].id for i in range(5)] == [suite[i].id for i in range(5)] == [t.id for t in src]


def test_sources_pickle_for_worker_processes(tmp_path):
    import pickle

    from cv_env.tasks import RobustnessWrapper

    suite = SyntheticSuite("charts", size=3)
    path = tmp_path / "p.parquet"
    write_parquet(suite, path)
    for src in (suite, RobustnessWrapper(suite), read_parquet(path)):
        src[0]  # a cached row group must not stop pickling
        copy = pickle.loads(pickle.dumps(src))
        assert len(copy) == len(src) and copy[1].id == src[1].id


def test_the_release_layout_loads_with_the_release_semantics(tmp_path):
    image = smooth_image(np.random.default_rng(0), (40, 30))
    rows = [
        release_row(0, image, "B", transform=["rotate_90"], bbox=[2, 3, 20, 25], dataset_name="ChartQA"),
        release_row(1, image, " park. ", transform=[], bbox=[2, 3, 20, 25], dataset_name="TextVQA"),
        release_row(2, image, "7", transform=["crop"], bbox=None, dataset_name="TextVQA"),
    ]
    path = tmp_path / "mvtoolbench.parquet"
    write_release_rows(path, rows)
    first, second, third = read_parquet(path)
    assert first.required_ops == ["rotate_270"] and first.bbox == [2.0, 3.0, 20.0, 25.0]  # a bbox asks for no crop
    assert first.category == "ChartQA" and first.id == "codevision_rl/0"  # the per-source table's rows
    assert first.extra == {"dataset_name": "ChartQA", "index": 0, "split": "train"}
    assert first.question == "What does the image show?" and np.array_equal(np.asarray(first.images[0]), np.asarray(image))
    assert second.required_ops == [] and second.answer == " park. "  # the truth as written
    assert third.required_ops == ["crop"] and third.bbox is None  # kept: the reward config decides what it pays


def test_loader_options_name_the_image_column_and_the_answer_field(tmp_path):
    row = release_row(0, smooth_image(np.random.default_rng(1), (32, 24)), "4", bbox=[1, 1, 9, 9])
    row["extra_info"]["answer"] = "four"
    row["pictures"] = row.pop("images")
    path = tmp_path / "renamed.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    with pytest.raises(MalformedRowError, match="no images in column 'images' .*image_column"):
        read_parquet(path)[0]
    task = read_parquet(path, image_column="pictures", answer_field="extra_info.answer", crop_from_bbox=True)[0]
    assert (task.answer, task.transforms) == ("four", ["crop"])
    with pytest.raises(MalformedRowError, match="answer_field 'extra_info.truth': the row has no 'truth'"):
        read_parquet(path, image_column="pictures", answer_field="extra_info.truth")[0]


def test_task_options_reach_the_loader_from_gym_make(tmp_path):
    import gymnasium as gym

    import cv_env  # noqa: F401

    path = tmp_path / "rows.parquet"
    write_release_rows(path, [release_row(0, smooth_image(np.random.default_rng(2), (32, 24)), "7", bbox=[1, 1, 9, 9])])
    env = gym.make("CodeVision-v0", tasks=str(path), sandbox={"workers": 1}, disable_env_checker=True,
                   task_options={"crop_from_bbox": True})
    assert env.unwrapped.tasks[0].required_ops == ["crop"]
    env.close()
    with pytest.raises(ValueError, match=r"task option\(s\) \['size'\] do not apply to a parquet source; "
                                         "it takes: on_error, crop_from_bbox, image_column, answer_field"):
        load_tasks(str(path), size=3)
    with pytest.raises(ValueError, match=r"\['crop_from_bbox'\] do not apply to a synthetic source"):
        load_tasks("synthetic", crop_from_bbox=True)
    with pytest.raises(ValueError, match="not to a given TaskSource or list of tasks"):
        load_tasks([SyntheticSuite("charts", size=1)[0]], on_error="skip")
    assert load_tasks("charts", size=2, difficulty=None).size == 2  # None keeps the default
