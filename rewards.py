"""
Reward functions on model text.

Rewards read only what the model wrote, so every function here takes any string and never raises: a malformed
answer earns 0.0, not a crashed training step. Reading the answer out of the text and matching it against the
right one (`answer_matches`, its rules) is answers.py's job.

Every recipe reward has one shape, `reward(traj, cfg) -> float` (end of file): `mgpo_reward` (also the direct
baseline's; `mgpo_format_ok` is a metric, never rewarded), `lfpc_stage1_reward`, `lfpc_stage2_reward`.
"""

import re

from functools import partial

from answers import answer_matches, extract_answer_tag, extract_boxed, unboxed
from crop import box_metrics, l1_distance, parse_box

# -----------------------------------------------------------------------------
# accuracy (shared by the recipes)

def accuracy_reward(text: str, answer: str, options: list[str] | None) -> float:
    """
    1.0 when the last `\\boxed{}` in text holds the right answer (see `answer_matches`), else 0.0.

    >>> accuracy_reward(r"It is red. \\boxed{A}", "A", ["red", "blue"]), accuracy_reward(r"\\boxed{3.0}", "3", None)
    (1.0, 1.0)
    """
    return float(answer_matches(extract_boxed(text), answer, options))


# -----------------------------------------------------------------------------
# MGPO: the reward is accuracy_reward alone; format is a metric

def mgpo_format_ok(turn1_text: str, turn2_text: str) -> bool:
    """
    Whether an MGPO rollout followed the template: a ```json box in turn 1 and a `\\boxed{}` answer in turn 2.

    >>> mgpo_format_ok('```json\\n[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}]\\n```', r"\\boxed{B}")
    True
    """
    return parse_box(turn1_text) is not None and extract_boxed(turn2_text) is not None


# -----------------------------------------------------------------------------
# LFPC: DeepEyes-style turns (<think>, <tool_call>, <answer>), stage I reward 0.8*acc + 0.2*format + 1.2*tool,
# stage II grounding reward from nested ground-truth boxes

_LFPC_TAG_NAMES = ("think", "tool_call", "answer")
_LFPC_TAG = re.compile(rf"<(/?)({'|'.join(_LFPC_TAG_NAMES)})>")
GROUNDING_KEYS = ("coverage", "r_iou", "r_l1", "r_geo")


def tool_accuracy_reward(text: str, answer: str, options: list[str] | None) -> float:
    """
    1.0 when the last <answer> in text holds the right answer (see `answer_matches`), else 0.0. Models trained
    on `\\boxed{}` answers often write <answer>\\boxed{B}</answer>: the box is unwrapped.

    >>> tool_accuracy_reward(r"<answer>\\boxed{B}</answer>", "blue", ["red", "blue"])
    1.0
    """
    pred = extract_answer_tag(text)
    return float(answer_matches(None if pred is None else unboxed(pred), answer, options))


def _tags_balanced(text: str) -> bool:
    # Every closing tag has an opening tag before it, and every opening tag is closed.
    depth = dict.fromkeys(_LFPC_TAG_NAMES, 0)
    for closing, name in _LFPC_TAG.findall(text):
        depth[name] += -1 if closing else 1
        if depth[name] < 0:
            return False
    return not any(depth.values())


def lfpc_format_reward(turn_texts: list[str], max_answer_chars: int) -> float:
    """
    -1.0 when an LFPC rollout breaks the structure, else 0.0. turn_texts are the model's own turns, in order.
    A structure error is: unbalanced <think>, <tool_call> or <answer> tags in any turn (a closing tag before its
    opening tag included); an <answer> before the final turn; no closed <answer> in the final turn; or an answer
    longer than max_answer_chars once stripped (a reasoning dump inside the tags is not an answer).

    >>> lfpc_format_reward(["<think>zoom</think><tool_call>{}</tool_call>", "<answer>B</answer>"], 10)
    0.0
    >>> lfpc_format_reward(["<answer>B</answer>", "<answer>B</answer>"], 10), lfpc_format_reward(["</think>B"], 10)
    (-1.0, -1.0)
    """
    if not turn_texts or not all(_tags_balanced(text) for text in turn_texts):
        return -1.0
    if any("<answer>" in text for text in turn_texts[:-1]):
        return -1.0
    answer = extract_answer_tag(turn_texts[-1])
    return 0.0 if answer is not None and len(answer.strip()) <= max_answer_chars else -1.0


def tool_bonus(correct: bool, num_valid_crops: int) -> float:
    """
    1.0 for a correct answer reached with at least one valid crop, else 0.0: a crop alone earns nothing, so the
    model is not paid for calling the tool on questions it then gets wrong.

    >>> tool_bonus(True, 2), tool_bonus(True, 0), tool_bonus(False, 3)
    (1.0, 0.0, 0.0)
    """
    return float(correct and num_valid_crops >= 1)


def stage1_sum(acc: float, fmt: float, tool: float,
               acc_weight: float = 0.8, format_weight: float = 0.2, tool_weight: float = 1.2) -> float:
    """
    LFPC stage I reward of its parts, acc_weight*acc + format_weight*fmt + tool_weight*tool (weights from the
    paper's Table 12). acc and tool are 0/1, fmt is 0 or -1, so the reward ranges from -0.2 to 2.0.

    >>> stage1_sum(1.0, 0.0, 1.0), stage1_sum(1.0, 0.0, 0.0), stage1_sum(0.0, -1.0, 0.0)
    (2.0, 0.8, -0.2)
    """
    return acc_weight * acc + format_weight * fmt + tool_weight * tool


