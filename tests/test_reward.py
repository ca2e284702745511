"""Tests for reward.py: turn parsing, the three CPR terms, their sum and group advantages.

Expected values are worked out by hand in the comments next to them.
Run: python -m pytest tests/test_reward.py
"""
import math
import random
import statistics

import pytest
import torch

import reward as R

T1 = "<think>the cube looks near</think><depth-estimation>estimate the depth</depth-estimation>"
T2 = "<think>the map shows two objects</think><segmentation>segment the objects</segmentation>"
FINAL = "<think>the red cube is at 2 m</think><answer>\\boxed{B}</answer>"
MAP = "<|vision_start|><|img_1|><|img_7|><|vision_end|>"
REFLECT = "The map may be inaccurate. Think again, then call <segmentation></segmentation> or give <answer></answer>."


def response(*turns):
    """Join model turns the way a rollout is written: a map and a reflection prompt after each tool call."""
    return "<|im_start|>" + "".join(t + (MAP + REFLECT if t.endswith("-estimation>") or t.endswith("segmentation>")
                                         else "") for t in turns) + "<|im_end|>"


def test_parse_turns_convention():
    """parse_turns drops maps and reflection prompts and splits after each closing tool tag."""
    assert R.parse_turns(response(T1, T2, FINAL)) == [T1, T2, FINAL]
    assert R.parse_turns(response(FINAL)) == [FINAL]
    # Truncated right after a tool call: the missing answer turn shows up as an empty final turn.
    assert R.parse_turns(T1) == [T1, ""]
    # Truncated inside the map: the unfinished map is dropped as well.
    assert R.parse_turns(T1 + "<|vision_start|><|img_3|>") == [T1, ""]
    assert R.parse_turns("") == [] and R.parse_turns("   ") == [] and R.parse_turns(None) == []


@pytest.mark.parametrize("turns, expected", [
    ([FINAL], 1.0),
    ([T1, FINAL], 1.0),
    ([T1, T2, FINAL], 1.0),
    (["  " + T1 + "\n", "\n" + FINAL + " "], 1.0),                  # whitespace around tags is fine
    ([T1, T2, T1, FINAL], 0.0),                                    # 4 turns > 3
    ([], 0.0),                                                     # empty input
    ([""], 0.0),
    (["hello " + FINAL], 0.0),                                     # text outside the tags
    ([FINAL + " bye"], 0.0),
    ([FINAL, FINAL], 0.0),                                         # an answer before the last turn
    (["<think>x <answer>B</answer></think><depth-estimation>d</depth-estimation>", FINAL], 0.0),  # nested
    ([T1], 0.0),                                                   # final turn is a tool call
    ([T1 + T2[T2.index("<seg"):], FINAL], 0.0),                    # two tool tags in one turn
    (["<think></think><answer>B</answer>"], 0.0),                  # empty think
    (["<think>x</think><answer> </answer>"], 0.0),                 # empty answer
    (["<think>x</think><answer>B"], 0.0),                          # truncated answer
    (["<think>x</think><think>y</think><answer>B</answer>"], 0.0), # repeated think
    (["<think>x</think><depth-estimation></depth-estimation>", FINAL], 1.0),  # empty tool body is allowed
    (["<think>x</think><foo>B</foo>"], 0.0),                       # unknown tag
    ([None, FINAL], 0.0),                                          # not strings
    ("not a list of turns", 0.0),
])
def test_format_reward_cases(turns, expected):
    """r_format: 1 only for 1-3 turns of think + tool, ending in think + answer (hand-labelled table)."""
    assert R.format_reward(turns) == expected


def test_format_reward_on_raw_responses():
    """A raw response string is parsed first; a truncated one (ends in a tool call or a map) scores 0."""
    assert R.format_reward(response(T1, FINAL)) == 1.0
    assert R.format_reward(response(T1, T2, FINAL)) == 1.0
    assert R.format_reward(response(T1, T2, T1, FINAL)) == 0.0
    assert R.format_reward(response(T1)) == 0.0
    assert R.format_reward(T1 + MAP) == 0.0


def test_count_tool_calls():
    """Complete tool calls of the model are counted; tags quoted in a reflection prompt and unclosed tags are not."""
    assert R.count_tool_calls(response(FINAL)) == 0
    assert R.count_tool_calls(response(T1, FINAL)) == 1          # REFLECT quotes a <segmentation> pair: ignored
    assert R.count_tool_calls(response(T1, T2, FINAL)) == 2
    assert R.count_tool_calls([T1, T2, FINAL]) == 2
    assert R.count_tool_calls("<think>a</think><segmentation>seg") == 0
    assert R.count_tool_calls(42) == 0


