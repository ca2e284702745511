"""Attention kernels: a FlashAttention-2 style fused attention in plain PyTorch (forward and backward),
its naive reference, and a route to torch's scaled_dot_product_attention.

What it implements. Softmax attention O = softmax(τ Q Kᵀ + mask) V with τ = 1/√hs (the attention inside
every transformer block of the unified model, PAPER.md / DESIGN.md `kernels.py`), computed the way
FlashAttention-2 does it (Dao 2023, arXiv 2307.08691; the steps are in EQUATIONS.md):
  * forward = Alg. 1: query tiles × key tiles with an online softmax (running max m and sum l); only the
    output O and the per-row logsumexp L are kept, so memory is linear in the sequence length;
  * backward = Alg. 2: a torch.autograd.Function that recomputes P = exp(τ Q Kᵀ − L) tile by tile and uses
    D = rowsum(dO ∘ O); no T×T matrix is ever stored;
  * causal tiles wholly above the diagonal are skipped in both passes.

Contract. q (B, nh, Tq, hs), k/v (B, nkv, Tk, hs) with nh % nkv == 0 (grouped-query attention: head h reads
kv head h // (nh/nkv)). Causal masking is aligned bottom-right, so with a KV cache (Tq < Tk) query row r sees
keys 0 … r + (Tk − Tq). `key_padding_mask` (B, Tk) bool, True = key may be attended (left-padded batches).
A query row that can see no key at all (all its keys padded, or Tq > Tk under causal) outputs zeros and
gets zero gradient, in all three paths. Any length, float32 / float64 / bfloat16 (bf16 accumulates in fp32).
The fused path runs with autocast off inside (bf16 autocast would re-cast its fp32 tiles), forward and backward.

Deviations from the FA-2 paper and why.
  * There is no on-chip SRAM to manage from Python: a "tile" is a batch of matrices handed to one bmm. On a
    CPU the win is the same idea at the cache level (a score tile stays in cache while it is exponentiated
    and multiplied), plus memory that grows as O(T) instead of O(T²).
  * All heads of a tile are processed at once (one bmm over B·nkv), and for GQA the query heads that share
    a kv head are folded into the row dimension, (B, nkv, g·Tq, hs), so K and V are never repeated.
  * The running max starts at a large finite negative number (−1e30) instead of −∞, so a row that has seen
    no visible key yet gives exp(−∞ − m) = 0 rather than NaN; a row that ends with l = 0 gets O = 0 and
    L = +∞, which makes every recomputed P (and so every gradient) of that row exactly 0.
  * Scores are kept in base 2 (log2 e folded into τ) so every exponential is an exp2, as the FA-2 CUDA code
    does; here the reason is speed: torch's CPU exp is 5-40× slower on −∞ and on inputs below −87 (masked
    entries, sharp attention), exp2 is not.
  * Decoding (few query rows) does not need tiling: when Tq ≤ SMALL_TQ, `attention` without gradients takes
    a plain one-softmax path, and with gradients the fused kernel uses a single key tile.
  * The backward loops query tiles outside and key tiles inside (Alg. 2 does the opposite); dK and dV are
    accumulated into slices of full-size buffers, which gives the same sums.

Switch. `attention(..., impl=None)` uses DEFAULT_IMPL: "fused" (default), "reference" or "sdpa"; set it with
the environment variable COOPER_ATTN or `set_default_impl(name)`.

Benchmark (not a test): `python kernels.py --bench [--big] [--threads 1]` prints forward and forward+backward
time (median of repeats, the paths interleaved) and peak memory; --big adds T=8192 (memory only). CPU peak memory is measured with torch.profiler's memory events:
every allocation and free made by torch inside the measured call, in time order; the peak of their running
sum is the extra memory the call needed on top of its inputs. `python kernels.py --tune` sweeps tile sizes.

Test: python -m pytest tests/test_kernels.py
"""
import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

