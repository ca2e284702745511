"""Graders of the course (course/EXERCISES.md): for each exercise N, tests marked `exerciseN` that check the student's
code against a trusted reference written here (float64 naive math, hand-computed values) and say in plain words what
is wrong. Each exercise's graders run in seconds and use only its own functions: where a grader needs other exercises'
code (the model's RoPE and attention, the FlashAttention forward), it substitutes a trusted reference, so the
exercises can be done in any order.

    python -m pytest -m exercise4          # grade exercise 4 (in a student copy: python course/make_student.py)
    python -m pytest tests/test_course.py  # in the reference tree: every grader, and the meta tests below

The meta tests at the end (reference tree only) check that every grader fails on a copy missing its exercise and
passes on the reference, and that a copy with every exercise cut still imports."""
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cooper
import data
import kernels
import model
import reward
import train
from model import ModelConfig, UnifiedTransformer, VQTokenizer

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = range(1, 11)
REFERENCE_ONLY = pytest.mark.skipif(not (ROOT / "course" / "make_student.py").is_file(),
                                    reason="meta test of the course: runs in the reference tree only")


def worst(got, want):
    """(max abs error, index tuple of the worst entry) of two tensors/arrays of one shape; NaN counts as infinite."""
    err = (torch.as_tensor(got, dtype=torch.float64) - torch.as_tensor(want, dtype=torch.float64)).abs()
    err = torch.nan_to_num(err, nan=math.inf)
    i = int(err.flatten().argmax())
    return err.flatten()[i].item(), tuple(int(x) for x in np.unravel_index(i, tuple(err.shape)))


def close(got, want, atol):
    return got.shape == want.shape and (got.numel() == 0 or worst(got, want)[0] <= atol)


class CharTokenizer:
    """A tiny stand-in for the BPE tokenizer: each special token is one id (its index in data.SPECIAL_TOKENS), every
    other character one id. Enough for the functions that only call tokenizer.encode(text).ids."""

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            hit = next((j for j, s in enumerate(data.SPECIAL_TOKENS) if text.startswith(s, i)), None)
            if hit is None:
                ids.append(len(data.SPECIAL_TOKENS) + ord(text[i]) % 100)
                i += 1
            else:
                ids.append(hit)
                i += len(data.SPECIAL_TOKENS[hit])
        return SimpleNamespace(ids=ids)

    def get_vocab_size(self):
        return len(data.SPECIAL_TOKENS) + 100


# ======================================================================================================================
# exercise 1: depth and segmentation as RGB images (data.py)


@pytest.mark.exercise1
def test_ex1_depth_to_rgb_is_a_linear_grey_ramp():
    """depth_to_rgb: clamp to [0, max_depth], scale linearly to 0..255 (rounded), three equal uint8 channels."""
    D = 10.0
    depth = np.array([[0.0, 2.5, 5.0, 10.0], [-3.0, 12.0, 1.0, 9.99]])
    rgb = data.depth_to_rgb(depth, D)
    assert isinstance(rgb, np.ndarray) and rgb.shape == (2, 4, 3), \
        f"depth_to_rgb of a (2, 4) map must be a (2, 4, 3) array (one RGB pixel per depth pixel), got shape {np.shape(rgb)}"
    assert rgb.dtype == np.uint8, f"depth_to_rgb must return uint8 (an ordinary image), got {rgb.dtype}"
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all(), \
        "the three channels differ: depth is a grey image, the same value in R, G and B"
    grey = rgb[..., 0].astype(int)
    want = np.array([[0, 64, 128, 255], [0, 255, 26, 255]])
    if grey[1, 1] != 255 or grey[1, 0] != 0:
        raise AssertionError(f"depths outside [0, max_depth] must be clamped first: -3 m should give 0 and 12 m (beyond "
                             f"max_depth = 10) should give 255, got {grey[1, 0]} and {grey[1, 1]} (a uint8 cast wraps "
                             f"around unless you clip)")
    if grey[0, 2] in (127,) and grey[0, 1] == 63:
        raise AssertionError("values are truncated, not rounded: use np.rint (or round) before casting to uint8")
    assert (grey == want).all(), \
        (f"depth d should map to round(d / max_depth · 255): for max_depth 10, depths {depth.tolist()} should give "
         f"{want.tolist()}, got {grey.tolist()}. The paper scales linearly: no log, no inverse depth, no per-image "
         f"normalisation")
    near = data.depth_to_rgb(np.array([[1.0, 2.0]]), D)[..., 0]
    assert near.tolist() == [[26, 51]], \
        (f"a map whose depths span only 1..2 m must still use the fixed range [0, max_depth] (grey 26 and 51), got "
         f"{near.tolist()}: do not normalise each image by its own min and max")
    assert data.depth_to_rgb(np.zeros((3, 2, 5)), D).shape == (3, 2, 5, 3), "batched input (N, H, W) must give (N, H, W, 3)"


@pytest.mark.exercise1
def test_ex1_rgb_to_depth_inverts_depth_to_rgb():
    """rgb_to_depth: mean over the three channels / 255 · max_depth, float32; within half a grey level of the clamped
    depth after a round trip."""
    D = 20.0
    out = data.rgb_to_depth(np.array([[[10, 20, 30], [255, 255, 255]]], np.uint8), D)
    assert out.shape == (1, 2), f"rgb_to_depth of a (1, 2, 3) image must be a (1, 2) map, got {np.shape(out)}"
    assert out.dtype == np.float32, f"rgb_to_depth must return float32 metres, got {out.dtype}"
    assert abs(out[0, 1] - D) < 1e-5, f"white (255, 255, 255) must decode to max_depth = {D}, got {out[0, 1]}"
    assert abs(out[0, 0] - 20 / 255 * D) < 1e-5, \
        (f"a generated map is not exactly grey: average the three channels. (10, 20, 30) should decode to "
         f"20/255 · {D} = {20 / 255 * D:.4f} m, got {out[0, 0]:.4f} (if this is 10/255·D or 30/255·D you read one channel)")
    d = np.random.default_rng(0).uniform(-1, D + 3, (4, 8, 8))
    back = data.rgb_to_depth(data.depth_to_rgb(d, D), D)
    err = np.abs(back - np.clip(d, 0, D)).max()
    assert err <= D / 510 + 1e-5, \
        f"round trip depth -> rgb -> depth is off by {err:.4f} m, more than half a grey level ({D / 510:.4f} m)"


@pytest.mark.exercise1
def test_ex1_seg_to_rgb_palette_colours():
    """seg_to_rgb: id 0 (background) is black, id i is PALETTE[i]; ids past the palette wrap around to
    1 + (i - 1) mod (K - 1), never to black."""
    K = len(data.PALETTE)
    seg = np.array([[0, 1, 2], [K - 1, K, 2 * K + 3]])
    rgb = data.seg_to_rgb(seg)
    assert np.shape(rgb) == (2, 3, 3), f"seg_to_rgb of a (2, 3) map must be (2, 3, 3), got {np.shape(rgb)}"
    assert rgb.dtype == np.uint8, f"seg_to_rgb must return uint8, got {rgb.dtype}"
    assert (rgb[0, 0] == 0).all(), f"id 0 is the background and must be black, got {rgb[0, 0].tolist()}"
    for (r, c) in [(0, 1), (0, 2), (1, 0)]:
        i = seg[r, c]
        assert (rgb[r, c] == data.PALETTE[i]).all(), \
            f"object id {i} must get colour PALETTE[{i}] = {data.PALETTE[i].tolist()}, got {rgb[r, c].tolist()}"
    for c in (1, 2):
        i = seg[1, c]
        want = data.PALETTE[1 + (i - 1) % (K - 1)]
        assert rgb[1, c].any(), f"id {i} (past the {K}-colour palette) became black, the background colour: wrap it " \
                                f"to 1 + (id - 1) mod (K - 1) so that it stays an object"
        assert (rgb[1, c] == want).all(), \
            (f"id {i} must wrap around the palette to PALETTE[1 + ({i} - 1) mod {K - 1}] = {want.tolist()}, "
             f"got {rgb[1, c].tolist()}")
    assert (data.rgb_to_seg(data.seg_to_rgb(np.arange(K)[None])) == np.arange(K)).all(), \
        "rgb_to_seg(seg_to_rgb(ids)) must give the ids back for every palette id"


# ======================================================================================================================
# exercise 2: VQ quantisation (model.VQTokenizer.quantize)

VQCFG = ModelConfig(image_size=16, vq_downsample=4, vq_patch=2, vq_channels=8, vq_channel_mult=(1, 2), codebook_size=16,
                    codebook_dim=4, vq_restart=0.0, vq_beta=0.4)


def vq_case(seed=0):
    torch.manual_seed(seed)
    vq = VQTokenizer(VQCFG).train()
    z_e = F.normalize(torch.randn(2, 4, 3, 3), dim=1).requires_grad_(True)  # (B, D, h, w) on the unit sphere
    z_q, codes, losses = vq.quantize(z_e)
    return vq, z_e, z_q, codes, losses


