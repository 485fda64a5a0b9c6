"""The procedural suite: determinism, split disjointness, exact answers, solvability by the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cv_env.task import Task
from cv_env.tasks import CATEGORIES, DEFAULT_MIX, ListSource, SyntheticSuite, TaskSource, load_tasks, render_original
from cv_env.tasks.base import content_hash
from cv_env.tasks.charts import render_charts
from cv_env.tasks.geometry import frame_of
from cv_env.tasks.multi import render_multi_image
from cv_env.tasks.ocr import MAX_TARGET_SHARE
from cv_env.tasks.oracle import check_solvable, oracle_solution
from cv_env.tasks.orientation import render_glyph_orientation
from cv_env.tasks.shapes import render_shapes_space
from cv_env.tasks.suite import SPLITS


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(pixels(a), pixels(b))


# ------------------------------------------------------------------------------- the contract

def test_load_tasks_resolves_every_spec():
    assert isinstance(load_tasks("synthetic"), SyntheticSuite)
    assert load_tasks("charts").mix == {"charts": 1}
    assert load_tasks("charts,tiny_ocr", split="test").mix == {"charts": 1, "tiny_ocr": 1}
    suite = load_tasks("synthetic", split="validation", seed=3, size=7)
    assert len(suite) == 7 and suite.split == "validation" and suite.seed == 3
    assert load_tasks(suite) is suite
    task = suite[0]
    listed = load_tasks([task])
    assert isinstance(listed, ListSource) and listed[0] is task
    with pytest.raises(ValueError, match="unknown task spec 'chart'"):
        load_tasks("chart")
    with pytest.raises(TypeError, match="cannot load tasks from a int"):
        load_tasks(5)


def test_default_sizes_and_mix_proportions_are_exact_per_block():
    assert [len(load_tasks("synthetic", split=s)) for s in SPLITS] == [10_000, 500, 500]
    suite = SyntheticSuite(size=200)
    block = sum(DEFAULT_MIX.values())
    counts = {}
    for i in range(block * 3):
        counts[suite.category_of(i)] = counts.get(suite.category_of(i), 0) + 1
    assert counts == {name: 3 * k for name, k in DEFAULT_MIX.items()}
    assert "glyph_orientation" not in counts
    # Spread out, not in runs: no category fills more than 2 consecutive slots.
    names = [suite.category_of(i) for i in range(block)]
    assert all(not (names[i] == names[i + 1] == names[i + 2]) for i in range(block - 2))


def test_task_source_indexing_iteration_and_sample():
    suite = SyntheticSuite("glyph_orientation", size=5)
    assert isinstance(suite, TaskSource)
    assert [t.id for t in suite] == [suite[i].id for i in range(5)]
    assert suite[-1].id == suite[4].id
    with pytest.raises(IndexError, match="out of range: this source has 5 tasks"):
        suite[5]
    a, b = suite.sample(np.random.default_rng(7)), suite.sample(np.random.default_rng(7))
    assert a.id == b.id


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        SyntheticSuite(split="dev")
    with pytest.raises(ValueError, match="difficulty must be 0, 1, 2 or 'mixed'"):
        SyntheticSuite(difficulty=5)
    with pytest.raises(ValueError, match="unknown task category 'cats'"):
        SyntheticSuite({"cats": 1})
    with pytest.raises(ValueError, match="mix is empty"):
        SyntheticSuite({"charts": 0})


# ------------------------------------------------------------------- determinism and splits

@pytest.mark.parametrize("category", list(CATEGORIES))
def test_items_are_deterministic_per_seed(category):
    one, two = SyntheticSuite(category, seed=11, size=3), SyntheticSuite(category, seed=11, size=3)
    for i in range(3):
        a, b = one[i], two[i]
        assert (a.id, a.question, a.answer, a.transforms, a.bbox) == (b.id, b.question, b.answer, b.transforms, b.bbox)
        assert all(same_pixels(x, y) for x, y in zip(a.images, b.images))
    other = SyntheticSuite(category, seed=12, size=3)
    assert [other.params(i)[1] for i in range(3)] != [one.params(i)[1] for i in range(3)]


def test_splits_never_share_an_item():
    seen: dict[str, set[str]] = {}
    for split in SPLITS:
        lo, hi = SPLITS[split]
        suite = SyntheticSuite({name: 1 for name in CATEGORIES}, split=split, seed=0, size=400)
        keys = set()
        for i in range(len(suite)):
            name, params, _ = suite.params(i)
            assert lo <= content_hash(params) < hi
            keys.add(name + repr(sorted((k, repr(v)) for k, v in params.items() if k != "render_seed")))
        seen[split] = keys
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]


# ------------------------------------------------------------------------- solvability

def _check_solvable(task: Task) -> None:
    steps = oracle_solution(task)
    assert steps[-1]["answer"] == task.answer and set(steps[-1]) == {"answer", "thought"}
    assert all(set(s) == {"code", "image_index", "description", "thought"} for s in steps[:-1])
    check_solvable(task)  # pixel equality with the clean render (see its docstring)
    if "crop" in task.transforms:
        originals = render_original(task)
        target = task.extra["target_box_original"]
        shown_frame = frame_of(task.transforms, originals[0].size)
        assert shown_frame.box_to_source(task.bbox) == [float(v) for v in target]
        w, h = originals[0].size
        assert w >= 1500 and h >= 1000
        assert (target[2] - target[0]) * (target[3] - target[1]) < MAX_TARGET_SHARE * w * h
        assert target[3] - target[1] >= 12  # text of at least ~8 px ink: legible once cropped


def test_check_solvable_catches_a_wrong_fix():
    task = SyntheticSuite("orientation_ocr", size=1)[0]
    check_solvable(task)
    wrong = {"rotate_90": "rotate_180", "rotate_180": "rotate_90", "rotate_270": "flip_vertical",
             "flip_horizontal": "flip_vertical", "flip_vertical": "flip_horizontal"}[task.transforms[0]]
    task.transforms = [wrong]  # the record no longer matches what was done to the image
    with pytest.raises(ValueError, match="does not restore the original render"):
        check_solvable(task)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_every_item_is_solvable_by_the_oracle(category):
    suite = SyntheticSuite(category, split="test", seed=5, size=16 if category == "corruption" else 12, difficulty="mixed")
    transforms_seen = set()
    for task in suite:
        assert task.category == category and task.answer and task.question
        _check_solvable(task)
        transforms_seen.update(task.transforms)
    if category not in ("corruption",):
        assert transforms_seen & {"rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical"}


def test_corruption_tasks_record_the_corruption_not_a_transform():
    for task in SyntheticSuite("corruption", size=8, difficulty="mixed"):
        assert task.transforms == [] and task.bbox is None
        assert task.extra["corruption"] in ("dark", "low_contrast", "noise", "blur")


def test_tiny_ocr_needs_crop_and_orientation():
    task = SyntheticSuite("tiny_ocr", size=1)[0]
    assert task.transforms[-1] == "crop" and len(task.transforms) == 2
    assert set(task.required_ops) == {"crop", {"rotate_90": "rotate_270", "rotate_270": "rotate_90"}.get(
        task.transforms[0], task.transforms[0])}
    code = oracle_solution(task)[0]["code"]
    x1, y1, x2, y2 = (int(v) for v in task.bbox)
    assert code.startswith(f"result = image.crop(({x1}, {y1}, {x2}, {y2}))")


# -------------------------------------------------------------- hand-computed answers

def test_chart_answers_are_computed_from_the_values():
    base = {"chart": "bar", "labels": ["Jan", "Feb", "Mar", "Apr"], "values": [12, 70, 45, 30], "pair": [1, 3],
            "threshold": 40, "colour": "blue", "title": "Orders", "size": [480, 360], "transform": None}
    expected = {"value": "70", "max": "Feb", "min": "Jan", "difference": "40", "sum": "100", "count_above": "2"}
    for qtype, answer in expected.items():
        assert render_charts({**base, "question": qtype}).answer == answer, qtype


def test_shape_answers_refer_to_the_upright_scene():
    scene = {"shapes": [{"shape": "circle", "colour": "red", "x": 60, "y": 200, "r": 20},
                        {"shape": "square", "colour": "blue", "x": 300, "y": 100, "r": 20}],
             "pick": [0, 1], "side": "min", "caption": "Figure 1"}
    # The red circle is left of and below the blue square, whatever transform is shown.
    for transform in (None, "rotate_90", "flip_horizontal"):
        lr = render_shapes_space({**scene, "question": "left_right", "transform": transform})
        ab = render_shapes_space({**scene, "question": "above_below", "transform": transform})
        assert (lr.answer, ab.answer) == ("A", "B")
        assert lr.transforms == ([transform] if transform else [])
    extreme = render_shapes_space({**scene, "question": "extreme", "transform": "rotate_180"})
    assert extreme.answer == "red" and "leftmost" in extreme.question  # pick[0]=0 is even: x axis, min side
    half = render_shapes_space({**scene, "question": "count_half", "transform": "rotate_180"})
    assert half.answer == "1" and "left half" in half.question


def test_multi_image_answers_use_the_upright_numbers():
    p = {"numbers": ["68", "91"], "question": "sum", "transform_image": 0, "transform": "rotate_180",
         "papers": [[230, 230, 230], [240, 240, 240]], "ink": [10, 10, 10]}
    assert render_multi_image(p).answer == "159"  # not 89 + 91
    assert render_multi_image({**p, "question": "largest"}).answer == "B"
    assert render_multi_image({**p, "question": "difference"}).answer == "23"


def test_corner_answer_is_the_upright_corner():
    from cv_env.tasks.orientation import render_corner_orientation

    p = {"corner": "bottom-right", "ink": "blue", "offset": [2, 2]}
    for transform in (None, "rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical"):
        r = render_corner_orientation({**p, "transform": transform})
        assert r.answer == "D" and r.images[0].size == (112, 112) and r.transforms == ([transform] if transform else [])
    # Upright, the blue square fills the bottom-right corner; the shown rotate_270 copy has it bottom-left.
    blue = lambda image: (pixels(image)[:, :, 2] > 150) & (pixels(image)[:, :, 0] < 100)  # noqa: E731
    ys, xs = np.nonzero(blue(r.originals[0]))
    assert ys.min() > 56 and xs.min() > 56 and len(ys) == 34 * 34
    ys, xs = np.nonzero(blue(render_corner_orientation({**p, "transform": "rotate_270"}).images[0]))
    assert ys.min() > 56 and xs.max() < 56


def test_glyph_answer_is_the_upright_direction():
    p = {"variant": "arrow", "value": "left", "ink": "blue", "jitter": [0, 0]}
    for transform in (None, "rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical"):
        r = render_glyph_orientation({**p, "transform": transform})
        assert r.answer == "C" and r.images[0].size == (112, 112)
    # The upright arrow points left: more ink in the left half of the glyph area (the head).
    ink = (pixels(r.originals[0])[30:, :, 2] > 150) & (pixels(r.originals[0])[30:, :, 0] < 100)
    cols = ink.sum(axis=0)
    assert cols[:56].max() > cols[56:].max()
