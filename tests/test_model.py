"""Tests of model.py: VQ gradient routing and codes, transformer causality, KV cache, left padding, MoT routing,
modality-constrained generation, bagel-7b size on the meta device. Run: python -m pytest tests/test_model.py"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model import PRESETS, ModelConfig, UnifiedTransformer, VQTokenizer, estimate_memory

VS, VE, STOP = 3, 4, 2  # vision_start, vision_end and a stop id inside the text range
# a small transformer (64 text ids + 32 codes, 4 codes per image) and a small VQ (16×16 images, 4×4 codes)
TCFG = ModelConfig(text_vocab=64, codebook_size=32, image_size=16, vq_downsample=8, n_layer=2, n_head=4,
                   n_kv_head=2, n_embd=32, ffn_hidden=64, max_seq_len=128, attn_impl="reference")
VQCFG = ModelConfig(image_size=16, vq_downsample=4, vq_patch=2, vq_channels=8, vq_channel_mult=(1, 2),
                    codebook_size=16, codebook_dim=4, vq_restart=0.0)


def make(cfg=TCFG, seed=0, **kw):
    torch.manual_seed(seed)
    return UnifiedTransformer(replace(cfg, **kw)).eval()


def rand_ids(cfg, B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


# ---------------------------------------------------------------------------------------------------------- VQ


@pytest.mark.exercise2
def test_vq_gradient_routing():
    """Codebook loss reaches only the codebook, commitment only the encoder, and the reconstruction loss reaches the
    encoder (through the straight-through step) and decoder but never the codebook."""
    torch.manual_seed(0)
    vq = VQTokenizer(VQCFG)
    _, losses, _ = vq(torch.rand(2, 3, 16, 16) * 2 - 1)
    enc, dec, cb = list(vq.encoder.parameters()), list(vq.decoder.parameters()), vq.codebook.weight

    def grads(loss, params):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [0.0 if g is None else g.abs().sum().item() for g in gs]
    assert sum(grads(losses["codebook"], enc + dec)) == 0 and grads(losses["codebook"], [cb])[0] > 0
    assert grads(losses["commit"], [cb])[0] == 0 and sum(grads(losses["commit"], dec)) == 0
    assert sum(grads(losses["commit"], enc)) > 0
    assert grads(losses["rec"], [cb])[0] == 0 and sum(grads(losses["rec"], enc)) > 0
    assert torch.allclose(losses["loss"], losses["rec"] + losses["codebook"] + losses["commit"])


@pytest.mark.exercise2
def test_vq_straight_through_and_beta():
    """quantize(): the forward value is the nearest unit code (checked against a float64 brute-force search), the
    gradient w.r.t. z_e is the upstream gradient unchanged, and commit = β · codebook term in value."""
    torch.manual_seed(0)
    vq = VQTokenizer(VQCFG)
    z_e = F.normalize(torch.randn(2, 4, 3, 3, dtype=torch.float32), dim=1).requires_grad_(True)
    z_q, codes, losses = vq.quantize(z_e)
    e = F.normalize(vq.codebook.weight.double(), dim=1)                       # (K, D)
    z = z_e.detach().double().permute(0, 2, 3, 1).reshape(-1, 4)             # (N, D)
    brute = torch.cdist(z, e).argmin(1)
    assert torch.equal(codes.flatten(), brute)
    assert torch.allclose(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 4).double(), e[brute], atol=1e-6)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    assert torch.equal(z_e.grad, g)
    assert math.isclose(losses["commit"].item(), 0.25 * losses["codebook"].item(), rel_tol=1e-5)


def test_vq_encode_decode_shapes_and_determinism():
    """encode gives long codes (B,h,w) in [0,K), identical on a repeat; decode gives (B,3,H,W) in [-1,1] and equals
    the forward pass's reconstruction (clamped) for the same codes."""
    torch.manual_seed(0)
    vq = VQTokenizer(VQCFG).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < VQCFG.codebook_size
    assert torch.equal(codes, vq.encode(x))
    img = vq.decode(codes)
    assert img.shape == (3, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    recon, _, codes_fwd = vq(x)
    assert torch.equal(codes_fwd, codes)
    assert torch.allclose(img, recon.clamp(-1, 1), atol=1e-6)


def test_codebook_stats_hand_computed():
    """Codes [0,0,1,2] over K=4: usage 3/4 and perplexity exp(H) with p = (1/2, 1/4, 1/4, 0) → 2^1.5."""
    s = VQTokenizer.codebook_stats(torch.tensor([0, 0, 1, 2]), 4)
    assert s["usage"] == 0.75 and math.isclose(s["perplexity"], 2 ** 1.5, rel_tol=1e-6)


def test_dead_code_restart():
    """In training mode a code whose running count is below the threshold is moved onto an encoder output of the
    batch and its count reset; live codes are untouched."""
    torch.manual_seed(0)
    vq = VQTokenizer(replace(VQCFG, vq_restart=0.5)).train()
    vq.code_count.fill_(1.0)
    vq.code_count[[3, 7]] = 0.0
    before = vq.codebook.weight.detach().clone()
    z = F.normalize(torch.randn(10, 4), dim=1)
    vq.restart_dead_codes(z)
    after = vq.codebook.weight.detach()
    live = [k for k in range(16) if k not in (3, 7)]
    assert torch.equal(after[live], before[live])
    for k in (3, 7):  # each restarted code is now exactly one of the batch vectors
        assert (after[k][None] == z).all(1).any() and vq.code_count[k] == 1.0


# ------------------------------------------------------------------------------------------------- transformer


def test_tiny_preset_forward_backward():
    """The tiny preset runs forward and backward on CPU with the fused kernel: logits (B,T,V), initial loss near
    ln V (near-uniform predictions), finite gradients reaching every parameter (the understanding path's too)."""
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], attn_impl="fused")
    model = UnifiedTransformer(cfg)
    idx = rand_ids(cfg, 2, 40)
    pixels = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    logits, loss = model(idx, targets=idx.roll(-1, 1), pixels=pixels)
    assert logits.shape == (2, 40, cfg.vocab_size)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.3
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in model.parameters())


