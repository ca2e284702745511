"""cooper.py — the user-facing COOPER model: load a run, generate depth / segmentation maps, answer spatial questions,
evaluate, and a small command line.

    python cooper.py ask  --run runs/stage1 --scene 3 --question "Which is closer to the camera? (A) ... (B) ..."
    python cooper.py ask  --run runs/stage1 --image my.png --question "How many objects are there?"
    python cooper.py eval --run runs/stage1 --n 64

Paper mechanisms here (PAPER.md):
- Auxiliary Modality Generation at inference: the map is generated as image codes after a depth / segmentation
  prompt, then decoded by the VQ tokenizer and read back as metres (`data.rgb_to_depth`) or instance ids
  (`data.rgb_to_seg`, snapped to the MAX_OBJECTS colours a map of this world can hold).
- Adaptive interleaved reasoning (`answer(mode="interleaved")`): after the model closes a tool tag the runtime forces
  <|vision_start|>, the model generates the map's codes, and the runtime appends the reflection prompt; at most 3 text
  turns.
- Evaluation with the Marigold protocol for depth (least-squares scale-and-shift, AbsRel, δ1) and instance IoU for
  segmentation (EQUATIONS.md "Metrics").

Deviations from the paper: rule-based answer checking (reward.answer_reward) instead of an LLM judge; maps are VQ
codes generated autoregressively instead of rectified-flow VAE latents (see model.py).

Tests: python -m pytest tests/test_cooper.py
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import reward
from model import ModelConfig, UnifiedTransformer, VQTokenizer

# ----------------------------------------------------------------------------------------------------------------------
# Metrics (EQUATIONS.md "Metrics"); all numpy, all on one image at a time


def align_scale_shift(pred, gt, mask):
    """Marigold protocol: (s, t) = argmin Σ (s·p + t − g)² over the valid pixels; returns s·pred + t."""
    p, g = pred[mask].astype(np.float64), gt[mask].astype(np.float64)
    A = np.stack([p, np.ones_like(p)], axis=1)  # (N, 2) design matrix of the least-squares fit
    (s, t), *_ = np.linalg.lstsq(A, g, rcond=None)
    return (s * pred + t).astype(np.float32)


def depth_metrics(pred, gt, mask=None, eps=1e-3):
    """AbsRel = mean |p − g| / g and δ1 = share of pixels with max(p/g, g/p) < 1.25, over `mask` (default: all)."""
    mask = np.ones_like(gt, dtype=bool) if mask is None else mask
    p, g = np.maximum(pred[mask], eps), gt[mask]
    absrel = float(np.mean(np.abs(p - g) / g))
    delta1 = float(np.mean(np.maximum(p / g, g / p) < 1.25))
    return absrel, delta1


def match_instances(pred, gt):
    """Map each predicted colour id to the ground-truth instance it overlaps most (0 = background stays 0)."""
    mapping = {0: 0}
    for pid in np.unique(pred):
        if pid == 0:
            continue
        ids, counts = np.unique(gt[pred == pid], return_counts=True)
        mapping[int(pid)] = int(ids[np.argmax(counts)])
    return np.vectorize(lambda x: mapping.get(int(x), 0), otypes=[np.int64])(pred)


def seg_metrics(pred, gt):
    """Pixel accuracy after matching predicted colours to instances, and mIoU over ground-truth objects where each
    object is scored against its best-matching predicted colour (EQUATIONS.md)."""
    acc = float(np.mean(match_instances(pred, gt) == gt))
    ious = []
    for oid in np.unique(gt):
        if oid == 0:
            continue
        g = gt == oid
        best = 0.0
        for pid in np.unique(pred[g]):  # only colours that touch the object can have IoU > 0
            if pid == 0:
                continue
            p = pred == pid
            best = max(best, np.sum(p & g) / np.sum(p | g))
        ious.append(best)
    return acc, float(np.mean(ious)) if ious else 1.0


def count_instances(seg):
    """Counting from a segmentation map: the number of non-background colours that fill at least one 2×2 block.
    Thin seams where a decoded map blends two colours snap to a third palette colour; they never fill a block
    (on the true maps of 128 validation scenes this rule counts 99 % of scenes right)."""
    n = 0
    for pid in np.unique(seg[seg > 0]):
        m = seg == pid  # (H, W)
        n += bool((m[:-1, :-1] & m[1:, :-1] & m[:-1, 1:] & m[1:, 1:]).any())
    return n


def psnr(a, b):
    """PSNR = 10 log10(255² / MSE) between two uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * math.log10(255.0 ** 2 / max(mse, 1e-10)))