@pytest.mark.exercise2
def test_ex2_nearest_code_by_cosine():
    """codes = argmax_k z·ê_k over the l2-normalised codebook (= argmin ‖z − ê_k‖² on the unit sphere);
    z_q = ê_codes."""
    vq, z_e, z_q, codes, _ = vq_case()
    assert codes.shape == (2, 3, 3) and codes.dtype == torch.long, \
        f"codes must be a long tensor (B, h, w) = (2, 3, 3), got {tuple(codes.shape)} {codes.dtype}"
    z = z_e.detach().double().permute(0, 2, 3, 1).reshape(-1, 4)  # (N, D)
    w = vq.codebook.weight.detach().double()
    e = F.normalize(w, dim=1)
    want = torch.cdist(z, e).argmin(1)
    got = codes.flatten()
    if not torch.equal(got, want):
        if torch.equal(got, (z @ w.t()).argmax(1)) or torch.equal(got, torch.cdist(z, w).argmin(1)):
            raise AssertionError("codes are looked up in the raw codebook: l2-normalise its rows first "
                                 "(F.normalize(self.codebook.weight, dim=1)); this tokenizer compares by cosine")
        if torch.equal(got, torch.cdist(z, e).argmax(1)):
            raise AssertionError("you picked the farthest code: the nearest one maximises z·e (minimises ‖z − e‖²)")
        i = int((got != want).nonzero()[0])
        raise AssertionError(f"vector {i} got code {got[i].item()} but the nearest unit code is {want[i].item()}")
    assert z_q.shape == z_e.shape, f"z_q must have z_e's shape (B, D, h, w) {tuple(z_e.shape)}, got {tuple(z_q.shape)}"
    zq = z_q.detach().double().permute(0, 2, 3, 1).reshape(-1, 4)
    assert close(zq, e[want], 1e-6), "the forward value of z_q must be the chosen unit code ê_k (normalised codebook row)"


@pytest.mark.exercise2
def test_ex2_loss_terms_and_their_gradients():
    """codebook = ‖sg[z_e] − z_q‖² (moves only the codebook), commit = β‖z_e − sg[z_q]‖² (moves only the
    encoder), both mean squared errors over all elements, with β = cfg.vq_beta on the commitment term only."""
    vq, z_e, _, codes, losses = vq_case()
    assert {"codebook", "commit"} <= set(losses), f"losses must hold 'codebook' and 'commit', got {sorted(losses)}"
    z = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    mse = F.mse_loss(F.normalize(vq.codebook.weight.detach(), dim=1)[codes.flatten()], z).item()
    cb, cm = losses["codebook"], losses["commit"]
    if math.isclose(cb.item(), VQCFG.vq_beta * mse, rel_tol=1e-4):
        raise AssertionError("β is applied to the codebook term: it belongs on the commitment term "
                             "(a well-known bug that shipped in several VQ repositories)")
    assert math.isclose(cb.item(), mse, rel_tol=1e-4), \
        f"codebook term should be mean((z_q − z_e)²) = {mse:.6f}, got {cb.item():.6f} (no β on this term)"
    if math.isclose(cm.item(), 0.25 * mse, rel_tol=1e-4):
        raise AssertionError(f"commit uses β = 0.25; read it from the config (self.cfg.vq_beta = {VQCFG.vq_beta})")
    assert math.isclose(cm.item(), VQCFG.vq_beta * mse, rel_tol=1e-4), \
        f"commitment term should be β · mean((z_e − z_q)²) = {VQCFG.vq_beta * mse:.6f}, got {cm.item():.6f}"

    def grad(loss, x):
        g = torch.autograd.grad(loss, x, retain_graph=True, allow_unused=True)[0]
        return 0.0 if g is None else g.abs().sum().item()
    cbw = vq.codebook.weight
    assert grad(cb, z_e) == 0, "the codebook term moved the encoder: apply sg[·] (.detach()) to z_e in the codebook term"
    assert grad(cb, cbw) > 0, \
        ("the codebook term does not reach the codebook: compute it from e[codes] (before the straight-through line), "
         "with only z_e detached")
    assert grad(cm, cbw) == 0, "the commitment term moved the codebook: apply sg[·] (.detach()) to z_q in the commitment term"
    assert grad(cm, z_e) > 0, "the commitment term must pull the encoder output z_e towards its code"


@pytest.mark.exercise2
def test_ex2_straight_through_estimator():
    """z_q = z_e + sg[z_q − z_e]: forward value ê_k, backward the identity to z_e, no gradient to the codebook."""
    vq, z_e, z_q, _, _ = vq_case(1)
    g = torch.randn_like(z_q)
    assert z_q.requires_grad, "z_q carries no gradient: the straight-through line is z_q = z + (z_q − z).detach()"
    (z_q * g).sum().backward()
    assert z_e.grad is not None and torch.allclose(z_e.grad, g, atol=1e-6), \
        ("the gradient does not pass straight through: the decoder's gradient w.r.t. z_q must reach z_e unchanged; "
         "use z_q = z + (z_q − z).detach()")
    cbg = vq.codebook.weight.grad
    assert cbg is None or cbg.abs().sum() == 0, \
        "the reconstruction path reached the codebook: only the codebook term may move it (detach z_q − z)"


# ======================================================================================================================
# exercise 3: RoPE (model.apply_rope) and the naive GQA attention (kernels.attention_reference)


