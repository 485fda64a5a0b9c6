"""CodeVision's dense process reward: every term a small named pure function.

Notation (the paper's): E = the ops that undo the task's transforms (`Task.required_ops`),
U = the ops detected in *successful* executions over the episode, n = number of executions
(failed ones included), ORIENT = rotations ∪ flips, CORE = ORIENT ∪ {crop}.

    total = w_acc*acc + w_fmt*fmt + alpha*mandatory + beta*necessity + exact + emerge
            - gamma*usage_cost - delta*spurious + exec_fail

`acc` is already gated (a skipped crop can zero it), `exact` and `emerge` are the bonus values
themselves, and `exec_fail` is the (negative) sum of the per-call penalties. `necessity` is a
group term: one episode cannot know it, so `episode_components` reports 0 and trainers add
`apply_necessity(group, cfg)` once a group of rollouts of the same task has finished.

Payment contract with the environment (the sum of an episode's step rewards is its total):

* on each tool step the env pays `exec_fail_reward(ok, cfg)` (0 for a successful execution);
* on the terminal step it pays `episode_components(outcome, cfg)["total"] - paid_so_far`, where
  `paid_so_far` is the sum of the rewards it already paid, and puts the components dict in
  `info["reward_components"]`.

Defaults reproduce the CodeVision release's weights (its `qwen3_vl.sh`: alpha 1.0, beta 0.0,
gamma 0.5, delta 0.5, format 0.1, emerge 0.2) plus the per-call failure penalty the paper
describes and the release computes but drops (0.05 here, 0 in the `codevision_release` preset).
The rule keys (`crop_frame`, `crop_without_bbox`, `answer_rules`, `format_rules`, `tool_use`,
`last_turn_call`) choose between our rules and the release's: `codevision_release` sets every one
to the release's, so it scores any episode as the release's reward code does. README ("The two
reward presets") gives each difference and its reason.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from cv_env import release_rules
from cv_env.task import CORE_OPS, ORIENT_OPS

__all__ = [
    "RewardConfig",
    "EpisodeOutcome",
    "PRESETS",
    "iou",
    "format_reward",
    "mandatory_reward",
    "gated_accuracy",
    "exact_reward",
    "emerge_reward",
    "usage_cost",
    "spurious_penalty",
    "exec_fail_reward",
    "step_components",
    "episode_components",
    "uses_tools",
    "necessity",
    "apply_necessity",
]


@dataclass(frozen=True)
class RewardConfig:
    """Weights of the CodeVision process reward (defaults: the release plus the per-call penalty).

    Build one from a Hydra/YAML dict with `RewardConfig.from_dict(d)` (unknown keys are an
    error) or by name with `RewardConfig.preset("codevision_release")`.
    """

    accuracy_weight: float = 1.0  # weight of acc, the (gated) answer correctness in {0, 1}
    format_weight: float = 0.1  # w_fmt: weight of fmt, the think/answer format check in {0, 1}
    alpha: float = 1.0  # weight of mandatory, the share of required inverse ops used (crop by IoU)
    beta: float = 0.0  # weight of necessity, the group term (0 = off, as in the release)
    gamma: float = 0.5  # weight of usage_cost, the executions beyond the free budget
    delta: float = 0.5  # weight of spurious, the orientation ops used when none was needed
    exact_bonus: float = 0.1  # paid when the used core ops equal the required core ops exactly
    emerge_bonus: float = 0.2  # paid for a correct answer that used an op outside CORE
    exec_fail_penalty: float = 0.05  # subtracted per failed execution, on its step (release: 0)
    crop_gate: float = 0.1  # if crop is required and mandatory < crop_gate, acc *= mandatory
    free_calls: int = 2  # executions free of usage_cost: max(free_calls, |E|)
    # necessity pays only when at most this many tool-free rollouts of the task were correct
    necessity_max_correct_without_tools: int = 1
    # -- the rules where our preset and the release differ (RULES lists each one's choices) --
    crop_frame: str = "bbox"  # bbox: crop boxes mapped through frames into the bbox's image | source: as cut (release)
    crop_without_bbox: float = 1.0  # mandatory share of a required crop used on a task without a bbox (release: 0)
    answer_rules: str = "codevision"  # codevision: cv_env.answers on the final turn | release: its strict rules
    format_rules: str = "codevision"  # codevision: every turn checked | release: the whole response checked
    tool_use: str = "success"  # necessity's tool-using rollout: success (a call that ran) | call (any; release)
    last_turn_call: str = "run"  # a tool call in the last allowed turn: run (and count it) | skip (release)

    def __post_init__(self) -> None:
        for name, choices in RULES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"reward config {name!r} is {getattr(self, name)!r}: choose one of {', '.join(choices)}"
                )
        for f in dataclasses.fields(self):
            if f.name in RULES:
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"reward config {f.name!r} must be a number, got {value!r}")
            if value < 0:
                raise ValueError(
                    f"reward config {f.name!r} is {value}: weights are magnitudes (>= 0); "
                    "penalties are subtracted by the formula"
                )
        for name in ("free_calls", "necessity_max_correct_without_tools"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(
                    f"reward config {name!r} must be a whole number, got {getattr(self, name)}"
                )
            object.__setattr__(self, name, int(getattr(self, name)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "RewardConfig":
        """Build from a mapping (e.g. a Hydra node); unknown keys raise a ValueError naming them."""
        d = dict(d or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown reward config key(s) {unknown}; valid keys are: {', '.join(valid)}"
            )
        return cls(**d)

    @classmethod
    def preset(cls, name: str = "codevision") -> "RewardConfig":
        """A named preset: "codevision" (default) or "codevision_release" (the release exactly)."""
        if name not in PRESETS:
            raise ValueError(f"unknown reward preset {name!r}; available presets: {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name])

    def to_dict(self) -> dict[str, float | str]:
        """Plain dict of every weight and rule (for logging and round trips)."""
        return dataclasses.asdict(self)


# The rule keys and their choices: ours first (the `codevision` default), then the release's.
RULES: dict[str, tuple[str, ...]] = {
    "crop_frame": ("bbox", "source"),
    "answer_rules": ("codevision", "release"),
    "format_rules": ("codevision", "release"),
    "tool_use": ("success", "call"),
    "last_turn_call": ("run", "skip"),
}

# The same values live in conf/reward/<name>.yaml (a test keeps them in sync).
PRESETS: dict[str, dict[str, float | str]] = {
    "codevision": {},
    "codevision_release": {
        "exec_fail_penalty": 0.0, "crop_frame": "source", "crop_without_bbox": 0.0, "answer_rules": "release",
        "format_rules": "release", "tool_use": "call", "last_turn_call": "skip",
    },
}


@dataclass(frozen=True)
class EpisodeOutcome:
    """What the reward needs to know about one finished episode, as plain data.

    assistant_turns: the model's turns, in order (tool responses are not assistant turns).
    correct: the answer checker's verdict (rule, math or judge).
    required_ops: E, from `Task.required_ops`.
    used_ops: U, ops detected in successful executions (an op that changed no pixel is absent).
    crop_boxes: every crop the model made, in the frame the config's `crop_frame` names: mapped
        into the frame of `bbox` ("bbox"), or in the pixels of the image it was cut from ("source").
    bbox: the task's box `[x1, y1, x2, y2]`, or None.
    n_calls: executions attempted, failed ones included; n_failed: how many of them failed.
    """

    assistant_turns: Sequence[str]
    correct: bool
    required_ops: Sequence[str] = ()
    used_ops: Iterable[str] = frozenset()
    crop_boxes: Sequence[Sequence[float]] = ()
    bbox: Sequence[float] | None = None
    n_calls: int = 0
    n_failed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.assistant_turns, str):
            raise TypeError("assistant_turns must be a list of turns, not one string")
        set_ = object.__setattr__  # frozen: normalise once so the record is truly immutable
        set_(self, "assistant_turns", tuple(str(t) for t in self.assistant_turns))
        set_(self, "correct", bool(self.correct))
        set_(self, "required_ops", tuple(dict.fromkeys(self.required_ops)))
        set_(self, "used_ops", frozenset(self.used_ops))
        boxes = tuple(tuple(float(v) for v in box) for box in self.crop_boxes)
        for box in boxes:
            if len(box) != 4:
                raise ValueError(f"crop box {list(box)} must be [x1, y1, x2, y2]")
        set_(self, "crop_boxes", boxes)
        if self.bbox is not None:
            if len(self.bbox) != 4:
                raise ValueError(f"bbox {list(self.bbox)} must be [x1, y1, x2, y2] or None")
            set_(self, "bbox", tuple(float(v) for v in self.bbox))
        if not (0 <= self.n_failed <= self.n_calls):
            raise ValueError(
                f"n_failed={self.n_failed} and n_calls={self.n_calls}: need 0 <= n_failed <= n_calls"
            )


# -- geometry ----------------------------------------------------------------------------------


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes `[x1, y1, x2, y2]` (corner order does not matter)."""
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


