"""Which answers does a finished model give? Truth × answer tables of the one-word categories on held-out scenes.

A score near chance can mean a constant answer (the model ignores the image) or guesses that are near but wrong
(counting 4 for 5). This asks every question of the first --n validation scenes, greedy and direct as in the
stage-1 evaluation (`cooper.evaluate_vqa`), and prints, per category, how often each true answer got each answer;
count is split into "how many objects" and "how many <shape>s", which need different things (counting every object,
or reading every object's shape).

    python docs/answer_confusion.py runs/tiny [--categories count,attribute] [--n 256]

Results: docs/perception.md ("Attribute and count: what the model answers").
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cooper  # noqa: E402
import data  # noqa: E402
import reward  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("run", help="finished stage-1 run folder (stage1.pt, vq.pt, tokenizer.json)")
p.add_argument("--categories", default="count,attribute,existence,left_right,relative_distance,relative_size")
p.add_argument("--n", type=int, default=256, help="validation scenes (the evaluation's first n, its questions)")
args = p.parse_args()
wanted = args.categories.split(",")
if set(wanted) - set(data.CATEGORY_INFO):
    p.error(f"unknown categories {sorted(set(wanted) - set(data.CATEGORY_INFO))}; choose from {list(data.CATEGORY_INFO)}")
try:
    model = cooper.Cooper.load(args.run)  # its most trained checkpoint (stage1.pt for a stage-1 run)
except cooper.RunError as e:
    sys.exit(f"error: {e}")
rgb, items = cooper.vqa_items(model.cfg.image_size, args.n)  # the stage-1 evaluation's questions
items = [(k, q) for k, q in items if q.category in wanted]
outs = model.answer_batch(rgb[[k for k, _ in items]], [q.text for _, q in items])

tables = collections.defaultdict(collections.Counter)
for (_, q), o in zip(items, outs):
    name = q.category + ("" if q.category != "count" else " (all objects)" if "objects are" in q.text else " (one shape)")
    tables[name][q.answer, reward.extract_answer(o["text"]) or "-"] += 1
for name in sorted(tables):
    t = tables[name]
    truths, answers = sorted({a for a, _ in t}), sorted({b for _, b in t})
    right = sum(n for (a, b), n in t.items() if a == b)
    print(f"\n{name}: {right}/{sum(t.values())} exact; rows: truth, columns: the model's answer")
    print(f"{'':>8}" + "".join(f"{b:>8}" for b in answers))
    for a in truths:
        print(f"{a:>8}" + "".join(f"{t[a, b]:>8}" for b in answers))