def rope_complex(x, cos, sin):
    """Trusted RoPE in float64: the pair (x[i], x[i + hs/2]) is the complex number a + ib, multiplied by e^{iθ}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    rot = torch.complex(cos.double(), sin.double())[:, None]  # (B, 1, T, hs/2)
    z = z * rot
    return torch.cat([z.real, z.imag], dim=-1)


def rope_trusted(x, cos, sin):
    """rope_complex in x's dtype: what model.py's blocks get from the graders of other exercises."""
    return rope_complex(x, cos, sin).to(x.dtype)


def rope_inputs(hs=8, T=6, B=2, n=3, seed=0):
    cfg = ModelConfig(n_embd=hs * 4, n_head=4, max_seq_len=32)
    cos, sin = model.rope_tables(cfg)
    pos = torch.tensor([[0, 1, 2, 5, 9, 20], [3, 3, 4, 7, 8, 31]])[:B, :T]
    x = torch.randn(B, n, T, hs, generator=torch.Generator().manual_seed(seed))
    return x, cos[pos], sin[pos]


@pytest.mark.exercise3
def test_ex3_rope_rotates_pairs():
    """apply_rope rotates each pair (x[i], x[i + hs/2]) by the position's angle (rotate-half layout), keeps the dtype,
    and makes q·k depend only on the distance between positions."""
    x, cos, sin = rope_inputs()
    got = model.apply_rope(x, cos, sin)
    want = rope_complex(x, cos, sin)
    assert got.shape == x.shape, f"apply_rope must keep the shape {tuple(x.shape)}, got {tuple(got.shape)}"
    if not close(got, want, 1e-5):
        half = x.shape[-1] // 2
        inter = torch.view_as_real(torch.view_as_complex(x.double().reshape(*x.shape[:-1], half, 2).contiguous())
                                   * torch.complex(cos.double(), sin.double())[:, None]).flatten(-2)
        if close(got, inter, 1e-5):
            raise AssertionError("you rotated adjacent pairs (x[2i], x[2i+1]); this model uses the rotate-half layout: "
                                 "pair x[i] with x[i + hs/2] (x1, x2 = x.chunk(2, dim=-1))")
        if close(got, rope_complex(x, cos, -sin), 1e-5):
            raise AssertionError("the rotation goes the wrong way: first half x1·cos − x2·sin, second half x2·cos + x1·sin")
        err, i = worst(got, want)
        raise AssertionError(f"apply_rope differs from rotating each pair (x[i], x[i + hs/2]) by θ by {err:.3f} at "
                             f"index {i}; expected cat([x1·cos − x2·sin, x2·cos + x1·sin], -1)")
    xb = x.bfloat16()
    assert model.apply_rope(xb, cos, sin).dtype == torch.bfloat16, \
        "apply_rope must return x's dtype (compute in float32, then .type_as(x))"
    # relative position: <R_m q, R_n k> is a function of m − n only
    cfg = ModelConfig(n_embd=32, n_head=4, max_seq_len=64)
    cos_t, sin_t = model.rope_tables(cfg)
    q, k = torch.randn(2, 8, generator=torch.Generator().manual_seed(1)).split(1)
    def dot(m, n):
        rq = model.apply_rope(q.view(1, 1, 1, 8), cos_t[[m]][None], sin_t[[m]][None])
        rk = model.apply_rope(k.view(1, 1, 1, 8), cos_t[[n]][None], sin_t[[n]][None])
        return (rq * rk).sum().item()
    assert math.isclose(dot(5, 2), dot(40, 37), abs_tol=1e-4), \
        "q·k after RoPE must depend only on the distance between positions (a rotation, not a scaling)"


def naive_attention(q, k, v, causal=True, key_padding_mask=None, kv_of=None, top_left=False, scale=True):
    """Trusted attention in float64, one head and one query row at a time: softmax over the visible keys of
    q·k / √hs, times V. Query head h reads kv head h // g (kv_of overrides it: a wrong variant for diagnosis). Causal
    is aligned bottom-right: row r sees keys 0 … r + Tk − Tq. A row that sees no key outputs 0."""
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    g = nh // nkv
    kv_of = kv_of or (lambda h: h // g)
    rows = []
    for b in range(B):
        for h in range(nh):
            kh, vh = k[b, kv_of(h)].double(), v[b, kv_of(h)].double()
            s = q[b, h].double() @ kh.T / (math.sqrt(hs) if scale else 1.0)  # (Tq, Tk)
            for r in range(Tq):
                vis = torch.ones(Tk, dtype=torch.bool)
                if causal:
                    vis &= torch.arange(Tk) <= r + (0 if top_left else Tk - Tq)
                if key_padding_mask is not None:
                    vis &= key_padding_mask[b].bool()
                rows.append(torch.softmax(s[r][vis], -1) @ vh[vis] if vis.any() else torch.zeros(hs, dtype=torch.float64))
    return torch.stack(rows).view(B, nh, Tq, hs)


def qkv(B, nh, nkv, Tq, Tk, hs, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, Tq, hs, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, nkv, Tk, hs, generator=g, dtype=torch.float64)
    v = torch.randn(B, nkv, Tk, hs, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)]


def left_padding(B, Tk, seed=1):
    start = torch.randint(0, Tk // 2 + 1, (B,), generator=torch.Generator().manual_seed(seed))
    return torch.arange(Tk)[None, :] >= start[:, None]  # (B, Tk) True = real key


def explain_attention(got, q, k, v, causal, mask, what):
    """Raise an AssertionError naming the worst row and, when the output matches a typical mistake, the mistake."""
    want = naive_attention(q, k, v, causal, mask)
    if close(got, want, 1e-9):
        return
    if torch.isnan(got).any():
        raise AssertionError(f"{what} has NaN: a row with no visible key (fully padded, or causal with Tq > Tk) must "
                             f"output 0; give it finite dummy scores, then zero its probabilities")
    nh, nkv = q.shape[1], k.shape[1]
    variants = [(dict(kv_of=lambda h: h % nkv), "query head h must read kv head h // g (g = nh / nkv consecutive "
                 "heads share one kv head: repeat_interleave, not repeat)"),
                (dict(top_left=True), "the causal mask is aligned top-left; with Tq < Tk (a KV cache) row r sees keys "
                 "0 … r + Tk − Tq (bottom-right)"),
                (dict(scale=False), "scores must be scaled by τ = 1/√hs before the softmax"),
                (dict(causal=False), "the causal mask is missing: row r must not see later keys")]
    for kw, why in variants:
        kw = {"causal": causal, **kw}
        c = kw.pop("causal")
        if (nh != nkv or "kv_of" not in kw) and close(got, naive_attention(q, k, v, c, mask, **kw), 1e-9):
            raise AssertionError(f"{what}: {why}")
    err, (b, h, r, _) = worst(got, want)
    raise AssertionError(f"{what}: row {r} of head {h} (batch {b}) differs from softmax(QKᵀ/√d)V by {err:.3g}")


@pytest.mark.exercise3
def test_ex3_attention_reference_matches_naive_math():
    """attention_reference equals float64 per-row softmax(QKᵀ/√d)V: GQA, causal bottom-right (Tq < Tk), key padding,
    a fully padded batch row (zeros, no NaN), and it returns q's dtype."""
    cases = [((2, 4, 2, 7, 7, 8), True, False), ((1, 6, 2, 3, 9, 4), True, False), ((3, 4, 1, 6, 6, 8), True, True),
             ((2, 2, 2, 5, 8, 4), False, True)]
    for (B, nh, nkv, Tq, Tk, hs), causal, padded in cases:
        q, k, v = qkv(B, nh, nkv, Tq, Tk, hs)
        mask = left_padding(B, Tk) if padded else None
        if padded:
            mask[-1] = False  # the last batch row: every key is padding
        got = kernels.attention_reference(q, k, v, causal, mask)
        assert got.shape == q.shape, f"output must have q's shape {tuple(q.shape)}, got {tuple(got.shape)}"
        explain_attention(got, q, k, v, causal, mask, f"attention_reference (B, nh, nkv, Tq, Tk, hs = {B, nh, nkv, Tq, Tk, hs}, "
                                                      f"causal={causal}, padded={padded})")
    q, k, v = qkv(1, 2, 1, 4, 4, 8, dtype=torch.float32)
    out = kernels.attention_reference(q, k, v)
    assert out.dtype == torch.float32, f"float32 inputs must give a float32 output, got {out.dtype}"
    q, k, v = qkv(1, 2, 1, 4, 4, 8, dtype=torch.bfloat16)
    assert kernels.attention_reference(q, k, v).dtype == torch.bfloat16, "bfloat16 inputs must give a bfloat16 output"


@pytest.mark.exercise3
def test_ex3_attention_reference_gradient():
    """Gradients flow through attention_reference and equal those of the naive math; a fully masked row gets zero
    gradient (not NaN)."""
    q, k, v = [t.requires_grad_() for t in qkv(2, 4, 2, 5, 5, 4, seed=3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    r = torch.randn(2, 4, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad((kernels.attention_reference(q, k, v, True, mask) * r).sum(), (q, k, v))
    want = torch.autograd.grad((naive_attention(q, k, v, True, mask) * r).sum(), (q, k, v))
    for name, a, b in zip(("dQ", "dK", "dV"), got, want):
        assert not torch.isnan(a).any(), \
            f"{name} has NaN: softmax over a row of −inf gives NaN; zero such rows' probabilities instead"
        assert close(a, b, 1e-9), f"{name} differs from the naive math's gradient by {worst(a, b)[0]:.3g}"


# ======================================================================================================================
# exercise 4: FlashAttention-2 forward (kernels.FlashAttention.forward)


class Ctx:
    """Stand-in for autograd's ctx, so forward / backward can be called directly and what they save inspected."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def trusted_lse2(q, k, causal, mask):
    """L = log2 Σ_visible 2^(log2(e)·τ q·k) per row (= logsumexp(S) / ln 2), +∞ for rows with no visible key; shape
    (B·nkv, g, Tq) like the kernel's."""
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    g = nh // nkv
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-2, -1) / math.sqrt(hs)  # (B, nh, Tq, Tk)
    vis = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    if causal:
        vis = vis & (torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + Tk - Tq)
    if mask is not None:
        vis = vis & mask.bool()[:, None, None, :]
    lse = torch.logsumexp(s.masked_fill(~vis, -math.inf), -1) / math.log(2)
    return torch.where(vis.any(-1), lse, math.inf).reshape(B * nkv, g, Tq)


def fa_forward(q, k, v, causal, mask, bq, bk):
    ctx = Ctx()
    out = kernels.FlashAttention.forward(ctx, q, k, v, causal, mask, bq, bk)
    return out, ctx


FA_CASES = [  # (B, nh, nkv, Tq, Tk, hs), causal, padded, block_q, block_k
    ((2, 4, 4, 37, 37, 8), True, False, 8, 16),  # several tiles, partial last tiles
    ((2, 4, 2, 30, 30, 8), False, False, 8, 8),  # GQA, not causal
    ((1, 6, 2, 23, 50, 4), True, False, 8, 16),  # Tq < Tk: a KV-cache prefix, bottom-right causal
    ((3, 4, 1, 21, 21, 8), True, True, 4, 8),  # multi-query with left padding and a fully padded row
]


@pytest.mark.exercise4
def test_ex4_flash_forward_matches_softmax_attention():
    """The tiled online-softmax forward equals float64 naive attention for several tile sizes; with one key tile
    against several key tiles the diagnosis points at the rescaling step."""
    for (B, nh, nkv, Tq, Tk, hs), causal, padded, bq, bk in FA_CASES:
        q, k, v = qkv(B, nh, nkv, Tq, Tk, hs)
        mask = left_padding(B, Tk) if padded else None
        if padded:
            mask[-1] = False
        want = naive_attention(q, k, v, causal, mask)
        where = f"(B, nh, nkv, Tq, Tk, hs = {B, nh, nkv, Tq, Tk, hs}, causal={causal}, padded={padded})"
        one, _ = fa_forward(q, k, v, causal, mask, Tq, Tk)  # one query tile, one key tile: no rescaling needed
        many, _ = fa_forward(q, k, v, causal, mask, bq, bk)
        assert many.shape == q.shape and many.dtype == q.dtype, \
            f"the output must have q's shape and dtype {tuple(q.shape)} {q.dtype}, got {tuple(many.shape)} {many.dtype}"
        if torch.isnan(many).any() or torch.isnan(one).any():
            raise AssertionError(f"NaN in the output {where}: a row that sees no key must keep O = 0 (divide by l only "
                                 f"where l > 0; start the running max at a finite floor)")
        err1, (b, h, r, _) = worst(one, want)
        if err1 > 1e-9:
            raise AssertionError(f"even with a single tile, row {r} of head {h} (batch {b}) differs from softmax(QKᵀ/√d)V "
                                 f"by {err1:.3g} {where}: check P̃ = exp2(S − m) (the scores are already in base 2: qs "
                                 f"carries log2(e)·τ), the masks, and the final O / l")
        err, (b, h, r, _) = worst(many, want)
        if err > 1e-9:
            raise AssertionError(f"with {bq}×{bk} tiles, row {r} of head {h} (batch {b}) differs from softmax(QKᵀ/√d)V by "
                                 f"{err:.3g} {where}, while one tile is right; did you rescale the running sum l and the "
                                 f"output O by 2^(m − m') when the running max changed?")


@pytest.mark.exercise4
def test_ex4_flash_forward_saves_the_log_sum_exp():
    """The forward saves L = m + log2(l) per row (base 2, +∞ for rows with no visible key): the backward pass
    recomputes P from it."""
    (_, nh, nkv, Tq, Tk, hs), causal, _, bq, bk = FA_CASES[2]
    B = 2
    for padded in (False, True):
        q, k, v = qkv(B, nh, nkv, Tq, Tk, hs, seed=5)
        mask = None
        if padded:
            mask = left_padding(B, Tk)
            mask[0, :] = False
        _, ctx = fa_forward(q, k, v, causal, mask, bq, bk)
        saved = getattr(ctx, "saved_tensors", None)
        assert saved is not None and len(saved) >= 5, "the forward must save (q, k, v, out, L, pad) for the backward"
        got, want = saved[4], trusted_lse2(q, k, causal, mask)
        assert got.shape == want.shape, f"L must have shape (B·nkv, g, Tq) {tuple(want.shape)}, got {tuple(got.shape)}"
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), fin), "rows that see no key must save L = +∞ (and only those)"
        if not close(got[fin], want[fin], 1e-9):
            err = worst(got[fin], want[fin])[0]
            raise AssertionError(f"the saved L differs from log2 Σ 2^S₂ by {err:.3g}: save L = m + log2(l) with the "
                                 f"final running max m and sum l of each row, in base 2 like the scores (log2, not log)")


