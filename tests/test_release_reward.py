"""`reward=codevision_release` against the CodeVision release's own rules, worked out by hand.

The release (github.com/ByteDance-BandAI/CodeVision) scores an episode from a summary:
`verl/experimental/agent_loop/agent_loop.py` (`_post_aggregate_tool_rewards` and its helpers)
combines the row's `transform` and bbox, the ops the calls used, their literal crop boxes, the
number of calls, the answer's correctness (`recipe/codevision/reward.py`) and the format flag
(`verl/workers/reward_manager/uvtr.py`). Here release-layout rows are played through the real
env (sandbox, host verification, frames), and every episode's reward is worked out from its
*plan* alone (what each call does, which answer it gives, how its turns are written) by the
release's rules as `release_expectation` states them, never from what the env recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

import cv_env  # noqa: F401  (registers CodeVision-v0)
from cv_env.frames import Frame
from cv_env.sandbox import Sandbox
from release_rows import release_row, smooth_image, write_release_rows

MAX_TURNS = 5
ORIENT = {"rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical"}
CORE = ORIENT | {"crop"}

# (truth, final answer, the release's rule verdict: worked out by hand from recipe/codevision/reward.py)
ANSWERS = [
    ("7", "7", True),  # equal as floats
    ("7", "7.0", True),  # equal as floats
    ("7", "It is 7 apples", True),  # no float: its last number, 7
    ("7", "7 or 8", False),  # its last number is 8
    ("7", "seven", False),  # no number in it
    ("7", "6.99995", True),  # as fractions within 1e-4 of 7
    ("7", "6.9", False),
    ("B", "B", True),
    ("B", "(b)", True),  # upper-cased, a standalone B
    ("B", "The answer is B.", True),  # the A of ANSWER is no standalone letter
    ("B", "A or B", True),  # the last standalone letter A-D counts
    ("B", "B or A", False),
    ("B", "bee", False),  # no standalone letter
    ("park.", "Park", False),  # strict: the release hands this to its judge (none here)
    ("park.", "park.", True),  # equal strings
    ("3/4", "0.75", True),  # 0.75 and 3/4 are the same fraction
    ("12", "12 cm", True),  # its last number
    ("STOP", "stop", False),  # strings differ; the letter rule needs a truth A-D
]
EARLY_GUESS = "unsure"  # an answer block in an early turn: no number, no standalone letter A-D
TRANSFORMS = [[], ["rotate_90"], ["rotate_180"], ["rotate_270"], ["flip_horizontal"], ["flip_vertical"], ["crop"],
              ["rotate_90", "crop"], ["flip_vertical", "crop"], ["rotate_180", "flip_horizontal"]]
# How the turns are written, and the release's format verdict for an episode that ends in an answer:
STYLES = {
    "clean": 1.0,  # every turn <think>...</think>, then the call or the answer
    "bare_later": 1.0,  # only the first turn thinks: the release counts tags over the whole response
    "bare_first": 0.0,  # the response does not open with <think>
    "open_think": 0.0,  # the answer turn opens a <think> it never closes
    "tail": 0.0,  # text after </answer>
    "two_answers": 0.0,  # an early turn also holds an <answer> block
}


@dataclass
class Call:
    code: str
    image_index: int
    ok: bool = True
    ops: frozenset = frozenset()
    box: tuple | None = None  # the literal crop box, in the pixels of images[image_index]


@dataclass
class Plan:
    index: int
    image: Image.Image
    transform: list
    bbox: list | None
    truth: str
    prediction: str
    verdict: bool
    ending: str  # answer | neither (a turn with no call and no <answer>) | limit (a call in the last turn)
    style: str
    calls: list = field(default_factory=list)
    chain: bool = False  # a crop of the bbox's region in a copy an earlier call made (its literal coordinates count)


@dataclass
class _Image:
    size: tuple
    mode: str
    frame: Frame | None  # pixels -> image 0's, when only geometry made it


def _box_in(rng, size, min_side=8):
    w, h = size
    while True:
        x1, y1 = int(rng.integers(0, w - min_side)), int(rng.integers(0, h - min_side))
        x2, y2 = int(rng.integers(x1 + min_side, w + 1)), int(rng.integers(y1 + min_side, h + 1))
        if (x1, y1, x2, y2) != (0, 0, w, h):
            return (x1, y1, x2, y2)


def _crop(images: list[_Image], j: int, box: tuple) -> Call:
    source, (x1, y1, x2, y2) = images[j], box
    frame = None if source.frame is None else source.frame.then(Frame.identity(source.size).crop(box))
    images.append(_Image((x2 - x1, y2 - y1), source.mode, frame))
    return Call(f"result = image.crop(({x1}, {y1}, {x2}, {y2}))", j, ops=frozenset({"crop"}), box=box)


def _rotate(images: list[_Image], j: int, d: int) -> Call:
    source = images[j]
    w, h = source.size
    frame = None if source.frame is None else source.frame.then(Frame.identity(source.size).rotate(d))
    images.append(_Image((h, w) if d != 180 else (w, h), source.mode, frame))
    return Call(f"result = image.rotate({d}, expand=True)", j, ops=frozenset({f"rotate_{d}"}))


def _flip(images: list[_Image], j: int, name: str) -> Call:
    source = images[j]
    step = Frame.identity(source.size)
    step = step.flip_horizontal() if name == "flip_horizontal" else step.flip_vertical()
    images.append(_Image(source.size, source.mode, None if source.frame is None else source.frame.then(step)))
    constant = "FLIP_LEFT_RIGHT" if name == "flip_horizontal" else "FLIP_TOP_BOTTOM"
    return Call(f"result = image.transpose(Image.{constant})", j, ops=frozenset({name}))


def _bbox_crop(rng, plan: Plan, images: list[_Image], j: int) -> Call:
    """A crop of images[j]: of the bbox's region where the image maps to image 0, else anywhere."""
    source = images[j]
    box = _box_in(rng, source.size)
    if plan.bbox is not None and source.frame is not None and rng.random() < 0.8:
        mapped = tuple(int(round(v)) for v in source.frame.box_from_source(plan.bbox))
        w, h = source.size
        # Only a box inside the image: the host clips a box that is not (README: "Crop boxes are the host's").
        if 0 <= mapped[0] <= mapped[2] - 8 and 0 <= mapped[1] <= mapped[3] - 8 and mapped[2] <= w and mapped[3] <= h \
                and mapped != (0, 0, w, h):
            box = mapped
            plan.chain = plan.chain or j > 0
    return _crop(images, j, box)