def test_masked_loss_matches_float64():
    """The loss is the mean next-token cross-entropy over loss_mask positions only (float64 log-softmax reference)."""
    model = make()
    idx, tgt = rand_ids(TCFG, 2, 12), rand_ids(TCFG, 2, 12, seed=5)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 3:7], mask[1, 9:] = True, True
    logits, loss = model(idx, targets=tgt, loss_mask=mask)
    logp = logits.double().log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)  # (B, T)
    assert math.isclose(loss.item(), -logp[mask].mean().item(), rel_tol=1e-5)


def test_causality():
    """Changing token t leaves the logits at positions < t unchanged and changes those at t."""
    model = make()
    idx = rand_ids(TCFG, 1, 20)
    alt = idx.clone()
    alt[0, 11] = (alt[0, 11] + 7) % TCFG.vocab_size
    a, b = model(idx)[0], model(alt)[0]
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11], b[:, 11])


@pytest.mark.parametrize("impl,mot", [("reference", False), ("fused", False), ("fused", True)])
def test_kv_cache_matches_full_forward(impl, mot):
    """Prefill + chunked + one-token decoding through the KV cache gives the full forward's logits (float32,
    atol 1e-5), for the fused and reference kernels and with MoT on a sequence mixing text and image codes."""
    model = make(attn_impl=impl, mot=mot)
    idx = rand_ids(TCFG, 2, 24)
    full = model(idx)[0]
    cache = model.new_cache(2, 24)
    parts = [model(idx[:, :10], cache=cache)[0], model(idx[:, 10:13], cache=cache)[0]]
    parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(13, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    # the prefill of generation computes the last position's logits only: the same numbers
    last = model(idx[:, :10], cache=model.new_cache(2, 24), logits_at=torch.arange(10).eq(9).expand(2, 10))[0]
    assert last.shape == (2, full.shape[-1])
    torch.testing.assert_close(last, full[:, 9], atol=1e-5, rtol=1e-5)
    # GRPO's log-probs need chosen positions only: logits_at gives those rows, in row-major order
    at = torch.rand(2, 24, generator=torch.Generator().manual_seed(1)) < 0.3
    torch.testing.assert_close(model(idx, logits_at=at)[0], full[at], atol=1e-5, rtol=1e-5)


def test_image_positions_2d():
    """Each image code's place k is its index in its block (raster order), text gets 0 and no pos2d; the same through
    the KV cache fed one token at a time, and the logits then match the full forward."""
    model = make()
    with torch.no_grad():
        model.pos2d.normal_()  # zero at initialisation; make it visible
    V = TCFG.image_offset
    idx = torch.tensor([[1, VS, V + 5, V + 6, V + 7, V + 8, VE, 9, VS, V + 1, V + 2, V + 3, V + 4, VE, 7]])
    k = model.image_index(idx, idx >= V, 0, None)  # (1, T)
    assert k[0].tolist() == [0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 1, 2, 3, 0, 0]
    with torch.no_grad():  # pos2d enters the input of image codes only: zero it and only their logits change
        full = model(idx)[0]
        saved = model.pos2d.clone()
        model.pos2d.zero_()
        changed = (model(idx)[0] - full).abs().amax(-1)[0] > 0  # (T,)
        model.pos2d.copy_(saved)
    assert changed.tolist() == [False, False] + [True] * 13  # from the first code on, causally
    cache = model.new_cache(1, idx.shape[1])
    steps = [model(idx[:, :3], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(3, idx.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_patch_embedding_reaches_the_first_image_only():
    """The understanding path adds PatchEmbed(pixels)[k] to code k of the first image block and nothing elsewhere
    (a generated map after it stays codes only); a KV-cached decode with the pixels on the prompt equals the full
    forward with them; the tokens before the image do not depend on the pixels."""
    model = make()
    V, g = TCFG.image_offset, TCFG.grid
    n = TCFG.image_tokens
    idx = torch.cat([torch.tensor([1, VS]), V + torch.arange(n), torch.tensor([VE, 9, VS]), V + torch.arange(n),
                     torch.tensor([VE, 7])])[None]  # (1, T): text, image 1, text, image 2 (a generated map), text
    pixels = torch.rand(1, 3, TCFG.image_size, TCFG.image_size) * 2 - 1
    is_img = idx >= V
    add = model.patch(pixels, is_img, model.image_index(idx, is_img, 0, None))[0]  # (T, C)
    p = TCFG.vq_downsample
    for k in (0, 1, n - 1):  # code k of the first block gets the features of patch (k // g, k % g)
        patch = pixels[0, :, (k // g) * p:(k // g + 1) * p, (k % g) * p:(k % g + 1) * p].reshape(-1)  # (3·p·p,) c, y, x
        torch.testing.assert_close(add[2 + k], model.patch.fc2(F.gelu(model.patch.fc1(patch))))
    assert add[:2].abs().sum() == 0 and add[2 + n:].abs().sum() == 0
    with torch.no_grad():
        full = model(idx, pixels=pixels)[0]
        assert torch.equal(full[0, :2], model(idx)[0][0, :2])
        cache = model.new_cache(1, idx.shape[1])
        cut = 2 + n + 4  # the prompt ends inside the second image block
        steps = [model(idx[:, :cut], cache=cache, pixels=pixels)[0]]
        steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(cut, idx.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_image_positions_gradient_is_bit_reproducible():
    """Two identical backward passes with 2 threads give bit-identical pos2d gradients (indexing's backward does not),
    so a run repeats exactly."""
    cfg = PRESETS["tiny"]
    model = make(cfg)
    idx = rand_ids(cfg, 32, 160)  # large enough for the backward to run on both threads
    grads, threads = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(8):
            model.zero_grad()
            model(idx, targets=idx)[1].backward()
            grads.append(model.pos2d.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads) and grads[0].abs().sum() > 0


def test_left_padded_batch_equals_individual():
    """A left-padded batch (positions skip the pads) gives each sequence's logits alone, for the prompt and for
    further tokens decoded through the KV cache."""
    model = make(attn_impl="fused")
    a, b = rand_ids(TCFG, 1, 9, seed=2)[0], rand_ids(TCFG, 1, 14, seed=3)[0]
    batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), a]), b])           # (2, 14)
    kpm = torch.stack([torch.arange(14) >= 5, torch.ones(14, dtype=torch.bool)])       # (2, 14)
    cache = model.new_cache(2, 16)
    out = model(batch, cache=cache, key_padding_mask=kpm)[0]
    nxt = torch.tensor([[11], [12]])
    kpm2 = torch.cat([kpm, torch.ones(2, 1, dtype=torch.bool)], 1)
    out2 = model(nxt, cache=cache, key_padding_mask=kpm2)[0]
    ref_a = model(torch.cat([a, nxt[0]])[None])[0]
    ref_b = model(torch.cat([b, nxt[1]])[None])[0]
    torch.testing.assert_close(out[0, 5:], ref_a[0, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref_b[0, :14], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2[:, 0], torch.stack([ref_a[0, 9], ref_b[0, 14]]), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_attention_impls_agree():
    """The same model gives the same logits with the fused kernel, the naive reference and SDPA."""
    idx = rand_ids(TCFG, 2, 30)
    outs = [make(attn_impl=impl)(idx)[0] for impl in ("reference", "fused", "sdpa")]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-5)


def test_mot_routing():
    """MoT: perturbing the image expert leaves the logits of a text-only sequence bit-identical, but changes a
    sequence containing image codes; perturbing the text expert changes the text-only logits."""
    model = make(mot=True)
    text = torch.randint(0, TCFG.text_vocab, (1, 16), generator=torch.Generator().manual_seed(4))
    mixed = text.clone()
    mixed[0, 4:8] = TCFG.image_offset + torch.arange(4)
    t0, m0 = model(text)[0], model(mixed)[0]
    with torch.no_grad():
        for blk in model.blocks:
            for p in blk.experts[1].parameters():
                p.add_(torch.randn_like(p))
        model.norms[1].weight.mul_(3.0)
    assert torch.equal(model(text)[0], t0)
    assert not torch.allclose(model(mixed)[0], m0)
    with torch.no_grad():
        model.blocks[0].experts[0].gate_up.weight.add_(1.0)
    assert not torch.allclose(model(text)[0], t0)


def test_grad_checkpointing_same_gradients():
    """cfg.grad_ckpt recomputes blocks in backward but gives the same loss and gradients."""
    idx = rand_ids(TCFG, 2, 16)
    pixels = torch.rand(2, 3, TCFG.image_size, TCFG.image_size) * 2 - 1
    res = []
    for ckpt in (False, True):
        model = make(grad_ckpt=ckpt, mot=True).train()
        loss = model(idx, targets=idx.roll(-1, 1), pixels=pixels)[1]
        loss.backward()
        res.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(res[0][0], res[1][0])
    for g0, g1 in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- generation


def check_modality(cfg, tokens, start_in_block=False):
    """Walk one sequence: after vision_start exactly image_tokens codes then vision_end; no code elsewhere."""
    left = cfg.image_tokens if start_in_block else -1
    for t in tokens:
        if left > 0:
            assert t >= cfg.image_offset, f"text id {t} inside an image block"
            left -= 1
        elif left == 0:
            assert t == VE, "image block not closed right after its codes"
            left = -1
        else:
            assert t < cfg.image_offset, f"image code {t} outside an image block"
            if t == VS:
                left = cfg.image_tokens


def test_generate_obeys_modality_constraints():
    """Sampling from a random model (half of whose mass sits on image codes) while <|vision_start|> is forced after
    any of 25 text ids and three tokens after every <|vision_end|>: every image block has exactly h·w codes closed by
    <|vision_end|>, no code appears outside a block, forced tokens come in order and are marked not-sampled, and
    finished sequences are padded with stop_id."""
    model = make(mot=True)
    prompt = torch.randint(5, TCFG.text_vocab, (4, 6), generator=torch.Generator().manual_seed(0))
    prompt[3, -1] = VS  # this prompt ends inside an image block
    force = {**{t: [VS] for t in range(5, 30)}, VE: [40, 41, 42]}
    out = model.generate(prompt, 60, temperature=1.0, vision_start=VS, vision_end=VE, stop_id=STOP, force=force,
                         generator=torch.Generator().manual_seed(0))
    toks, sampled = out["tokens"], out["sampled"]
    assert toks.shape[0] == 4 and sampled.shape == (4, toks.shape[1] - 6) and torch.equal(toks[:, :6], prompt)
    n_blocks = n_forced = 0
    for b in range(4):
        gen = toks[b, 6:].tolist()
        check_modality(TCFG, gen, start_in_block=(b == 3))
        n_blocks += gen.count(VS)
        assert all(not sampled[b, i] for i, t in enumerate(gen) if t == VE)
        for i, t in enumerate(gen[:-1]):
            if 5 <= t < 30 and out["mask"][b, 7 + i]:  # a trigger: <|vision_start|> follows, forced
                assert gen[i + 1] == VS and not sampled[b, i + 1]
                n_forced += 1
            if t == VE and i + 3 < len(gen) and out["mask"][b, 9 + i]:
                assert gen[i + 1:i + 4] == [40, 41, 42] and not sampled[b, i + 1:i + 4].any()
        if STOP in gen:  # everything after the stop is padding, never sampled
            s = gen.index(STOP)
            assert all(t == STOP for t in gen[s:]) and not sampled[b, s + 1:].any()
            assert out["mask"][b, 6 + s] and not out["mask"][b, 6 + s + 1:].any()
    assert n_blocks >= 4 and n_forced >= 2


def test_generate_ban_and_turn_cap():
    """ban={id: n} keeps those ids from being sampled once n image blocks were generated; turn_cap finishes a sequence
    that samples more than turn_cap text tokens in one turn; a forced <|vision_start|> opens a block either way."""
    model = make()
    prompt = torch.randint(5, TCFG.text_vocab, (8, 4), generator=torch.Generator().manual_seed(4))
    kw = dict(temperature=1.0, vision_start=VS, vision_end=VE, stop_id=STOP, generator=torch.Generator().manual_seed(1))
    banned = list(range(10, 40))
    out = model.generate(prompt, 40, force={t: [VS] for t in range(40, 64)}, ban={t: 1 for t in banned}, **kw)
    n_after = 0
    for b in range(8):
        gen, samp = out["tokens"][b, 4:].tolist(), out["sampled"][b].tolist()
        first_ve = gen.index(VE) if VE in gen else len(gen)
        n_after += sum(s for s in samp[first_ve + 1:])
        assert not any(t in banned and s for t, s in zip(gen[first_ve + 1:], samp[first_ve + 1:]))
    assert n_after > 20  # plenty was sampled after the first block, none of it banned
    out = model.generate(prompt, 40, turn_cap=3, **kw)
    text = (out["tokens"][:, 4:] < TCFG.image_offset) & out["sampled"]
    assert text.sum(1).max() <= 4 and (out["mask"][:, 4:].sum(1) <= 4).all()


def test_generate_stops_at_max_seq_len():
    """A rollout budget longer than the positions left after the prompt (stage 2's 3 turns and 2 maps after a long
    question) is cut at max_seq_len instead of failing, and the tokens it does give equal an uncut run's."""
    model = make()
    T0 = TCFG.max_seq_len - 5
    prompt = torch.randint(5, TCFG.text_vocab, (2, T0), generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=0.0, vision_start=VS, vision_end=VE)
    out = model.generate(prompt, 50, **kw)
    assert out["tokens"].shape == (2, TCFG.max_seq_len + 1) and out["sampled"].shape == (2, 6)
    assert torch.equal(out["tokens"][:, :T0 + 3], model.generate(prompt, 3, **kw)["tokens"])


# greedy decoding = the allowed argmax of the full forward, with its logp: tests/test_course.py::test_ex6_greedy_is_the_allowed_argmax


def test_generate_left_padded_batch_equals_individual():
    """Greedy generation of a left-padded batch gives each prompt's tokens generated alone."""
    model = make(attn_impl="fused")
    a = torch.randint(5, TCFG.text_vocab, (4,), generator=torch.Generator().manual_seed(2))
    b = torch.randint(5, TCFG.text_vocab, (7,), generator=torch.Generator().manual_seed(3))
    batch = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), a]), b])
    kpm = torch.stack([torch.arange(7) >= 3, torch.ones(7, dtype=torch.bool)])
    kw = dict(temperature=0.0, vision_start=VS, vision_end=VE)
    out = model.generate(batch, 10, key_padding_mask=kpm, **kw)["tokens"][:, 7:]
    assert torch.equal(out[0], model.generate(a[None], 10, **kw)["tokens"][0, 4:])
    assert torch.equal(out[1], model.generate(b[None], 10, **kw)["tokens"][0, 7:])