@pytest.mark.exercise4
def test_ex4_flash_forward_large_scores_stay_finite():
    """Sharp attention (scores in the hundreds) must not overflow: exponentiate S − m, never S."""
    q, k, v = qkv(1, 2, 2, 20, 20, 8, seed=2, scale=60.0)
    out, _ = fa_forward(q, k, v, True, None, 4, 8)
    assert torch.isfinite(out).all(), "the output overflowed for large scores: subtract the running max before exp2"
    err, (b, h, r, _) = worst(out, naive_attention(q, k, v, True, None))
    assert err < 1e-9, f"row {r} of head {h} differs from softmax(QKᵀ/√d)V by {err:.3g} for large scores"


# ======================================================================================================================
# exercise 5: FlashAttention-2 backward (kernels.FlashAttention.backward)


def fa_backward(q, k, v, dout, causal, mask, bq, bk, need=(True, True, True)):
    """Call the kernel's backward with what a correct forward saves, computed here by trusted float64 math (so the
    backward is graded on its own)."""
    ctx = Ctx()
    out = naive_attention(q, k, v, causal, mask)
    pad = None
    if mask is not None:
        pad = torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=torch.float64).masked_fill(
            ~mask.bool()[:, None, None, :], -math.inf)
    ctx.saved_tensors = (q, k, v, out, trusted_lse2(q, k, causal, mask), pad)
    ctx.needs_input_grad = tuple(need) + (False,) * 4
    ctx.causal, ctx.block_q, ctx.block_k = causal, bq, bk
    return kernels.FlashAttention.backward(ctx, dout)