def to_unit(images):
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1], the VQ tokenizer's input range."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def from_unit(x):
    """float (N, 3, H, W) in [-1, 1] → uint8 (N, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------------
# The model a user talks to

class RunError(RuntimeError):
    """A run folder or input file that cannot be used; the message says what to do."""


MODEL_CHECKPOINTS = ("grpo.pt", "sft.pt", "stage1.pt")  # the most trained one present is loaded


def load_weights(module, state, path):
    """module.load_state_dict(state); weights written by another version of model.py give a one-line RunError."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        why = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:200]  # the line naming the missing / unexpected keys
        raise RunError(f"{path} does not fit this version of model.py ({why}); "
                       f"train a new run: python train.py --stage 1 --out NEW_FOLDER") from None


class Cooper:
    """A trained run: text tokenizer + VQ image tokenizer + unified transformer, on one device."""

    seg_ids = data.MAX_OBJECTS  # instance ids a segmentation map of the world can hold; None = the whole palette

    def __init__(self, model, vq, tokenizer, device="cpu"):
        self.model, self.vq, self.tok, self.device = model.eval(), vq.eval(), tokenizer, torch.device(device)
        self.cfg = model.cfg

    @classmethod
    def load(cls, run_dir, device="cpu"):
        """Load `run_dir` written by `python train.py`: tokenizer.json, vq.pt and the latest model checkpoint."""
        if not os.path.isdir(run_dir):
            raise RunError(f"run folder {run_dir!r} does not exist; train one with: python train.py --stage 1 --out {run_dir}")
        ckpt = next((c for c in MODEL_CHECKPOINTS if os.path.exists(os.path.join(run_dir, c))), None)
        for name in ("tokenizer.json", "vq.pt", ckpt or "stage1.pt"):
            if not os.path.exists(os.path.join(run_dir, name)):
                raise RunError(f"{run_dir} has no {name}; finish training with: python train.py --stage 1 --out {run_dir} --resume")
        tok = data.load_tokenizer(os.path.join(run_dir, "tokenizer.json"))
        states = {}
        for name in ("vq.pt", ckpt):
            try:
                states[name] = torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=False)
            except Exception as e:
                raise RunError(f"cannot read {os.path.join(run_dir, name)} ({type(e).__name__}: {e}); retrain or restore it")
        mcfg = ModelConfig(**states[ckpt]["model_config"])
        vq, model = VQTokenizer(mcfg), UnifiedTransformer(mcfg)
        for module, name in ((vq, "vq.pt"), (model, ckpt)):
            load_weights(module, states[name]["model"], os.path.join(run_dir, name))
        return cls(model.to(device), vq.to(device), tok, device)

    # -- images <-> codes ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images):
        """uint8 (N, H, W, 3) or (H, W, 3) → codes (N, h, w) long, on the model's device."""
        images = np.asarray(images)
        return self.vq.encode(to_unit(images[None] if images.ndim == 3 else images).to(self.device))

    @torch.no_grad()
    def decode_codes(self, codes):
        """codes (N, h, w) → uint8 (N, H, W, 3)."""
        return from_unit(self.vq.decode(codes.to(self.device)))  # (N, 3, H, W) in [-1, 1] → uint8

    def _prompt_ids(self, segments, images):
        ids, _ = data.encode_segments(segments, self.tok, self.cfg.image_offset,
                                      {k: v.cpu().numpy() for k, v in images.items()})
        return ids

    def _generate(self, prompts, max_new_tokens, temperature=0.0, top_k=None, force=None, seed=0):
        """Left-pad a list of prompt id lists into one batch and generate; returns the new tokens per prompt."""
        T0 = max(len(p) for p in prompts)
        idx = torch.full((len(prompts), T0), data.PAD_ID, dtype=torch.long)
        pad = torch.zeros(len(prompts), T0, dtype=torch.bool)
        for b, p in enumerate(prompts):  # left padding: the prompt ends at the last column for every row
            idx[b, T0 - len(p):] = torch.tensor(p)
            pad[b, T0 - len(p):] = True
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = self.model.generate(idx.to(self.device), max_new_tokens, temperature=temperature, top_k=top_k,
                                  vision_start=data.VISION_START, vision_end=data.VISION_END, stop_id=data.IM_END,
                                  key_padding_mask=pad.to(self.device), force=force, generator=g)
        return out["tokens"][:, T0:].cpu()  # (B, N)

    # -- auxiliary modality generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_maps(self, images, kind, temperature=0.0, seed=0):
        """Generate depth or segmentation maps for a batch of uint8 RGB images (N, H, W, 3).
        Returns (maps, map_rgb): metres (N, H, W) float32 or instance ids (N, H, W), and the generated RGB encodings."""
        assert kind in ("depth", "segmentation"), kind
        codes = self.encode_images(images)  # (N, h, w)
        n_img = self.cfg.image_tokens
        prompts = []
        for c in codes:
            # the stage-1 AMG layout with a dummy target; the prompt ends at the target's <|vision_start|>
            ids = self._prompt_ids(data.amg_segments(kind), {"rgb": c, kind: torch.zeros_like(c)})
            cut = len(ids) - 1 - ids[::-1].index(data.VISION_START)
            prompts.append(ids[: cut + 1])
        new = self._generate(prompts, n_img + 1, temperature=temperature, seed=seed)  # h·w codes + <|vision_end|>
        gen = new[:, :n_img] - self.cfg.image_offset  # (N, h·w) code indices
        gen = gen.clamp(0, self.cfg.codebook_size - 1).view(-1, self.cfg.grid, self.cfg.grid)  # (N, h, w)
        rgb = self.decode_codes(gen)
        maps = data.rgb_to_depth(rgb) if kind == "depth" else data.rgb_to_seg(rgb, max_id=self.seg_ids)
        return maps, rgb

    def generate_map(self, image, kind, temperature=0.0, seed=0):
        """One image (H, W, 3) uint8 → its depth map in metres (H, W) or its instance-id map (H, W)."""
        maps, _ = self.generate_maps(np.asarray(image)[None], kind, temperature, seed)
        return maps[0]

    # -- answering -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def answer_batch(self, images, questions, mode="direct", temperature=0.0, max_new_tokens=48, seed=0):
        """Answer question strings about uint8 images (N, H, W, 3). Returns one dict per question:
        text (what the model wrote), answer (the extracted final answer or None)."""
        if mode != "direct":
            raise ValueError(f"mode {mode!r}: this run answers in 'direct' mode")
        codes = self.encode_images(images)
        prompts = []
        for c, q in zip(codes, questions):
            prompts.append(self._prompt_ids(data.prompt_segments(q), {"rgb": c}))  # ends with the answer turn's <|im_start|>
        new = self._generate(prompts, max_new_tokens, temperature=temperature, seed=seed)
        out = []
        for row in new.tolist():
            row = row[: row.index(data.IM_END)] if data.IM_END in row else row
            text = self.tok.decode([t for t in row if t < self.cfg.image_offset], skip_special_tokens=False)
            out.append({"text": text, "answer": reward.extract_answer(text)})
        return out

    def answer(self, image, question, mode="direct", **kw):
        """Answer one question about one uint8 image (H, W, 3); returns {text, answer}."""
        return self.answer_batch(np.asarray(image)[None], [question], mode, **kw)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation on held-out scenes (EQUATIONS.md "Metrics")