def _random_call(rng, plan: Plan, images: list[_Image]) -> Call:
    """One call on one of the episode's images, and what it does (its expected effect)."""
    j = len(images) - 1 if rng.random() < 0.6 else int(rng.integers(len(images)))
    source = images[j]
    roll = rng.random()
    if roll < 0.12:
        return Call("result = image.no_such_method()", j, ok=False)
    if roll < 0.40 and min(source.size) >= 16:
        return _bbox_crop(rng, plan, images, j)
    if roll < 0.62:
        return _rotate(images, j, int(rng.choice([90, 180, 270])))
    if roll < 0.80:
        return _flip(images, j, "flip_horizontal" if rng.random() < 0.5 else "flip_vertical")
    kinds = ["contrast", "blur"] + (["grayscale"] if source.mode != "L" else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    code = {
        "contrast": "from PIL import ImageEnhance\nresult = ImageEnhance.Contrast(image).enhance(1.8)",
        "blur": "from PIL import ImageFilter\nresult = image.filter(ImageFilter.GaussianBlur(2))",
        "grayscale": 'result = image.convert("L")',
    }[kind]
    images.append(_Image(source.size, "L" if kind == "grayscale" else source.mode, None))
    return Call(code, j, ops=frozenset({kind}))


def _solving_calls(rng, plan: Plan, images: list[_Image]) -> list[Call]:
    """The calls that undo the row's transforms in order, each on the latest image, then its crop."""
    calls = []
    for t in plan.transform:
        if t.startswith("rotate_"):
            calls.append(_rotate(images, len(images) - 1, 360 - int(t.split("_")[1])))
        elif t.startswith("flip_"):
            calls.append(_flip(images, len(images) - 1, t))
    if "crop" in plan.transform:
        calls.append(_bbox_crop(rng, plan, images, len(images) - 1))
    return calls


def make_plan(rng, index: int) -> Plan:
    size = (int(rng.integers(56, 97)), int(rng.integers(40, 81)))
    truth, prediction, verdict = ANSWERS[int(rng.integers(len(ANSWERS)))]
    ending = str(rng.choice(["answer"] * 6 + ["neither", "limit"]))
    plan = Plan(index, smooth_image(rng, size), list(TRANSFORMS[int(rng.integers(len(TRANSFORMS)))]),
                list(_box_in(rng, size)) if rng.random() < 0.6 else None, truth, prediction, verdict, ending,
                str(rng.choice(list(STYLES))))
    images = [_Image(size, "RGB", Frame.identity(size))]
    if ending != "limit" and rng.random() < 0.3:  # a policy that solves the row
        plan.calls = _solving_calls(rng, plan, images)
    else:
        n_calls = MAX_TURNS if ending == "limit" else int(rng.integers(0, MAX_TURNS))
        plan.calls = [_random_call(rng, plan, images) for _ in range(n_calls)]
    if plan.style == "two_answers" and not plan.calls:
        plan.style = "clean"
    return plan


# -- the turns as the plan writes them --------------------------------------------------------


def _opening(plan: Plan, k: int) -> str:
    bare = (plan.style == "bare_first" and k == 0) or (plan.style == "bare_later" and k > 0)
    return "" if bare else "<think>Look at the image first.</think>\n"


def turns(plan: Plan) -> list[str]:
    out = []
    for k, call in enumerate(plan.calls):
        arguments = {"code": call.code, "description": "process the image", "image_index": call.image_index}
        early = f"<answer>{EARLY_GUESS}</answer>\n" if plan.style == "two_answers" and k == 0 else ""
        out.append(_opening(plan, k) + early + "<tool_call>\n"
                   + json.dumps({"name": "code_image_tool", "arguments": arguments}) + "\n</tool_call>")
    k = len(plan.calls)
    if plan.ending == "answer":
        if plan.style == "open_think":
            out.append(f"<think>Done.\n<answer>{plan.prediction}</answer>")
        else:
            tail = "\nHope this helps." if plan.style == "tail" else ""
            out.append(_opening(plan, k) + f"<answer>{plan.prediction}</answer>" + tail)
    elif plan.ending == "neither":
        out.append(_opening(plan, k) + plan.prediction)
    return out


# -- the release's rules, applied to the plan ---------------------------------------------------


def _iou(a, b):
    """IoU as the release computes it (corners as given)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else inter / 1e-6


def release_expectation(plan: Plan) -> dict:
    """The release's reward terms for the plan (weights of its qwen3_vl.sh; exec weight 0)."""
    ran = plan.calls[:MAX_TURNS - 1] if plan.ending == "limit" else plan.calls  # the last-turn call never runs
    used = set().union(*[c.ops for c in ran if c.ok])
    boxes = [c.box for c in ran if c.ok and c.box is not None]
    expected_ops = set()  # the release inverts every listed transform; crop stays crop
    for t in plan.transform:
        expected_ops.add(f"rotate_{(360 - int(t.split('_')[1])) % 360}" if t.startswith("rotate_") else t)
    if plan.ending == "limit":  # the last line is "</tool_call>": no number, no letter
        correct = False
    elif plan.ending == "neither" and plan.style == "two_answers":  # the early block is the last <answer>
        correct = False
    else:
        correct = plan.verdict
    fmt = STYLES[plan.style] if plan.ending == "answer" else 0.0
    mandatory = 0.0
    if expected_ops:
        mandatory = len((expected_ops - {"crop"}) & used) / len(expected_ops)
        if "crop" in expected_ops and "crop" in used and plan.bbox is not None:
            mandatory += max([_iou(plan.bbox, b) for b in boxes], default=0.0) / len(expected_ops)
        mandatory = min(mandatory, 1.0)
    acc = 1.0 if correct else 0.0
    if "crop" in expected_ops and mandatory < 0.1:
        acc *= mandatory
    exact = 0.1 if (expected_ops & CORE) and (expected_ops & CORE) == (used & CORE) else 0.0
    emerge = 0.2 if correct and used - CORE else 0.0
    threshold = max(2, len(expected_ops))
    usage = len(ran) - threshold if len(ran) >= threshold else 0.0
    spurious = 0.0 if expected_ops & ORIENT else float(len(used & ORIENT))
    total = acc + 0.1 * fmt + 1.0 * mandatory + exact + emerge - 0.5 * (usage + spurious)
    return {"correct": correct, "acc": acc, "fmt": fmt, "mandatory": mandatory, "necessity": 0.0, "exact": exact,
            "emerge": emerge, "usage_cost": float(usage), "spurious": spurious, "exec_fail": 0.0, "total": total}


# -- playing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout_s=10.0) as shared:
        yield shared


def play(env, index: int, turns_: list[str]) -> tuple[float, dict]:
    env.reset(seed=0, options={"index": index})
    total, info = 0.0, {}
    for turn in turns_:
        _, reward, terminated, truncated, info = env.step(turn)
        total += reward
        if terminated or truncated:
            break
    return total, info


def test_codevision_release_matches_the_release_on_generated_episodes(tmp_path, sandbox):
    rng = np.random.default_rng(19)
    plans = [make_plan(rng, i) for i in range(240)]
    path = tmp_path / "rows.parquet"
    write_release_rows(path, [release_row(p.index, p.image, p.truth, transform=p.transform, bbox=p.bbox)
                              for p in plans])
    env = gym.make("CodeVision-v0", tasks=str(path), reward="codevision_release", max_turns=MAX_TURNS,
                   sandbox=sandbox, disable_env_checker=True)
    mismatches = []
    for plan in plans:
        paid, info = play(env, plan.index, turns(plan))
        expected = release_expectation(plan)
        got = {**info["reward_components"], "correct": info["correct"]}
        if any(got[k] != pytest.approx(v, abs=1e-9) for k, v in expected.items()) or paid != pytest.approx(got["total"]):
            mismatches.append((plan.index, plan.transform, plan.bbox, [c.code for c in plan.calls], plan.ending,
                               plan.style, expected, got))
    env.close()
    assert not mismatches, "\n".join(map(str, mismatches[:5]))

    # What the 240 episodes cover (so a change to the generator cannot quietly narrow the test).
    ran_ops = [op for p in plans for c in p.calls if c.ok for op in c.ops]
    assert CORE | {"contrast", "blur", "grayscale"} <= set(ran_ops)
    assert sum(p.chain for p in plans) >= 10  # crops of rotated/flipped copies, scored on literal coordinates
    assert sum(p.bbox is None for p in plans) >= 60 and sum(p.bbox is not None for p in plans) >= 100
    assert sum(p.transform == [] for p in plans) >= 15
    assert sum("crop" in p.transform and p.bbox is None for p in plans) >= 10  # required crop, nothing to score it
    assert sum(not release_expectation(p)["correct"] for p in plans) >= 60  # wrong answers
    assert sum(not c.ok for p in plans for c in p.calls) >= 30  # failed calls
    assert {p.ending for p in plans} == {"answer", "neither", "limit"} and {p.style for p in plans} == set(STYLES)
    assert sum(release_expectation(p)["usage_cost"] > 0 for p in plans) >= 20
    assert sum(release_expectation(p)["spurious"] > 0 for p in plans) >= 15
    assert sum(release_expectation(p)["exact"] > 0 for p in plans) >= 20
    assert sum(0 < release_expectation(p)["mandatory"] < 1 for p in plans) >= 20


# -- the differences the issue found, worked out by hand -----------------------------------------


def _call(code: str, image_index: int = 0) -> str:
    arguments = {"code": code, "description": "", "image_index": image_index}
    return ("<think>Fix the image.</think>\n<tool_call>\n" + json.dumps({"name": "code_image_tool", "arguments": arguments})
            + "\n</tool_call>")


def _answer(text: str) -> str:
    return f"<think>Now I can read it.</think>\n<answer>{text}</answer>"


# image 0 is 64x48; rotate(270) makes image 1 (48x64), where image 0's [40, 4, 60, 20] is [28, 40, 44, 60]
CASES = {
    # transform, bbox, truth, turns: {preset: total}
    "rotation with a bbox: no crop is inferred (was 1.6)": (
        ["rotate_270"], [40, 4, 60, 20], "7", [_call("result = image.rotate(90, expand=True)"), _answer("7")],
        {"codevision": 1 + 0.1 + 1 + 0.1, "codevision_release": 1 + 0.1 + 1 + 0.1}),
    "a bbox alone, answered without the tool (was 0.10)": (
        [], [40, 4, 60, 20], "7", [_answer("7")], {"codevision": 1.1, "codevision_release": 1.1}),
    "rotate then crop: frames (ours) vs literal coordinates (release, IoU 0)": (
        ["rotate_90", "crop"], [40, 4, 60, 20], "7",
        [_call("result = image.rotate(270, expand=True)"), _call("result = image.crop((28, 40, 44, 60))", 1), _answer("7")],
        {"codevision": 1 + 0.1 + 1 + 0.1, "codevision_release": 1 + 0.1 + 0.5 + 0.1}),
    "a required crop without a bbox: full share (ours) vs none, so acc gated to 0 (release)": (
        ["crop"], None, "7", [_call("result = image.crop((8, 8, 40, 40))"), _answer("7")],
        {"codevision": 1 + 0.1 + 1 + 0.1, "codevision_release": 0 + 0.1 + 0 + 0.1}),
    "'Park' for 'park.': lenient rules (ours) vs strict ones, no judge (release)": (
        [], None, "park.", [_answer("Park")], {"codevision": 1.1, "codevision_release": 0.1}),
    "a second turn without <think>: our format fails, the release's holds": (
        ["rotate_270"], None, "7",
        [_call("result = image.rotate(90, expand=True)"), "<answer>7</answer>"],
        {"codevision": 1 + 0 + 1 + 0.1, "codevision_release": 1 + 0.1 + 1 + 0.1}),
    "a call in the last allowed turn: run and counted (ours) vs never run (release)": (
        ["rotate_270"], None, "7",
        [_call("result = image.rotate(90, expand=True)")] * 3 + [_call("result = image.rotate(90, expand=True)", 1)],
        {"codevision": 0 + 0 + 1 + 0.1 - 0.5 * 2, "codevision_release": 0 + 0 + 1 + 0.1 - 0.5 * 1}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_worked_cases_under_both_presets(name, tmp_path, sandbox):
    transform, bbox, truth, turns_, totals = CASES[name]
    path = tmp_path / "row.parquet"
    write_release_rows(path, [release_row(0, smooth_image(np.random.default_rng(3), (64, 48)), truth,
                                          transform=transform, bbox=bbox)])
    for preset, expected in totals.items():
        env = gym.make("CodeVision-v0", tasks=str(path), reward=preset, max_turns=4, sandbox=sandbox,
                       disable_env_checker=True)
        paid, info = play(env, 0, turns_)
        env.close()
        assert info["reward_components"]["total"] == pytest.approx(expected), (preset, info["reward_components"])
        assert paid == pytest.approx(expected)
