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
TURN_CAP = 96  # text tokens one model turn may hold; the longest turn of data.make_trajectory has 85 (tested)


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

    def pixels(self, images):
        """uint8 (N, H, W, 3) → the understanding path's input (N, 3, H, W) in [-1, 1], or None without one."""
        return to_unit(np.asarray(images)).to(self.device) if self.cfg.patch_embed else None

    def _generate(self, prompts, max_new_tokens, temperature=0.0, seed=0, pixels=None, **kw):
        """Left-pad a list of prompt id lists into one batch and generate (kw: force / ban / turn_cap / top_k, see
        model.UnifiedTransformer.generate). pixels: each prompt's input image for the understanding path. Returns
        generate's dict, on the CPU, with "T0" the padded prompt width: tokens[:, T0:] are the new ones."""
        T0 = max(len(p) for p in prompts)
        idx = torch.full((len(prompts), T0), data.PAD_ID, dtype=torch.long)
        pad = torch.zeros(len(prompts), T0, dtype=torch.bool)
        for b, p in enumerate(prompts):  # left padding: the prompt ends at the last column for every row
            idx[b, T0 - len(p):] = torch.tensor(p)
            pad[b, T0 - len(p):] = True
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = self.model.generate(idx.to(self.device), max_new_tokens, temperature=temperature,
                                  vision_start=data.VISION_START, vision_end=data.VISION_END, stop_id=data.IM_END,
                                  key_padding_mask=pad.to(self.device), generator=g, pixels=pixels, **kw)
        return {**{k: v.cpu() for k, v in out.items()}, "T0": T0}

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
        out = self._generate(prompts, n_img + 1, temperature=temperature, seed=seed,
                             pixels=self.pixels(images))  # h·w codes + <|vision_end|>
        gen = out["tokens"][:, out["T0"]:out["T0"] + n_img] - self.cfg.image_offset  # (N, h·w) code indices
        gen = gen.clamp(0, self.cfg.codebook_size - 1).view(-1, self.cfg.grid, self.cfg.grid)  # (N, h, w)
        rgb = self.decode_codes(gen)
        maps = data.rgb_to_depth(rgb) if kind == "depth" else data.rgb_to_seg(rgb, max_id=self.seg_ids)
        return maps, rgb

    def generate_map(self, image, kind, temperature=0.0, seed=0):
        """One image (H, W, 3) uint8 → its depth map in metres (H, W) or its instance-id map (H, W)."""
        maps, _ = self.generate_maps(np.asarray(image)[None], kind, temperature, seed)
        return maps[0]

    # -- answering: the interleaved runtime (PAPER.md "Text format"; DESIGN.md "Stage 2") --------------------------

    def prompts(self, codes, questions, mode):
        """Prompt ids of each (codes (h, w), question) for an answering mode (see `rollout`), and how many of their last
        ids the runtime wrote for the model (the mode's prefill: part of the response, not of the question)."""
        # the runtime opens the model's first turn: every turn starts with <think> (PAPER.md's format), and with no
        # system prompt the stage-1 habit of answering at once would otherwise win; "direct" opens with <answer>
        prefill = {"direct": [data.ANSWER], "interleaved": [data.THINK], "text": [data.THINK]}
        for kind in ("depth", "segmentation"):                             # the map first, always (the paper's "PE")
            prefill[kind] = self.tok.encode(f"<think>{data.PLANS[kind][0]}</think>{data.TOOL_PROMPTS[kind]}").ids
            prefill[kind] += [data.VISION_START]
        extra = prefill.get(mode, [])
        ids = [self._prompt_ids(data.prompt_segments(q), {"rgb": c}) + extra for c, q in zip(codes, questions)]
        return ids, len(extra)

    def runtime(self, mode, turn_cap=TURN_CAP):
        """generate() keywords of the tool-switch runtime. After a closing tool tag <|vision_start|> is forced (the
        model then draws exactly h×w codes, and <|vision_end|> follows); after a generated map the reflection prompt is
        forced; once MAX_TURNS - 1 maps are drawn the tool tags are masked, so the last turn answers; a turn longer than
        turn_cap tokens ends the rollout (its format reward is then 0). Modes "text" and "direct" mask the tool tags
        throughout; <|vision_start|> is never sampled (only forced)."""
        # exercise 10 begin: the tool-switching runtime
        force = {data.DEPTH_TAG_END: [data.VISION_START], data.SEG_TAG_END: [data.VISION_START],
                 data.VISION_END: self.tok.encode(data.REFLECTION_PROMPT).ids}
        last = 0 if mode in ("text", "direct") else reward.MAX_TURNS - 1  # maps a rollout may draw
        ban = {t: last for t in (data.DEPTH_TAG, data.DEPTH_TAG_END, data.SEG_TAG, data.SEG_TAG_END)}
        ban[data.VISION_START] = 0  # <|vision_start|> is only ever forced
        return dict(force=force, ban=ban, turn_cap=turn_cap)
        # exercise 10 end

    def max_tokens(self, turn_cap=TURN_CAP):
        """Longest possible rollout: MAX_TURNS turns of turn_cap tokens, and a map + reflection between turns."""
        between = self.cfg.image_tokens + 2 + len(self.tok.encode(data.REFLECTION_PROMPT).ids)
        return reward.MAX_TURNS * turn_cap + (reward.MAX_TURNS - 1) * between

    @torch.no_grad()
    def rollout(self, images, questions, mode="interleaved", temperature=0.0, seed=0, turn_cap=TURN_CAP):
        """Run the tool-switch runtime on uint8 images (N, H, W, 3) and question strings, all in one batched, KV-cached
        generation. Modes: "interleaved" (the model decides when to draw a map), "direct" (answer at once), "text"
        (tool tags masked out), "depth" / "segmentation" (that map is always drawn first: the paper's "PE" row).
        Returns (results, raw): one dict per question (see `answer_batch`) and generate's dict with "T0" (for GRPO)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        prompts, n_prefill = self.prompts(self.encode_images(images), questions, mode)
        raw = self._generate(prompts, self.max_tokens(turn_cap), temperature=temperature, seed=seed,
                             pixels=self.pixels(images), **self.runtime(mode, turn_cap))
        start = raw["T0"] - n_prefill  # the response: the prefill, then everything generated after it
        results = [self.read_rollout(raw["tokens"][b, start:][raw["mask"][b, start:]].tolist())
                   for b in range(len(prompts))]
        return results, raw

    def read_rollout(self, ids):
        """What a rollout says: the model's text (image codes left out, so each map reads <|vision_start|><|vision_end|>),
        its turns, the maps it drew [(kind, map)] and its final answer."""
        text = self.tok.decode([t for t in ids if t < self.cfg.image_offset], skip_special_tokens=False)
        text = text.replace("<|pad|>", "")
        maps, i = [], 0
        while data.VISION_START in ids[i:]:
            s = ids.index(data.VISION_START, i)
            block = [t - self.cfg.image_offset for t in ids[s + 1:s + 1 + self.cfg.image_tokens]]
            if len(block) == self.cfg.image_tokens and all(t >= 0 for t in block):
                kind = "depth" if data.DEPTH_TAG_END in ids[max(0, s - 1):s] else "segmentation"
                rgb = self.decode_codes(torch.tensor(block).view(1, self.cfg.grid, self.cfg.grid))[0]
                maps.append((kind, data.rgb_to_depth(rgb) if kind == "depth" else data.rgb_to_seg(rgb, self.seg_ids)))
            i = s + 1
        return {"text": text, "turns": reward.parse_turns(text), "maps": maps, "answer": reward.extract_answer(text)}

    def answer_batch(self, images, questions, mode="direct", temperature=0.0, seed=0):
        """Answer question strings about uint8 images (N, H, W, 3). Returns one dict per question: text (the whole
        trajectory the model wrote, maps as <|vision_start|><|vision_end|>), turns (the text of each model turn), maps
        (list of (kind, decoded map)), answer (the extracted final answer or None)."""
        return self.rollout(images, questions, mode, temperature, seed)[0]

    def answer(self, image, question, mode="direct", **kw):
        """Answer one question about one uint8 image (H, W, 3); see `answer_batch`."""
        return self.answer_batch(np.asarray(image)[None], [question], mode, **kw)[0]


MODES = ("interleaved", "direct", "text", "depth", "segmentation")


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation on held-out scenes (EQUATIONS.md "Metrics")


@torch.no_grad()
def evaluate(cooper, n=64, split="val", seed=0, batch=32, n_vqa=256):
    """Evaluate the VQ tokenizer, the generated maps and the maps' usefulness for answering on the first n scenes of
    `split`, and direct-answer VQA (`evaluate_vqa`) on the first n_vqa (0 = skip). Returns (metrics: flat dict of
    floats, samples: dict of uint8 image stacks)."""
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
    # 4. direct-answer VQA per category, with chance and blind baselines
    if n_vqa:
        m.update(evaluate_vqa(cooper, n=n_vqa, split=split, seed=seed))
    samples = {"rgb": rgb, "depth": depth, "gen_depth": gen_d, "seg": seg, "gen_seg": gen_s}
    return {k: float(v) for k, v in m.items()}, samples


@torch.no_grad()
def vqa_items(image_size, n=256, split="val", seed=0):
    """The VQA evaluation's questions: images (n, H, W, 3) of the first n scenes of `split`, and (scene index,
    question) for every question of every scene."""
    scenes = [data.make_scene(data.scene_seed(split, i), image_size) for i in range(n)]
    rng = np.random.default_rng(seed)
    items = [(k, q) for k, s in enumerate(scenes) for q in data.make_questions(s, rng) + data.grounding_questions(s, rng)]
    return np.stack([s.rgb for s in scenes]), items


def evaluate_vqa(cooper, n=256, split="val", seed=0, batch=256):
    """Direct-answer VQA and grounding on the first n scenes of `split`, every question of every scene. Per category:
    vqa/C the mean score (rule-based verifier; numbers by MRA), vqa_se/C its standard error, vqa_chance/C the wording
    prior's score on the same questions (data.prior_answer: the best answer given the question's wording alone) and
    vqa_blind/C the model's score when each question is asked about the next scene's image instead. vqa/mean and
    vqa_{chance,blind}/mean average the benchmark categories (data.CATEGORIES), not the grounding tasks."""
    rgb, items = vqa_items(cooper.cfg.image_size, n, split, seed)
    m = {}
    for tag, shift in (("vqa", 0), ("vqa_blind", 1)):  # blind: the same question about another scene's image
        scores = {}
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            outs = cooper.answer_batch(rgb[[(k + shift) % n for k, _ in chunk]], [q.text for _, q in chunk])
            for (_, q), o in zip(chunk, outs):
                scores.setdefault(q.category, []).append(reward.answer_reward(o["text"], q.answer, q.kind))
        for cat, v in scores.items():
            m[f"{tag}/{cat}"] = float(np.mean(v))
            if tag == "vqa":
                m[f"vqa_se/{cat}"] = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
                m[f"vqa_n/{cat}"] = len(v)
    for _, q in items:
        m.setdefault(f"vqa_chance/{q.category}", []).append(data.answer_score(data.prior_answer(q), q))
    m.update({k: float(np.mean(v)) for k, v in m.items() if k.startswith("vqa_chance/")})
    for tag in ("vqa", "vqa_blind", "vqa_chance"):
        m[f"{tag}/mean"] = float(np.mean([m[f"{tag}/{c}"] for c in data.CATEGORIES if f"{tag}/{c}" in m]))
    return m


PLOT_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0)]


def _ticks(lo, hi, n=5, log=False):
    """About n round tick values covering [lo, hi] (powers of ten and their 2× / 5× on a log axis)."""
    if log:
        for ms in ((1,), (1, 2, 5), tuple(range(1, 10))):  # the sparsest set of mantissas that gives 3 ticks or more
            vals = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in ms]
            vals = [v for v in vals if lo <= v <= hi]
            if len(vals) >= 3:
                break
        return vals
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def line_chart(series, title="", xlabel="step", ylabel="", log_y=False, dashed=None, size=(560, 340)):
    """A line chart drawn with Pillow: axes with tick values, axis labels and a legend.
    series: {name: [(x, y), ...]}; dashed: {name: [(x, y), ...]} drawn dashed in the same colour as the series of that
    name (chance levels, baselines) or grey. Returns a PIL image."""
    dashed = dashed or {}
    pts = [p for v in list(series.values()) + list(dashed.values()) for p in v if not log_y or p[1] > 0]
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 58, 24, W - 150, H - 40  # plot area; the legend sits to the right of it
    d.text((x0, 6), title, fill="black")
    if not pts:
        return img
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    f = math.log10 if log_y else (lambda v: v)
    ylo, yhi = f(min(ys)), f(max(ys))
    ylo, yhi = (ylo - 0.05 * (yhi - ylo), yhi + 0.05 * (yhi - ylo)) if yhi > ylo else (ylo - 1, yhi + 1)
    X = lambda x: x0 + (x1 - x0) * (x - xlo) / (xhi - xlo)
    Y = lambda y: y1 - (y1 - y0) * (f(y) - ylo) / (yhi - ylo)
    for t in _ticks(xlo, xhi):
        d.line([(X(t), y1), (X(t), y1 + 4)], fill="black")
        d.text((X(t) - 3 * len(f"{t:g}"), y1 + 6), f"{t:g}", fill="black")
    for t in _ticks(10 ** ylo if log_y else ylo, 10 ** yhi if log_y else yhi, log=log_y):
        d.line([(x0 - 4, Y(t)), (x1, Y(t))], fill=(225, 225, 225))
        d.text((x0 - 8 - 6 * len(f"{t:.3g}"), Y(t) - 6), f"{t:.3g}", fill="black")
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text(((x0 + x1) // 2 - 3 * len(xlabel), H - 16), xlabel, fill="black")
    d.text((4, y0 - 16), ylabel + (" (log)" if log_y else ""), fill="black")
    names = list(series)
    for name, v in dashed.items():
        c = PLOT_COLOURS[names.index(name) % len(PLOT_COLOURS)] if name in names else (150, 150, 150)
        v = [p for p in v if not log_y or p[1] > 0]
        for (xa, ya), (xb, yb) in zip(v, v[1:]):
            for k in range(0, 10, 2):  # dashes: every other tenth of the segment
                d.line([(X(xa + (xb - xa) * k / 10), Y(ya + (yb - ya) * k / 10)),
                        (X(xa + (xb - xa) * (k + 1) / 10), Y(ya + (yb - ya) * (k + 1) / 10))], fill=c, width=1)
    for i, (name, v) in enumerate(series.items()):
        c = PLOT_COLOURS[i % len(PLOT_COLOURS)]
        v = [(X(x), Y(y)) for x, y in v if not log_y or y > 0]
        if len(v) > 1:
            d.line(v, fill=c, width=2)
        for p in v:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
        d.line([(x1 + 10, y0 + 6 + 14 * i), (x1 + 28, y0 + 6 + 14 * i)], fill=c, width=2)
        d.text((x1 + 32, y0 + 14 * i), name, fill="black")
    if dashed:
        k = len(series)
        d.text((x1 + 10, y0 + 14 * k + 4), "- - - chance / baseline", fill=(90, 90, 90))
    return img


def stack_images(images):
    """Images one above the other on a white page."""
    W, H = max(i.width for i in images), sum(i.height for i in images)
    page = Image.new("RGB", (W, H), "white")
    y = 0
    for i in images:
        page.paste(i, (0, y))
        y += i.height
    return page


def tools_used(turns):
    """Which tools a rollout called: the set of "depth" / "segmentation" over its turns that end in a tool call."""
    return {"depth" if t.endswith("</depth-estimation>") else "segmentation" for t in turns[:-1]
            if t.endswith(("</depth-estimation>", "</segmentation>"))}


@torch.no_grad()
def evaluate_modes(cooper, n=128, split="val", seed=0, modes=MODES, batch=256):
    """Stage-2 evaluation on every question of the first n scenes of `split`, in each answering mode (greedy): per
    category {mode}/C the mean score and {mode}_se/C its standard error, {mode}/mean over the benchmark categories and
    {mode}/format the share of rollouts with r_format = 1; for the interleaved mode the tool-usage table (the paper's
    Figure 3): tools/C/{depth,segmentation,none} = share of rollouts calling that tool (none: no call), and chance/C."""
    scenes = [data.make_scene(data.scene_seed(split, i), cooper.cfg.image_size) for i in range(n)]
    rgb = np.stack([s.rgb for s in scenes])
    rng = np.random.default_rng(seed)
    items = [(k, q) for k, s in enumerate(scenes) for q in data.make_questions(s, rng)]
    m = {f"chance/{c}": float(np.mean([data.answer_score(data.prior_answer(q), q) for _, q in items
                                       if q.category == c])) for c in data.CATEGORIES}
    for mode in modes:
        scores, fmt, tools = {}, [], {}
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            for (_, q), r in zip(chunk, cooper.answer_batch(rgb[[k for k, _ in chunk]], [q.text for _, q in chunk], mode)):
                scores.setdefault(q.category, []).append(reward.answer_reward(r["text"], q.answer, q.kind))
                fmt.append(reward.format_reward(r["turns"]))
                used = tools_used(r["turns"])
                t = tools.setdefault(q.category, {"depth": 0, "segmentation": 0, "none": 0, "n": 0})
                t["n"] += 1
                for k in used or {"none"}:
                    t[k] += 1
        for c, v in scores.items():
            m[f"{mode}/{c}"] = float(np.mean(v))
            m[f"{mode}_se/{c}"] = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
            m[f"{mode}_n/{c}"] = len(v)
        m[f"{mode}/mean"] = float(np.mean([m[f"{mode}/{c}"] for c in data.CATEGORIES if f"{mode}/{c}" in m]))
        m[f"{mode}/format"] = float(np.mean(fmt))
        if mode == "interleaved":
            m.update({f"tools/{c}/{k}": t[k] / t["n"] for c, t in tools.items() for k in ("depth", "segmentation", "none")})
    return m


@torch.no_grad()
def evaluate_rewards(cooper, n=64, group_size=8, split="val", seed=0, temperature=1.0, turn_cap=TURN_CAP, batch=256):
    """The GRPO objective on held-out prompts: one question on each of n `split` scenes, group_size interleaved
    rollouts each, sampled as in training, scored with the CPR reward (reward.cpr_rewards, exploration within each
    group). Returns reward/{total,answer,format,explore} means, reward_se/total (standard error over the n prompts'
    group means), reward/per_prompt (those group means: the same prompts and seeds give a paired comparison of two
    models, see `paired_gain`) and tool_rate/{positive,negative,boundary} (share of rollouts that call a tool, per flag)."""
    rng = np.random.default_rng([seed, 7])
    scenes = [data.make_scene(data.scene_seed(split, i), cooper.cfg.image_size) for i in range(n)]
    qs = []
    for s in scenes:
        cand = data.make_questions(s, rng)
        qs.append(cand[int(rng.integers(len(cand)))])
    idx = [k for k in range(n) for _ in range(group_size)]  # groups consecutive, as in train.py::grpo_step
    rgb = np.stack([s.rgb for s in scenes])[idx]
    results = []
    for i in range(0, len(idx), batch):
        results += cooper.rollout(rgb[i:i + batch], [qs[k].text for k in idx[i:i + batch]], "interleaved",
                                  temperature=temperature, seed=seed + i, turn_cap=turn_cap)[0]
    totals, comp = reward.cpr_rewards([r["text"] for r in results], [qs[k].answer for k in idx],
                                      [qs[k].kind for k in idx], [qs[k].flag for k in idx], group_size=group_size)
    per_prompt = np.asarray(totals, dtype=float).reshape(n, group_size).mean(1)
    m = {"reward/total": float(per_prompt.mean()), "reward_se/total": float(per_prompt.std(ddof=1) / math.sqrt(n)),
         "reward/per_prompt": [round(float(x), 4) for x in per_prompt],  # for paired comparisons of two models
         **{f"reward/{k}": float(np.mean(v)) for k, v in comp.items()}}
    for flag, (rate, count) in tool_rates(results, [qs[k].flag for k in idx]).items():
        m[f"tool_rate/{flag}"], m[f"tool_rate_n/{flag}"] = rate, count
    return m


def paired_gain(before, after):
    """Mean reward gain over the same prompts (group means, e.g. SFT then GRPO) and its paired standard error:
    the spread of the per-prompt differences / sqrt(n), which removes the prompts' own difficulty from the noise."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def tool_rates(results, groups):
    """{g: (share of the rollouts in group g that call a tool, their number)}; groups: one label per rollout (its flag or
    its category)."""
    used = np.array([reward.count_tool_calls(r["turns"]) > 0 for r in results])
    labels = np.array(groups)
    return {g: (float(used[labels == g].mean()), int((labels == g).sum())) for g in dict.fromkeys(groups)}