# -- the terms -----------------------------------------------------------------------------------


_FORMAT_TAGS = re.compile(r"</?think>|<answer>")


def _think_blocks_balanced(turn: str) -> tuple[bool, int]:
    """(balanced, depth at the end of the first <answer>) for one turn's <think> tags.

    Balanced means every <think> is closed before the next opens (no nesting) and every
    </think> closes an open one. The second value is -1 when the turn has no <answer>.
    """
    depth, answer_depth = 0, -1
    for match in _FORMAT_TAGS.finditer(turn):  # one pass: linear in the turn's length
        tag = match.group()
        if tag == "<think>":
            if depth:
                return False, answer_depth
            depth = 1
        elif tag == "</think>":
            if not depth:
                return False, answer_depth
            depth = 0
        elif answer_depth < 0:
            answer_depth = depth
    return depth == 0, answer_depth


def format_reward(assistant_turns: Sequence[str]) -> float:
    """fmt in {0, 1}: the think → (tool call | answer) format held on every assistant turn.

    Every turn starts with <think> (after optional whitespace) and its think tags are balanced;
    across the episode there is exactly one <answer>…</answer>, at the end of the last turn
    and not inside a think block.
    """
    if not assistant_turns:
        return 0.0
    for turn in assistant_turns:
        if not turn.lstrip().startswith("<think>"):
            return 0.0
        balanced, _ = _think_blocks_balanced(turn)
        if not balanced:
            return 0.0
    text = "".join(assistant_turns)
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return 0.0
    last = assistant_turns[-1].rstrip()
    if "<answer>" not in last or not last.endswith("</answer>"):
        return 0.0
    if last.index("<answer>") > last.index("</answer>"):
        return 0.0
    _, answer_depth = _think_blocks_balanced(last)
    return 1.0 if answer_depth == 0 else 0.0


