"""Why direct-answer VQA stays at chance: the transformer memorises its training images instead of learning the rule.

Trains a fresh tiny transformer on existence questions only ("Is there a red cube in the image?", one question per
training scene, yes/no balanced), with the tokenizer of a finished run, and prints teacher-forced yes/no accuracy on
those training questions and on held-out scenes. Then two probes on bag-of-codes features (how often each VQ code
occurs in the image) show how label-hungry the code representation is: a linear classifier given all 8 colour-
presence labels of each scene, and an MLP given one colour question per scene (as the transformer is).

    python docs/vqa_probe.py --run runs/tiny                    # ~5 min on a 2-core CPU
    python docs/vqa_probe.py --run runs/tiny --scenes 64 --steps 400   # memorising 64 scenes is quick
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cooper  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from model import UnifiedTransformer  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--run", default="runs/tiny", help="a finished stage-1 run (its tokenizers are reused)")
p.add_argument("--scenes", type=int, default=4000, help="training scenes, one existence question each")
p.add_argument("--steps", type=int, default=1500)
p.add_argument("--every", type=int, default=250)
p.add_argument("--lr", type=float, default=1e-3)
args = p.parse_args()
try:
    C = cooper.Cooper.load(args.run)  # only its tokenizers (text and VQ) and sizes are used
except cooper.RunError as e:
    sys.exit(f"error: {e}")
tok, cfg = C.tok, C.cfg
YES, NO = tok.encode("yes").ids[0], tok.encode("no").ids[0]


def build(split, n, seed):
    """One existence question per scene: (ids, loss mask, answer) plus the scene's codes and colours."""
    scenes = [data.make_scene(data.scene_seed(split, k), cfg.image_size) for k in range(n)]
    codes = torch.cat([C.encode_images(np.stack([s.rgb for s in scenes[i:i + 256]])) for i in range(0, n, 256)])
    rng, rows = np.random.default_rng(seed), []
    for s, c in zip(scenes, codes.numpy()):
        q = next(q for q in data.make_questions(s, rng) if q.category == "existence")
        ids, mask = data.encode_segments(data.vqa_segments(q), tok, cfg.image_offset, {"rgb": c})
        rows.append((ids, mask, q.answer))
    bag = torch.zeros(n, cfg.codebook_size)  # (n, K) how often each code occurs in the image
    bag.scatter_add_(1, codes.view(n, -1), torch.ones(n, codes[0].numel()))
    colours = torch.tensor([[any(o.color == c for o in s.objects) for c in data.COLORS] for s in scenes]).float()
    return rows, bag, colours


def accuracy(model, rows):
    """Teacher-forced: is the logit of the right answer word above the other one, at the answer position?"""
    model.eval()
    hits = []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            idx, tgt, lm = train.collate([(ids, m, "") for ids, m, _ in chunk], "cpu")
            logits, _ = model(idx)
            at = lm & ((tgt == YES) | (tgt == NO))  # (B, T) the answer-word position of each row
            t = at.float().argmax(1)  # (B,) its index
            pick = logits[torch.arange(len(chunk)), t]  # (B, V)
            hits += ((pick[:, YES] > pick[:, NO]) == torch.tensor([a == "yes" for _, _, a in chunk])).tolist()
    model.train()
    return float(np.mean(hits))


tr, bag_tr, col_tr = build("train", args.scenes, 0)
va, bag_va, col_va = build("val", 512, 1)
torch.manual_seed(0)
model = UnifiedTransformer(cfg)  # a fresh transformer of the run's size
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
rng, t0 = np.random.default_rng(0), time.time()
print(f"transformer, existence only, {args.scenes} training scenes (held-out: 512 val scenes, chance 0.5)")
for step in range(args.steps + 1):
    if step % args.every == 0:
        print(f"step {step:5d}  train acc {accuracy(model, tr[:512]):.3f}  held-out acc {accuracy(model, va):.3f}"
              f"  ({time.time() - t0:.0f} s)", flush=True)
    if step == args.steps:
        break
    idx, tgt, lm = train.collate([(ids, m, "") for ids, m, _ in (tr[k] for k in rng.integers(len(tr), size=32))], "cpu")
    _, loss = model(idx, tgt, lm)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def fit(net, x, y, epochs):
    o = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(32):
            loss = F.binary_cross_entropy_with_logits(net(x[i]).squeeze(-1), y[i])
            o.zero_grad()
            loss.backward()
            o.step()
    return net


def acc(net, x, y):
    with torch.no_grad():
        return float(((net(x).squeeze(-1) > 0).float() == y).float().mean())


torch.manual_seed(0)
lin = fit(torch.nn.Linear(cfg.codebook_size, 8), bag_tr, col_tr, 20)
base = torch.maximum(col_va.mean(0), 1 - col_va.mean(0)).mean()
print(f"bag of codes -> colour present, linear, 8 labels per scene: held-out {acc(lin, bag_va, col_va):.3f} "
      f"(majority {base:.3f})")
q_tr, q_va = (torch.tensor(np.random.default_rng(s).integers(8, size=len(b))) for s, b in ((0, bag_tr), (1, bag_va)))
x_tr, x_va = torch.cat([bag_tr, F.one_hot(q_tr, 8).float()], 1), torch.cat([bag_va, F.one_hot(q_va, 8).float()], 1)
y_tr, y_va = col_tr[torch.arange(len(q_tr)), q_tr], col_va[torch.arange(len(q_va)), q_va]
mlp = fit(torch.nn.Sequential(torch.nn.Linear(x_tr.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)), x_tr, y_tr, 30)
print(f"bag of codes + colour asked -> yes/no, MLP, 1 label per scene: train {acc(mlp, x_tr, y_tr):.3f}, held-out "
      f"{acc(mlp, x_va, y_va):.3f} (majority {max(y_va.mean(), 1 - y_va.mean()):.3f})")