def format_modes(m):
    """The stage-2 evaluation as text: score ± standard error per category and mode, format rate, tool usage."""
    modes = [x for x in MODES if f"{x}/mean" in m]
    lines = [f"{'category':18s}" + "".join(f"{x:>16s}" for x in modes) + f"{'chance':>8s}"]
    for c in data.CATEGORIES + ["mean", "format"]:
        cells = [f"{m[f'{x}/{c}']:.3f}" + (f"±{m[f'{x}_se/{c}']:.3f}" if f"{x}_se/{c}" in m else "      ")
                 if f"{x}/{c}" in m else "" for x in modes]
        lines.append(f"{c:18s}" + "".join(f"{v:>16s}" for v in cells)
                     + (f"{m[f'chance/{c}']:8.3f}" if f"chance/{c}" in m else ""))
    if any(k.startswith("tools/") for k in m):
        lines.append(f"\ntool use (interleaved)  {'depth':>6s} {'seg':>6s} {'none':>6s}")
        for c in data.CATEGORIES:
            if f"tools/{c}/none" in m:
                lines.append(f"{c:22s} " + " ".join(f"{m[f'tools/{c}/{k}']:6.2f}" for k in ("depth", "segmentation", "none")))
    if "reward/total" in m:
        lines.append(f"\nCPR reward, sampled groups: total {m['reward/total']:.3f} ± {m['reward_se/total']:.3f} (answer "
                     f"{m['reward/answer']:.3f}, format {m['reward/format']:.3f}, explore {m['reward/explore']:+.3f}); "
                     "tool-call rate " + ", ".join(f"{f} {m[f'tool_rate/{f}']:.2f}" for f in ("positive", "negative", "boundary")
                                                 if f"tool_rate/{f}" in m))
    if "reward_gain/total" in m:
        lines.append(f"gain over the SFT model on the same prompts: {m['reward_gain/total']:+.3f} ± "
                     f"{m['reward_gain_se/total']:.3f} (paired standard error)")
    return "\n".join(lines)


