"""reward.py: the CPR reward (Cooperative Perception-Reasoning) and group-relative advantages.

Implements PAPER.md "CPR reward" and the advantage of "GRPO as run by the authors":
    R = w_a * r_answer + w_f * r_format + w_e * r_explore,   A_i = (R_i - mean_G) / (std_G + 1e-4).
Every reward function is total: malformed, truncated or adversarial text scores 0 and never raises.

Response convention (what `parse_turns` reads). The response is everything after the question's
`<|im_start|>`. The model writes `<think>…</think>` and then either a tool call
`<depth-estimation>…</depth-estimation>` / `<segmentation>…</segmentation>` or `<answer>…</answer>`.
After a tool call the generated map appears as `<|vision_start|>…<|vision_end|>`, followed by the
reflection prompt, which the model did not write; the next turn starts at the next `<think>`.
So a two-turn response in plain text looks like (one string, wrapped here)
    <think>a</think><depth-estimation>p</depth-estimation><|vision_start|>codes<|vision_end|>reflection
    <think>b</think><answer>B</answer><|im_end|>
and `parse_turns` returns ["<think>a</think><depth-estimation>p</depth-estimation>",
"<think>b</think><answer>B</answer>"].

Deviations from the paper, and why:
- r_answer is a rule-based verifier instead of an LLM judge (DESIGN.md, item 3). Choice, yes/no and count
  answers score 0 or 1; numeric answers score the SIBench mean relative accuracy (MRA) in [0, 1], which is
  the small-scale stand-in for the judge's "close enough".
- The exploration term counts rollouts with >= 1 tool call, the paper's intent (the released code counts
  >= 2 by slicing a list twice).

Test: python -m pytest tests/test_reward.py
"""
from __future__ import annotations

import math
import re

import torch

TOOLS = ("depth-estimation", "segmentation")
MAX_TURNS = 3  # PAPER.md: at most 3 text turns, so at most 2 generated maps

# A generated map and the reflection prompt after it: from <|vision_start|> up to the next <think>, or
# to the end when the response stops there (so the reflection prompt must not contain "<think>").
_MAP_AND_REFLECTION = re.compile(r"<\|vision_start\|>.*?(?=<think>|\Z)", re.S)
# Split point: right after each closing tool tag.
_AFTER_TOOL = re.compile(r"(?<=</depth-estimation>)|(?<=</segmentation>)")
# Any protocol tag, opening or closing. A well-formed turn holds exactly four: its two pairs.
_ANY_TAG = re.compile(r"</?(?:think|answer|depth-estimation|segmentation)>")
# The layout of one turn: <think>…</think> then one tagged block, only whitespace outside the tags.
_TURN = re.compile(r"\s*<think>(.*)</think>\s*<([a-z-]+)>(.*)</\2>\s*", re.S)


def _text(x) -> str:
    # Reward functions are total: anything that is not a string reads as the empty response.
    return x if isinstance(x, str) else ""


def parse_turns(text: str) -> list[str]:
    """Split a full response string into the model-written text of each turn.

    Steps: drop <|im_start|> at the start and <|im_end|> at the end; delete every generated map
    (<|vision_start|>…<|vision_end|>) together with the text after it up to the next <think> (the reflection
    prompt); split right after each closing tool tag, so each turn holds at most one closing tool tag, at
    its end. A response that ends with a tool call therefore gets an empty final turn (it never answered).
    Empty or whitespace-only input gives []; each turn is stripped of surrounding whitespace.
    """
    text = _text(text).strip()
    text = text.removeprefix("<|im_start|>").removesuffix("<|im_end|>")
    text = _MAP_AND_REFLECTION.sub("", text)
    if not text.strip():
        return []
    return [t.strip() for t in _AFTER_TOOL.split(text)]