@pytest.mark.exercise5
def test_ex5_flash_backward_matches_autograd():
    """dQ, dK, dV from the tiled backward (P recomputed from L, D = rowsum(dO ∘ O)) equal autograd through float64
    naive attention, for several tile sizes, GQA, Tq < Tk, padding and a fully padded row (zero gradient)."""
    for (B, nh, nkv, Tq, Tk, hs), causal, padded, bq, bk in FA_CASES:
        q, k, v = [t.requires_grad_() for t in qkv(B, nh, nkv, Tq, Tk, hs, seed=7)]
        mask = left_padding(B, Tk) if padded else None
        if padded:
            mask[-1] = False
        dout = torch.randn(B, nh, Tq, hs, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        want = torch.autograd.grad((naive_attention(q, k, v, causal, mask) * dout).sum(), (q, k, v))
        got = fa_backward(q.detach(), k.detach(), v.detach(), dout, causal, mask, bq, bk)[:3]
        where = f"(B, nh, nkv, Tq, Tk, hs = {B, nh, nkv, Tq, Tk, hs}, causal={causal}, padded={padded}, tiles {bq}×{bk})"
        for name, a, b in zip(("dQ", "dK", "dV"), got, want):
            assert a is not None and a.shape == b.shape, \
                f"{name} must be a tensor of shape {tuple(b.shape)}, got {None if a is None else tuple(a.shape)} {where}"
            assert not torch.isnan(a).any(), f"{name} has NaN {where}: rows with L = +∞ must give P = 0, not NaN"
        dq, dk, dv = got
        if not close(dv, want[2], 1e-9):
            err, (b, h, j, _) = worst(dv, want[2])
            raise AssertionError(f"dV of key {j}, kv head {h} (batch {b}) differs from Σ_i Pᵀ dO by {err:.3g} {where}: "
                                 f"recompute P = exp2(S₂ − L) from the saved L, and sum over all query tiles and the g "
                                 f"query heads that share the kv head")
        if not close(dq, want[0], 1e-9):
            err, (b, h, r, _) = worst(dq, want[0])
            raise AssertionError(f"dQ of row {r}, head {h} (batch {b}) differs by {err:.3g} {where} while dV is right: "
                                 f"dS = P ∘ (dP − D) with dP = dO Vᵀ and D = rowsum(dO ∘ O), then dQ = τ dS K")
        if not close(dk, want[1], 1e-9):
            err, (b, h, j, _) = worst(dk, want[1])
            ratio = (dk.flatten() @ want[1].flatten() / (want[1].flatten() @ want[1].flatten())).item()
            hint = (f" (it is {ratio:.4f}× the right one: qs carries τ·log2(e), so dK = τ dSᵀ Q needs the factor ln 2)"
                    if abs(ratio - 1) > 1e-3 and close(dk, ratio * want[1], 1e-9) else "")
            raise AssertionError(f"dK of key {j}, kv head {h} (batch {b}) differs by {err:.3g} {where}{hint}: "
                                 f"dK = τ Σ_i dSᵀ Q_i")


@pytest.mark.exercise5
def test_ex5_flash_backward_partial_gradients():
    """Only the gradients autograd asks for are needed (needs_input_grad); those computed are still exact."""
    q, k, v = [t.requires_grad_() for t in qkv(1, 4, 2, 21, 21, 8, seed=11)]
    dout = torch.randn(1, 4, 21, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad((naive_attention(q, k, v) * dout).sum(), (q, k, v))
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    dq = fa_backward(qd, kd, vd, dout, True, None, 8, 8, need=(True, False, False))[0]
    assert dq is not None and close(dq, want[0], 1e-9), "with only q requiring grad, dQ must still be exact"
    _, dk, dv = fa_backward(qd, kd, vd, dout, True, None, 8, 8, need=(False, True, True))[:3]
    assert dk is not None and close(dk, want[1], 1e-9), "with only k and v requiring grad, dK must still be exact"
    assert dv is not None and close(dv, want[2], 1e-9), "with only k and v requiring grad, dV must still be exact"


# ======================================================================================================================
# exercise 6: the modality constraint of KV-cached decoding (model.UnifiedTransformer.generate)

VS, VE, STOP = data.VISION_START, data.VISION_END, data.IM_END
GEN_CFG = ModelConfig(text_vocab=64, codebook_size=32, image_size=16, vq_downsample=8, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=32, ffn_hidden=64, max_seq_len=128, attn_impl="sdpa", patch_embed=False)


@pytest.fixture
def gen_model(monkeypatch):
    """A random small model whose RoPE and attention are trusted code (torch SDPA and rope_trusted), so that this
    exercise is graded on its own."""
    monkeypatch.setattr(model, "apply_rope", rope_trusted)
    torch.manual_seed(0)
    return UnifiedTransformer(GEN_CFG).eval()


def read_blocks(gen, sampled, cfg, start_in_block=False):
    """Walk generated ids; raise a plain-words error for a code outside an image block or text inside one."""
    left = cfg.image_tokens if start_in_block else -1
    for i, (t, s) in enumerate(zip(gen, sampled)):
        if left > 0:
            assert t >= cfg.image_offset, \
                (f"step {i}: text id {t} was sampled inside an image block; after <|vision_start|> only image codes "
                 f"(ids >= image_offset) are allowed until h·w codes are drawn")
            left -= 1
        elif left == 0:
            assert t == VE, f"step {i}: the image block was not closed by <|vision_end|> right after its h·w codes"
            left = -1
        else:
            assert t < cfg.image_offset, \
                (f"step {i}: image code {t} was {'sampled' if s else 'emitted'} outside an image block; outside a "
                 f"block every image code must be masked out")
            if t == VS:
                left = cfg.image_tokens


@pytest.mark.exercise6
def test_ex6_codes_only_inside_image_blocks(gen_model):
    """With half of the model's mass on image codes and <|vision_start|> forced after many text ids: every block holds
    exactly h·w sampled codes, and no code appears outside a block."""
    with torch.no_grad():
        gen_model.lm_head.weight[GEN_CFG.image_offset:] *= 3.0  # make codes tempting everywhere
    prompt = torch.randint(5, GEN_CFG.text_vocab, (4, 6), generator=torch.Generator().manual_seed(0))
    prompt[3, -1] = VS  # this prompt ends inside an image block
    force = {t: [VS] for t in range(13, 40)}
    out = gen_model.generate(prompt, 50, temperature=1.0, vision_start=VS, vision_end=VE, force=force,
                             generator=torch.Generator().manual_seed(0))
    n_blocks = 0
    for b in range(4):
        gen, samp = out["tokens"][b, 6:].tolist(), out["sampled"][b].tolist()
        read_blocks(gen, samp, GEN_CFG, start_in_block=(b == 3))
        n_blocks += gen.count(VS)
    assert n_blocks >= 3, "too few image blocks were opened to check the constraint"


@pytest.mark.exercise6
def test_ex6_banned_ids_after_n_maps(gen_model):
    """ban={id: n}: the id is never sampled once the sequence has generated n image blocks (n = 0: never)."""
    prompt = torch.randint(5, GEN_CFG.text_vocab, (8, 4), generator=torch.Generator().manual_seed(4))
    kw = dict(temperature=1.0, vision_start=VS, vision_end=VE, generator=torch.Generator().manual_seed(1))
    late, never = list(range(13, 40)), [40, 41, 42]
    out = gen_model.generate(prompt, 40, force={t: [VS] for t in range(43, 64)},
                             ban={**{t: 1 for t in late}, **{t: 0 for t in never}}, **kw)
    n_late = 0
    for b in range(8):
        gen, samp = out["tokens"][b, 4:].tolist(), out["sampled"][b].tolist()
        read_blocks(gen, samp, GEN_CFG)
        blocks = 0
        for i, (t, s) in enumerate(zip(gen, samp)):
            if s and t in never:
                raise AssertionError(f"id {t} has ban {{{t}: 0}} (never) but was sampled at step {i}: mask ids whose "
                                     f"limit is <= the number of image blocks generated so far")
            if s and t in late and blocks >= 1:
                raise AssertionError(f"id {t} has ban {{{t}: 1}} but was sampled at step {i}, after {blocks} image "
                                     f"block(s): allowed &= blocks < limit")
            n_late += s and t in late and blocks == 0
            blocks += t == VE
    assert n_late > 0, ("ids banned only after the first map were never sampled before it: ban={id: n} must allow the "
                        "id while fewer than n blocks were generated")


@pytest.mark.exercise6
def test_ex6_greedy_is_the_allowed_argmax(gen_model):
    """Greedy decoding through the KV cache picks, at every sampled step, the argmax of the full forward's logits over
    the allowed modality (image codes inside a block, text outside), and reports that id's log-softmax as its logp."""
    prompt = torch.randint(5, GEN_CFG.text_vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    force = {t: [VS] for t in range(5, 40)}
    out = gen_model.generate(prompt, 16, temperature=0.0, vision_start=VS, vision_end=VE, force=force)
    toks = out["tokens"]
    with torch.no_grad():
        full = gen_model(toks)[0]  # (B, T, V)
    is_code = torch.arange(GEN_CFG.vocab_size) >= GEN_CFG.image_offset
    for b in range(2):
        left = -1
        for i in range(toks.shape[1] - 5):
            t = 5 + i
            in_block = left > 0
            left = GEN_CFG.image_tokens if toks[b, t] == VS else -1 if toks[b, t] == VE else left - (left > 0)
            if not out["sampled"][b, i]:
                continue
            want = full[b, t - 1].masked_fill(is_code != in_block, -math.inf).argmax().item()
            assert toks[b, t].item() == want, \
                (f"step {i} (batch row {b}, {'inside' if in_block else 'outside'} an image block): greedy picked "
                 f"{toks[b, t].item()} but the best allowed id is {want}; allowed = (codes still owed > 0) == is_code")
            assert math.isclose(out["logps"][b, i].item(), full[b, t - 1].log_softmax(-1)[toks[b, t]].item(), abs_tol=1e-5), \
                f"step {i} (batch row {b}): the reported logp is not the log-softmax of the chosen id"


# ======================================================================================================================
# exercise 7: the loss mask of a token sequence (data.encode_segments)


@pytest.mark.exercise7
def test_ex7_encode_segments_ids_and_mask():
    """Text segments become their token ids with the segment's loss flag; an image becomes <|vision_start|>, one id per
    code (image_offset + code, raster order), <|vision_end|>, with loss on the codes and <|vision_end|> only."""
    tok, off = CharTokenizer(), 200
    rgb = np.array([[3, 1, 4], [1, 5, 9]])  # (h, w) = (2, 3): raster order 3 1 4 1 5 9
    depth = np.array([[2, 7, 1], [8, 2, 8]])
    segs = [("text", "<|im_start|>ab", False), ("image", "rgb", False), ("text", "q<|im_end|>", False),
            ("text", "<|im_start|>", False), ("image", "depth", True), ("text", "ok<|im_end|>", True)]
    ids, mask = data.encode_segments(segs, tok, off, {"rgb": rgb, "depth": depth})
    t = lambda s: tok.encode(s).ids  # noqa: E731
    want_ids = (t("<|im_start|>ab") + [VS] + [off + c for c in rgb.ravel()] + [VE] + t("q<|im_end|>") + t("<|im_start|>")
                + [VS] + [off + c for c in depth.ravel()] + [VE] + t("ok<|im_end|>"))
    want_mask = ([False] * 3 + [False] * 8 + [False] * 2 + [False] + [False] + [True] * 6 + [True] + [True] * 3)
    assert isinstance(ids, list) and isinstance(mask, list), "encode_segments must return two lists (ids, loss_mask)"
    assert len(ids) == len(mask), f"ids and loss_mask must have one entry per token: {len(ids)} ids, {len(mask)} flags"
    if ids != want_ids:
        if ids[:3] == want_ids[:3] and len(ids) == len(want_ids):
            block = ids[3:11]
            if block[0] != VS or block[-1] != VE:
                raise AssertionError("an image must be wrapped as <|vision_start|> codes… <|vision_end|>")
            if block[1:-1] == [off + c for c in rgb.T.ravel()]:
                raise AssertionError("image codes must be in raster order (row by row): flatten the (h, w) grid with ravel()")
            if block[1:-1] == [int(c) for c in rgb.ravel()]:
                raise AssertionError("image code k must become id image_offset + k (image ids come after the text vocabulary)")
        raise AssertionError(f"ids differ from the expected layout:\n got  {ids}\n want {want_ids}")
    vs = [i for i, x in enumerate(ids) if x == VS]
    assert not any(mask[i] for i in vs), \
        "<|vision_start|> must never be a training target: in stage 2 the runtime inserts it after a tool tag"
    ve = ids.index(VE, vs[1])
    assert mask[ve], ("with loss on an image, <|vision_end|> is a target too: the model must learn to close the block "
                      "after its h·w codes")
    assert not mask[ids.index(VE)], "an image without loss (the input rgb) must have no target at all, <|vision_end|> included"
    assert [bool(m) for m in mask] == want_mask, \
        (f"loss_mask differs: text takes its segment's flag, an image's codes and <|vision_end|> take the image's flag, "
         f"<|vision_start|> is always False\n got  {[int(m) for m in mask]}\n want {[int(m) for m in want_mask]}")


@pytest.mark.exercise7
def test_ex7_encode_segments_codes_given_directly():
    """An image segment may carry its codes instead of a name; then no `images` dict is needed."""
    codes = np.array([[5, 0], [2, 3]])
    ids, mask = data.encode_segments([("image", codes, True)], CharTokenizer(), 50)
    assert ids == [VS, 55, 50, 52, 53, VE], f"codes passed directly must be encoded the same way, got {ids}"
    assert mask == [False, True, True, True, True, True], f"loss flags of a target image: got {mask}"
    ids, mask = data.encode_segments([("text", "", True)], CharTokenizer(), 50)
    assert ids == [] and mask == [], "an empty text segment adds nothing"


# ======================================================================================================================
# exercise 8: the CPR exploration term (reward.exploration_rewards)


@pytest.mark.exercise8
def test_ex8_exploration_one_group():
    """One group of 8: c < 3 rewards tool users of a positive item, c > 3 penalises tool users of a negative item,
    c = 3, boundary items and rollouts without a tool call get 0."""
    def run(used, flag):
        return reward.exploration_rewards(used, [flag], group_size=8)
    few, three, many = [1, 0, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]
    got = run(few, "positive")
    assert got[1] == 0 and got[3] == 0, \
        f"rollouts without a tool call always get 0 (got {got} for tool use {few} on a positive item)"
    assert got == [0.2, 0, 0.2, 0, 0, 0, 0, 0], \
        (f"c = 2 tool-using rollouts (< 3) on a positive item: each tool user should get +0.2 (perception helps and "
         f"too few explored it), got {got}")
    assert run(few, "negative") == [0.0] * 8, "c < 3 on a negative item: no reward, no penalty"
    got = run(many, "negative")
    assert got == [-0.2] * 5 + [0.0] * 3, \
        f"c = 5 tool-using rollouts (> 3) on a negative item: each tool user should get −0.2, got {got}"
    assert run(many, "positive") == [0.0] * 8, "c > 3 on a positive item: 0 (the bonus is only for too little exploration)"
    for flag in ("positive", "negative", "boundary"):
        assert run(three, flag) == [0.0] * 8, f"c = 3 (= threshold) gives 0 to everyone, also for a {flag} item"
    assert run(few, "boundary") == [0.0] * 8 and run(many, "boundary") == [0.0] * 8, "boundary items are never rewarded"
    assert run([0] * 8, "positive") == [0.0] * 8, "c = 0: nobody used a tool, so nobody gets the bonus"


@pytest.mark.exercise8
def test_ex8_exploration_counts_and_groups():
    """A rollout counts as tool-using with >= 1 call (counts, not only bools); c is counted per group of consecutive
    rollouts; threshold and bonus are parameters; flags may be given per group or per rollout."""
    got = reward.exploration_rewards([1, 1, 1, 1, 2, 0, 0, 0], ["negative"] * 8)
    assert got == [-0.2] * 5 + [0.0] * 3, \
        (f"tool-call counts [1, 1, 1, 1, 2, 0, 0, 0]: every rollout with >= 1 call is tool-using, so c = 5 (the released "
         f"code's >= 2 rule gives c = 1); got {got}")
    used = [True, False, False, False] + [True, True, True, True]
    got = reward.exploration_rewards(used, ["positive", "negative"], group_size=4, threshold=3, bonus=0.5)
    assert got == [0.5, 0, 0, 0, -0.5, -0.5, -0.5, -0.5], \
        (f"two groups of 4 (consecutive blocks): group 0 has c = 1 < 3 (positive: +bonus to its tool user), group 1 "
         f"c = 4 > 3 (negative: −bonus to each); count c per group, not over the batch; got {got}")
    got = reward.exploration_rewards(used, ["positive"] * 4 + ["negative"] * 4, group_size=4, threshold=1, bonus=0.5)
    assert got == [0, 0, 0, 0, -0.5, -0.5, -0.5, -0.5], f"threshold is a parameter (here 1): got {got}"


# ======================================================================================================================
# exercise 9: group advantages (reward.group_advantages) and the clipped GRPO loss (train.grpo_loss)


def advantages_reference(rewards, G, scale=True, eps=1e-4):
    out = []
    for s in range(0, len(rewards), G):
        g = [float(x) for x in rewards[s:s + G]]
        m = sum(g) / G
        if max(g) == min(g):
            out += [0.0] * G
            continue
        sd = math.sqrt(sum((x - m) ** 2 for x in g) / (G - 1)) if G > 1 else 0.0
        out += [(x - m) / (sd + eps) if scale else x - m for x in g]
    return out


@pytest.mark.exercise9
def test_ex9_group_advantages():
    """A_i = (R_i − mean of its group) / (unbiased std of its group + eps); scale=False only centres (Dr. GRPO); groups
    are consecutive blocks; a zero-variance group gives exact zeros."""
    r = [1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 3.0, 1.0, 0.5, 2.5, 0.0, 0.2]
    got = reward.group_advantages(torch.tensor(r, dtype=torch.float64), group_size=4)
    want = advantages_reference(r, 4)
    assert isinstance(got, torch.Tensor) and got.shape == (12,), \
        (f"group_advantages must return a tensor of shape (N,) = (12,), got {type(got).__name__} "
         f"{tuple(getattr(got, 'shape', ()))}")
    got = got.tolist()
    if not np.allclose(got, want, atol=1e-9):
        for gi in range(3):
            chunk = got[4 * gi:4 * gi + 4]
            if abs(sum(chunk)) > 1e-6:
                raise AssertionError(f"advantage of group {gi} is not centred (its advantages sum to {sum(chunk):.3f}): "
                                     f"subtract each group's own mean, groups being consecutive blocks of group_size")
        rr = np.array(r).reshape(3, 4)
        c = rr - rr.mean(1, keepdims=True)
        variants = {"the std must be the unbiased one (divide by G − 1, torch's default std)":
                    c / (rr.std(1, keepdims=True) + 1e-4),
                    "eps goes on the std, outside the square root: (R − mean) / (std + eps)":
                    c / np.sqrt(rr.var(1, ddof=1, keepdims=True) + 1e-4),
                    "divide by the std (scale=True is GRPO's (R − mean) / (std + eps))": c}
        for why, v in variants.items():
            if np.allclose(got, v.ravel(), atol=1e-9):
                raise AssertionError(why)
        i = int(np.argmax(np.abs(np.array(got) - want)))
        raise AssertionError(f"advantage {i} (group {i // 4}) is {got[i]:.6f}, expected {want[i]:.6f}")
    got = reward.group_advantages([1.0, 0.0, 0.0, 0.0], 4, scale=False).tolist()
    assert np.allclose(got, [0.75, -0.25, -0.25, -0.25]), \
        f"scale=False (Dr. GRPO) only centres: A = R − mean, got {got}"
    z = reward.group_advantages([0.1] * 4 + [2.2] * 4, group_size=4)
    assert not torch.isnan(z).any(), "a group whose rewards are all equal must give 0, not NaN (its std is 0)"
    assert torch.equal(z, torch.zeros(8)), f"a group whose rewards are all equal must give exact zeros, got {z.tolist()}"
    one = reward.group_advantages(torch.tensor([0.3, 1.7]), group_size=1)
    assert torch.equal(one, torch.zeros(2)), "groups of size 1 have no spread: their advantages are 0"
    assert reward.group_advantages([1, 0], 2).dtype.is_floating_point, "integer rewards must give float advantages"
    with pytest.raises(ValueError):
        reward.group_advantages([1.0, 2.0, 3.0], group_size=2)


def grpo_reference(logps, old, adv, mask, ref=None, beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="grpo", clip=True,
                   use_max=False):
    """Trusted GRPO loss, one token at a time in float64 (clip=False / use_max=True: wrong variants for diagnosis)."""
    G, T = logps.shape
    rows, n_i = [], []
    for i in range(G):
        terms = []
        for t in range(T):
            if not mask[i, t]:
                continue
            r = torch.exp(logps[i, t] - old[i, t].detach())
            a = float(adv[i])
            un, cl = r * a, (torch.clamp(r, 1 - eps_low, 1 + eps_high) if clip else r) * a
            ell = -(torch.maximum(un, cl) if use_max else torch.minimum(un, cl))
            if ref is not None and beta > 0:
                d = ref[i, t] - logps[i, t]
                ell = ell + beta * (torch.exp(d) - d - 1)
            terms.append(ell)
        rows.append(torch.stack(terms).sum() if terms else logps.sum() * 0)
        n_i.append(len(terms))
    rows = torch.stack(rows)
    if loss_type == "grpo":
        return (rows / torch.tensor([max(n, 1) for n in n_i], dtype=rows.dtype)).mean()
    if loss_type == "dapo":
        return rows.sum() / max(sum(n_i), 1)
    return rows.sum() / (G * T)


def grpo_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 6, dtype=torch.float64, generator=g) * 3
    delta = (torch.rand(3, 6, dtype=torch.float64, generator=g) - 0.5) * 1.4  # ratios in [0.5, 2]: clipping fires
    adv = torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], dtype=torch.bool)
    return old + delta, old, adv, mask