# The LFPC paper's coverage gate: a crop covering more than this of B1 holds what answers the question
COVERAGE_THRESHOLD = 0.9


def grounding_reward(pred: list[float] | None, gt_boxes: list[list[float]], size: tuple[float, float],
                     iou_weight: float, coverage_threshold: float = COVERAGE_THRESHOLD) -> dict[str, float]:
    """
    LFPC stage II grounding reward of one predicted box. All boxes are in ORIGINAL pixels, gt_boxes nested and
    smallest first (B1 = gt_boxes[0] is the least region that answers the question), size = (W, H) of the original.

        coverage = |pred ∩ B1| / |B1|
        r_iou    = max_i IoU(pred, Bi) if coverage > coverage_threshold else 0
        r_l1     = 1 - min_i L1(pred, Bi)       (corners normalised by W and H, mean of the four)
        r_geo    = iou_weight * r_iou + (1 - iou_weight) * r_l1

    IoU alone rewards tight boxes that cut off part of B1, hence the coverage gate; r_l1 keeps a signal when the
    gate is closed. pred None (no valid crop) scores 0 on every key.

    Example, 200 x 100 image, B1 = [40, 40, 60, 60], B2 = [20, 20, 80, 80], pred = [25, 25, 75, 75]:
        coverage = 1 (B1 inside pred); IoU with B1 = 400/2500 = 0.16, with B2 = 2500/3600 = 0.694: r_iou = 0.694;
        L1 to B2 = (5/200 + 5/100 + 5/200 + 5/100) / 4 = 0.0375 (closer than B1's 0.1125): r_l1 = 0.9625;
        with iou_weight 0.5, r_geo = 0.5 * 0.694 + 0.5 * 0.9625 = 0.828.
    """
    if not gt_boxes:
        raise ValueError("grounding_reward needs at least one ground-truth box")
    if pred is None:
        return dict.fromkeys(GROUNDING_KEYS, 0.0)
    best_iou, covered, _ = box_metrics(pred, gt_boxes, size)  # the rule the held-out report measures with
    r_iou = best_iou if covered > coverage_threshold else 0.0
    r_l1 = 1.0 - min(l1_distance(pred, box, size) for box in gt_boxes)
    r_geo = iou_weight * r_iou + (1.0 - iou_weight) * r_l1
    return {"coverage": covered, "r_iou": r_iou, "r_l1": r_l1, "r_geo": r_geo}


def score_crops(crops: list[list[float]], gt_boxes: list[list[float]], size: tuple[float, float],
                iou_weight: float, coverage_threshold: float, which: str) -> dict[str, float]:
    """
    The `grounding_reward` of one crop of a rollout. crops are its valid crops in ORIGINAL pixels, in the order
    they were made; which = "last" scores the last one (the latest view the model asked for), "best" the one with
    the highest r_geo. No crops scores 0 on every key.

    Example with the boxes of `grounding_reward` and iou_weight 0.5, crops [[25, 25, 75, 75], [0, 0, 200, 100]]:
        "best" is the first crop, r_geo 0.828 as there;
        "last" is the whole image: it covers B1, r_iou = IoU with B2 = 3600/20000 = 0.18,
        L1 to B2 = (20/200 + 20/100 + 120/200 + 20/100) / 4 = 0.275, r_l1 = 0.725, r_geo = 0.09 + 0.3625 = 0.4525.
    """
    if which not in ("last", "best"):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    score = partial(grounding_reward, gt_boxes=gt_boxes, size=size, iou_weight=iou_weight,
                    coverage_threshold=coverage_threshold)
    if not crops:
        return score(None)
    if which == "last":
        return score(crops[-1])
    return max(map(score, crops), key=lambda scores: scores["r_geo"])


# -----------------------------------------------------------------------------
# Recipe rewards, one shape: reward(traj, cfg) -> float; traj a rollout.Trajectory, cfg the recipe's Config.

def mgpo_reward(traj, cfg) -> float:
    """MGPO's reward, also the direct baseline's: the last turn's answer correctness (`accuracy_reward`), no format
    or grounding term (grounding emerges from it). It has no weights: `cfg` is not read."""
    return accuracy_reward(traj.texts[-1], traj.sample.answer, traj.sample.options)


def lfpc_stage1_reward(traj, cfg) -> float:
    """LFPC stage I (learn to focus), `stage1_sum` of the last turn's <answer> accuracy, the format of every turn
    and the tool bonus, with cfg's weights. E.g. correct, well formed, one crop, the paper's weights: 2.0."""
    s = traj.sample
    acc = tool_accuracy_reward(traj.texts[-1], s.answer, s.options)
    return stage1_sum(acc, lfpc_format_reward(traj.texts, cfg.max_answer_chars),
                      tool_bonus(acc > 0, len(traj.crop_boxes)), cfg.acc_weight, cfg.format_weight, cfg.tool_weight)


def crop_grounding(traj, cfg) -> dict[str, float]:
    """`score_crops` of the episode's crops against its sample's nested boxes, with cfg's settings."""
    return score_crops(traj.crop_boxes, traj.sample.boxes, traj.original_size, cfg.iou_weight,
                       cfg.coverage_threshold, cfg.grounding_crop)


def lfpc_stage2_reward(traj, cfg) -> float:
    """LFPC stage II (learn to crop precisely): the stage I reward + cfg.grounding_weight * r_geo of one crop.
    E.g. correct with one crop exactly on B1 (r_geo 1), weight 1: 2.0 + 1.0 = 3.0."""
    return lfpc_stage1_reward(traj, cfg) + cfg.grounding_weight * crop_grounding(traj, cfg)["r_geo"]