# -------------------------------------------------------------------------------------------------- presets


def test_bagel_7b_size_on_meta_device():
    """bagel-7b built on the meta device: the parameter count equals the hand formula of a Qwen2.5-7B-shaped decoder
    (untied embeddings over text + image codes) plus the 2-D image positions and the patch embedding, ≈ 7.7 B; with
    MoT ≈ 14.3 B total and the same ≈ 7.7 B active."""
    cfg = PRESETS["bagel-7b"]
    with torch.device("meta"):
        dense, mot = UnifiedTransformer(cfg), UnifiedTransformer(replace(cfg, mot=True))
    C, Fh, L, V, hs = 3584, 18944, 28, 152064 + cfg.codebook_size, 128
    per_expert = C * (28 + 2 * 4) * hs + 28 * hs * C + 3 * C * Fh + 2 * C + 2 * hs  # qkv, o, SwiGLU, norms
    P = 3 * 16 * 16  # pixels of one 16×16 patch, the understanding path's input: Linear(P, 2C) → GELU → Linear(2C, C)
    patch = P * 2 * C + 2 * C + 2 * C * C + C
    assert dense.num_params() == 2 * V * C + cfg.image_tokens * C + patch + L * per_expert + C  # + 2-D image positions
    assert mot.num_params() == dense.num_params() + L * per_expert + C
    assert 7.5e9 < dense.num_params() < 7.9e9 and 13.9e9 < mot.num_params() < 14.5e9
    assert mot.num_params(active=True) == dense.num_params()