@pytest.mark.exercise9
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_ex9_grpo_loss_matches_token_by_token_reference(loss_type):
    """Off-policy ratios on both sides of the clip range, advantages of both signs, rows of different lengths: the loss
    and its gradient equal a token-by-token float64 reference, for each aggregation."""
    lp, old, adv, mask = grpo_inputs()
    leaf = lp.clone().requires_grad_(True)
    loss, stats = train.grpo_loss(leaf, old, adv, mask, loss_type=loss_type)
    ref_leaf = lp.clone().requires_grad_(True)
    want = grpo_reference(ref_leaf, old, adv, mask, loss_type=loss_type)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0, "grpo_loss must return a scalar tensor as the loss"
    if not math.isclose(loss.item(), want.item(), abs_tol=1e-9):
        others = {t: grpo_reference(lp, old, adv, mask, loss_type=t).item() for t in ("grpo", "dapo", "dr_grpo")}
        for t, v in others.items():
            if t != loss_type and math.isclose(loss.item(), v, abs_tol=1e-9):
                raise AssertionError(
                    f"loss_type={loss_type!r} gave the {t!r} aggregation. grpo: mean over sequences of each sequence's "
                    f"token mean; dapo: sum over all tokens / number of tokens; dr_grpo: sum / (G·T)")
        if math.isclose(loss.item(), -want.item(), abs_tol=1e-9):
            raise AssertionError("the loss has the wrong sign: ℓ = −min(r·A, clip(r)·A) (we minimise the loss)")
        if math.isclose(loss.item(), grpo_reference(lp, old, adv, mask, loss_type=loss_type, clip=False).item(), abs_tol=1e-9):
            raise AssertionError("no clipping: ℓ = −min(r·A, clip(r, 1 − eps_low, 1 + eps_high)·A)")
        if math.isclose(loss.item(), grpo_reference(lp, old, adv, mask, loss_type=loss_type, use_max=True).item(),
                        abs_tol=1e-9):
            raise AssertionError("take the pessimistic term: −min(r·A, clip(r)·A), not max")
        raise AssertionError(f"loss {loss.item():.6f} differs from the reference {want.item():.6f}")
    loss.backward()
    want.backward()
    err, (i, t) = worst(leaf.grad, ref_leaf.grad)
    assert err < 1e-9, \
        (f"d loss / d logp at completion {i}, token {t} is {leaf.grad[i, t]:.5f}, expected {ref_leaf.grad[i, t]:.5f}: "
         f"clipped tokens get no gradient, old_logps and advantages are constants (detach them)")
    assert stats["tokens"] == 12, "stats['tokens'] must count the masked tokens (the lines after the exercise use n_i, n)"