IMPLS = ("fused", "reference", "sdpa")
DEFAULT_IMPL = os.environ.get("COOPER_ATTN", "fused")
# Tile sizes, chosen with `python kernels.py --tune` on this 2-core CPU (B=4, nh=8, hs=64, causal; 1 thread,
# T=1024 and 4096; sweep of BLOCK_Q 32-256 × BLOCK_K 128-1024). One score tile is (B·nkv, g·BLOCK_Q, BLOCK_K)
# floats = 2 MiB for 32 heads at 64×256: about the size of a core's L2, so the 4 elementwise passes over it
# (max, subtract, exp2, sum) stay in cache. 64×256 was best or within noise of the best at both lengths:
# bigger tiles spill out of cache (256×256 was 1.5× slower), smaller ones pay more Python steps per FLOP.
BLOCK_Q = 64  # also bounds the causal waste: the masked half of each diagonal tile is BLOCK_Q/T of the work
BLOCK_K = 256
SMALL_TQ = 16  # at or below this many query rows (KV-cache decoding) the keys are one tile: tiling cannot pay
_FLOOR = -1e30  # finite start of the running max (see "Deviations")
LOG2E = 1.0 / math.log(2)  # scores are scaled by log2(e) so that exp(x) becomes exp2(x·log2 e)


def set_default_impl(name):
    """Choose the path `attention(..., impl=None)` takes: "fused", "reference" or "sdpa"."""
    global DEFAULT_IMPL
    if name not in IMPLS:
        raise ValueError(f"unknown attention impl {name!r}; choose one of {IMPLS}")
    DEFAULT_IMPL = name


def _visible(Tq, Tk, causal, key_padding_mask, device):
    """Bool (B or 1, 1, Tq, Tk) of the keys each query row may attend, or None when all are visible."""
    allowed = None
    if causal and Tq > 1:  # one query row sees every key (bottom-right): no mask, which keeps decoding cheap
        # bottom-right alignment: row r sees keys 0 … r + (Tk − Tq)
        rows = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
        allowed = (torch.arange(Tk, device=device)[None, :] <= rows)[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, Tk)
        allowed = pad if allowed is None else allowed & pad
    return allowed


def attention_reference(q, k, v, causal=True, key_padding_mask=None):
    """Naive attention: materialise the (Tq, Tk) score matrix, softmax in float32 (float64 for float64)."""
    # exercise 3 begin: RoPE and GQA attention
    B, nh, Tq, hs = q.shape
    Tk, g = k.shape[2], nh // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # GQA: head h reads kv head h // g, so repeat each kv head g times
    k = k.to(acc).repeat_interleave(g, dim=1)  # (B, nh, Tk, hs)
    v = v.to(acc).repeat_interleave(g, dim=1)  # (B, nh, Tk, hs)
    att = (q.to(acc) @ k.transpose(-2, -1)) / math.sqrt(hs)  # S = τ Q Kᵀ, (B, nh, Tq, Tk)
    allowed = _visible(Tq, Tk, causal, key_padding_mask, q.device)
    if allowed is not None:
        att = att.masked_fill(~allowed, float("-inf"))
        # a row with no visible key: give it finite dummy scores, then zero its probabilities, so both
        # the output and the gradient of that row are 0 instead of NaN
        seen = allowed.any(-1, keepdim=True)  # (B or 1, 1, Tq, 1)
        att = att.masked_fill(~seen, 0.0)
        p = torch.softmax(att, dim=-1) * seen
    else:
        p = torch.softmax(att, dim=-1)
    return (p @ v).to(q.dtype)  # (B, nh, Tq, Tk) @ (B, nh, Tk, hs) -> (B, nh, Tq, hs)
    # exercise 3 end


