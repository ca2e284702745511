"""Lookup probe: how fast does a fresh tiny transformer learn to find things in an image, and what makes it learn?

It isolates the grounding step of stage 1 (README, "Making the model see"): a fresh `tiny` UnifiedTransformer, with a
finished run's text and VQ tokenizers, is trained on a few question categories alone, one question per sequence, and
its held-out accuracy is printed every --eval-every steps: the exact answer (every token inside \\boxed{…}, teacher
forced) on 256 validation scenes, and the same for the blind baseline (each question asked about the next scene's
image). Levers, each a flag: the layout (question before or after the image) and the understanding path (pixel
patches added to the codes), so each can be switched off alone; --then/--switch run a curriculum.

    python docs/lookup_probe.py --run runs/tiny --tasks locate                       # question first (the recipe)
    python docs/lookup_probe.py --run runs/tiny --tasks locate --layout image-first  # the old layout
    python docs/lookup_probe.py --run runs/tiny --tasks identify --no-pixels          # codes alone

Results and commands: docs/perception.md.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cooper  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from model import ModelConfig, UnifiedTransformer, VQTokenizer  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--run", default="runs/tiny", help="finished stage-1 run whose tokenizer.json and vq.pt are used")
p.add_argument("--tasks", default="locate", help="comma-separated categories (data.CATEGORIES + data.GROUNDING), "
               "and refer: paint the named object's mask (trained, not scored)")
p.add_argument("--then", default="", help="categories trained from step --switch on (a curriculum); evaluated throughout")
p.add_argument("--switch", type=int, default=0, help="the step where --then replaces --tasks")
p.add_argument("--layout", default="question-first", choices=("question-first", "image-first"))
p.add_argument("--pixels", action=argparse.BooleanOptionalAction, default=True, help="the understanding path")
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--n-train", type=int, default=4000, help="training scenes (x 2 with flips)")
p.add_argument("--eval-every", type=int, default=100)
p.add_argument("--few", default="", metavar="N:S", help="a distractor curriculum: for the first S steps train only on "
               "scenes with at most N objects (held-out scores are always on every scene)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=1, help="torch threads (two probes fit on two cores)")
p.add_argument("--init", default="", help="start from this run's stage1.pt instead of fresh weights (a model that "
               "already finds things)")
p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
               help="override ModelConfig fields of the fresh transformer, e.g. --set n_embd=256 ffn_hidden=768")
args = p.parse_args()
torch.set_num_threads(args.threads)
T0 = time.time()

try:
    tok = data.load_tokenizer(os.path.join(args.run, "tokenizer.json"))
    vq_state = torch.load(os.path.join(args.run, "vq.pt"), map_location="cpu", weights_only=False)
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}; train a run first: python train.py --stage 1 --out {args.run}")
cfg = replace(ModelConfig(**vq_state["model_config"]), patch_embed=args.pixels, attn_impl="sdpa")
cfg = replace(cfg, **{k: type(getattr(cfg, k))(v) for k, v in (s.split("=") for s in args.set)})
vq = VQTokenizer(cfg)
cooper.load_weights(vq, vq_state["model"], os.path.join(args.run, "vq.pt"))
vq.eval()
first, then = args.tasks.split(","), [t for t in args.then.split(",") if t]
tasks = first + [t for t in then if t not in first]  # every category that is trained at some point is evaluated
unknown = [t for t in tasks if t not in data.CATEGORY_INFO and t != "refer"]
if unknown:
    sys.exit(f"error: unknown task(s) {unknown}; choose from {list(data.CATEGORY_INFO)}")


def encode(images):
    with torch.no_grad():
        return torch.cat([vq.encode(cooper.to_unit(images[i:i + 512])) for i in range(0, len(images), 512)]).numpy()


def pool(split, n):
    """Scenes (with their flips for training), their RGB images and VQ codes; with the "refer" task also the codes
    of every object's own mask, painted as a one-object segmentation map."""
    scenes = [data.make_scene(data.scene_seed(split, k)) for k in range(n)]
    scenes += [data.flip_scene(s) for s in scenes] if split == "train" else []
    rgb = np.stack([s.rgb for s in scenes])  # (N, H, W, 3)
    masks = {}
    if "refer" in tasks:
        keys = [(k, i) for k, s in enumerate(scenes) for i in range(len(s.objects))]
        codes = encode(np.stack([data.seg_to_rgb((scenes[k].seg == i + 1).astype(int)) for k, i in keys]))
        masks = dict(zip(keys, codes))
    return scenes, rgb, encode(rgb), masks