def mandatory_reward(
    required_ops: Sequence[str],
    used_ops: Iterable[str],
    crop_boxes: Sequence[Sequence[float]] = (),
    bbox: Sequence[float] | None = None,
    crop_without_bbox: float = 1.0,
) -> float:
    """mandatory in [0, 1]: the share of E that U covers, a required crop scored by its best IoU.

    |(E - {crop}) ∩ U| / |E| + [crop ∈ E ∩ U] * max IoU(bbox, crop boxes) / |E|, capped at 1;
    0 when E is empty. A required crop on a task without a bbox cannot be scored: using it
    earns `crop_without_bbox` of its share (1 in our preset; the release pays 0).
    """
    required, used = set(required_ops), set(used_ops)
    if not required:
        return 0.0
    share = len((required - {"crop"}) & used)
    if "crop" in required and "crop" in used:
        if bbox is None:
            share += crop_without_bbox
        else:
            share += max((iou(bbox, box) for box in crop_boxes), default=0.0)
    return min(1.0, share / len(required))


def gated_accuracy(
    correct: bool, required_ops: Sequence[str], mandatory: float, cfg: RewardConfig
) -> float:
    """acc: 1 for a correct answer, scaled by mandatory when a required crop was (nearly) skipped.

    A correct answer on a crop task whose mandatory term is below `crop_gate` was most likely
    guessed from the full image, so it earns only `mandatory` (possibly 0).
    """
    acc = 1.0 if correct else 0.0
    if "crop" in required_ops and mandatory < cfg.crop_gate:
        acc *= mandatory
    return acc


