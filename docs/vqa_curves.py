"""VQA learning curves of the stage-1 recipe and its variants, over seeds: the numbers behind the README's tables.

Each (variant, seed) is one `python train.py --stage 1` run with the variant's flags, sharing one run's text and VQ
tokenizers (--tokenizer-from), so the runs differ only in what the variant changes. Every run evaluates VQA on held-out
scenes every --eval-every steps (train.py: score ± standard error, the wording prior's chance level, and the blind
score with another scene's image). This script starts the runs (--jobs at a time, the cores split between them;
finished runs are reused, stopped ones resumed), then prints per category and step the mean over seeds with its
standard error, the seeds' spread, chance and blind, each variant's difference to the first one at their last common
step (seed by seed), and writes OUT/curves.json, OUT/curves.png and OUT/gain_VARIANT.png
(every category's score minus chance).

    python train.py --stage 1                                                    # once: runs/tiny (tokenizers)
    python docs/vqa_curves.py --tokenizer-from runs/tiny --variants recipe,control --seeds 0,1 --jobs 2
    python docs/vqa_curves.py --summary-only --out runs/curves                    # tables again, no training

Variants (train.py flags added to the common ones): recipe (the defaults; before --detail-extra 1 became the default,
the runs of docs/perception.md called "recipe" had --detail-extra 0), control (--amg-share 0: no map
generation, the paper's "BAGEL" row), no-ground (--ground-share 0), codes-only (--no-patch-embed), no-compare
(--compare-steps 0: the recipe without its comparison phase), shape (--shape-lookups: "what shape is the red object?"
among the lookups), find-attribute (--find-attribute: attribute among the finding phase's questions), detail
(--detail-steps 1000: a phase of attribute and count after the comparisons), detail-extra and detail-extra-1
(--detail-extra 0.5 / 1: half a batch / a batch of attribute and count questions beside each step after the comparisons),
compare-extra (--compare-extra 1: a batch of comparison questions beside each step of the comparison phase; the
default since), compare-1000 and compare-1500 (--compare-steps 1000 / 1500: a comparison phase of 1,000 steps, the
default since, and of 1,500 steps, the default before, whose runs of docs/perception.md are called compare-extra).
Results and commands: docs/perception.md.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import cooper  # noqa: E402
import data  # noqa: E402

# no-compare: the recipe without its comparison phase, as in the runs of docs/perception.md before "Two objects compared"
VARIANTS = {"recipe": [], "control": ["--amg-share", "0"], "no-ground": ["--ground-share", "0"],
            "codes-only": ["--no-patch-embed"], "no-compare": ["--compare-steps", "0"],
            "shape": ["--shape-lookups"], "find-attribute": ["--find-attribute"],
            "detail": ["--detail-steps", "1000"], "detail-extra": ["--detail-extra", "0.5"],
            "detail-extra-1": ["--detail-extra", "1"], "compare-extra": ["--compare-extra", "1"],
            "compare-1000": ["--compare-steps", "1000"], "compare-1500": ["--compare-steps", "1500"]}


def run_dir(out, variant, seed):
    return os.path.join(out, f"{variant}_s{seed}")


def launch(args, variant, seed, threads):
    """Start one training run (or resume it) as a subprocess; returns the Popen, or None when it is finished."""
    d = run_dir(args.out, variant, seed)
    log = os.path.join(args.out, f"{variant}_s{seed}.log")
    if os.path.exists(os.path.join(d, "stage1.pt")) and any(
            r.get("phase") == "eval" and "depth/absrel_all" in r for r in read_rows(d)):
        print(f"{variant} seed {seed}: finished, reused ({d})")
        return None
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--stage", "1", "--out", d, "--seed", str(seed),
           "--tokenizer-from", args.tokenizer_from, "--eval-every", str(args.eval_every)] + VARIANTS[variant]
    cmd += args.train_args + (["--resume"] if os.path.exists(os.path.join(d, "vq.pt")) else [])
    print(f"{variant} seed {seed}: {' '.join(cmd[1:])}  (log {log})", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def read_rows(d):
    path = os.path.join(d, "metrics.jsonl")
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []


def curves(args, variant):
    """{step: {key: [value per seed]}} over the evaluation rows of a variant's runs."""
    out = {}
    for seed in args.seeds:
        for r in read_rows(run_dir(args.out, variant, seed)):
            if r.get("phase") == "eval" and "vqa/mean" in r:
                for k, v in r.items():
                    if k.startswith("vqa"):
                        out.setdefault(r["step"], {}).setdefault(k, []).append(v)
    return out