def _turn_ok(turn: str, final: bool) -> bool:
    """One turn of the CPR format: <think>…</think> + a tool call (non-final) or + <answer>…</answer> (final)."""
    if len(_ANY_TAG.findall(turn)) != 4:  # exactly four tags: no nesting, no repeats, no early answer
        return False
    m = _TURN.fullmatch(turn)
    if m is None:
        return False
    think, tag, body = m.groups()
    if final:
        return tag == "answer" and bool(think.strip()) and bool(body.strip())
    return tag in TOOLS and bool(think.strip())  # a tool body (the instruction) may be empty


def format_reward(turns) -> float:
    """r_format in {0, 1} (PAPER.md CPR): 1.0 only when every non-final turn is `<think>…</think>` followed
    by exactly one tool tag and the final turn is `<think>…</think><answer>…</answer>`, with 1 to 3 turns.

    `turns` is the list from `parse_turns` (a raw response string is parsed first). Whitespace between and
    around tags is allowed; any other text outside the tags, a nested or repeated tag, an empty <think> or
    <answer> body, or an answer before the last turn scores 0. A tool body may be empty.
    """
    if isinstance(turns, str):
        turns = parse_turns(turns)
    if not isinstance(turns, (list, tuple)) or not 1 <= len(turns) <= MAX_TURNS:
        return 0.0
    if not all(isinstance(t, str) for t in turns):
        return 0.0
    ok = all(_turn_ok(t, final=False) for t in turns[:-1]) and _turn_ok(turns[-1], final=True)
    return float(ok)


def count_tool_calls(text_or_turns) -> int:
    """Number of complete tool calls (<depth-estimation>…</depth-estimation> or <segmentation>…</segmentation>)
    in the model-written text. A string is parsed with `parse_turns` first, so tags quoted inside a
    reflection prompt are not counted; an unclosed (truncated) tool tag is not a call."""
    turns = parse_turns(text_or_turns) if isinstance(text_or_turns, str) else text_or_turns
    if not isinstance(turns, (list, tuple)):
        return 0
    # A call is a turn ending in a closing tool tag with its opening tag earlier (string search: linear time).
    return sum(1 for t in turns for tool in TOOLS if isinstance(t, str) and t.endswith(f"</{tool}>")
               and f"<{tool}>" in t[:-len(tool) - 3])


# ---------------------------------------------------------------- answers