def exact_reward(required_ops: Sequence[str], used_ops: Iterable[str], cfg: RewardConfig) -> float:
    """exact: `exact_bonus` when E ∩ CORE is non-empty and equals U ∩ CORE (no more, no less)."""
    required_core = set(required_ops) & CORE_OPS
    return cfg.exact_bonus if required_core and required_core == set(used_ops) & CORE_OPS else 0.0


def emerge_reward(correct: bool, used_ops: Iterable[str], cfg: RewardConfig) -> float:
    """emerge: `emerge_bonus` for a correct answer that used an op outside CORE (e.g. contrast)."""
    return cfg.emerge_bonus if correct and set(used_ops) - CORE_OPS else 0.0


def usage_cost(n_calls: int, required_ops: Sequence[str], cfg: RewardConfig) -> float:
    """usage_cost: executions beyond the free budget max(free_calls, |E|) (failed ones count)."""
    return float(max(0, n_calls - max(cfg.free_calls, len(set(required_ops)))))


def spurious_penalty(required_ops: Sequence[str], used_ops: Iterable[str]) -> float:
    """spurious: |U ∩ ORIENT| when the task needs no orientation op (E ∩ ORIENT empty), else 0."""
    if set(required_ops) & ORIENT_OPS:
        return 0.0
    return float(len(set(used_ops) & ORIENT_OPS))


def exec_fail_reward(ok: bool, cfg: RewardConfig) -> float:
    """The per-call term the env pays on a tool step: -exec_fail_penalty if the execution failed."""
    return 0.0 if ok else -cfg.exec_fail_penalty


# The names of `episode_components`, in its order (every step's info names them all).
TERMS = ("acc", "fmt", "mandatory", "necessity", "exact", "emerge", "usage_cost", "spurious", "exec_fail", "total")


def step_components(ok: bool, cfg: RewardConfig) -> dict[str, float]:
    """The terms of a tool step that does not end the episode: every term by name, 0 but this
    call's `exec_fail` penalty, which is also the step's `total` (the rest is paid at the end)."""
    terms = dict.fromkeys(TERMS, 0.0)
    terms["exec_fail"] = terms["total"] = exec_fail_reward(ok, cfg)
    return terms


def episode_components(outcome: EpisodeOutcome, cfg: RewardConfig | None = None) -> dict[str, float]:
    """Every reward term of one finished episode by name, and their weighted `total`.

    Keys: acc, fmt, mandatory, necessity (always 0 here: a group term, see `apply_necessity`),
    exact, emerge, usage_cost, spurious, exec_fail (sum over calls, <= 0), total. Values are
    the terms as defined in the module docstring (unweighted, except the bonuses and
    exec_fail, which are amounts). The env pays exec_fail on each step as it happens and
    `total - paid_so_far` at the end, so an episode's step rewards sum to `total`.
    """
    cfg = cfg or RewardConfig()
    o = outcome
    mandatory = mandatory_reward(o.required_ops, o.used_ops, o.crop_boxes, o.bbox, cfg.crop_without_bbox)
    if cfg.format_rules == "release":
        fmt = release_rules.format_reward(release_rules.response_text(o.assistant_turns))
    else:
        fmt = format_reward(o.assistant_turns)
    terms = {
        "acc": gated_accuracy(o.correct, o.required_ops, mandatory, cfg),
        "fmt": fmt,
        "mandatory": mandatory,
        "necessity": 0.0,
        "exact": exact_reward(o.required_ops, o.used_ops, cfg),
        "emerge": emerge_reward(o.correct, o.used_ops, cfg),
        "usage_cost": usage_cost(o.n_calls, o.required_ops, cfg),
        "spurious": spurious_penalty(o.required_ops, o.used_ops),
        "exec_fail": sum((exec_fail_reward(False, cfg) for _ in range(o.n_failed)), 0.0),  # never -0.0
    }
    terms["total"] = (
        cfg.accuracy_weight * terms["acc"]
        + cfg.format_weight * terms["fmt"]
        + cfg.alpha * terms["mandatory"]
        + cfg.beta * terms["necessity"]
        + terms["exact"]
        + terms["emerge"]
        - cfg.gamma * terms["usage_cost"]
        - cfg.delta * terms["spurious"]
        + terms["exec_fail"]
    )
    return terms