@pytest.mark.exercise9
def test_ex9_grpo_loss_kl_masking_and_on_policy():
    """k3 KL with β; masked entries (even NaN / inf) change nothing; on-policy (old = current) the ratio is 1 and the
    gradient is the REINFORCE one, −A_i / (G n_i) per token for "grpo"."""
    lp, old, adv, mask = grpo_inputs(1)
    ref = old - 0.3
    loss, _ = train.grpo_loss(lp, old, adv, mask, ref_logps=ref, beta=0.1)
    want = grpo_reference(lp, old, adv, mask, ref=ref, beta=0.1)
    assert math.isclose(loss.item(), want.item(), abs_tol=1e-9), \
        (f"with beta = 0.1 the loss should add β·KL per token, KL = exp(ref − logp) − (ref − logp) − 1 (k3); got "
         f"{loss.item():.6f}, expected {want.item():.6f}")
    loss0, _ = train.grpo_loss(lp, old, adv, mask, ref_logps=ref, beta=0.0)
    assert math.isclose(loss0.item(), grpo_reference(lp, old, adv, mask).item(), abs_tol=1e-9), \
        "beta = 0: the KL must not enter the loss (it is only reported)"
    dirty_lp, dirty_old = lp.clone(), old.clone()
    dirty_lp[~mask], dirty_old[~mask] = math.nan, -math.inf
    leaf = dirty_lp.clone().requires_grad_(True)
    loss_d, _ = train.grpo_loss(leaf, dirty_old, adv, mask)
    assert math.isclose(loss_d.item(), grpo_reference(lp, old, adv, mask).item(), abs_tol=1e-9), \
        ("NaN / inf in masked-out positions changed the loss: replace masked entries with torch.where before any "
         "arithmetic (a multiply by the mask keeps NaN)")
    loss_d.backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[~mask] == 0).all(), \
        ("masked-out positions must get exactly zero gradient and no NaN: select with torch.where(mask, x, 0) before "
         "exp(); multiplying by the mask still sends NaN · 0 = NaN back")
    leaf = old.clone().requires_grad_(True)
    loss, stats = train.grpo_loss(leaf, leaf.detach(), adv, mask)
    loss.backward()
    n_i = mask.sum(1, keepdim=True).double()
    want_grad = torch.where(mask, -adv[:, None] / (3 * n_i), torch.zeros(()).double())
    assert torch.allclose(leaf.grad, want_grad, atol=1e-12), \
        "on-policy the ratio is 1 and the gradient per masked token must be −A_i / (G · n_i) (REINFORCE, 'grpo')"
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_low_frac"] == 0 and stats["clip_high_frac"] == 0
    with pytest.raises(ValueError):
        train.grpo_loss(lp, old, adv, mask, loss_type="ppo")


# ======================================================================================================================
# exercise 10: the stage-2 tool-switching runtime (cooper.Cooper.runtime, train.policy_mask)


@pytest.fixture(scope="module")
def small_agent():
    cfg = ModelConfig(text_vocab=CharTokenizer().get_vocab_size(), codebook_size=16, image_size=16, vq_downsample=8,
                      n_layer=1, n_head=2, n_kv_head=1, n_embd=16, ffn_hidden=32, max_seq_len=64, vq_channels=8,
                      vq_patch=4, vq_channel_mult=(1, 2), codebook_dim=4, patch_embed=False)
    return cooper.Cooper(UnifiedTransformer(cfg), VQTokenizer(cfg), CharTokenizer())


@pytest.mark.exercise10
def test_ex10_runtime_forces_and_bans(small_agent):
    """runtime(mode) gives generate() its keywords: force <|vision_start|> after a closing tool tag and the reflection
    prompt after <|vision_end|>; ban the four tool tags once MAX_TURNS − 1 maps are drawn (from the start in "text" and
    "direct" modes); never sample <|vision_start|>; pass turn_cap through."""
    reflect = small_agent.tok.encode(data.REFLECTION_PROMPT).ids
    tags = {data.DEPTH_TAG: "<depth-estimation>", data.DEPTH_TAG_END: "</depth-estimation>",
            data.SEG_TAG: "<segmentation>", data.SEG_TAG_END: "</segmentation>"}
    for mode, maps in (("interleaved", reward.MAX_TURNS - 1), ("depth", reward.MAX_TURNS - 1),
                       ("segmentation", reward.MAX_TURNS - 1), ("text", 0), ("direct", 0)):
        kw = small_agent.runtime(mode, turn_cap=17)
        assert isinstance(kw, dict) and {"force", "ban", "turn_cap"} <= set(kw), \
            f"runtime must return a dict of generate() keywords with force, ban and turn_cap; got {kw!r}"
        force, ban = kw["force"], kw["ban"]
        for tag, name in ((data.DEPTH_TAG_END, "</depth-estimation>"), (data.SEG_TAG_END, "</segmentation>")):
            assert list(force.get(tag, [])) == [VS], \
                (f"mode {mode!r}: after {name} the runtime must force <|vision_start|> (id {VS}) so that the model then "
                 f"draws the map; force[{tag}] is {force.get(tag)}")
        assert list(force.get(VE, [])) == reflect, \
            ("after <|vision_end|> the runtime must force the reflection prompt, "
             "tokenizer.encode(data.REFLECTION_PROMPT).ids")
        assert set(force) == {data.DEPTH_TAG_END, data.SEG_TAG_END, VE}, \
            f"force only after the two closing tool tags and <|vision_end|>; got triggers {sorted(force)}"
        for tag, name in tags.items():
            assert ban.get(tag) == maps, \
                (f"mode {mode!r}: the tool tag {name} (id {tag}) must be banned once {maps} map(s) are drawn "
                 f"({'MAX_TURNS − 1, so the last turn answers' if maps else 'no tools in this mode'}); ban[{tag}] is "
                 f"{ban.get(tag)}")
        assert ban.get(VS) == 0, "<|vision_start|> is only ever forced: ban it from being sampled (ban[VISION_START] = 0)"
        assert kw["turn_cap"] == 17, f"turn_cap must be passed through, got {kw['turn_cap']}"