def tool_chart(m, size=(640, 300)):
    """The tool-usage table as a stacked bar chart (the paper's Figure 3): per category the share of interleaved
    rollouts that drew a depth map, a segmentation map, or none (a rollout with both counts in both)."""
    cats = [c for c in data.CATEGORIES if f"tools/{c}/none" in m]
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 50, 24, W - 110, H - 60
    d.text((x0, 6), "tool use per category (interleaved rollouts)", fill="black")
    d.rectangle([x0, y0, x1, y1], outline="black")
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        y = y1 - (y1 - y0) * t
        d.line([(x0 - 4, y), (x0, y)], fill="black")
        d.text((x0 - 34, y - 6), f"{t:.2f}", fill="black")
    d.text((4, y0 - 16), "share", fill="black")
    colours = {"depth": (214, 39, 40), "segmentation": (31, 119, 180), "none": (190, 190, 190)}
    bw = (x1 - x0) / max(1, len(cats))
    for i, c in enumerate(cats):
        base = y1
        for k, col in colours.items():
            h = (y1 - y0) * m[f"tools/{c}/{k}"] / max(1.0, sum(m[f"tools/{c}/{j}"] for j in colours))
            d.rectangle([x0 + i * bw + 4, base - h, x0 + (i + 1) * bw - 4, base], fill=col)
            base -= h
        d.text((x0 + i * bw + 2, y1 + 6 + 12 * (i % 2)), c[:12], fill="black")
    for j, (k, col) in enumerate(colours.items()):
        d.rectangle([x1 + 10, y0 + 4 + 16 * j, x1 + 22, y0 + 14 + 16 * j], fill=col)
        d.text((x1 + 26, y0 + 3 + 16 * j), k, fill="black")
    return img


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