def test_extract_answer():
    """The LAST closed <answer> of the model text is read, narrowed to its last balanced \\boxed{}."""
    assert R.extract_answer(response(FINAL)) == "B"
    assert R.extract_answer("<answer>A</answer> <answer> C </answer>") == "C"
    assert R.extract_answer("<answer>so \\boxed{\\frac{1}{2}} m</answer>") == "\\frac{1}{2}"
    assert R.extract_answer("<answer>3 \\boxed{4</answer>") is None     # box never closed
    assert R.extract_answer("<answer>3") is None                        # truncated answer
    assert R.extract_answer(T1 + MAP + "reflect <answer>Z</answer>") is None  # only the reflection prompt has one
    assert R.extract_answer("no tags") is None


@pytest.mark.parametrize("s, expected", [
    ("3.2 m", 3.2), ("320 cm", 3.2), ("3200mm", 3.2), ("2 meters", 2.0), ("2 metres", 2.0),
    ("0.5 km", 500.0), ("10 feet", 3.048), ("1 foot", 0.3048), ("2 ft", 0.6096), ("10 inches", 0.254),
    ("about 1.5", 1.5), ("-2", -2.0), (".5m", 0.5), ("1e1 cm", 0.1), ("\\text{12}\\,\\text{cm}", 0.12),
    ("3 mice", 3.0),                      # "m" is only a unit when a word boundary follows it
    ("three", 3.0), ("no number", None), ("", None), ("1e999", None), (2, 2.0), (float("nan"), None),
])
def test_parse_number_units(s, expected):
    """Numbers are read in metres: units m/cm/mm/km/ft/feet/foot/inch converted by hand-known factors."""
    got = R.parse_number(s)
    assert (got is None) if expected is None else got == pytest.approx(expected, rel=1e-12)


def test_mra_and_qspatial_hand_values():
    """MRA = share of tolerances 0.50, 0.45, ..., 0.05 strictly above |p-g|/g; Q-Spatial: ratio < 2."""
    assert R.mra(3.0, 3.0) == 1.0
    assert R.mra(1.23, 1.0) == 0.6        # error 0.23 < 0.50 … 0.25 (6 of 10)
    assert R.mra(3.0, 3.2) == 0.9         # error 0.0625 < 0.50 … 0.10 (9 of 10)
    assert R.mra(1.49, 1.0) == 0.1        # error 0.49 < 0.50 only
    assert R.mra(1.25, 1.0) == 0.5        # error exactly 0.25: strict, so 0.50 … 0.30 only (5 of 10)
    assert R.mra(1.5, 1.0) == 0.0         # error exactly 0.50 is not < 0.50
    assert R.mra(2.0, 1.0) == 0.0 and R.mra(-1.0, 1.0) == 0.0
    assert R.mra(0.0, 0.0) == 1.0 and R.mra(0.1, 0.0) == 0.0 and R.mra(float("inf"), 1.0) == 0.0
    assert R.mra(None, 1.0) == 0.0
    assert R.qspatial_hit(1.9, 1.0) and R.qspatial_hit(1.0, 1.9) and not R.qspatial_hit(2.0, 1.0)
    assert not R.qspatial_hit(0.0, 1.0) and not R.qspatial_hit(-1.0, -1.0) and not R.qspatial_hit("x", 1)


def ans(body):
    return f"<think>t</think><answer>{body}</answer>"


@pytest.mark.parametrize("body, gt, kind, expected", [
    ("B", "B", "choice", 1.0), ("(B)", "B", "choice", 1.0), ("b) the blue sphere", "B", "choice", 1.0),
    ("Option B", "(B)", "choice", 1.0), (" \\boxed{ c } ", "C", "choice", 1.0), ("b", "B", "choice", 1.0),
    ("The answer is (D).", "D", "choice", 1.0), ("A", "B", "choice", 0.0),
    ("a red cube", "A", "choice", 0.0),    # a lower-case article is not an option letter
    ("G", "G", "choice", 0.0),             # only A-F are options
    ("Yes", "yes", "yesno", 1.0), (" no.", "No", "yesno", 1.0), ("yes, it is", "Yes", "yesno", 1.0),
    ("Yesterday", "yes", "yesno", 0.0), ("no", "yes", "yesno", 0.0), ("maybe", "yes", "yesno", 0.0),
    ("3", "3", "count", 1.0), ("3 objects", 3, "count", 1.0), ("three", "3", "count", 1.0),
    ("3.0", "3", "count", 1.0), ("3.5", "3", "count", 0.0), ("4", "3", "count", 0.0),
    ("3 cm", "3", "count", 1.0),           # counts never convert units
    ("3.2 m", "3.2", "number", 1.0), ("320 cm", 3.2, "number", 1.0), ("3 m", "3.2", "number", 0.9),
    ("about 10 feet", "3.048 m", "number", 1.0), ("unknown", "3.2", "number", 0.0),
    ("a blue cube", "A Blue cube.", "other", 1.0),  # unknown kind: normalised exact string match
])
def test_answer_reward_table(body, gt, kind, expected):
    """r_answer per kind on hand-labelled answers, including bracketed letters, words and units."""
    assert R.answer_reward(ans(body), gt, kind) == pytest.approx(expected)