@torch.no_grad()
def evaluate(cooper, n=64, split="val", seed=0, batch=32, vqa=True):
    """Evaluate the VQ tokenizer, the generated maps, the maps' usefulness for answering, and direct-answer VQA on the
    first n scenes of `split`. Returns (metrics: flat dict of floats, samples: dict of uint8 image stacks)."""
    scenes = [data.make_scene(data.scene_seed(split, i), cooper.cfg.image_size) for i in range(n)]
    rgb = np.stack([s.rgb for s in scenes])  # (n, H, W, 3)
    depth = np.stack([s.depth for s in scenes])  # (n, H, W) metres
    seg = np.stack([data.reading_order(s.seg) for s in scenes])  # (n, H, W) instance ids, as the targets number them
    m, used = {}, set()
    # 1. the VQ tokenizer alone: reconstruct each modality through encode → decode
    targets = {"rgb": rgb, "depth": data.depth_to_rgb(depth), "segmentation": data.seg_to_rgb(seg)}
    recon = {}
    for mod, img in targets.items():
        codes = torch.cat([cooper.encode_images(img[i:i + batch]) for i in range(0, n, batch)])  # (n, h, w)
        used.update(codes.flatten().tolist())
        recon[mod] = np.concatenate([cooper.decode_codes(codes[i:i + batch]) for i in range(0, n, batch)])
        m[f"vq/psnr_{mod}"] = float(np.mean([psnr(a, b) for a, b in zip(recon[mod], img)]))
    m["vq/depth_absrel"] = float(np.mean([depth_metrics(data.rgb_to_depth(r), d)[0] for r, d in zip(recon["depth"], depth)]))
    recon_seg = data.rgb_to_seg(recon["segmentation"], max_id=cooper.seg_ids)  # (n, H, W) instance ids
    m["vq/seg_pixel_acc"] = float(np.mean(recon_seg == seg))
    # counting on the reconstruction of the true map: the ceiling of use/count_from_seg
    m["vq/seg_count"] = float(np.mean([count_instances(r) == len(s.objects) for r, s in zip(recon_seg, scenes)]))
    m["vq/codebook_usage"] = len(used) / cooper.cfg.codebook_size
    # 2. auxiliary modality generation: depth (Marigold protocol, raw and aligned) and segmentation
    gen_d = np.concatenate([cooper.generate_maps(rgb[i:i + batch], "depth", seed=seed)[0] for i in range(0, n, batch)])
    gen_s = np.concatenate([cooper.generate_maps(rgb[i:i + batch], "segmentation", seed=seed)[0] for i in range(0, n, batch)])
    for where in ("all", "obj"):
        rows = []
        for p, g, s in zip(gen_d, depth, seg):
            mask = np.ones_like(s, bool) if where == "all" else s > 0
            if mask.sum() < 2:
                continue
            rows.append(depth_metrics(p, g, mask) + depth_metrics(align_scale_shift(p, g, mask), g, mask))
        r = np.mean(rows, axis=0)
        m.update({f"depth/absrel_{where}": r[0], f"depth/delta1_{where}": r[1],
                  f"depth/absrel_{where}_aligned": r[2], f"depth/delta1_{where}_aligned": r[3]})
    sm = np.array([seg_metrics(p, g) for p, g in zip(gen_s, seg)])
    m["seg/pixel_acc"], m["seg/miou"] = sm.mean(0)
    # 3. map usefulness: answer from the generated map alone, reading it under each object's true mask
    rel_hits, cnt_hits = [], []
    rng = np.random.default_rng(seed)
    questions = [data.make_questions(s, rng) for s in scenes]
    for k, (s, qs) in enumerate(zip(scenes, questions)):
        for q in qs:
            if q.category == "relative_distance":
                d = [gen_d[k][s.seg == o + 1].mean() for o in q.objects]  # mean generated depth under each object
                rel_hits.append("AB"[int(np.argmin(d))] == q.answer)
        cnt_hits.append(count_instances(gen_s[k]) == len(s.objects))
    m["use/rel_distance_from_depth"] = float(np.mean(rel_hits)) if rel_hits else float("nan")
    m["use/count_from_seg"] = float(np.mean(cnt_hits))
    # 4. direct-answer VQA per category (rule-based verifier; numbers scored by MRA)
    if vqa:
        items = [(k, q) for k, qs in enumerate(questions) for q in qs]
        scores = {}
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            outs = cooper.answer_batch(rgb[[k for k, _ in chunk]], [q.text for _, q in chunk])
            for (_, q), o in zip(chunk, outs):
                scores.setdefault(q.category, []).append(reward.answer_reward(o["text"], q.answer, q.kind))
        for cat, v in sorted(scores.items()):
            m[f"vqa/{cat}"] = float(np.mean(v))
        m["vqa/mean"] = float(np.mean([np.mean(v) for v in scores.values()]))
    samples = {"rgb": rgb, "depth": depth, "gen_depth": gen_d, "seg": seg, "gen_seg": gen_s}
    return {k: float(v) for k, v in m.items()}, samples