def format_table(m):
    """The evaluation as printed text: one map / tokenizer metric a line, then the VQA table (score ± standard error,
    chance = the wording prior on the same questions, blind = the same questions about another scene's image)."""
    lines = [f"{'metric':34s} {'value':>8s}"]
    lines += [f"{k:34s} {v:8.3f}" for k, v in m.items() if not k.startswith("vqa")]
    cats = [c for c in data.CATEGORIES + ["mean"] + data.GROUNDING if f"vqa/{c}" in m]
    if cats:
        lines.append(f"\n{'VQA (held out)':20s} {'score':>14s} {'chance':>7s} {'blind':>7s} {'n':>5s}")
        for c in cats:
            se = f" ± {m[f'vqa_se/{c}']:.3f}" if f"vqa_se/{c}" in m else " " * 8
            n = f"{m[f'vqa_n/{c}']:5.0f}" if f"vqa_n/{c}" in m else ""
            lines.append(f"{c:20s} {m[f'vqa/{c}']:6.3f}{se} {m[f'vqa_chance/{c}']:7.3f} {m[f'vqa_blind/{c}']:7.3f} {n}")
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
    a.add_argument("--mode", default="", choices=("",) + MODES,
                   help="how to answer (default: interleaved for a stage-2 run, direct for a stage-1 run)")
    a.add_argument("--out", default="cooper_out", help="folder for the generated maps and the trajectory strip (PNG)")
    e = sub.add_parser("eval", help="evaluate a run on held-out scenes and print the table")
    e.add_argument("--run", default="runs/tiny")
    e.add_argument("--n", type=int, default=64, help="held-out scenes for the map metrics")
    e.add_argument("--n-vqa", type=int, default=256, help="held-out scenes for VQA (every question of each)")
    e.add_argument("--split", default="test", choices=["val", "test"])
    e.add_argument("--seed", type=int, default=0,
                   help="draw of the questions and sampling seed (train.py's evaluation uses the run's --seed)")
    e.add_argument("--n-modes", type=int, default=128,
                   help="held-out scenes for the answering modes of a stage-2 run (every question, every mode)")
    for q in (a, e):
        q.add_argument("--device", default="cpu")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run_command(args)
    except RunError as e:
        sys.exit(f"error: {e}")