def _unbox(s: str) -> str | None:
    """Content of the last \\boxed{…} in s with braces matched; s itself when there is none;
    None when the last box is never closed (truncated)."""
    start = s.rfind("\\boxed{")
    if start < 0:
        return s
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer: the text between the last </answer> of the model-written text and the nearest
    <answer> before it, narrowed to the last \\boxed{…} inside it when present, stripped. None when there
    is no closed answer tag or the box is unclosed."""
    s = "\n".join(parse_turns(text))
    end = s.rfind("</answer>")  # string search, not a regex: linear even on adversarial text
    start = s.rfind("<answer>", 0, max(end, 0))
    if end < 0 or start < 0:
        return None
    body = _unbox(s[start + len("<answer>"):end])
    return None if body is None else body.strip()


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen twenty").split()
_WORD_NUMBER = re.compile(r"\b(" + "|".join(_WORDS) + r")\b", re.I)
# Length units and their size in metres. A unit must end at a word boundary, so "3 mice" has none.
_UNITS = [(r"km|kilomet(?:er|re)s?", 1000.0), (r"cm|centimet(?:er|re)s?", 0.01), (r"mm|millimet(?:er|re)s?", 0.001),
          (r"m|met(?:er|re)s?", 1.0), (r"ft|feet|foot", 0.3048), (r"inch(?:es)?", 0.0254)]
_UNIT = re.compile(r"(?:\s|\\[,;:! ]|~)*(?:" +  # spaces, LaTeX spacing (\, \; ~) then the unit
                    "|".join(f"(?P<u{k}>{p})" for k, (p, _) in enumerate(_UNITS)) + r")\b", re.I)
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|mbox|textrm)\s*\{([^{}]*)\}")


def _first_number(s: str):
    """(value, end index) of the first number written in digits, else of the first number word
    zero…twenty; None when there is none or it is not finite."""
    m = _NUMBER.search(s)
    if m is not None:
        v = float(m.group())  # the regex only matches valid float syntax; huge exponents give inf
        return (v, m.end()) if math.isfinite(v) else None
    m = _WORD_NUMBER.search(s)
    return (float(_WORDS.index(m.group(1).lower())), m.end()) if m else None


def parse_number(s) -> float | None:
    """The first number in s, converted to metres when a length unit follows it.

    Units read (case-insensitive, after optional spaces or LaTeX spacing, \\text{…} allowed): km,
    kilometre(s)/kilometer(s); m, metre(s)/meter(s); cm, centimetre(s)/centimeter(s); mm,
    millimetre(s)/millimeter(s); ft, foot, feet; inch, inches. A bare number is taken as metres.
    Also reads the words zero…twenty when no digits appear.
    Numbers (int/float) pass through; anything unreadable gives None.
    """
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s) if math.isfinite(s) else None
    s = _LATEX_TEXT.sub(r" \1", _text(s))
    found = _first_number(s)
    if found is None:
        return None
    value, end = found
    m = _UNIT.match(s, end)
    if m is not None:  # which named group matched tells the unit
        k = next(int(name[1:]) for name, g in m.groupdict().items() if g is not None)
        value *= _UNITS[k][1]
    return value


def mra(pred, gt) -> float:
    """SIBench mean relative accuracy: mean over theta in {0.50, 0.55, …, 0.95} of 1[|p - g| / |g| < 1 - theta].
    The tolerances 1 - theta are taken as the exact decimals 0.50, 0.45, …, 0.05. gt = 0 scores 1 only for
    p = 0; a missing or non-finite value scores 0."""
    try:
        p, g = float(pred), float(gt)
    except (TypeError, ValueError):
        return 0.0
    if not (math.isfinite(p) and math.isfinite(g)):
        return 0.0
    if g == 0:
        return float(p == 0)
    rel = abs(p - g) / abs(g)
    return sum(rel < (10 - k) / 20 for k in range(10)) / 10  # theta = 0.50 + 0.05 k, tolerance = 1 - theta


def qspatial_hit(pred, gt) -> bool:
    """Q-Spatial success: max(p/g, g/p) < 2, defined for positive finite p and g (anything else misses)."""
    try:
        p, g = float(pred), float(gt)
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(p) and math.isfinite(g) and p > 0 and g > 0):
        return False
    return max(p / g, g / p) < 2


# An option letter A-F at the start, optionally after "option"/"answer is", in brackets or followed by
# ")", ".", ":" or ",". Lower-case letters count only when bracketed or punctuated ("b) …"), or when the
# letter is the whole answer, so an answer like "a red cube" is not read as option A.
_CHOICE = re.compile(r"\s*(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*)?"
                     r"(?:[\(\[]\s*([A-Fa-f])\s*[\)\]]|([A-Fa-f])\s*[\).:,]|([A-F])(?=\s|$))", re.I)


def _choice(s: str) -> str | None:
    s = s.strip()
    if len(s) == 1 and s.upper() in "ABCDEF":
        return s.upper()
    m = _CHOICE.match(s)
    if m is None:
        return None
    letter = m.group(1) or m.group(2) or m.group(3)
    if m.group(3) and not letter.isupper():  # the re.I flag lets a bare lower-case letter through; refuse it
        return None
    return letter.upper()


def _yesno(s: str) -> str | None:
    m = re.match(r"\W*(yes|no)\b", s, re.I)
    return m.group(1).lower() if m else None


def _norm(s) -> str:
    # Generic normalisation for exact matches: lower case, single spaces, no surrounding punctuation.
    return " ".join(str(s).lower().split()).strip(" .,;:!?\"'()[]")


def _count(x) -> float | None:
    # A count is the first number as written: "3 cm" is still 3, no unit conversion.
    if not isinstance(x, str):
        return parse_number(x)
    found = _first_number(_LATEX_TEXT.sub(r" \1", x))
    return None if found is None else found[0]


def answer_reward(text, answer, kind: str) -> float:
    """r_answer: the final answer (see `extract_answer`) judged against the ground truth `answer`.

    kind "choice": option letters A-F, exact ("B", "(B)", "b) the blue sphere", "Option B" all read B).
    kind "yesno": the first word must be yes / no, exact.  kind "count": the first number (digits or
    zero…twenty, no unit conversion) equals the integer ground truth.  kind "number": MRA in [0, 1] of the
    value in metres (units as in `parse_number`).  Any other kind: normalised exact string match.
    No answer, an unreadable answer or any malformed input scores 0.
    """
    pred = extract_answer(text)
    if pred is None or not pred:
        return 0.0
    if kind == "choice":
        p, g = _choice(pred), _choice(str(answer))
        return float(p is not None and p == g)
    if kind == "yesno":
        p, g = _yesno(pred), _yesno(str(answer))
        return float(p is not None and p == g)
    if kind == "count":
        p, g = _count(pred), _count(answer)
        return float(p is not None and g is not None and g.is_integer() and p == g)
    if kind == "number":
        p, g = parse_number(pred), parse_number(answer)
        return mra(p, g) if p is not None and g is not None else 0.0
    return float(_norm(pred) == _norm(answer))


# ---------------------------------------------------------------- exploration and the total

def _per_rollout(values, n: int, group_size: int, name: str) -> list:
    """Accept one value per rollout (length n) or one per group (length n / group_size, repeated)."""
    values = list(values)
    if len(values) == n:
        return values
    if len(values) * group_size == n:
        return [v for v in values for _ in range(group_size)]
    raise ValueError(f"{name}: expected {n} (per rollout) or {n // group_size} (per group) values, got {len(values)}")


def exploration_rewards(tool_used, flags, group_size: int = 8, threshold: int = 3, bonus: float = 0.2) -> list[float]:
    """r_explore per rollout (PAPER.md CPR, exploration term).

    tool_used: one bool or tool-call count per rollout; consecutive blocks of `group_size` rollouts share a
    prompt. flags: "positive" / "negative" / "boundary", one per rollout or one per group (repeated over
    its rollouts). With c = rollouts of the group with >= 1 tool call: c < threshold gives +bonus to every
    tool-using rollout whose flag is positive; c > threshold gives -bonus to every tool-using rollout whose
    flag is negative; c == threshold, boundary or an unknown flag give 0. Rollouts without a tool call get 0.
    """
    used = [bool(u > 0) for u in tool_used]  # counts and bools alike: >= 1 call
    n = len(used)
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rollouts do not split into groups of {group_size}")
    flags = [str(f).strip().lower() for f in _per_rollout(flags, n, group_size, "flags")]
    # exercise 8 begin: the CPR exploration term
    out = [0.0] * n
    for start in range(0, n, group_size):
        c = sum(used[start:start + group_size])  # CPR r_explore: rollouts of this prompt with >= 1 tool call
        for i in range(start, start + group_size):
            if used[i] and c < threshold and flags[i] == "positive":
                out[i] = bonus  # few rollouts explored although perception helps: reward those that did
            elif used[i] and c > threshold and flags[i] == "negative":
                out[i] = -bonus  # many rollouts called a tool that does not help: discourage them
    # exercise 8 end
    return out


def cpr_rewards(responses, answers, kinds, flags, group_size: int = 8, weights=(1.0, 1.0, 1.0)):
    """CPR reward R = w_a r_answer + w_f r_format + w_e r_explore for every rollout (PAPER.md CPR).

    responses: one response string per rollout, grouped as in `exploration_rewards`. answers, kinds and
    flags: one per rollout or one per group. Returns (totals, components) with components
    {"answer": […], "format": […], "explore": […]} (unweighted, for logging).
    """
    n = len(responses)
    answers = _per_rollout(answers, n, group_size, "answers")
    kinds = _per_rollout(kinds, n, group_size, "kinds")
    turns = [parse_turns(r) for r in responses]
    comp = {"answer": [answer_reward(r, a, k) for r, a, k in zip(responses, answers, kinds)],
            "format": [format_reward(t) for t in turns],
            "explore": exploration_rewards([count_tool_calls(t) for t in turns], flags, group_size)}
    wa, wf, we = weights
    # CPR total, PAPER.md: R = r_answer + r_format + r_explore (weights all 1.0 in the paper)
    totals = [wa * a + wf * f + we * e for a, f, e in zip(comp["answer"], comp["format"], comp["explore"])]
    return totals, comp


def group_advantages(rewards, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (PAPER.md GRPO; EQUATIONS.md GRPO family).

    rewards: (N,) tensor or list, consecutive blocks of `group_size` share a prompt. Returns (N,) tensor:
    scale=True  -> A_i = (R_i - mean_G) / (std_G + eps), std unbiased (divides by G - 1)  [GRPO]
    scale=False -> A_i = R_i - mean_G                                                      [Dr. GRPO]
    A group whose rewards are all equal gets exact zeros (it carries no learning signal). A group of size 1
    has no unbiased std; its std is defined as 0, so its advantage is 0 too. Never NaN for finite rewards.
    """
    r = torch.as_tensor(rewards)
    r = r if r.is_floating_point() else r.to(torch.get_default_dtype())
    if r.dim() != 1 or group_size < 1 or r.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(r.shape)} do not split into groups of {group_size}")
    # exercise 9 begin: group advantages and the clipped GRPO loss
    g = r.view(-1, group_size)  # (num_groups, G)
    centred = g - g.mean(dim=1, keepdim=True)  # (num_groups, G)
    constant = (g.amax(dim=1) == g.amin(dim=1)).unsqueeze(1)  # (num_groups, 1): zero-variance groups
    centred = torch.where(constant, torch.zeros_like(centred), centred)  # exact zeros, no rounding residue
    if scale:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])  # unbiased, (num_groups, 1)
        centred = centred / (std + eps)  # GRPO advantage (R - mean_G) / (std_G + eps), eps = 1e-4
    return centred.reshape(-1)  # (N,)
    # exercise 9 end