def summarise(args):
    cats = data.CATEGORIES + ["mean"] + data.GROUNDING
    table, charts = {}, []
    for variant in args.variants:
        cv = curves(args, variant)
        if not cv:
            print(f"\n{variant}: no evaluations yet")
            continue
        table[variant] = {}
        print(f"\n{variant}: held-out score, mean over seeds ± standard error (seeds' range) | chance | blind")
        steps = sorted(cv)
        print(f"{'category':18s}" + "".join(f"{'step ' + str(s):>26s}" for s in steps))
        for c in cats:
            if f"vqa/{c}" not in cv[steps[-1]]:
                continue
            cells = []
            for s in steps:
                v = cv[s].get(f"vqa/{c}", [])
                se = cv[s].get(f"vqa_se/{c}", [])
                n = len(v)
                # seeds are independent: the mean's SE is sqrt(sum of squared per-seed SEs) / n; "mean" has none
                err = math.sqrt(sum(e * e for e in se)) / n if len(se) == n and n else float("nan")
                rng = f"{min(v):.2f}-{max(v):.2f}" if n > 1 else ""
                cells.append(f"{np.mean(v):.3f}±{err:.3f} {rng:>9s}")
                table[variant].setdefault(c, []).append(
                    {"step": s, "mean": float(np.mean(v)), "se": err, "seeds": v,
                     "chance": float(np.mean(cv[s][f"vqa_chance/{c}"])), "blind": float(np.mean(cv[s][f"vqa_blind/{c}"]))})
            last = table[variant][c][-1]
            print(f"{c:18s}" + "".join(f"{x:>26s}" for x in cells) + f"   | {last['chance']:.3f} | {last['blind']:.3f}")
    first = next(iter(table), None)
    for v in [v for v in table if v != first]:  # each variant against the first, at their last common step, by seed
        step = max(set(p["step"] for p in table[first]["mean"]) & set(p["step"] for p in table[v]["mean"]), default=None)
        if step is None:
            continue
        print(f"\n{first} - {v} at step {step}: mean over seeds ± standard error (per seed)")
        for c in cats:
            a = next((p for p in table[first].get(c, []) if p["step"] == step), None)
            b = next((p for p in table[v].get(c, []) if p["step"] == step), None)
            if a and b and len(a["seeds"]) == len(b["seeds"]):
                d = [x - y for x, y in zip(a["seeds"], b["seeds"])]  # the same seed's runs, paired
                print(f"{c:18s} {np.mean(d):+.3f} ± {math.sqrt(a['se'] ** 2 + b['se'] ** 2):.3f}   "
                      f"({' / '.join(f'{x:+.3f}' for x in d)})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "curves.json"), "w") as f:
        json.dump(table, f, indent=1)
    for c in cats:  # one panel per category: each variant's mean curve, chance dashed
        series = {v: [(p["step"], p["mean"]) for p in table[v].get(c, [])] for v in table}
        dashed = {"chance": [(p["step"], p["chance"]) for p in next(iter(table.values())).get(c, [])]} if table else {}
        if any(series.values()):
            charts.append(cooper.line_chart(series, title=f"{c} (held out, mean over seeds)", ylabel="score",
                                            dashed=dashed, size=(420, 230)))
    for v in table:  # one panel per variant: every category's held-out score minus its chance level
        gain = {c: [(p["step"], p["mean"] - p["chance"]) for p in pts] for c, pts in table[v].items() if c != "mean"}
        zero = {"chance": [(p["step"], 0.0) for p in table[v]["mean"]]}
        cooper.line_chart(gain, title=f"{v}: held-out score - chance, mean over seeds", ylabel="score - chance",
                          dashed=zero, size=(640, 300)).save(os.path.join(args.out, f"gain_{v}.png"))
    if charts:
        cooper.stack_images([cooper.stack_images(charts[i:i + 1]) for i in range(len(charts))]).save(
            os.path.join(args.out, "curves.png"))
        print(f"\nwrote {args.out}/curves.json and curves.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after -- are passed to every train.py run (e.g. -- --steps 500).")
    p.add_argument("--tokenizer-from", default="runs/tiny", help="finished run whose tokenizer.json and vq.pt all share")
    p.add_argument("--out", default="runs/curves", help="folder for the runs, their logs and the summary")
    p.add_argument("--variants", default="recipe,control", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time; the CPU cores are split between them")
    p.add_argument("--summary-only", action="store_true", help="only read the runs in --out and print the tables")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.variants, args.seeds, args.train_args = args.variants.split(","), [int(s) for s in args.seeds.split(",")], extra
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    if not args.summary_only:
        if not all(os.path.exists(os.path.join(args.tokenizer_from, f)) for f in ("tokenizer.json", "vq.pt")):
            p.error(f"--tokenizer-from {args.tokenizer_from}: no tokenizer.json / vq.pt there; run python train.py "
                    f"--stage 1 first")
        os.makedirs(args.out, exist_ok=True)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        todo, running, t0 = [(v, s) for v in args.variants for s in args.seeds], [], time.time()
        while todo or running:
            while todo and len(running) < args.jobs:
                proc = launch(args, *todo[0], threads)
                if proc is not None:
                    running.append((todo[0], proc))
                todo.pop(0)
            for job in list(running):
                if job[1].poll() is not None:
                    running.remove(job)
                    status = "done" if job[1].returncode == 0 else f"FAILED (exit {job[1].returncode}; see its log)"
                    print(f"{job[0][0]} seed {job[0][1]}: {status} after {time.time() - t0:.0f} s", flush=True)
            time.sleep(2)
    summarise(args)


if __name__ == "__main__":
    main()
