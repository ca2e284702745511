"""The README's commands are real: every `python train.py …`, `torchrun … train.py …` and `python cooper.py …` line in
its code blocks parses with the scripts' own argument parsers (the training itself is exercised elsewhere).
Run: python -m pytest tests/test_readme.py"""
import os
import shlex

import cooper
import train

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def commands():
    lines, inside = [], False
    for line in open(README, encoding="utf-8"):
        if line.startswith("```"):
            inside = not inside
        elif inside and ("train.py" in line or "cooper.py" in line):
            lines.append(shlex.split(line.split("#")[0]))
    return lines


def test_readme_commands_parse():
    """Each README command names flags and values the scripts accept (argparse exits on anything unknown)."""
    cmds = commands()
    assert any("train.py" in c for c in cmds) and any("cooper.py" in c for c in cmds)
    for c in cmds:
        if "train.py" in c:
            cfg = train.parse_args(c[c.index("train.py") + 1:])
            assert cfg.stage in (1, 2)
        else:
            args = cooper.build_parser().parse_args(c[c.index("cooper.py") + 1:])
            assert args.cmd in ("ask", "eval")


def test_readme_mapping_resolves():
    """Every `file.py::name` the README points to is defined in that file (a class, function, method or module constant, by grep)."""
    import re
    root = os.path.dirname(README)
    refs = set(re.findall(r"`(\w+\.py)::([\w.]+)`", open(README, encoding="utf-8").read()))
    assert len(refs) > 20
    missing = []
    for f, name in refs:
        src = open(os.path.join(root, f), encoding="utf-8").read()
        if not re.search(rf"^\s*((def|class) {re.escape(name.split('.')[-1])}\b|{re.escape(name)}\s*=)", src, re.M):
            missing.append(f"{f}::{name}")
    assert not missing, f"README names code that does not exist: {missing}"
