"""Tests for kernels.py: the fused FlashAttention-2 path against float64 naive math, gradcheck, SDPA,
bfloat16, fully masked rows, KV-cache alignment, the impl switch and linear memory.
Run: python -m pytest tests/test_kernels.py"""
import math
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import FlashAttention, attention, attention_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(B, nh, nkv, Tq, Tk, hs, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, Tq, hs, generator=g, dtype=torch.float64)
    k = torch.randn(B, nkv, Tk, hs, generator=g, dtype=torch.float64)
    v = torch.randn(B, nkv, Tk, hs, generator=g, dtype=torch.float64)
    return [x.to(device, dtype).requires_grad_() for x in (q, k, v)]


def padding(B, Tk, seed=1):
    """Left padding of random length per batch row (what batched generation uses), True = real key."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, Tk // 2 + 1, (B,), generator=g)
    return torch.arange(Tk)[None, :] >= start[:, None]  # (B, Tk)


def fused(q, k, v, causal=True, mask=None, bq=16, bk=32):
    """The fused path with small tiles so that several query and key tiles (and partial ones) are used."""
    return FlashAttention.apply(q, k, v, causal, mask, bq, bk)


def grads(out, inputs, seed=2):
    """Output and gradients of <out, R> for a fixed random R (so every output element matters)."""
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [out] + list(torch.autograd.grad(out, inputs, r.to(out.device, out.dtype)))


CASES = [  # B, nh, nkv, Tq, Tk, hs, causal, padded
    (2, 4, 4, 37, 37, 8, True, False),  # odd length, several tiles, partial last tile
    (2, 4, 2, 50, 50, 16, False, False),  # GQA, not causal
    (1, 6, 2, 23, 71, 8, True, False),  # Tq < Tk: KV-cache prefix, bottom-right causal
    (3, 4, 1, 41, 41, 8, True, True),  # multi-query attention with left padding
    (2, 2, 2, 19, 45, 4, False, True),  # not causal, padding, Tq < Tk
    (2, 4, 2, 1, 53, 8, True, True),  # decoding: one query row
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_matches_float64_naive(case, device):
    """Forward and all three gradients of the fused path equal float64 naive math (atol 1e-10) on odd
    lengths, Tq < Tk, GQA/MQA, causal and not, with and without key padding."""
    B, nh, nkv, Tq, Tk, hs, causal, padded = case
    q, k, v = make(B, nh, nkv, Tq, Tk, hs, device=device)
    mask = padding(B, Tk).to(device) if padded else None
    got = grads(fused(q, k, v, causal, mask), (q, k, v))
    want = grads(attention_reference(q, k, v, causal, mask), (q, k, v))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), f"{name}: max err {(a - b).abs().max():.2e}"


@pytest.mark.exercise3
def test_reference_hand_computed():
    """The naive reference on a 2-token, hs=1 example computed by hand: causal row 0 copies v0; row 1
    mixes v0 and v1 with softmax weights of the scores q1·k0 = 0 and q1·k1 = 1 (hs = 1, so τ = 1)."""
    q = torch.tensor([1.0, 1.0]).view(1, 1, 2, 1)
    k = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1)
    v = torch.tensor([2.0, 4.0]).view(1, 1, 2, 1)
    w1 = math.e / (1 + math.e)  # softmax([0, 1])[1]
    want = torch.tensor([2.0, 2.0 * (1 - w1) + 4.0 * w1]).view(1, 1, 2, 1)
    for impl in kernels.IMPLS:
        assert torch.allclose(attention(q, k, v, impl=impl), want, atol=1e-6), impl


def test_gradcheck_fused():
    """torch.autograd.gradcheck of the hand-written backward on small float64 inputs (causal, Tq < Tk, GQA,
    padding, tiles of 4×8 so the tile loops and the online rescaling are exercised)."""
    q, k, v = make(2, 4, 2, 7, 13, 4)
    mask = padding(2, 13)
    # fast mode checks random projections of the Jacobian (full mode takes ~30 s here)
    assert torch.autograd.gradcheck(lambda a, b, c: fused(a, b, c, True, mask, 4, 8), (q, k, v), fast_mode=True)
    q, k, v = make(1, 2, 1, 5, 6, 3)  # small enough for the full Jacobian
    assert torch.autograd.gradcheck(lambda a, b, c: fused(a, b, c, False, None, 2, 4), (q, k, v))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_matches_sdpa_float32(case, device):
    """In float32 the fused path (default tiles and small tiles) agrees with torch SDPA (with bottom-right
    causal mask and GQA) to atol 2e-5 on the output and 1e-4 on the gradients."""
    B, nh, nkv, Tq, Tk, hs, causal, padded = case
    q, k, v = make(B, nh, nkv, Tq, Tk, hs, dtype=torch.float32, device=device)
    mask = padding(B, Tk).to(device) if padded else None
    want = grads(attention(q, k, v, causal, mask, impl="sdpa"), (q, k, v))
    for out in (attention(q, k, v, causal, mask, impl="fused"), fused(q, k, v, causal, mask)):
        for i, (a, b) in enumerate(zip(grads(out, (q, k, v)), want)):
            assert torch.allclose(a, b, atol=2e-5 if i == 0 else 1e-4, rtol=1e-4), (i, (a - b).abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_within_tolerance(device):
    """bfloat16 inputs: output and gradients stay in bf16 and are within 2e-2 (a few bf16 ulps at these
    magnitudes) of float64 math on the same bf16-rounded inputs, because the kernel accumulates in float32."""
    q, k, v = make(2, 4, 2, 45, 45, 16, dtype=torch.bfloat16, device=device)
    got = grads(fused(q, k, v), (q, k, v))
    assert all(t.dtype == torch.bfloat16 for t in got)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = grads(attention_reference(q64, k64, v64), (q64, k64, v64))
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 2e-2


@pytest.mark.parametrize("impl", kernels.IMPLS)
def test_fully_masked_rows_are_zero(impl):
    """A query row with no visible key (its batch row fully padded, or causal with Tq > Tk) outputs exactly
    0, gets exactly 0 gradient and produces no NaN anywhere, in every path; other rows are unaffected."""
    q, k, v = make(2, 2, 2, 6, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False  # batch row 1: every key is padding
    out, dq, dk, dv = grads(attention(q, k, v, True, mask, impl=impl), (q, k, v))
    assert not any(t.isnan().any() for t in (out, dq, dk, dv))
    assert out[1].abs().max() == 0 and dq[1].abs().max() == 0 and dk[1].abs().max() == 0
    ref = attention_reference(q[:1], k[:1], v[:1], True)
    assert torch.allclose(out[:1], ref, atol=1e-10)
    # causal with more queries than keys: the first Tq − Tk rows see nothing
    q, k, v = make(1, 2, 2, 9, 5, 4)
    out, dq, dk, dv = grads(attention(q, k, v, True, impl=impl), (q, k, v))
    assert out[:, :, :4].abs().max() == 0 and dq[:, :, :4].abs().max() == 0
    assert not any(t.isnan().any() for t in (out, dq, dk, dv))
    assert torch.allclose(out[:, :, 4:], attention_reference(q[:, :, 4:], k, v, True), atol=1e-10)


def test_partial_requires_grad():
    """Gradients are right when only q requires grad, and when only k and v do (the backward skips the
    unneeded products), matching the float64 reference."""
    q, k, v = make(1, 4, 2, 21, 21, 8)
    want = grads(attention_reference(q, k, v), (q, k, v))
    qd = q.detach().requires_grad_()
    _, dq = grads(fused(qd, k.detach(), v.detach()), (qd,))
    assert torch.allclose(dq, want[1], atol=1e-10)
    kd, vd = k.detach().requires_grad_(), v.detach().requires_grad_()
    out = fused(q.detach(), kd, vd)
    _, dk, dv = grads(out, (kd, vd))
    assert torch.allclose(dk, want[2], atol=1e-10) and torch.allclose(dv, want[3], atol=1e-10)


@pytest.mark.exercise4
def test_kv_cache_alignment():
    """Bottom-right causal alignment: attending the last Tq queries to all Tk keys equals the last Tq rows
    of full causal self-attention (what a KV cache must reproduce), for prefill chunks and one-token steps."""
    q, k, v = make(2, 4, 2, 40, 40, 8)
    full = fused(q, k, v)
    for Tq in (1, 7, 33):
        part = fused(q[:, :, -Tq:], k, v)
        assert torch.allclose(part, full[:, :, -Tq:], atol=1e-12)
        assert torch.allclose(attention(q[:, :, -Tq:], k, v, impl="sdpa"), full[:, :, -Tq:], atol=1e-12)


@pytest.mark.parametrize("Tq", [1, 5])
def test_decoding_path_matches_reference(Tq):
    """Without gradients a few query rows take the one-softmax decoding path; it equals float64 naive math
    with GQA, left padding and a fully padded batch row (which must give zeros, not NaN)."""
    q, k, v = make(3, 4, 2, Tq, 30, 8)
    mask = padding(3, 30)
    mask[2] = False
    with torch.no_grad():
        got = attention(q, k, v, True, mask, impl="fused")
        want = attention_reference(q, k, v, True, mask)
    assert torch.allclose(got, want, atol=1e-12) and got[2].abs().max() == 0


def test_causal_tiles_cover_exactly_the_visible_keys():
    """The key tiles visited for each query tile cover every key some row of it may see, none above the
    diagonal, and only tiles flagged as crossing the diagonal contain keys hidden from some row."""
    for Tq, Tk in [(37, 37), (10, 50), (50, 10), (64, 64)]:
        for r0 in range(0, Tq, 16):
            r1 = min(r0 + 16, Tq)
            tiles = kernels._key_tiles(r0, r1, Tq, Tk, True, 8)
            keys = [j for k0, k1, _ in tiles for j in range(k0, k1)]
            assert keys == list(range(max(0, min(Tk, r1 + Tk - Tq))))  # visible to the last row, no gaps
            for k0, k1, crossing in tiles:
                if not crossing:  # every row of the tile sees every key of the tile
                    assert k1 - 1 <= r0 + Tk - Tq


def test_switch_and_env_var():
    """set_default_impl routes attention(impl=None) to the chosen path (bitwise equal to calling it
    directly), rejects unknown names, and COOPER_ATTN sets the default at import time."""
    q, k, v = make(1, 2, 2, 9, 9, 4)
    old = kernels.DEFAULT_IMPL
    try:
        kernels.set_default_impl("reference")
        assert torch.equal(attention(q, k, v), attention_reference(q, k, v))
        kernels.set_default_impl("fused")
        assert torch.equal(attention(q, k, v), attention(q, k, v, impl="fused"))
        with pytest.raises(ValueError):
            kernels.set_default_impl("triton")
    finally:
        kernels.set_default_impl(old)
    env = dict(os.environ, COOPER_ATTN="sdpa")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.DEFAULT_IMPL)"], env=env,
                         cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "sdpa"


def test_memory_grows_linearly():
    """Peak extra memory of fused forward+backward (torch.profiler allocation events) grows about linearly
    in T (doubling T at most 2.5× the peak) and stays below one naive (B, nh, T, T) fp32 score matrix."""
    peaks = {}
    for T in (256, 512):
        q, k, v = make(1, 2, 2, T, T, 16, dtype=torch.float32)
        peaks[T] = kernels._peak_bytes(lambda: kernels._run("fused", q, k, v, True), torch.device("cpu"))
    assert peaks[512] < 2.5 * peaks[256]
    assert peaks[512] < 2 * 512 * 512 * 4  # one score matrix of the naive path


@pytest.mark.parametrize("device", DEVICES)
def test_fused_under_autocast(device):
    """Inside a bf16 autocast region (how train.py runs on GPUs) the fused path gives exactly what it gives on the
    same bf16 inputs outside autocast, forward and backward: autocast must not re-cast the kernel's fp32 insides
    (it once made the in-place accumulation fail with a dtype error)."""
    q, k, v = make(2, 4, 2, 70, 70, 16, dtype=torch.bfloat16, device=device)
    want = grads(attention(q, k, v, impl="fused"), (q, k, v))
    with torch.autocast(device, dtype=torch.bfloat16):
        got = grads(attention(q, k, v, impl="fused"), (q, k, v))
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