def test_answer_reward_malformed():
    """No closed answer tag, an empty answer, non-string input or a truncated box score 0."""
    for text in ["B", "<answer>B", "<answer></answer>", "<answer>\\boxed{B</answer>", None, 5, ["B"]]:
        assert R.answer_reward(text, "B", "choice") == 0.0
    assert R.answer_reward(ans("3"), None, "number") == 0.0 and R.answer_reward(ans("3"), "x", "count") == 0.0


@pytest.mark.exercise8
def test_exploration_table():
    """r_explore over one group of 8: c<3 / c=3 / c>3 against positive / negative / boundary (PAPER.md)."""
    def run(used, flag):
        return R.exploration_rewards(used, [flag], group_size=8)
    few = [1, 0, 1, 0, 0, 0, 0, 0]       # c = 2 < 3
    three = [1, 1, 1, 0, 0, 0, 0, 0]     # c = 3
    many = [1, 1, 1, 1, 1, 0, 0, 0]      # c = 5 > 3
    plus = [0.2, 0, 0.2, 0, 0, 0, 0, 0]
    minus = [-0.2] * 5 + [0.0] * 3
    zero = [0.0] * 8
    assert run(few, "positive") == plus and run(few, "negative") == zero and run(few, "boundary") == zero
    assert run(three, "positive") == zero and run(three, "negative") == zero and run(three, "boundary") == zero
    assert run(many, "positive") == zero and run(many, "negative") == minus and run(many, "boundary") == zero
    # c = 0: nobody used a tool, so nobody is rewarded even on a positive item.
    assert run([0] * 8, "positive") == zero


@pytest.mark.exercise8
def test_exploration_counts_one_call_not_two():
    """Rollouts with >= 1 call count (counts 1 and 2 alike); the released code's >= 2 rule would give c = 1 here."""
    counts = [1, 1, 1, 1, 2, 0, 0, 0]    # c = 5 > 3 on a negative item
    assert R.exploration_rewards(counts, ["negative"] * 8) == [-0.2] * 5 + [0.0] * 3


@pytest.mark.exercise8
def test_exploration_groups_and_flag_layouts():
    """Groups are consecutive blocks; per-group and per-rollout flags give the same result; bad shapes raise."""
    used = [True, False, False, False] + [True, True, True, True]  # group 0: c = 1, group 1: c = 4
    per_group = R.exploration_rewards(used, ["positive", "negative"], group_size=4, threshold=3, bonus=0.5)
    per_rollout = R.exploration_rewards(used, ["positive"] * 4 + ["negative"] * 4, group_size=4, bonus=0.5)
    assert per_group == per_rollout == [0.5, 0, 0, 0, -0.5, -0.5, -0.5, -0.5]
    with pytest.raises(ValueError):
        R.exploration_rewards([1, 0, 1], ["positive"], group_size=2)


@pytest.mark.exercise8
def test_cpr_rewards_hand_example():
    """Totals = answer + format + explore per rollout, components returned unweighted (hand-computed group of 4)."""
    good_tool = response(T1, "<think>t</think><answer>B</answer>")   # answer 1, format 1, tool
    bad_tool = response(T1, "<think>t</think><answer>C</answer>")    # answer 0, format 1, tool
    no_format = "B <answer>B</answer>"                                # answer 1, format 0, no tool
    text_only = "<think>t</think><answer>(B)</answer>"               # answer 1, format 1, no tool
    totals, comp = R.cpr_rewards([good_tool, bad_tool, no_format, text_only], ["B"], ["choice"], ["positive"],
                                 group_size=4)
    # c = 2 < 3 on a positive item: the two tool users get +0.2.
    assert comp == {"answer": [1.0, 0.0, 1.0, 1.0], "format": [1.0, 1.0, 0.0, 1.0], "explore": [0.2, 0.2, 0.0, 0.0]}
    assert totals == pytest.approx([2.2, 1.2, 1.0, 2.0])
    totals_w, _ = R.cpr_rewards([good_tool, bad_tool, no_format, text_only], ["B"] * 4, ["choice"] * 4,
                                ["positive"] * 4, group_size=4, weights=(1.0, 0.5, 2.0))
    assert totals_w == pytest.approx([1 + 0.5 + 0.4, 0 + 0.5 + 0.4, 1.0, 1.5])


