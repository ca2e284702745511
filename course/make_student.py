"""Make a student copy of the project: the same files, with the solution of each chosen exercise cut out.

The reference source marks every exercise in place with a pair of comment lines inside one function body:

    # exercise N begin: <short title>
    ...solution lines...
    # exercise N end

An exercise may have several such regions (all numbered N). In the copy, the lines strictly between the two
markers become one line, `raise NotImplementedError("exercise N: <title> — see course/EXERCISES.md")`, at the
markers' indentation; the marker lines stay, so the student sees where the code goes.

    python course/make_student.py --out ../cooper-student                # every exercise cut
    python course/make_student.py --out /tmp/ex4 --only 4                # only exercise 4 cut
    python course/make_student.py --out /tmp/most --except 1,2           # all but exercises 1 and 2
    cd ../cooper-student && python -m pytest -m exercise4                # grade one exercise

Copied: the top-level .py files, tests/, pyproject.toml, requirements.txt, README.md, course/EXERCISES.md and the
scripts and notes in docs/ (*.py, *.md). Not copied: runs/, .git, images and other outputs, caches, this script.
Errors (unknown exercise, non-empty --out, unbalanced or nested markers) print one line and exit with status 2.
"""
import argparse
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHEET = "course/EXERCISES.md"
TOP_FILES = ("pyproject.toml", "requirements.txt", "README.md", SHEET)
SKIP_DIRS = {"__pycache__", ".pytest_cache"}

# a line that looks like a marker at all; then it must match BEGIN or END exactly
MARKER_LIKE = re.compile(r"^\s*#\s*exercise\b", re.IGNORECASE)
BEGIN = re.compile(r"^(?P<indent>[ \t]*)# exercise (?P<n>[1-9][0-9]*) begin: (?P<title>\S.*?)\s*$")
END = re.compile(r"^(?P<indent>[ \t]*)# exercise (?P<n>[1-9][0-9]*) end\s*$")


class CopyError(Exception):
    """A problem that stops the copy; its message is one line meant for the user."""


@dataclass
class Region:
    """One marked region: exercise number, title, file (relative to the root), 1-based line numbers of the begin
    and end markers, and the indentation of the markers."""
    n: int
    title: str
    file: str
    begin: int
    end: int
    indent: str

    @property
    def lines(self):
        """Number of solution lines strictly between the markers."""
        return self.end - self.begin - 1


def source_files(root=ROOT):
    """The top-level Python files of the project, the only files that may hold exercise regions."""
    return sorted(p for p in Path(root).glob("*.py") if p.is_file())


def parse_regions(path, root=ROOT):
    """All exercise regions of one file, in order. Raises CopyError on a malformed, unbalanced or nested marker."""
    rel = Path(path).relative_to(root).as_posix()
    regions, open_ = [], None
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), start=1):
        if not MARKER_LIKE.match(line):
            continue
        b, e = BEGIN.match(line), END.match(line)
        if b:
            if open_ is not None:
                raise CopyError(f"{rel}:{i}: nested marker: exercise {b['n']} begins inside exercise {open_.n} "
                                f"(opened at line {open_.begin})")
            open_ = Region(int(b["n"]), b["title"], rel, i, 0, b["indent"])
        elif e:
            if open_ is None:
                raise CopyError(f"{rel}:{i}: unbalanced marker: 'exercise {e['n']} end' without a begin")
            if int(e["n"]) != open_.n:
                raise CopyError(f"{rel}:{i}: unbalanced marker: 'exercise {e['n']} end' closes exercise {open_.n} "
                                f"(opened at line {open_.begin})")
            if e["indent"] != open_.indent:
                raise CopyError(f"{rel}:{i}: unbalanced marker: the end of exercise {open_.n} is not indented like "
                                f"its begin (line {open_.begin})")
            open_.end = i
            if open_.lines < 1:
                raise CopyError(f"{rel}:{open_.begin}: exercise {open_.n} region is empty")
            regions.append(open_)
            open_ = None
        else:
            raise CopyError(f"{rel}:{i}: malformed marker {line.strip()!r}; use '# exercise N begin: <title>' "
                            f"and '# exercise N end'")
    if open_ is not None:
        raise CopyError(f"{rel}:{open_.begin}: unbalanced marker: exercise {open_.n} never ends")
    return regions


def find_regions(root=ROOT):
    """Every exercise region of the project's source files: list of Region, by file then line."""
    return [r for p in source_files(root) for r in parse_regions(p, root)]


def exercises(regions):
    """{exercise number: title of its first region}."""
    out = {}
    for r in regions:
        out.setdefault(r.n, r.title)
    return dict(sorted(out.items()))