def stage2_run(run_dir):
    """Whether a run folder holds a stage-2 model (sft.pt or grpo.pt), which answers with interleaved reasoning."""
    return any(os.path.exists(os.path.join(run_dir, c)) for c in ("sft.pt", "grpo.pt"))


def trajectory_strip(image, result, width=640):
    """One PNG of a trajectory: the input image and each generated map in a row, the model's turns below."""
    cells = [image] + [data.colorize_depth(m) if k == "depth" else data.seg_to_rgb(m) for k, m in result["maps"]]
    row = np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells], axis=1)
    pics = Image.fromarray(row).resize((row.shape[1] * 2, row.shape[0] * 2), Image.NEAREST)
    lines = []
    for k, t in enumerate(result["turns"] or [result["text"]]):
        words, cur = t.split(" "), f"turn {k + 1}:"
        for w in words:  # wrap at ~100 characters
            if len(cur) + len(w) > 100:
                lines.append(cur)
                cur = "   "
            cur += " " + w
        lines.append(cur)
    page = Image.new("RGB", (max(width, pics.width), pics.height + 16 + 13 * len(lines)), "white")
    page.paste(pics, (0, 0))
    d = ImageDraw.Draw(page)
    labels = ["input"] + [k for k, _ in result["maps"]]
    for j, name in enumerate(labels):
        d.text((j * pics.width // len(labels) + 4, pics.height + 1), name, fill="black")
    for j, line in enumerate(lines):
        d.text((4, pics.height + 16 + 13 * j), line, fill="black")
    return page


def run_command(args):
    c = Cooper.load(args.run, args.device)
    if args.cmd == "eval":
        m, samples = evaluate(c, args.n, args.split, seed=args.seed, n_vqa=args.n_vqa)
        print(format_table(m))
        with open(os.path.join(args.run, f"eval_{args.split}.json"), "w") as f:
            json.dump(m, f, indent=1)
        sample_grid(samples).save(os.path.join(args.run, f"eval_{args.split}.png"))
        print(f"wrote {args.run}/eval_{args.split}.json and eval_{args.split}.png")
        if stage2_run(args.run):
            m = evaluate_modes(c, n=args.n_modes, split=args.split)
            m.update(evaluate_rewards(c, n=max(2, args.n_modes // 2), split=args.split))
            print("\n" + format_modes(m))
            with open(os.path.join(args.run, f"eval_modes_{args.split}.json"), "w") as f:
                json.dump(m, f, indent=1)
            tool_chart(m).save(os.path.join(args.run, f"tools_{args.split}.png"))
            print(f"wrote {args.run}/eval_modes_{args.split}.json and tools_{args.split}.png")
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
    mode = args.mode or ("interleaved" if stage2_run(args.run) else "direct")
    res = c.answer(img, question, mode=mode)
    trajectory_strip(img, res).save(os.path.join(args.out, "trajectory.png"))
    print(f"question: {question}\nmode:     {mode}")
    for k, t in enumerate(res["turns"] or [res["text"]]):
        print(f"turn {k + 1}:   {t}")
    for kind, _ in res["maps"]:
        print(f"          (drew a {kind} map)")
    print(f"answer:   {res['answer']}")
    if truth is not None:
        print(f"truth:    {truth}")
    print(f"pictures: {args.out}/trajectory.png (the input, each map it drew, its turns), {args.out}/depth.png "
          f"(near red, far blue), {args.out}/segmentation.png")


if __name__ == "__main__":
    main()