def _attention_sdpa(q, k, v, causal, key_padding_mask):
    """torch's scaled_dot_product_attention with a bottom-right causal mask and GQA."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is None and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    # SDPA's is_causal aligns top-left, so pass the bottom-right mask explicitly
    allowed = _visible(Tq, Tk, causal, key_padding_mask, q.device)
    if allowed is None:  # one query row, no padding: it sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    seen = allowed.any(-1, keepdim=True)
    # rows with no visible key attend everywhere, then are zeroed: defined output and zero gradient
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~seen, enable_gqa=gqa)
    return out.masked_fill(~seen, 0.0)


def _attention_small(q, k, v, causal, key_padding_mask):
    """Few query rows and no gradient (KV-cache decoding): one plain softmax over all keys, no tiling.
    The scores are only (g·Tq, Tk) per kv head, so there is no memory to save, and 4 ops beat a tile loop."""
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc).reshape(B, nkv, nh // nkv * Tq, hs)  # GQA: fold the g heads of a kv head into rows
    s = (qf @ k.to(acc).transpose(-2, -1)) / math.sqrt(hs)  # S = τ Q Kᵀ, (B, nkv, g·Tq, Tk)
    allowed = _visible(Tq, Tk, causal, key_padding_mask, q.device)
    if allowed is not None:
        s.masked_fill_(~allowed.repeat(1, 1, nh // nkv, 1), float("-inf"))  # rows ordered (g, Tq)
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a row with no visible key gives NaN: make it 0
    return (p @ v.to(acc)).reshape(B, nh, Tq, hs).to(q.dtype)  # (B, nh, Tq, hs)


def _key_tiles(r0, r1, Tq, Tk, causal, block_k):
    """Key tiles [k0, k1) that query tile [r0, r1) visits, each flagged if it crosses the causal diagonal.
    Keys every row of the tile may see are cut into tiles of block_k; under causal, the keys that only some
    rows see form one last tile (bq wide); keys that no row sees (above the diagonal) are skipped."""
    if not causal:
        return [(k0, min(k0 + block_k, Tk), False) for k0 in range(0, Tk, block_k)]
    off = Tk - Tq  # bottom-right alignment: row r sees keys 0 … r + off
    kdiag = max(0, min(Tk, r0 + off))  # keys below kdiag are seen by every row of the tile
    kend = max(0, min(Tk, r1 + off))  # keys from kend on are seen by no row: the skipped tiles
    tiles = [(k0, min(k0 + block_k, kdiag), False) for k0 in range(0, kdiag, block_k)]
    return tiles + ([(kdiag, kend, True)] if kend > kdiag else [])


def _causal_bias(r0, r1, k0, k1, g, off, dtype, device):
    """Additive mask (g·bq, bk) for a diagonal tile: 0 where a folded query row may see the key, −∞ above
    the diagonal. (Adding a small bias is several times faster on CPU than a broadcast masked_fill_.)"""
    last = torch.arange(r0, r1, device=device).repeat(g) + off  # last visible key of each folded row
    hidden = torch.arange(k0, k1, device=device)[None, :] > last[:, None]  # (g·bq, bk)
    return torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


def _pad_bias(key_padding_mask, dtype):
    """(B, Tk) bool, True = visible  ->  additive bias (B, 1, 1, Tk): 0 visible, −∞ padded; or None."""
    if key_padding_mask is None:
        return None
    hidden = ~key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Tk)
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))


class FlashAttention(torch.autograd.Function):
    """FlashAttention-2 forward (Alg. 1) and backward (Alg. 2) over tiles, in plain PyTorch.

    Scores are kept in base 2, S₂ = log2(e)·τ Q Kᵀ, so every exponential is exp2: softmax(S) = 2^(S₂ − max)/sum
    is unchanged, and torch's CPU exp2 stays fast on −∞ and on very negative inputs, where exp is 5-40× slower
    (masked entries and sharp attention would hit that slow path). L is saved in base 2 as well."""

    @staticmethod
    def forward(ctx, q, k, v, causal, key_padding_mask, block_q, block_k):
        B, nh, Tq, hs = q.shape
        nkv, Tk = k.shape[1], k.shape[2]
        g, BH = nh // nkv, B * nkv
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        pad = _pad_bias(key_padding_mask, acc)  # (B, 1, 1, Tk) or None
        if Tq <= SMALL_TQ:
            block_k = max(Tk, 1)  # decoding: one key tile, nothing to gain from tiling
        # fold the g query heads of each kv head into one batch entry: (B·nkv, g, Tq, hs); τ·log2(e) applied once
        qs = (q.to(acc) * (LOG2E / math.sqrt(hs))).reshape(BH, g, Tq, hs)
        kt = k.to(acc).reshape(BH, Tk, hs).transpose(1, 2).contiguous()  # Kᵀ (B·nkv, hs, Tk): faster bmm
        vf = v.to(acc).reshape(BH, Tk, hs)  # (B·nkv, Tk, hs)
        out = torch.zeros(BH, g, Tq, hs, dtype=acc, device=q.device)
        lse2 = torch.full((BH, g, Tq), float("inf"), dtype=acc, device=q.device)  # +∞ = row saw no key
        # exercise 4 begin: FlashAttention-2 forward
        for r0 in range(0, Tq, block_q):  # Alg. 1 line 3: for each query tile Q_i
            r1 = min(r0 + block_q, Tq)
            rows = g * (r1 - r0)
            tiles = _key_tiles(r0, r1, Tq, Tk, causal, block_k)
            if not tiles:
                continue  # every key of this tile is above the diagonal: output stays 0
            qi = qs[:, :, r0:r1].reshape(BH, rows, hs)  # (B·nkv, g·bq, hs)
            # line 5 (m = −∞, l = 0, O = 0) is folded into the first key tile below
            for j, (k0, k1, causal_part) in enumerate(tiles):  # line 6: for each key tile K_j, V_j
                s = torch.bmm(qi, kt[:, :, k0:k1])  # line 8: S_ij = τ Q_i K_jᵀ (base 2), (B·nkv, g·bq, bk)
                if causal_part:  # masked entries −∞
                    s.add_(_causal_bias(r0, r1, k0, k1, g, Tk - Tq, acc, q.device))
                if pad is not None:
                    s.view(B, nkv, rows, k1 - k0).add_(pad[..., k0:k1])
                if j == 0:  # first key tile: nothing accumulated yet, so no rescaling
                    m = s.amax(dim=-1).clamp_min_(_FLOOR)  # line 9: m = rowmax S_i1 (finite floor)
                    s.sub_(m[:, :, None]).exp2_()  # line 9: P̃_i1 = exp(S_i1 − m), in place
                    l = s.sum(dim=-1)  # line 9: l = rowsum P̃
                    o = torch.bmm(s, vf[:, k0:k1])  # line 10: O = P̃ V_1, (B·nkv, g·bq, hs)
                    continue
                m_new = torch.maximum(m, s.amax(dim=-1))  # line 9: m' = max(m, rowmax S_ij)
                s.sub_(m_new[:, :, None]).exp2_()  # line 9: P̃_ij = exp(S_ij − m'), in place
                alpha = (m - m_new).exp2_()  # e^{m − m'}: rescales what was accumulated so far
                l.mul_(alpha).add_(s.sum(dim=-1))  # line 9: l = e^{m−m'} l + rowsum P̃
                o.mul_(alpha[:, :, None]).baddbmm_(s, vf[:, k0:k1])  # line 10: O = diag(e^{m−m'}) O + P̃ V_j
                m = m_new
            # lines 12-13: O_i = O / l, L_i = m + log l; a row with l = 0 keeps O = 0 and L = +∞
            lse2[:, :, r0:r1] = torch.where(l > 0, m + l.log2(), float("inf")).view(BH, g, r1 - r0)
            out[:, :, r0:r1] = (o / l.clamp_min(1e-30)[:, :, None]).view(BH, g, r1 - r0, hs)
        # exercise 4 end
        out = out.view(B, nh, Tq, hs).to(q.dtype)  # (B, nh, Tq, hs)
        ctx.save_for_backward(q, k, v, out, lse2, pad)  # Alg. 1 line 15: keep only O and L
        ctx.causal, ctx.block_q, ctx.block_k = causal, block_q, block_k
        return out

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):  # fp32 insides, as in the forward
            return FlashAttention._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        q, k, v, out, lse2, pad = ctx.saved_tensors
        need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
        causal, block_q, block_k = ctx.causal, ctx.block_q, ctx.block_k
        B, nh, Tq, hs = q.shape
        nkv, Tk = k.shape[1], k.shape[2]
        g, BH = nh // nkv, B * nkv
        acc, tau = lse2.dtype, 1.0 / math.sqrt(hs)
        qs = (q.to(acc) * (LOG2E * tau)).reshape(BH, g, Tq, hs)  # log2(e)·τ Q, folded like the forward
        kf = k.to(acc).reshape(BH, Tk, hs)  # (B·nkv, Tk, hs)
        kt = kf.transpose(1, 2).contiguous()  # Kᵀ (B·nkv, hs, Tk)
        vt = v.to(acc).reshape(BH, Tk, hs).transpose(1, 2).contiguous()  # Vᵀ (B·nkv, hs, Tk)
        do = dout.to(acc).reshape(BH, g, Tq, hs)
        # exercise 5 begin: FlashAttention-2 backward
        # Alg. 2 line 4: D_i = rowsum(dO_i ∘ O_i), (B·nkv, g, Tq)
        D = (do * out.to(acc).reshape(BH, g, Tq, hs)).sum(dim=-1)
        dq = torch.zeros(BH, g, Tq, hs, dtype=acc, device=q.device) if need_dq else None
        dk = torch.zeros(BH, Tk, hs, dtype=acc, device=q.device) if need_dk else None
        dv = torch.zeros(BH, Tk, hs, dtype=acc, device=q.device) if need_dv else None
        for r0 in range(0, Tq, block_q):  # query tiles outer (see "Deviations")
            r1 = min(r0 + block_q, Tq)
            rows = g * (r1 - r0)
            tiles = _key_tiles(r0, r1, Tq, Tk, causal, block_k)
            if not tiles:
                continue
            qi = qs[:, :, r0:r1].reshape(BH, rows, hs)  # (B·nkv, g·bq, hs)
            doi = do[:, :, r0:r1].reshape(BH, rows, hs)  # (B·nkv, g·bq, hs)
            Li = lse2[:, :, r0:r1].reshape(BH, rows, 1)
            Di = D[:, :, r0:r1].reshape(BH, rows, 1)
            dqi = torch.zeros(BH, rows, hs, dtype=acc, device=q.device) if need_dq else None
            for k0, k1, causal_part in tiles:
                # line 10: S_ij = τ Q_i K_jᵀ (base 2), shifted by −L_i inside the same bmm, (B·nkv, g·bq, bk)
                s = torch.baddbmm(-Li, qi, kt[:, :, k0:k1])
                if causal_part:
                    s.add_(_causal_bias(r0, r1, k0, k1, g, Tk - Tq, acc, q.device))
                if pad is not None:
                    s.view(B, nkv, rows, k1 - k0).add_(pad[..., k0:k1])
                p = s.exp2_()  # line 11: P_ij = exp(S_ij − L_i), recomputed instead of stored
                if need_dv:
                    dv[:, k0:k1].baddbmm_(p.transpose(1, 2), doi)  # line 12: dV_j += P_ijᵀ dO_i
                if need_dq or need_dk:
                    dp = torch.bmm(doi, vt[:, :, k0:k1])  # line 13: dP_ij = dO_i V_jᵀ, (B·nkv, g·bq, bk)
                    ds = dp.sub_(Di).mul_(p)  # line 14: dS_ij = P_ij ∘ (dP_ij − D_i), in place
                    if need_dq:
                        dqi.baddbmm_(ds, kf[:, k0:k1])  # line 15: dQ_i += τ dS_ij K_j (τ applied at the end)
                    if need_dk:
                        # line 16: dK_j += τ dS_ijᵀ Q_i (qi carries τ·log2 e; the ln 2 is applied at the end)
                        dk[:, k0:k1].baddbmm_(ds.transpose(1, 2), qi)
            if need_dq:
                dq[:, :, r0:r1] = (dqi * tau).view(BH, g, r1 - r0, hs)
        dq = dq.view(B, nh, Tq, hs).to(q.dtype) if need_dq else None  # (B, nh, Tq, hs)
        dk = dk.mul_(math.log(2)).view(B, nkv, Tk, hs).to(k.dtype) if need_dk else None  # (B, nkv, Tk, hs)
        dv = dv.view(B, nkv, Tk, hs).to(v.dtype) if need_dv else None  # (B, nkv, Tk, hs)
        # exercise 5 end
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, causal=True, key_padding_mask=None, impl=None):
    """Scaled dot-product attention: q (B, nh, Tq, hs), k/v (B, nkv, Tk, hs) -> (B, nh, Tq, hs) in q's dtype.

    causal is aligned bottom-right (row r sees keys 0 … r + Tk − Tq); key_padding_mask (B, Tk) bool with
    True = may be attended; impl in {None, "fused", "reference", "sdpa"}, None = DEFAULT_IMPL."""
    impl = DEFAULT_IMPL if impl is None else impl
    assert q.shape[1] % k.shape[1] == 0, "number of query heads must be a multiple of kv heads"
    if impl == "fused":
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        # the kernel sets its own precision (bf16 in and out, fp32 inside); autocast would turn its inner
        # matmuls back to bf16 and break its in-place fp32 accumulators
        with torch.autocast(q.device.type, enabled=False):
            if q.shape[2] <= SMALL_TQ and not grad:
                return _attention_small(q, k, v, causal, key_padding_mask)  # decoding: tiling cannot pay
            return FlashAttention.apply(q, k, v, causal, key_padding_mask, BLOCK_Q, BLOCK_K)
    if impl == "reference":
        return attention_reference(q, k, v, causal, key_padding_mask)
    if impl == "sdpa":
        return _attention_sdpa(q, k, v, causal, key_padding_mask)
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")


# ----------------------------------------------------------------------------------------------------------
# Benchmark and tile-size sweep (command line only; not used by the model)

def _run(impl, q, k, v, backward, block=None):
    """One call of an attention path; with backward, also its gradient for a fixed upstream gradient."""
    if impl == "fused" and block is not None:
        out = FlashAttention.apply(q, k, v, True, None, *block)
    else:
        out = attention(q, k, v, causal=True, impl=impl)
    if backward:
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return 1e3 * (time.perf_counter() - t0)


def _peak_bytes(fn, device):
    """Peak extra bytes torch allocates while fn runs. CUDA: the allocator's own peak counter. CPU: the
    profiler's memory events (every allocation > 0 and free < 0, in time order); peak of the running sum."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _inputs(T, device, dtype, grad, B=4, nh=8, hs=64):
    gen = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(B, nh, T, hs, generator=gen).to(device, dtype).requires_grad_(grad) for _ in range(3)]