def sample_grid(samples, n=8, scale=2):
    """A PNG-ready grid, one scene per row: RGB | true depth | generated depth | true seg | generated seg."""
    rows = []
    for i in range(min(n, len(samples["rgb"]))):
        cells = [samples["rgb"][i], data.colorize_depth(samples["depth"][i]), data.colorize_depth(samples["gen_depth"][i]),
                 data.seg_to_rgb(samples["seg"][i]), data.seg_to_rgb(samples["gen_seg"][i])]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], axis=1))
    grid = np.concatenate(rows, axis=0)  # (n·(H+2), 5·(W+2), 3)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    header = Image.new("RGB", (img.width, 14), "white")
    draw = ImageDraw.Draw(header)
    for j, name in enumerate(["rgb", "depth", "gen depth", "seg", "gen seg"]):
        draw.text((j * img.width // 5 + 2, 1), name, fill="black")
    out = Image.new("RGB", (img.width, img.height + 14), "white")
    out.paste(header, (0, 0)); out.paste(img, (0, 14))
    return out


def format_table(m, chance=None):
    """The evaluation as a printed table: one metric a line, VQA rows with the category's chance level."""
    lines = [f"{'metric':34s} {'value':>8s}"]
    for k, v in m.items():
        extra = f"   (chance {chance(k[4:]):.2f})" if chance and k.startswith("vqa/") and k != "vqa/mean" else ""
        lines.append(f"{k:34s} {v:8.3f}{extra}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def load_image(path, size):
    """Read a PNG/JPEG as uint8 (size, size, 3): converted to RGB and resized (bilinear) to the model's square input."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise RunError(f"image {path!r} does not exist")
    except Exception as e:
        raise RunError(f"cannot read image {path!r} ({type(e).__name__}: {e})")
    if img.size != (size, size):
        print(f"note: resizing {path} from {img.size[0]}x{img.size[1]} to {size}x{size} (the model's input size)")
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


def build_parser():
    p = argparse.ArgumentParser(description="Use a trained small-COOPER run.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ask", help="answer a question about an image and save the generated depth/segmentation maps")
    a.add_argument("--run", default="runs/tiny", help="run folder written by train.py")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="an RGB image file (resized to the model's input size)")
    src.add_argument("--scene", type=int, help="use test scene number SCENE of the synthetic world instead")
    a.add_argument("--question", default="", help="the question; without one, a generated question for --scene is used")
    a.add_argument("--mode", default="direct", choices=["direct"])
    a.add_argument("--out", default="cooper_out", help="folder for the generated maps (PNG)")
    e = sub.add_parser("eval", help="evaluate a run on held-out scenes and print the table")
    e.add_argument("--run", default="runs/tiny")
    e.add_argument("--n", type=int, default=64, help="number of held-out scenes")
    e.add_argument("--split", default="test", choices=["val", "test"])
    for q in (a, e):
        q.add_argument("--device", default="cpu")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run_command(args)
    except RunError as e:
        sys.exit(f"error: {e}")


def run_command(args):
    c = Cooper.load(args.run, args.device)
    if args.cmd == "eval":
        m, samples = evaluate(c, args.n, args.split)
        print(format_table(m, data.chance))
        with open(os.path.join(args.run, f"eval_{args.split}.json"), "w") as f:
            json.dump(m, f, indent=1)
        sample_grid(samples).save(os.path.join(args.run, f"eval_{args.split}.png"))
        print(f"wrote {args.run}/eval_{args.split}.json and eval_{args.split}.png")
        return
    if args.image:
        img, question, truth = load_image(args.image, c.cfg.image_size), args.question, None
    else:
        scene = data.make_scene(data.scene_seed("test", args.scene), size=c.cfg.image_size)
        img, question, truth = scene.rgb, args.question, None
        if not question:
            q = data.make_questions(scene, np.random.default_rng(args.scene))[0]
            question, truth = q.text, q.answer
    if not question:
        raise RunError("give --question (a generated one is only available with --scene)")
    os.makedirs(args.out, exist_ok=True)
    depth, seg = c.generate_map(img, "depth"), c.generate_map(img, "segmentation")
    Image.fromarray(img).save(os.path.join(args.out, "input.png"))
    Image.fromarray(data.colorize_depth(depth)).save(os.path.join(args.out, "depth.png"))
    Image.fromarray(data.seg_to_rgb(seg)).save(os.path.join(args.out, "segmentation.png"))
    res = c.answer(img, question, mode=args.mode)
    print(f"question: {question}\nmodel:    {res['text']}\nanswer:   {res['answer']}")
    if truth is not None:
        print(f"truth:    {truth}")
    print(f"maps:     {args.out}/depth.png (near red, far blue), {args.out}/segmentation.png")


if __name__ == "__main__":
    main()