@pytest.mark.exercise9
def test_group_advantages_hand_values():
    """(R - mean) / (unbiased std + eps): rewards [1,0,0,0] -> mean 0.25, std sqrt(0.75/3) = 0.5."""
    a = R.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 3.0, 1.0]), group_size=4)
    # group 2: mean 2, deviations +-1, unbiased var 4/3, std 1.1547005
    expected = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001] + \
               [s / (math.sqrt(4 / 3) + 1e-4) for s in (1, -1, 1, -1)]
    assert torch.allclose(a, torch.tensor(expected), atol=1e-6)
    assert R.group_advantages([1.0, 0.0, 0.0, 0.0], 4, scale=False).tolist() == [0.75, -0.25, -0.25, -0.25]


@pytest.mark.exercise9
def test_group_advantages_against_float64_stdlib():
    """Random rewards: matches statistics.mean / statistics.stdev (unbiased) computed per group in float64."""
    rng = random.Random(0)
    rewards = [rng.choice([0.0, 1.0, 1.2, 2.2, -0.2]) + rng.random() for _ in range(48)]
    got = R.group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size=8)
    for g in range(6):
        chunk = rewards[8 * g: 8 * g + 8]
        m, s = statistics.mean(chunk), statistics.stdev(chunk)
        assert got[8 * g: 8 * g + 8].tolist() == pytest.approx([(r - m) / (s + 1e-4) for r in chunk], rel=1e-12)


@pytest.mark.exercise9
def test_group_advantages_degenerate_groups():
    """A zero-variance group gives exact zeros (no NaN), size-1 groups give zeros, and a list input works."""
    a = R.group_advantages([0.1] * 8 + [2.2] * 8, group_size=8)
    assert torch.equal(a, torch.zeros(16))
    b = R.group_advantages(torch.tensor([0.3, 1.7, -4.0]), group_size=1)
    assert torch.equal(b, torch.zeros(3))
    assert R.group_advantages([1, 0], 2).dtype == torch.get_default_dtype()
    with pytest.raises(ValueError):
        R.group_advantages([1.0, 2.0, 3.0], group_size=2)


FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<depth-estimation>", "</depth-estimation>",
             "<segmentation>", "</segmentation>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>",
             "<|im_end|>", "<thi", "</ans", "answer>", "\\boxed{", "{", "}", "\\text{", "B", "(c)", "yes", "No",
             "3.2", "-0", "1e999", "1e-400", ".", "m", " cm", "feet", "nan", "inf", "three", " ", "\n", "é", "\x00",
             "9" * 300, "<" * 5, ">", "\\", "0.", "+-", "e5", "Option", ")", "<|img_3|>"]


def test_fuzz_rewards_never_raise():
    """3000 random tag/number soups (fixed seed): no reward function raises and every output is in range."""
    rng = random.Random(1234)
    texts = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += [None, 17, 3.5, ["<think>"], b"<answer>B</answer>", "\ud800"]
    for i, text in enumerate(texts):
        turns = R.parse_turns(text)
        assert isinstance(turns, list) and all(isinstance(t, str) for t in turns)
        assert R.format_reward(turns) in (0.0, 1.0) and R.format_reward(text) in (0.0, 1.0)
        assert isinstance(R.count_tool_calls(text), int) and R.count_tool_calls(text) >= 0
        got = R.extract_answer(text)
        assert got is None or isinstance(got, str)
        v = R.parse_number(text)
        assert v is None or math.isfinite(v)
        for gt, kind in [("B", "choice"), ("yes", "yesno"), ("3", "count"), ("3.2", "number"), (text, "other")]:
            assert 0.0 <= R.answer_reward(text, gt, kind) <= 1.0
        assert 0.0 <= R.answer_reward("<answer>x</answer>", text, ["choice", "yesno", "count", "number"][i % 4]) <= 1
    kinds = ["choice", "yesno", "count", "number"] * 750
    totals, comp = R.cpr_rewards(texts[:3000], ["B", "yes", "3", "3.2"] * 750, kinds,
                                 ["positive", "negative", "boundary"] * 125, group_size=8)
    assert len(totals) == 3000 and all(math.isfinite(t) and -0.2 <= t <= 2.2 for t in totals)


def test_adversarial_long_text_is_linear_time():
    """Unclosed tags repeated 20k times are scored in well under a second each (a backtracking regex would
    take tens of seconds on these: it rescans the rest of the text from every opening tag)."""
    import time
    for text in ["<answer>" * 20000, "<segmentation>" * 20000, "<|vision_start|>a<think>" * 10000,
                 "<answer>" + "\\boxed{" * 20000 + "</answer>", "<think>" + "</think>a" * 10000]:
        t0 = time.perf_counter()
        R.cpr_rewards([text], ["3"], ["number"], ["positive"], group_size=1)
        assert time.perf_counter() - t0 < 2.0