if __name__ == "__main__":  # python reward.py --bench : time the rewards on a batch of typical responses
    import argparse
    import statistics
    import time

    ap = argparse.ArgumentParser(description="CPR reward timings (median of 7 runs)")
    ap.add_argument("--bench", action="store_true", help="print the timing table")
    if ap.parse_args().bench:
        tool = "<think>the cube looks near</think><depth-estimation>estimate the depth</depth-estimation>"
        shown = "<|vision_start|>" + "<|img_1|>" * 256 + "<|vision_end|>The map may be inaccurate; think again."
        batch = [tool + shown + "<think>so about 3 m</think><answer>\\boxed{3.1 m}</answer>",
                 "<think>the left one</think><answer>(B)</answer>"] * 64  # 128 rollouts = 16 groups of 8
        jobs = {"cpr_rewards": lambda: cpr_rewards(batch, ["3.2", "B"] * 8, ["number", "choice"] * 8,
                                                   ["positive"] * 16, group_size=8),
                "group_advantages": lambda: group_advantages(torch.rand(128), group_size=8)}
        print(f"{'function (128 rollouts)':<26}{'median ms':>10}{'us/rollout':>12}")
        for name, fn in jobs.items():
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            print(f"{name:<26}{1e3 * t:>10.3f}{1e6 * t / 128:>12.1f}")
