"""The robustness wrapper and the orientation algebra it relies on, checked by pixel equality."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cv_env.task import Task
from cv_env.tasks import ROBUSTNESS_VARIANTS, ListSource, RobustnessWrapper, SyntheticSuite, render_original
from cv_env.tasks.geometry import ORIENT_ORDER, apply_transform, apply_transforms, compose_orientation
from cv_env.tasks.oracle import run_oracle
from cv_env.tasks.orientation import DIAGNOSTIC_CHOICES


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def random_image(w=37, h=23, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("name, degrees", [("rotate_90", 90), ("rotate_180", 180), ("rotate_270", 270)])
def test_rotations_match_pil_rotate_with_expand(name, degrees):
    image = random_image()
    assert same_pixels(apply_transform(image, name), image.rotate(degrees, expand=True))


def test_composition_equals_applying_in_sequence():
    image = random_image()
    for a in ORIENT_ORDER:
        for b in ORIENT_ORDER:
            composed = compose_orientation([a, b])
            assert len(composed) <= 2
            assert same_pixels(apply_transforms(image, composed), apply_transforms(image, [a, b])), (a, b)
    assert compose_orientation(["rotate_90", "rotate_90"]) == ["rotate_180"]
    assert compose_orientation(["flip_horizontal", "flip_vertical"]) == ["rotate_180"]
    assert compose_orientation(["rotate_90", "rotate_270"]) == []
    assert compose_orientation(["rotate_180", "crop"]) == ["rotate_180"]


# ---------------------------------------------------------------------------- wrapper

def test_variants_are_the_original_plus_five_transforms_in_order():
    base = SyntheticSuite("charts", size=2)
    wrapped = RobustnessWrapper(base)
    assert wrapped.variants == ROBUSTNESS_VARIANTS and len(wrapped) == 12
    assert [wrapped.variant_of(i) for i in range(6)] == list(ROBUSTNESS_VARIANTS)
    for i, task in enumerate(wrapped):
        source = base[i // 6]
        variant = ROBUSTNESS_VARIANTS[i % 6]
        assert task.id == f"{source.id}@{variant}"
        assert task.extra["robustness"] == {"variant": variant, "base_id": source.id}
        assert (task.question, task.answer) == (source.question, source.answer)
        expected = source.images[0] if variant == "original" else apply_transform(source.images[0], variant)
        assert same_pixels(task.images[0], expected)
        if variant != "original":
            base_orient = [t for t in source.transforms if t != "crop"]
            assert task.transforms == compose_orientation(base_orient + [variant])


def test_upright_vqa_item_gets_exactly_the_variant_as_transform():
    image = random_image(60, 40)
    task = Task(id="vqa/1", images=[image], question="What colour?", answer="red", bbox=[10, 5, 30, 25],
                transforms=["crop"])
    wrapped = RobustnessWrapper(ListSource([task]))
    for variant_task, variant in zip(wrapped, ROBUSTNESS_VARIANTS):
        if variant == "original":
            assert variant_task.transforms == ["crop"] and variant_task.bbox == task.bbox
        else:
            assert variant_task.transforms == [variant, "crop"]
            # The mapped box shows the same pixels, once the orientation is undone.
            x1, y1, x2, y2 = (int(v) for v in variant_task.bbox)
            crop = variant_task.images[0].crop((x1, y1, x2, y2))
            inverse = {"rotate_90": "rotate_270", "rotate_270": "rotate_90"}.get(variant, variant)
            assert same_pixels(apply_transform(crop, inverse), image.crop((10, 5, 30, 25)))
        assert run_oracle(variant_task)  # crop (+ fix) runs


def test_bbox_mapping_on_misoriented_tiny_targets_is_pixel_exact():
    base = SyntheticSuite("tiny_ocr", split="test", size=2)
    for task in RobustnessWrapper(base):
        original = render_original(task)[0]
        (out,) = run_oracle(task)  # crop at the mapped bbox, then undo the composed orientation
        assert same_pixels(out, original.crop(tuple(task.extra["target_box_original"]))), task.id


@pytest.mark.parametrize("category", ["orientation_ocr", "multi_image", "shapes_space", "glyph_orientation"])
def test_wrapped_generated_tasks_stay_solvable(category):
    for task in RobustnessWrapper(SyntheticSuite(category, size=2)):
        k = int(task.extra.get("transform_image", 0))
        originals = render_original(task)
        outputs = run_oracle(task)
        assert same_pixels(outputs[0] if outputs else task.images[k], originals[k]), task.id


def test_orientation_diagnostic_answers_follow_the_variant():
    for task in RobustnessWrapper(SyntheticSuite("orientation_diagnostic", size=3)):
        assert len(task.transforms) == 1
        assert DIAGNOSTIC_CHOICES[task.answer] == task.transforms[0]
        (out,) = run_oracle(task)
        assert same_pixels(out, render_original(task)[0])


def test_foreign_diagnostic_without_parameters_is_refused_clearly():
    task = Task(id="x", images=[random_image()], question="which?", answer="A", answer_type="choice",
                transforms=["rotate_90"], extra={"orientation_is_answer": True, "choices": DIAGNOSTIC_CHOICES})
    wrapped = RobustnessWrapper(ListSource([task]))
    assert wrapped[1].answer == "B"  # rotate_90 then rotate_90 is rotate_180: relabelled
    assert wrapped[2].answer == "C"  # rotate_90 then rotate_180 is rotate_270
    with pytest.raises(ValueError, match="not one of its choices"):
        wrapped[3]  # rotate_90 then rotate_270 cancels out


def test_corruption_variants_record_the_corruption():
    base = SyntheticSuite("orientation_ocr", size=1)
    wrapped = RobustnessWrapper(base, transforms=(), corruptions=("dark", "noise"), severity=2)
    assert wrapped.variants == ("original", "dark", "noise")
    dark, noise = wrapped[1], wrapped[2]
    assert dark.extra["corruption"] == "dark" and dark.extra["severity"] == 2
    assert dark.transforms == base[0].transforms  # a corruption is not a transform
    assert np.asarray(dark.images[0]).mean() < 0.3 * np.asarray(base[0].images[0]).mean()
    assert same_pixels(noise.images[0], RobustnessWrapper(base, transforms=(), corruptions=("noise",), severity=2)[1].images[0])
    (fixed,) = run_oracle(dark)  # undo the orientation and brighten in one step
    assert np.abs(np.asarray(fixed, float) - np.asarray(render_original(dark)[0], float)).mean() < 5


def test_wrapper_arguments_are_checked():
    base = SyntheticSuite("charts", size=1)
    with pytest.raises(ValueError, match="unknown transform 'rotate_45'"):
        RobustnessWrapper(base, transforms=("rotate_45",))
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        RobustnessWrapper(base, corruptions=("fog",))
    with pytest.raises(ValueError, match="no variants"):
        RobustnessWrapper(base, transforms=(), include_original=False)