def parse_numbers(text, flag):
    """'4' or '1,3' -> {4} or {1, 3}; CopyError on anything else."""
    try:
        nums = {int(s) for s in text.split(",") if s.strip()}
    except ValueError:
        raise CopyError(f"{flag} {text!r}: expected exercise numbers like 4 or 1,3") from None
    if not nums:
        raise CopyError(f"{flag} {text!r}: expected exercise numbers like 4 or 1,3")
    return nums


def select(known, only=None, exclude=None):
    """The exercise numbers to cut: `only` (default all known) minus `exclude`. CopyError on an unknown number."""
    for name, nums in (("--only", only), ("--except", exclude)):
        unknown = sorted(set(nums or ()) - set(known))
        if unknown:
            raise CopyError(f"{name}: unknown exercise {', '.join(map(str, unknown))}; "
                            f"the exercises are {', '.join(map(str, sorted(known)))}")
    return set(known if only is None else only) - set(exclude or ())


def raise_line(region):
    """The line that replaces a region's solution."""
    msg = f"exercise {region.n}: {region.title} — see {SHEET}".replace("\\", "\\\\").replace('"', '\\"')
    return f'{region.indent}raise NotImplementedError("{msg}")'


def cut(text, regions):
    """The text of one file with each region's solution lines replaced by its raise line."""
    lines = text.split("\n")
    for r in sorted(regions, key=lambda r: -r.begin):  # bottom up, so earlier line numbers stay valid
        lines[r.begin:r.end - 1] = [raise_line(r)]
    return "\n".join(lines)


def copy_tree(root, out):
    """Copy the files a student needs from root to out (see the module docstring)."""
    root, out = Path(root), Path(out)
    files = [p for p in root.glob("*.py")] + [root / f for f in TOP_FILES if (root / f).is_file()]
    files += [p for p in (root / "docs").glob("*") if p.suffix in (".py", ".md")] if (root / "docs").is_dir() else []
    for p in (root / "tests").rglob("*") if (root / "tests").is_dir() else []:
        if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts) and p.suffix != ".pyc":
            files.append(p)
    for p in files:
        dst = out / p.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst)


def make_student(out, only=None, exclude=None, root=ROOT, log=print):
    """Write a student copy of `root` to `out` with the selected exercises cut (only: the numbers to cut, default all;
    exclude: numbers to keep). Returns the list of Region cut. Raises CopyError (nothing written) on an unknown
    exercise, a non-empty `out` or a bad marker."""
    root, out = Path(root).resolve(), Path(out).resolve()
    regions = find_regions(root)  # validates every marker before anything is written
    chosen = select(exercises(regions), only, exclude)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CopyError(f"--out {out} exists and is not empty; choose a new folder")
    if out == root or root in out.parents:
        raise CopyError(f"--out {out} is inside the project; choose a folder outside it")
    todo = [r for r in regions if r.n in chosen]
    new = {}
    for f in sorted({r.file for r in todo}):
        text = cut((root / f).read_text(encoding="utf-8"), [r for r in todo if r.file == f])
        try:
            compile(text, f, "exec")
        except SyntaxError as e:  # a region that is not a whole block of one function body
            raise CopyError(f"{f}: cutting the exercise regions leaves invalid Python (line {e.lineno}: {e.msg}); "
                            f"each region must be whole statements of one function body") from None
        new[f] = text
    out.mkdir(parents=True, exist_ok=True)
    copy_tree(root, out)
    for f, text in new.items():
        (out / f).write_text(text, encoding="utf-8")
    for r in sorted(todo, key=lambda r: (r.n, r.file, r.begin)):
        span = f"{r.begin + 1}-{r.end - 1}" if r.lines > 1 else f"{r.begin + 1}"
        log(f"cut exercise {r.n:>2}  {r.file}:{span}  ({r.lines} line{'s' if r.lines > 1 else ''})  {r.title}")
    log(f"{len(todo)} regions of {len(chosen)} exercises cut; student copy in {out}")
    return todo


def main(argv=None):
    ap = argparse.ArgumentParser(description="Make a student copy with exercise solutions replaced by "
                                             "raise NotImplementedError (see course/EXERCISES.md).")
    ap.add_argument("--out", required=True, help="new (or empty) folder for the copy")
    ap.add_argument("--only", help="cut only these exercises, e.g. 4 or 1,3 (default: all)")
    ap.add_argument("--except", dest="exclude", help="do not cut these exercises, e.g. 1,2")
    args = ap.parse_args(argv)
    try:
        only = parse_numbers(args.only, "--only") if args.only is not None else None
        exclude = parse_numbers(args.exclude, "--except") if args.exclude is not None else None
        make_student(args.out, only, exclude)
    except CopyError as e:
        print(f"make_student.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