def test_memory_estimate_consistent():
    """estimate_memory counts the same parameters as the built model, 16 B/param of optimiser state, activations
    that grow linearly with batch tokens and shrink under activation checkpointing."""
    cfg = PRESETS["small"]
    m1, m2 = estimate_memory(cfg, 1000), estimate_memory(cfg, 2000)
    assert m1["params"] == UnifiedTransformer(cfg).num_params() and m1["weights+grads+adam"] == 16 * m1["params"]
    assert m2["activations"] == 2 * m1["activations"]
    assert estimate_memory(replace(cfg, grad_ckpt=True), 1000)["activations"] < m1["activations"]


def test_unreduced_loss_matches_mean_loss():
    """reduction="none" (output layer on the masked positions only) gives per-token losses whose mean is the
    ordinary masked mean loss, and the same gradients."""
    cfg = ModelConfig(text_vocab=50, codebook_size=16, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=64)
    torch.manual_seed(0)
    m = UnifiedTransformer(cfg)
    idx, tgt = torch.randint(0, cfg.vocab_size, (3, 11)), torch.randint(0, cfg.vocab_size, (3, 11))
    mask = torch.rand(3, 11) < 0.5
    _, mean = m(idx, tgt, mask)
    g1 = torch.autograd.grad(mean, m.lm_head.weight)[0]
    none, per_tok = m(idx, tgt, mask, reduction="none")
    assert none is None and per_tok.shape == (int(mask.sum()),)
    torch.testing.assert_close(per_tok.mean(), mean)
    torch.testing.assert_close(torch.autograd.grad(per_tok.mean(), m.lm_head.weight)[0], g1)