def bench(lengths, memory_only, repeats, device, dtype, naive_limit_gib):
    """Print forward and forward+backward time (median of `repeats`, calls interleaved across paths so
    that load from other processes hits them alike) and peak extra memory, B=4, nh=8, hs=64, causal."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, dtype {dtype}, threads {torch.get_num_threads()}, B=4 nh=8 hs=64 causal, "
          f"tiles {BLOCK_Q}x{BLOCK_K}, median of {repeats}, load average {load:.1f} on {os.cpu_count()} cpus")
    print(f"{'T':>5} {'path':>9} | {'fwd ms':>8} {'x sdpa':>6} | {'fwd+bwd ms':>10} {'x sdpa':>6} | "
          f"{'fwd MiB':>8} {'fwd+bwd MiB':>11} | {'one T² fp32 matrix MiB':>22}")
    for T in lengths:
        score_mib = 4 * 8 * T * T * 4 / 2**20  # one naive score matrix (B, nh, T, T) in fp32
        # the naive path holds several T² matrices at once (about 3 forward, 6 with backward)
        impls = ["fused", "sdpa"] + (["reference"] if 6 * score_mib / 1024 <= naive_limit_gib else [])
        res = {i: {} for i in impls}
        for backward in (False, True):
            key = "fb" if backward else "f"
            for impl in impls:  # peak memory, and a warm-up call
                q, k, v = _inputs(T, device, dtype, backward)
                ctx = torch.enable_grad() if backward else torch.no_grad()
                with ctx:
                    res[impl]["mem_" + key] = _peak_bytes(lambda: _run(impl, q, k, v, backward), device) / 2**20
            if memory_only:
                continue
            times = {i: [] for i in impls}
            for _ in range(repeats):
                for impl in impls:
                    q, k, v = _inputs(T, device, dtype, backward)
                    with torch.enable_grad() if backward else torch.no_grad():
                        times[impl].append(_time_ms(lambda: _run(impl, q, k, v, backward), device))
            for impl in impls:
                res[impl][key] = statistics.median(times[impl])
        for impl in impls:
            r, s = res[impl], res["sdpa"]
            f = f"{r['f']:8.1f} {r['f'] / s['f']:6.2f}" if "f" in r else f"{'-':>8} {'-':>6}"
            fb = f"{r['fb']:10.1f} {r['fb'] / s['fb']:6.2f}" if "fb" in r else f"{'-':>10} {'-':>6}"
            print(f"{T:5d} {impl:>9} | {f} | {fb} | {r['mem_f']:8.1f} {r['mem_fb']:11.1f} | {score_mib:22.1f}")
        skipped = [i for i in ("reference",) if i not in impls]
        if skipped:
            print(f"{T:5d} {'reference':>9} | skipped: needs about {6 * score_mib / 1024:.1f} GiB "
                  f"(over --naive-limit-gib {naive_limit_gib})")


def tune(T, repeats, device, dtype):
    """Sweep (BLOCK_Q, BLOCK_K) at one length; print the median times relative to SDPA."""
    blocks = [(64, 256), (64, 512), (64, 1024), (128, 128), (128, 256), (128, 512), (256, 256)]
    print(f"tile sweep, T={T}, B=4 nh=8 hs=64 causal, threads {torch.get_num_threads()}, median of {repeats}")
    for backward in (False, True):
        times = {b: [] for b in blocks + ["sdpa"]}
        for _ in range(repeats):
            for b in times:
                q, k, v = _inputs(T, device, dtype, backward)
                impl, block = ("sdpa", None) if b == "sdpa" else ("fused", b)
                with torch.enable_grad() if backward else torch.no_grad():
                    times[b].append(_time_ms(lambda: _run(impl, q, k, v, backward, block), device))
        sdpa = statistics.median(times["sdpa"])
        print(("forward+backward" if backward else "forward") + f": sdpa {sdpa:.1f} ms")
        for b in blocks:
            med = statistics.median(times[b])
            print(f"  BLOCK_Q={b[0]:4d} BLOCK_K={b[1]:4d}: {med:8.1f} ms  {med / sdpa:5.2f}x sdpa")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="benchmark / tile sweep for kernels.attention")
    ap.add_argument("--bench", action="store_true", help="time and memory table, T in 256, 1024, 4096")
    ap.add_argument("--big", action="store_true", help="with --bench: add the T=8192 memory row")
    ap.add_argument("--tune", action="store_true", help="sweep tile sizes at --tune-T")
    ap.add_argument("--tune-T", type=int, default=1024)
    # 1 thread by default: on a shared 2-core machine a 2-thread OpenMP region stalls whenever another
    # process holds the second core, which hits a loop of many small ops far harder than one fused kernel
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--naive-limit-gib", type=float, default=4.0, help="skip the naive path above this memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    if args.tune:
        tune(args.tune_T, args.repeats, dev, dt)
    if args.bench or not args.tune:
        bench([256, 1024, 4096], False, args.repeats, dev, dt, args.naive_limit_gib)
        if args.big:
            bench([8192], True, args.repeats, dev, dt, args.naive_limit_gib)