@pytest.mark.exercise10
def test_ex10_policy_mask():
    """policy_mask: True exactly on the tokens the policy sampled as text (codes too with image_pg); forced tokens,
    the prompt and padding never; padded with False to `width`."""
    off, T0 = 50, 3
    prompt = [[1, 7, 8], [0, 1, 9]]
    gen = [[20, 21, 10, VS, 55, 56, VE, 30, 31, 2], [22, 11, VS, 51, 52, VE, 33, 2, 2, 2]]
    sampled = [[1, 1, 1, 0, 1, 1, 0, 0, 1, 1], [1, 1, 0, 1, 1, 0, 0, 1, 0, 0]]  # 0: forced or padding
    raw = {"tokens": torch.tensor([p + g for p, g in zip(prompt, gen)]), "sampled": torch.tensor(sampled, dtype=torch.bool),
           "T0": T0}
    want = torch.tensor(sampled, dtype=torch.bool) & (torch.tensor(gen) < off)
    m = train.policy_mask(raw, off, 14)
    assert isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.shape == (2, 14), \
        (f"policy_mask must be a bool tensor (B, width) = (2, 14), got {getattr(m, 'dtype', type(m))} "
         f"{tuple(getattr(m, 'shape', ()))}")
    assert not m[:, 10:].any(), "positions past the generated tokens (up to width) are padding: False"
    assert not (m[:, :10] & ~raw["sampled"]).any(), \
        "forced tokens (<|vision_start|>, <|vision_end|>, the reflection prompt) and padding are not actions: keep sampled only"
    assert not (m[:, :10] & (torch.tensor(gen) >= off)).any(), \
        "sampled image codes are context, not actions (PAPER.md): exclude ids >= image_offset unless image_pg"
    assert torch.equal(m[:, :10], want), \
        (f"the mask must be sampled & (generated id < image_offset) over tokens[:, T0:] (not the prompt)\n got  "
         f"{m[:, :10].int().tolist()}\n want {want.int().tolist()}")
    mi = train.policy_mask(raw, off, 12, image_pg=True)
    assert mi.shape == (2, 12) and torch.equal(mi[:, :10], raw["sampled"]) and not mi[:, 10:].any(), \
        "with image_pg the sampled image codes are in the mask too: exactly `sampled`, padded with False"


# ======================================================================================================================
# meta tests of the course (reference tree only)


def _sheet_counts():
    """{exercise: line count} from the table at the top of course/EXERCISES.md."""
    text = (ROOT / "course" / "EXERCISES.md").read_text(encoding="utf-8")
    return {int(n): int(c) for n, c in re.findall(r"^\|\s*(\d+)\s*\|[^|\n]*\|[^|\n]*\|\s*(\d+)\s*\|", text, re.M)}


def _load_make_student():
    sys.path.insert(0, str(ROOT / "course"))
    try:
        import make_student
    finally:
        sys.path.pop(0)
    return make_student


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


# Runs pytest with -m EXPR in the current folder and writes {marker: number of selected tests} to argv[2].
_COUNT_MARKERS = """
import collections, json, sys, pytest
class Count:
    def pytest_collection_finish(self, session):
        c = collections.Counter(m.name for it in session.items for m in it.iter_markers() if m.name.startswith("exercise"))
        json.dump(c, open(sys.argv[2], "w"))
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", sys.argv[1]], plugins=[Count()]))
"""


@REFERENCE_ONLY
def test_every_grader_bites(tmp_path):
    """For every exercise N, a copy missing only N fails `pytest -m exerciseN` with NotImplementedError, while the
    reference passes all graders; every exercise has a graded test and a region, and make_student cuts every region."""
    ms = _load_make_student()
    regions = ms.find_regions(ROOT)
    numbers = sorted({r.n for r in regions})
    assert numbers == list(EXERCISES), f"exercise regions found for {numbers}, expected 1..10"
    copies = {}
    for n in numbers:
        cut = ms.make_student(tmp_path / f"without_{n}", only={n}, log=lambda *a: None)
        assert sorted((r.file, r.begin) for r in cut) == sorted((r.file, r.begin) for r in regions if r.n == n)
        copies[n] = tmp_path / f"without_{n}"
    expr = " or ".join(f"exercise{n}" for n in numbers)
    counts = tmp_path / "counts.json"

    def run(job):
        t0 = time.time()
        if job == "reference":
            cmd, cwd = [sys.executable, "-c", _COUNT_MARKERS, expr, str(counts)], ROOT
        else:
            cmd, cwd = [sys.executable, "-m", "pytest", "-q", "-m", f"exercise{job}", "-p", "no:cacheprovider"], copies[job]
        p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
        return job, p.returncode, p.stdout + p.stderr, time.time() - t0

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, ["reference"] + numbers))
    for job, rc, out, secs in results:
        tail = "\n".join(out.splitlines()[-15:])
        if job == "reference":
            assert rc == 0, f"the reference tree fails its graders (-m {expr}):\n{tail}"
            found = json.loads(counts.read_text())
            missing = [n for n in numbers if not found.get(f"exercise{n}")]
            assert not missing, f"exercises without a graded test: {missing}"
        else:
            assert rc == 1, f"exercise {job}: a copy missing it should fail -m exercise{job} (exit 1), got exit {rc}:\n{tail}"
            assert "NotImplementedError" in out, f"exercise {job}: failures do not mention NotImplementedError:\n{tail}"


@REFERENCE_ONLY
def test_full_student_copy_cuts_every_region_and_imports(tmp_path):
    """A copy with every exercise cut: each region holds exactly its raise line, every module imports, and the course
    files and tests are there (the cutting script itself is not)."""
    ms = _load_make_student()
    out = tmp_path / "student"
    cut = ms.make_student(out, log=lambda *a: None)
    regions = ms.find_regions(ROOT)
    assert len(cut) == len(regions)
    left = ms.find_regions(out)  # the markers stay in the copy, around one line each
    assert [(r.file, r.n, r.title) for r in left] == [(r.file, r.n, r.title) for r in regions]
    for r in left:
        line = (out / r.file).read_text(encoding="utf-8").split("\n")[r.begin]
        assert r.lines == 1 and line == ms.raise_line(r), f"{r.file}:{r.begin}: exercise {r.n} region not cut to its raise line"
    for f in ("course/EXERCISES.md", "tests/test_course.py", "tests/conftest.py", "pyproject.toml", "README.md"):
        assert (out / f).is_file(), f"{f} missing from the student copy"
    assert not (out / "course" / "make_student.py").exists()
    p = subprocess.run([sys.executable, "-c", "import data, kernels, model, reward, train, cooper"], cwd=out, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"a full student copy does not import:\n{p.stderr[-2000:]}"


@REFERENCE_ONLY
def test_sheet_table_matches_the_regions():
    """The table at the top of course/EXERCISES.md lists every exercise with the number of lines inside its regions."""
    ms = _load_make_student()
    regions = ms.find_regions(ROOT)
    want = {n: sum(r.lines for r in regions if r.n == n) for n in sorted({r.n for r in regions})}
    assert _sheet_counts() == want, f"course/EXERCISES.md's table should list these line counts: {want}"


@REFERENCE_ONLY
def test_make_student_refuses_bad_input(tmp_path, capsys):
    """Unknown exercise, an existing non-empty --out, and unbalanced or nested markers: one-line error, exit status 2."""
    ms = _load_make_student()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [(["--out", str(tmp_path / "a"), "--only", "11"], "unknown exercise 11"),
             (["--out", str(tmp_path / "a"), "--except", "0"], "unknown exercise 0"),
             (["--out", str(tmp_path / "a"), "--only", "x"], "expected exercise numbers"),
             (["--out", str(tmp_path / "full")], "not empty")]
    for argv, msg in cases:
        assert ms.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "a").exists()
    bad = {"unbalanced": "def f():\n    # exercise 1 begin: t\n    return 1\n",
           "nested": "def f():\n    # exercise 1 begin: t\n    # exercise 2 begin: u\n    x = 1\n    # exercise 2 end\n"
                     "    # exercise 1 end\n",
           "mismatched": "def f():\n    # exercise 1 begin: t\n    return 1\n    # exercise 2 end\n",
           "malformed": "def f():\n    # exercise 1 start\n    return 1\n"}
    for name, src in bad.items():
        root = tmp_path / f"root_{name}"
        root.mkdir()
        (root / "mod.py").write_text(src)
        with pytest.raises(ms.CopyError, match=name if name != "mismatched" else "unbalanced"):
            ms.make_student(tmp_path / f"out_{name}", root=root, log=lambda *a: None)
        assert not (tmp_path / f"out_{name}").exists()
    good = tmp_path / "root_good"
    good.mkdir()
    (good / "mod.py").write_text("def f(x):\n    '''doc'''\n    # exercise 3 begin: add\n    y = x + 1\n    return y\n"
                                 "    # exercise 3 end\n")
    cut = ms.make_student(tmp_path / "out_good", root=good, log=lambda *a: None)
    assert [(r.n, r.lines) for r in cut] == [(3, 2)]
    assert (tmp_path / "out_good" / "mod.py").read_text().split("\n")[3] == \
        '    raise NotImplementedError("exercise 3: add — see course/EXERCISES.md")'