def questions(scene, rng, only=None):
    only = only or tasks
    qs = [q for q in data.make_questions(scene, rng) + data.grounding_questions(scene, rng) if q.category in only]
    if "refer" in only:  # referring segmentation: paint the named object's mask (64 target codes)
        i = int(rng.integers(len(scene.objects)))
        qs.append(data.Question(f"Paint the {scene.objects[i].color} object.", "", "refer", "map", "boundary", None, [i]))
    return qs


def example(q, codes, k, masks=None):
    """(ids, loss mask, category, scene index) of one question in the chosen layout."""
    if q.category == "refer":
        segs = data.prompt_segments(q) + [("image", masks[(k, q.objects[0])], True), ("text", "<|im_end|>", False)]
        return (*data.encode_segments(segs, tok, cfg.image_offset, {"rgb": codes[k]}), q.category, k)
    if args.layout == "question-first":
        segs = data.vqa_segments(q)
    else:  # the image, then the question
        segs = [("text", "<|im_start|>", False), ("image", "rgb", False),
                ("text", q.text + "<|im_end|><|im_start|>", False), ("text", data.answer_text(q) + "<|im_end|>", True)]
    ids, mask = data.encode_segments(segs, tok, cfg.image_offset, {"rgb": codes[k]})
    return ids, mask, q.category, k


train_pool, val_pool = pool("train", args.n_train), pool("val", 256)
few_n, few_steps = map(int, args.few.split(":")) if args.few else (0, 0)
few_idx = [k for k, s in enumerate(train_pool[0]) if len(s.objects) <= few_n]  # scenes of the distractor curriculum
rng = np.random.default_rng(1)
items = [(k, q) for k, s in enumerate(val_pool[0]) for q in questions(s, rng) if q.category != "refer"]
prefix = len(tok.encode("<answer>\\boxed{").ids)
print(f"pools ready in {time.time() - T0:.0f} s; {len(items)} held-out questions; tasks {tasks}, layout {args.layout}, "
      f"pixels {args.pixels}", flush=True)

torch.manual_seed(args.seed)
if args.init:  # continue a finished stage-1 model (its own config; its tokenizers must be --run's)
    path = os.path.join(args.init, "stage1.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, OSError) as e:
        sys.exit(f"error: cannot read {path} ({e}); train it first: python train.py --stage 1 --out {args.init}")
    cfg = replace(ModelConfig(**state["model_config"]), attn_impl="sdpa")
    model = UnifiedTransformer(cfg)
    cooper.load_weights(model, state["model"], path)
else:
    model = UnifiedTransformer(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)


@torch.no_grad()
def evaluate():
    """Exact-answer accuracy per category, teacher forced, on the held-out items; and blind (next scene's image)."""
    model.eval()
    out = {}
    for tag, shift in (("seen", 0), ("blind", 1)):
        for a in range(0, len(items), 256):
            chunk = items[a:a + 256]
            ex = [example(q, val_pool[2], (k + shift) % 256) for k, q in chunk]
            idx, tgt, lm, pix = train.collate(ex, "cpu", val_pool[1] if args.pixels else None)
            pred = model(idx, pixels=pix)[0].argmax(-1)  # (B, T)
            for b, (_, q) in enumerate(chunk):
                span = lm[b].nonzero()[:, 0][prefix:prefix + len(tok.encode(q.answer).ids)]  # the answer's tokens
                out.setdefault((q.category, tag), []).append(bool((pred[b, span] == tgt[b, span]).all()))
    model.train()
    return {key: float(np.mean(v)) for key, v in out.items()}


for step in range(args.steps + 1):
    if step % args.eval_every == 0:
        r = evaluate()
        print(f"EVAL step {step:5d} ({time.time() - T0:5.0f} s) " + "  ".join(
            f"{c} {r[(c, 'seen')]:.3f} (blind {r[(c, 'blind')]:.3f})" for c in tasks if (c, "seen") in r), flush=True)
    if step == args.steps:
        break
    frac = step / args.steps  # linear warm-up over 100 steps, cosine to a tenth
    lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
    for g in opt.param_groups:
        g["lr"] = lr
    brng, ex = np.random.default_rng([args.seed, step]), []
    while len(ex) < args.batch:  # the batch is a pure function of the seed and the step
        k = int(few_idx[brng.integers(len(few_idx))] if step < few_steps else brng.integers(len(train_pool[0])))
        qs = questions(train_pool[0][k], brng, then if then and step >= args.switch else first)
        if qs:
            ex.append(example(qs[int(brng.integers(len(qs)))], train_pool[2], k, train_pool[3]))
    idx, tgt, lm, pix = train.collate(ex, "cpu", train_pool[1] if args.pixels else None)
    _, loss = model(idx, tgt, lm, pixels=pix)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