# -- the group term -----------------------------------------------------------------------------


# A finished episode as the group term sees it: a dict with `correct`, `n_calls` (and
# optionally `n_failed` and `acc`), or an EpisodeOutcome.
Episode = Mapping[str, Any] | EpisodeOutcome


def _field(episode: Episode, name: str, default: Any = None) -> Any:
    if isinstance(episode, Mapping):
        return episode.get(name, default)
    return getattr(episode, name, default)


def uses_tools(episode: Episode, tool_use: str = "success") -> bool:
    """Whether an episode counts as a with-tools rollout.

    tool_use "success" (ours): at least one *successful* execution. Calls that all failed gave
    the model no visual evidence, so the rollout answered without tools; counting them would
    also let a cheap failing call buy the necessity bonus. "call" (the release): any call.
    `n_failed` defaults to 0 when the episode does not report it.
    """
    n_calls = int(_field(episode, "n_calls", 0) or 0)
    n_failed = int(_field(episode, "n_failed", 0) or 0) if tool_use == "success" else 0
    return n_calls - n_failed > 0


def necessity(group: Sequence[Episode], max_correct_without_tools: int = 1, tool_use: str = "success") -> list[float]:
    """The unweighted necessity term of each episode in a group of rollouts of one task.

    max(0, acc_with_tools - acc_without_tools), paid to correct tool-using episodes when the
    group has at least one tool-free episode and at most `max_correct_without_tools` of those
    were correct (otherwise the question is answerable without tools). Each episode needs
    `correct` and `n_calls` (and optionally `n_failed`; see `uses_tools`). An episode whose
    accuracy the crop gate cut (it reports `acc` < 1 although correct: the answer was likely
    guessed without the required crop) earns none, as in the release.
    """
    for i, episode in enumerate(group):
        if _field(episode, "correct") is None or _field(episode, "n_calls") is None:
            raise ValueError(
                f"group[{i}] needs 'correct' and 'n_calls' to compute necessity, got {episode!r}"
            )
    tools = [uses_tools(e, tool_use) for e in group]
    with_tools = [bool(_field(e, "correct")) for e, t in zip(group, tools) if t]
    without_tools = [bool(_field(e, "correct")) for e, t in zip(group, tools) if not t]
    if not with_tools or not without_tools or sum(without_tools) > max_correct_without_tools:
        return [0.0] * len(group)
    gain = max(0.0, sum(with_tools) / len(with_tools) - sum(without_tools) / len(without_tools))
    return [gain if t and _field(e, "correct") and float(_field(e, "acc", 1.0)) >= 1.0 else 0.0
            for e, t in zip(group, tools)]


def apply_necessity(group: Sequence[Episode], cfg: RewardConfig | None = None) -> list[float]:
    """Per-episode reward adjustment (beta * necessity) for trainers to add to each total."""
    cfg = cfg or RewardConfig()
    return [cfg.beta * v for v in necessity(group, cfg.necessity_max_correct_without_tools, cfg.tool_use)]
