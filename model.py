"""model.py — the unified model of COOPER: a VQ image tokenizer and one decoder-only transformer over text and image codes.

Paper mechanisms here (PAPER.md "Architecture", DESIGN.md "Sequence layout"):
- One token stream, one vocabulary: text ids | special ids in [0, text_vocab), image codes in [text_vocab, vocab_size).
  Input images and generated depth / segmentation maps are all sequences of codes from one shared VQ codebook.
- Qwen2.5-style decoder as in BAGEL: RoPE, RMSNorm, SwiGLU, grouped-query attention, QK-norm.
- 2-D position of image tokens (BAGEL adds a learned 2-D position embedding to its ViT and VAE tokens): every image
  code gets pos2d[row·w + col] of its place in the h×w grid on top of the sequence's 1-D RoPE.
- Mixture-of-Transformers (BAGEL, `mot=True`): image-code tokens use their own norms, QKV/O projections and MLP;
  attention over the whole sequence is shared.
- Auxiliary Modality Generation at inference: `generate` samples exactly h×w image codes after <|vision_start|> and
  then forces <|vision_end|>; image codes are masked everywhere else.

Deviations from the paper, and why:
- Images are discrete VQ codes (Chameleon-style early fusion) instead of BAGEL's SigLIP ViT + VAE latents + rectified
  flow: one next-token loss serves text and images, which keeps the code small and trainable on a CPU.
- Attention is causal everywhere, image blocks included (BAGEL uses full attention inside a noised image block),
  because codes are generated one at a time.
- No pretrained weights: everything is trained from scratch at small scale.
- The VQ tokenizer (LlamaGen-like l2-normalised 8-d codebook) adds a dead-code restart that also initialises the
  codebook from the first batch, folds 4×4 pixels into channels first and has no GroupNorm: on a 2-core CPU it has
  ~2-3 minutes to train, and without the restart most codes stayed unused (14 % usage vs 96 % measured; an EMA
  codebook with the same budget collapsed to < 1 %).

Shape legend: B batch, T tokens (Tk keys incl. cache), C width, nh query heads, nkv key/value heads, hs head size,
V vocabulary, K codebook size, D code dimension, h×w code grid, H×W pixels.

    python model.py --preset bagel-7b      # parameter count + memory estimate, built on the meta device
    python model.py --bench                # tokens/s, KV-cache speed-up, FLOP/s share of the matmul peak
Tests: python -m pytest tests/test_model.py
"""
import argparse
import contextlib
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels


@dataclass
class ModelConfig:
    # image tokenizer (VQ)
    image_size: int = 64           # H = W of every image the tokenizer sees
    vq_downsample: int = 8         # pixels per code side; grid = image_size // vq_downsample
    codebook_size: int = 1024      # K
    codebook_dim: int = 8          # D, low-dimensional and l2-normalised (LlamaGen)
    vq_patch: int = 4              # pixels folded into channels before the first conv (pixel-unshuffle)
    vq_channels: int = 64          # conv width after the pixel-unshuffle
    vq_channel_mult: tuple = (1, 2)  # width multiplier per resolution; vq_downsample = vq_patch · 2^(len − 1)
    vq_beta: float = 0.25          # weight of the commitment term
    vq_restart: float = 0.03       # restart codes picked less than this often per batch (running mean); 0 = off
    # transformer
    text_vocab: int = 1024         # overwritten at run time from the text tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 128
    ffn_hidden: int = 384
    rope_theta: float = 10000.0
    qk_norm: bool = True
    mot: bool = False
    max_seq_len: int = 512
    attn_impl: str = "fused"       # kernels.attention impl: "fused" | "reference" | "sdpa"
    grad_ckpt: bool = False        # recompute each block in the backward pass (activation checkpointing)
    tie_embeddings: bool = False   # Qwen2.5-7B keeps input and output embeddings separate
    patch_embed: bool = True       # understanding path: a learned embedding of each input-image patch's pixels is
                                   # added to its code's embedding (BAGEL reads input images with a ViT)
    norm_eps: float = 1e-6

    @property
    def grid(self):                # h = w of the code grid
        return self.image_size // self.vq_downsample

    @property
    def image_tokens(self):        # codes per image, h·w
        return self.grid ** 2

    @property
    def image_offset(self):        # id of image code 0
        return self.text_vocab

    @property
    def vocab_size(self):          # V
        return self.text_vocab + self.codebook_size


PRESETS = {
    # CPU, tests and the default `python train.py --stage 1`: 1.2 M transformer params, 64 codes per 64×64 image.
    # VQ (1.0 M params): the default 1,500 steps of 16 images take ~1 min 45 s on an idle 2-core CPU and reach RGB PSNR
    # 26.9 dB, depth AbsRel 0.042, seg accuracy 0.981, usage 98 % (README, measured results).
    "tiny": ModelConfig(),
    # CPU for an hour or one small GPU for minutes: 15 M params, same 8×8 code grid, wider tokenizer (2,048 codes).
    "small": ModelConfig(vq_patch=2, vq_channels=64, vq_channel_mult=(1, 2, 2), codebook_size=2048, n_layer=8, n_head=8, n_kv_head=4, n_embd=384,
                         ffn_hidden=1024, max_seq_len=1024),
    # one to eight GPUs for hours: ~110 M params, 128×128 images as 16×16 codes (256 per image).
    "base": ModelConfig(image_size=128, vq_patch=2, vq_channels=128, vq_channel_mult=(1, 2, 2), vq_downsample=8,
                        codebook_size=8192, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, ffn_hidden=2048,
                        max_seq_len=2048, rope_theta=1e5),
    # Qwen2.5-7B decoder dims as in BAGEL-7B (PAPER.md): ≈ 7.6 B params, ≈ 14 B with mot=True; needs many GPUs
    # (FSDP, bf16, grad_ckpt), ~120 GB of weights + Adam state in fp32 before activations.
    "bagel-7b": ModelConfig(image_size=256, vq_patch=2, vq_channels=128, vq_channel_mult=(1, 2, 2, 4), vq_downsample=16,
                            codebook_size=16384, text_vocab=152064, n_layer=28, n_head=28, n_kv_head=4, n_embd=3584,
                            ffn_hidden=18944, rope_theta=1e6, max_seq_len=8192, grad_ckpt=True),
}


# ======================================================================================================================
# VQ image tokenizer (DESIGN.md difference 1; EQUATIONS.md "VQ-VAE")


class ResBlock(nn.Module):
    """x + conv3×3(SiLU(conv3×3(SiLU(x)))), at constant width (no normalisation: cheaper on a CPU, and these
    shallow nets train stably without it)."""

    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.net(x)


class VQTokenizer(nn.Module):
    """Conv encoder → l2-normalised low-dimensional codebook → conv decoder. One tokenizer serves RGB, depth-as-RGB
    and segmentation-as-RGB images (all in [-1, 1]). The first step folds vq_patch×vq_patch pixels into channels
    (pixel-unshuffle) so that no convolution runs at full resolution; each later stage halves H and W."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p, ch = cfg.vq_patch, [cfg.vq_channels * m for m in cfg.vq_channel_mult]
        assert p * 2 ** (len(ch) - 1) == cfg.vq_downsample, "vq_downsample = vq_patch · 2^(len(vq_channel_mult) − 1)"
        enc = [nn.PixelUnshuffle(p), nn.Conv2d(3 * p * p, ch[0], 3, padding=1)]  # (B, 3p², H/p, W/p) -> width ch[0]
        for i in range(len(ch)):  # a residual block per resolution, then a stride-2 conv to the next one
            enc += [ResBlock(ch[i])] + ([nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1)] if i + 1 < len(ch) else [])
        self.encoder = nn.Sequential(*enc, nn.SiLU(), nn.Conv2d(ch[-1], cfg.codebook_dim, 1))  # -> (B, D, h, w)
        dec = [nn.Conv2d(cfg.codebook_dim, ch[-1], 3, padding=1)]
        for i in reversed(range(len(ch))):  # mirror: residual block, then nearest 2× upsample + conv
            dec += [ResBlock(ch[i])]
            if i > 0:
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch[i], ch[i - 1], 3, padding=1)]
        dec += [nn.SiLU(), nn.Conv2d(ch[0], 3 * p * p, 3, padding=1), nn.PixelShuffle(p)]  # back to (B, 3, H, W)
        self.decoder = nn.Sequential(*dec)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        nn.init.normal_(self.codebook.weight)
        # running (EMA) count of how often each code is picked per batch; drives the dead-code restart. Starting at 0
        # makes the first training batch place every code on an encoder output (a data-dependent initialisation).
        self.register_buffer("code_count", torch.zeros(cfg.codebook_size))

    def embed(self, images):
        """Encoder output, l2-normalised per code vector: (B,3,H,W) -> z_e (B,D,h,w) on the unit sphere."""
        return F.normalize(self.encoder(images), dim=1)

    def quantize(self, z_e):
        """Nearest code by cosine; returns (z_q with straight-through gradient, codes (B,h,w), losses)."""
        B, D, h, w = z_e.shape
        z = z_e.permute(0, 2, 3, 1).reshape(-1, D)                       # (B·h·w, D)
        learning = self.training and torch.is_grad_enabled()             # encode() never changes the codebook
        if learning and self.cfg.vq_restart > 0:
            self.restart_dead_codes(z.detach())
        # exercise 2 begin: VQ quantisation
        e = F.normalize(self.codebook.weight, dim=1)                     # (K, D) unit codes
        codes = (z.detach() @ e.t()).argmax(dim=1)                       # argmin ‖z − e_k‖² = argmax z·e_k on the sphere
        # exercise 2 end
        if learning:
            n = torch.bincount(codes, minlength=e.shape[0]).float()     # (K,) picks in this batch
            self.code_count.mul_(0.95).add_(n, alpha=0.05)
        # exercise 2 begin: VQ quantisation
        z_q = e[codes]                                                   # (B·h·w, D)
        # VQ-VAE loss (van den Oord 2017), both terms before the straight-through line:
        codebook = F.mse_loss(z_q, z.detach())                           # ‖sg[z_e] − z_q‖²: moves only the codebook
        commit = self.cfg.vq_beta * F.mse_loss(z, z_q.detach())          # β‖z_e − sg[z_q]‖²: moves only the encoder
        z_q = z + (z_q - z).detach()                                     # straight-through: forward z_q, backward identity
        # exercise 2 end
        z_q = z_q.view(B, h, w, D).permute(0, 3, 1, 2)                   # (B, D, h, w)
        return z_q, codes.view(B, h, w), {"codebook": codebook, "commit": commit}

    @torch.no_grad()
    def restart_dead_codes(self, z):
        """Dead-code restart: every code whose running pick count fell below cfg.vq_restart is moved onto a random
        encoder output of the current batch (z (N, D)), so the whole codebook stays in use."""
        dead = (self.code_count < self.cfg.vq_restart).nonzero().squeeze(1)  # (n_dead,)
        if len(dead):
            pick = torch.randint(0, z.shape[0], (len(dead),), device=z.device)
            new = z[pick]  # (n_dead, D)
            if torch.distributed.is_initialized():  # under DDP the counts are rank 0's (a buffer DDP broadcasts),
                torch.distributed.broadcast(new, 0)  # so all ranks restart the same codes: use rank 0's vectors too
            self.codebook.weight[dead] = new
            self.code_count[dead] = 1.0

    def forward(self, images):
        """images (B,3,H,W) in [-1,1] -> (recon (B,3,H,W), losses {rec, codebook, commit, loss}, codes (B,h,w))."""
        z_q, codes, losses = self.quantize(self.embed(images))
        recon = self.decoder(z_q)
        losses["rec"] = F.mse_loss(recon, images)                        # reconstruction term of the VQ-VAE loss
        losses["loss"] = losses["rec"] + losses["codebook"] + losses["commit"]
        return recon, losses, codes

    @torch.no_grad()
    def encode(self, images):
        """images (B,3,H,W) in [-1,1] -> codes long (B,h,w)."""
        return self.quantize(self.embed(images))[1]

    @torch.no_grad()
    def decode(self, codes):
        """codes long (B,h,w) -> images (B,3,H,W) clamped to [-1,1]."""
        e = F.normalize(self.codebook.weight, dim=1)[codes]              # (B, h, w, D)
        return self.decoder(e.permute(0, 3, 1, 2)).clamp(-1, 1)          # (B, 3, H, W)

    @staticmethod
    def codebook_stats(codes, codebook_size):
        """Usage = share of the K codes used at least once; perplexity = exp(−Σ p̄_k log p̄_k) of the code histogram."""
        p = torch.bincount(codes.flatten(), minlength=codebook_size).float()
        p = p / p.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"usage": (p > 0).float().mean().item(), "perplexity": entropy.exp().item()}


# ======================================================================================================================
# Unified transformer (PAPER.md "Architecture": Qwen2.5 decoder + MoT)


def rope_tables(cfg: ModelConfig, device=None):
    """cos/sin tables of rotary position embedding, (max_seq_len, hs/2) each."""
    hs = cfg.n_embd // cfg.n_head
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)  # (L, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """RoPE (rotate-half form): x (B, n, T, hs), cos/sin (B, T, hs/2) gathered at each token's position."""
    # exercise 3 begin: RoPE and GQA attention
    x1, x2 = x.float().chunk(2, dim=-1)                                  # (B, n, T, hs/2) each
    cos, sin = cos[:, None], sin[:, None]                                # (B, 1, T, hs/2) broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)
    # exercise 3 end


class Expert(nn.Module):
    """The per-modality weights of one block: norms, QKV/O projections with QK-norm, and a SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hs = cfg.n_embd // cfg.n_head
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * hs, bias=False)
        self.q_norm = nn.RMSNorm(hs, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hs, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.o = nn.Linear(cfg.n_head * hs, cfg.n_embd, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        self.sizes = (cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs)
        self.hs = hs

    def qkv_proj(self, x):
        """x (N, C) -> q|k|v (N, (nh+2nkv)·hs), with QK-norm (per head RMSNorm of q and k, as in BAGEL)."""
        q, k, v = self.qkv(self.attn_norm(x)).split(self.sizes, dim=-1)
        q = self.q_norm(q.unflatten(-1, (-1, self.hs))).flatten(-2)      # (N, nh·hs)
        k = self.k_norm(k.unflatten(-1, (-1, self.hs))).flatten(-2)      # (N, nkv·hs)
        return torch.cat([q, k, v], dim=-1)

    def mlp(self, x):
        """SwiGLU: down(silu(gate(x)) * up(x)) on the RMS-normalised input."""
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block; with MoT two experts (0 = text/understanding, 1 = image generation) share attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(2 if cfg.mot else 1))

    def route(self, fn, x, is_img):
        """Mixture-of-Transformers routing by token id: fn(expert, x_subset) on text and on image tokens separately.
        x (B,T,Cin), is_img (B,T) bool -> (B,T,Cout)."""
        if len(self.experts) == 1:
            return fn(self.experts[0], x)
        flat, m = x.flatten(0, 1), is_img.flatten()                      # (B·T, Cin), (B·T,)
        y_txt, y_img = fn(self.experts[0], flat[~m]), fn(self.experts[1], flat[m])
        out = flat.new_empty(flat.shape[0], y_txt.shape[-1])             # (B·T, Cout)
        out[~m], out[m] = y_txt, y_img
        return out.view(*x.shape[:2], -1)                                # (B, T, Cout)

    def forward(self, x, is_img, cos, sin, cache, layer, kpm):
        cfg, hs = self.cfg, self.experts[0].hs
        B, T, C = x.shape
        qkv = self.route(Expert.qkv_proj, x, is_img)                     # (B, T, (nh+2nkv)·hs)
        q, k, v = qkv.split(self.experts[0].sizes, dim=-1)
        q = q.view(B, T, cfg.n_head, hs).transpose(1, 2)                 # (B, nh, T, hs)
        k = k.view(B, T, cfg.n_kv_head, hs).transpose(1, 2)              # (B, nkv, T, hs)
        v = v.view(B, T, cfg.n_kv_head, hs).transpose(1, 2)              # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)                             # (B, nkv, Tk, hs) incl. the cached keys
        # shared attention over both modalities; GQA, bottom-right causal alignment under a cache, and zero output
        # for left-pad query rows that see no key all live in kernels.attention
        y = kernels.attention(q, k, v, causal=True, key_padding_mask=kpm, impl=cfg.attn_impl)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * hs)             # (B, T, nh·hs)
        x = x + self.route(lambda e, t: e.o(t), y, is_img)
        return x + self.route(Expert.mlp, x, is_img)


class KVCache:
    """Preallocated keys/values of every layer, (n_layer, B, nkv, max_len, hs), and a length pointer."""

    def __init__(self, cfg: ModelConfig, batch_size, max_len, device=None, dtype=torch.float32):
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.last_text = torch.full((batch_size,), -1, dtype=torch.long, device=device)  # for the 2-D image positions

    def update(self, layer, k, v):
        """Write the new keys/values (B, nkv, T, hs) after the cached ones; return all of them (B, nkv, Tk, hs)."""
        L, T = self.length, k.shape[2]
        assert L + T <= self.k.shape[3], "KV cache is full"
        self.k[layer, :, :, L:L + T] = k
        self.v[layer, :, :, L:L + T] = v
        return self.k[layer, :, :, :L + T], self.v[layer, :, :, :L + T]


class PatchEmbed(nn.Module):
    """The understanding path (BAGEL reads input images with a SigLIP ViT, apart from the generation latents): each
    vq_downsample × vq_downsample RGB patch of the input image → Linear → GELU → Linear, added to the embedding of the
    code at the same place. Codes alone make a from-scratch model learn what each of K codes looks like from answer
    labels; pixels give it colour and shading directly (README, "Making the model see")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.p = cfg.vq_downsample
        self.fc1 = nn.Linear(3 * self.p * self.p, 2 * cfg.n_embd)
        self.fc2 = nn.Linear(2 * cfg.n_embd, cfg.n_embd)

    def forward(self, pixels, is_img, k):
        """pixels (B,3,H,W), is_img (B,T), k (B,T) place in the grid -> (B,T,C), non-zero on the first image block."""
        x = F.unfold(pixels.to(self.fc1.weight.dtype), self.p, stride=self.p).transpose(1, 2)  # (B, h·w, 3·p·p)
        feats = self.fc2(F.gelu(self.fc1(x)))                            # (B, h·w, C) raster order, like the codes
        start = is_img & ~F.pad(is_img[:, :-1], (1, 0))                   # (B, T) first code of each image block
        first = is_img & (start.long().cumsum(1) == 1)                    # (B, T) codes of the first block in idx
        out = torch.gather(feats, 1, k[..., None].expand(-1, -1, feats.shape[-1]))  # (B, T, C) feature of place k
        return torch.where(first[..., None], out, 0.0)


class UnifiedTransformer(nn.Module):
    """Decoder-only transformer over text ids | special ids | image codes (one embedding table, one LM head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos2d = nn.Parameter(torch.zeros(cfg.image_tokens, cfg.n_embd))  # learned 2-D position of each image code
        self.patch = PatchEmbed(cfg) if cfg.patch_embed else None  # understanding path for the input image
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps) for _ in range(2 if cfg.mot else 1))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg, device=self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style: shrink the residual-branch outputs with depth
            if name.endswith(("o.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self, active=False):
        """Parameter count; active=True counts one expert per block (what one token uses under MoT)."""
        n = sum(p.numel() for p in self.parameters())
        if active and self.cfg.mot:
            n -= sum(p.numel() for b in self.blocks for p in b.experts[1].parameters())
            n -= sum(p.numel() for p in self.norms[1].parameters())
        return n

    def new_cache(self, batch_size, max_len, device=None, dtype=torch.float32):
        return KVCache(self.cfg, batch_size, max_len, device=device, dtype=dtype)

    def forward(self, idx, targets=None, loss_mask=None, cache=None, key_padding_mask=None, reduction="mean",
                pixels=None, logits_at=None):
        """idx (B,T) -> (logits (B,T,V), loss). targets[t] is the token after idx[t]; the loss is the mean
        cross-entropy over positions where loss_mask is True (all positions when loss_mask is None).
        reduction="none" returns (None, per-token losses (N_masked,) in row-major order of the mask) and runs the
        output layer on the masked positions only (training: a third of the tiny model's FLOPs are the output layer).
        key_padding_mask (B,Tk) bool, True = real token, covers cached keys + idx.
        pixels (B,3,H,W) in [-1,1]: the input image of each row; with cfg.patch_embed its patch embeddings are added to
        the codes of the first image block in idx (the understanding path; generated maps stay codes only).
        logits_at (B,T) bool: logits (N_true, V) of those positions only, in row-major order (the prefill of generation
        needs the last position's alone; GRPO the sampled text tokens': the output layer skips the rest)."""
        cfg = self.cfg
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if key_padding_mask is not None:
            assert key_padding_mask.shape == (B, past + T), "key_padding_mask covers cached keys and new tokens"
            # RoPE position = number of real tokens before this one, so left pads do not shift a sequence
            pos = (key_padding_mask.long().cumsum(1)[:, past:] - 1).clamp(min=0)  # (B, T)
        else:
            pos = torch.arange(past, past + T, device=idx.device).expand(B, T)  # (B, T) continue after the cache
        assert past + T <= cfg.max_seq_len, "sequence longer than max_seq_len"
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]                # (B, T, hs/2)
        is_img = idx >= cfg.image_offset                                 # (B, T) MoT routing by token id
        k = self.image_index(idx, is_img, past, cache)                   # (B, T) place of each code in its h×w grid
        # 2-D position of image codes; F.embedding, not pos2d[k]: its CPU backward sums repeated indices in a fixed
        # order (bit-reproducible runs)
        x = self.embed(idx) + torch.where(is_img[..., None], F.embedding(k, self.pos2d), 0.0)  # (B, T, C)
        if pixels is not None and self.patch is not None:
            x = x + self.patch(pixels, is_img, k)                        # understanding path (BAGEL's ViT input)
        for i, block in enumerate(self.blocks):
            args = (x, is_img, cos, sin, cache, i, key_padding_mask)
            if cfg.grad_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)        # activation checkpointing: recompute in bwd
            else:
                x = block(*args)
        if cache is not None:
            cache.length += T
        x = self.norms[0](x) if not cfg.mot else torch.where(is_img[..., None], self.norms[1](x), self.norms[0](x))
        mask = None if targets is None else torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask
        if reduction == "none":
            # output layer only where there is a target: (N_masked, C) -> (N_masked, V) -> (N_masked,)
            return None, F.cross_entropy(self.lm_head(x[mask]).float(), targets[mask], reduction="none")
        if logits_at is not None:
            return self.lm_head(x[logits_at]), None                      # (N_true, C) -> (N_true, V)
        logits = self.lm_head(x)                                         # (B, T, V)
        if targets is None:
            return logits, None
        # next-token cross-entropy over the masked positions only
        loss = F.cross_entropy(logits[mask].float(), targets[mask])     # (N_masked, V) vs (N_masked,)
        return logits, loss

    def image_index(self, idx, is_img, past, cache):
        """Place k of every image code in its block's h×w grid (raster order; BAGEL's 2-D position of image tokens); 0 for
        text. k = t - (position of the last non-image token before t) - 1; the cache carries that position across
        decoding steps."""
        t = torch.arange(past, past + idx.shape[1], device=idx.device)  # (T,) absolute positions
        last = torch.where(is_img, -1, t)                                # (B, T) own position for text tokens
        if cache is not None:
            last = torch.cat([cache.last_text[:, None], last], dim=1)    # (B, 1 + T) the cached one first
        last = last.cummax(dim=1).values[:, -idx.shape[1]:]              # (B, T) last text position at or before t
        if cache is not None:
            cache.last_text = last[:, -1]
        return torch.where(is_img, (t - last - 1).clamp(0, self.cfg.image_tokens - 1), 0)  # (B, T)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, *, temperature=1.0, top_k=None, vision_start, vision_end, stop_id=None,
                 key_padding_mask=None, force=None, ban=None, turn_cap=None, generator=None, pixels=None):
        """Sample up to max_new_tokens after idx (B,T0) (left-padded when key_padding_mask is given) with a KV cache; all
        per-sequence bookkeeping is held in (B,) tensors, so a step costs the same Python for 1 or 256 sequences.

        Modality constraints (Auxiliary Modality Generation): after <|vision_start|> exactly cfg.image_tokens image codes
        are sampled from image-code logits only, then <|vision_end|> is forced; elsewhere image codes are masked.
        force: {trigger id: [ids]}: after a sequence emits a trigger (sampled or forced) those ids are fed as its next
        tokens, not sampled (held back while an image block is open). The stage-2 runtime forces <|vision_start|> after a
        closing tool tag and the reflection prompt after <|vision_end|>.
        ban: {id: n}: that id is never sampled once a sequence has generated n image blocks (n = 0: never; e.g. tool tags
        after the last map a rollout may draw). turn_cap: a sequence that samples more than turn_cap text tokens in one turn
        (since the start or its last generated image block) is finished there.
        A sequence that emits stop_id outside an image block is finished and padded with stop_id; generation ends early
        once all are finished (N ≤ max_new_tokens).
        Returns dict(tokens (B,T0+N), sampled (B,N) bool, logps (B,N): log-prob of each sampled token under the
        temperature-scaled model distribution before masking (0 where not sampled), mask (B,T0+N): real tokens)."""
        cfg, dev, (B, T0) = self.cfg, idx.device, idx.shape
        max_new_tokens = min(max_new_tokens, cfg.max_seq_len - T0 + 1)  # positions left (the last token is not fed back)
        kpm = torch.ones(B, T0, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask.bool()
        V, n_img, rows = cfg.vocab_size, cfg.image_tokens, torch.arange(B, device=dev)
        is_code = torch.arange(V, device=dev) >= cfg.image_offset              # (V,)
        # modality state from the prompt: codes still owed in an open image block (-1 = outside one)
        t = torch.arange(T0, device=dev)
        last_vs = torch.where((idx == vision_start) & kpm, t, -1).amax(1)     # (B,) last <|vision_start|>, -1 if none
        last_ve = torch.where((idx == vision_end) & kpm, t, -1).amax(1)       # (B,)
        codes_after = ((idx >= cfg.image_offset) & kpm & (t > last_vs[:, None])).sum(1)  # (B,)
        left = torch.where(last_vs > last_ve, n_img - codes_after, -1)        # (B,)
        # forced tokens: a table trigger id -> row of `seqs`; each sequence holds a queue (its row) and a read pointer
        force = force or {}
        trig = torch.full((V,), -1, dtype=torch.long, device=dev)
        L = max([len(v) for v in force.values()], default=1)
        seqs = torch.zeros(max(1, len(force)), L, dtype=torch.long, device=dev)
        lens = torch.zeros(max(1, len(force)), dtype=torch.long, device=dev)
        for r, (k, v) in enumerate(force.items()):
            trig[k], lens[r] = r, len(v)
            seqs[r, :len(v)] = torch.tensor(v, dtype=torch.long, device=dev)
        queue, qpos, qlen = seqs[torch.zeros(B, dtype=torch.long, device=dev)], torch.zeros_like(left), torch.zeros_like(left)
        limit = torch.full((V,), max_new_tokens + 1, dtype=torch.long, device=dev)  # maps drawn before an id is banned
        for k, n in (ban or {}).items():
            limit[k] = n
        blocks, run = torch.zeros_like(left), torch.zeros_like(left)  # image blocks generated; text tokens in a row
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        pad = stop_id if stop_id is not None else 0
        cache = self.new_cache(B, T0 + max_new_tokens, device=dev, dtype=self.embed.weight.dtype)
        last_pos = (torch.arange(T0, device=dev) == T0 - 1).expand(B, T0)  # (B, T0): the prefill's last position only
        logits = self(idx, cache=cache, key_padding_mask=kpm, pixels=pixels, logits_at=last_pos)[0][:, None]  # (B, 1, V)
        out_tok, out_sampled, out_logp, out_mask = [], [], [], []
        for step in range(max_new_tokens):
            last = logits[:, -1].float()                                      # (B, V)
            scaled = last / temperature if temperature > 0 else last
            # exercise 6 begin: the modality constraint of decoding
            allowed = (left > 0)[:, None] == is_code[None, :]                 # (B, V) modality constraint
            allowed &= blocks[:, None] < limit[None, :]                       # (B, V) banned ids
            # exercise 6 end
            masked = scaled.masked_fill(~allowed, float("-inf"))
            if top_k is not None:
                kth = masked.topk(min(top_k, V), dim=-1).values[:, -1:]      # (B, 1)
                masked = masked.masked_fill(masked < kth, float("-inf"))
            if temperature > 0:
                nxt = torch.multinomial(masked.softmax(-1), 1, generator=generator).squeeze(1)  # (B,)
            else:
                nxt = masked.argmax(-1)                                       # greedy
            logp = scaled.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)  # (B,)
            close = left == 0                                                 # image block full: close it
            queued = (qpos < qlen) & (left < 0)                               # forced tokens wait outside images
            nxt = torch.where(close, vision_end, torch.where(queued, queue[rows, qpos.clamp(max=L - 1)], nxt))
            nxt = torch.where(done, pad, nxt)
            sampled = ~(close | queued | done)
            qpos = qpos + (queued & ~done).long()
            real = ~done
            # advance the state of the live sequences
            in_block = left > 0
            left = torch.where(nxt == vision_start, n_img, torch.where(nxt == vision_end, -1, left - (in_block & is_code[nxt]).long()))
            left = torch.where(done, -1, left)
            blocks = blocks + (real & close).long()                                  # a generated image block was closed
            run = torch.where(real & close, 0, run + (sampled & ~is_code[nxt]).long())  # text the model wrote since the map
            fired = real & (trig[nxt] >= 0)                                   # a trigger: load its forced tokens
            r = trig[nxt].clamp(min=0)
            queue = torch.where(fired[:, None], seqs[r], queue)
            qlen, qpos = torch.where(fired, lens[r], qlen), torch.where(fired, 0, qpos)
            done = done | (real & (left < 0) & (nxt == pad) & (stop_id is not None))
            if turn_cap is not None:
                done = done | (real & (run > turn_cap))
            out_tok.append(nxt)
            out_sampled.append(sampled)
            out_logp.append(torch.where(sampled, logp, torch.zeros_like(logp)))
            out_mask.append(real)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            kpm = torch.cat([kpm, real[:, None]], dim=1)                      # (B, Tk+1)
            logits, _ = self(nxt[:, None], cache=cache, key_padding_mask=kpm)
        tokens = torch.cat([idx, torch.stack(out_tok, 1)], dim=1)             # (B, T0+N)
        mask = torch.cat([kpm[:, :T0], torch.stack(out_mask, 1)], dim=1)       # (B, T0+N)
        return {"tokens": tokens, "sampled": torch.stack(out_sampled, 1), "logps": torch.stack(out_logp, 1),
                "mask": mask}


# ======================================================================================================================
# Size, memory and speed (command line)


def estimate_memory(cfg: ModelConfig, batch_tokens, dtype=torch.bfloat16):
    """Rough training memory in bytes for one step over batch_tokens tokens (per data-parallel replica, unsharded):
    fp32 weights + fp32 grads + AdamW moments (16 B/param), activations saved for backward in `dtype` (one expert's
    worth per token; with grad_ckpt only each block's input plus one block recomputed), logits in `dtype` plus their
    fp32 copy for the loss. Also the inference weights in `dtype` and the KV cache per token."""
    with torch.device("meta"):
        n = UnifiedTransformer(cfg).num_params()
    b, C, F_, hs, L = torch.finfo(dtype).bits // 8, cfg.n_embd, cfg.ffn_hidden, cfg.n_embd // cfg.n_head, cfg.n_layer
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * hs
    # per token per block: norm inputs/outputs 4C, qkv out, normed + roped q|k, attention out and o-proj input,
    # SwiGLU gate|up, silu(gate) and the product
    per_block = 4 * C + qkv + 2 * (cfg.n_head + cfg.n_kv_head) * hs + 2 * cfg.n_head * hs + 4 * F_
    act_elems = batch_tokens * (L * C + per_block if cfg.grad_ckpt else L * per_block)
    out = {"params": n, "weights+grads+adam": 16 * n, "activations": act_elems * b,
           "logits": batch_tokens * cfg.vocab_size * (b + 4)}
    out["train_total"] = out["weights+grads+adam"] + out["activations"] + out["logits"]
    out["inference_weights"] = n * b
    out["kv_cache_per_token"] = 2 * L * cfg.n_kv_head * hs * b
    return out


def _median_time(fn, repeats, sync=lambda: None):
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(device="cpu"):
    """Tokens/s forward+backward (fused vs SDPA attention), KV-cache speed-up, FLOP/s share of the matmul rate.
    On CUDA the step runs under bf16 autocast (as train.py does), the rate is a bf16 4096³ matmul's, and `base` is added."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    n = 4096 if cuda else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16 if cuda else torch.float32) for _ in range(2))
    # the matmul rate is measured again right before each row: on a shared CPU the load changes by the minute
    peak = lambda: 2 * n ** 3 / _median_time(lambda: a @ b, 15, sync)
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"training step fwd+bwd, {where}; FLOP share vs a {n}³ {a.dtype} matmul (median)")
    print(f"{'preset':8s} {'attn':6s} {'B×T':>8s} {'tok/s':>8s} {'GFLOP/s':>8s} {'matmul GFLOP/s':>15s} {'share':>6s}")
    shapes = [("tiny", (8, 160)), ("small", (4, 256))] + ([("small", (32, 512)), ("base", (16, 1024))] if cuda else [])
    for name, (B, T) in shapes:
        for impl in ("fused", "sdpa"):
            cfg = replace(PRESETS[name], attn_impl=impl)
            model = UnifiedTransformer(cfg).to(device)
            idx = torch.randint(0, cfg.vocab_size, (B, T), device=device)

            def step():
                model.zero_grad(set_to_none=True)
                with amp():
                    loss = model(idx, targets=idx)[1]
                loss.backward()
            step()
            rate = peak()
            dt = _median_time(step, 7, sync)
            # training FLOPs/token: 6 × matmul params (embedding lookup excluded) + causal attention 6·L·C·T
            n_mm = model.num_params() - model.embed.weight.numel()
            flops = (6 * n_mm + 6 * cfg.n_layer * cfg.n_embd * T) * B * T / dt
            print(f"{name:8s} {impl:6s} {f'{B}×{T}':>8s} {B * T / dt:8.0f} {flops / 1e9:8.1f} {rate / 1e9:15.1f} "
                  f"{100 * flops / rate:5.1f}%")
    print("\nKV cache: 256 new tokens after a 16-token prompt, batch 1, greedy")
    for name in ("tiny", "small"):
        model = UnifiedTransformer(PRESETS[name]).to(device).eval()
        prompt = torch.randint(0, model.cfg.text_vocab, (1, 16), device=device)

        @torch.no_grad()
        def cached():
            cache = model.new_cache(1, 16 + 256, device=device)
            logits, _ = model(prompt, cache=cache)
            for _ in range(256):
                logits, _ = model(logits[:, -1:].argmax(-1), cache=cache)

        @torch.no_grad()
        def recompute():
            seq = prompt
            for _ in range(256):
                seq = torch.cat([seq, model(seq)[0][:, -1:].argmax(-1)], dim=1)
        tc, tr = _median_time(cached, 3, sync), _median_time(recompute, 3, sync)
        print(f"{name:8s} cached {tc:6.2f} s   recompute {tr:6.2f} s   speed-up {tr / tc:5.1f}×")
    print("\nbatched sampling with generate() (the GRPO rollouts' engine): 160 new tokens after an 80-token prompt,"
          " temperature 1, a forced image block after every 40th token id")
    model = UnifiedTransformer(PRESETS["tiny"]).to(device).eval()
    for B in (64, 256):
        prompt = torch.randint(20, model.cfg.text_vocab, (B, 80), device=device)
        g = torch.Generator(device=device).manual_seed(0)
        run = lambda: model.generate(prompt, 160, temperature=1.0, vision_start=3, vision_end=4, generator=g,
                                     force={40: [3]})
        t = _median_time(run, 3, sync)
        print(f"tiny     batch {B:4d}: {B * 160 / t:8.0f} tokens/s ({t:5.2f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--mot", action="store_true", help="Mixture-of-Transformers (image-code expert)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per step for the memory estimate")
    p.add_argument("--bench", action="store_true", help="run the speed benchmark instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --bench")
    args = p.parse_args()
    if args.bench:
        return bench(torch.device(args.device))
    cfg = replace(PRESETS[args.preset], mot=args.mot or PRESETS[args.preset].mot)
    with torch.device("meta"):  # no memory is allocated: shapes only
        model = UnifiedTransformer(cfg)
    gib = 2 ** 30
    mem = estimate_memory(cfg, args.batch_tokens)
    print(f"preset {args.preset} (mot={cfg.mot}): {model.num_params() / 1e6:,.1f} M parameters, "
          f"{model.num_params(active=True) / 1e6:,.1f} M active per token")
    print(f"vocab {cfg.vocab_size} = {cfg.text_vocab} text + {cfg.codebook_size} image codes; "
          f"{cfg.image_tokens} codes per {cfg.image_size}×{cfg.image_size} image")
    print(f"training, {args.batch_tokens} tokens/step, bf16 activations, grad_ckpt={cfg.grad_ckpt}:")
    for k in ("weights+grads+adam", "activations", "logits", "train_total"):
        print(f"  {k:20s} {mem[k] / gib:9.2f} GiB")
    print(f"inference: bf16 weights {mem['inference_weights'] / gib:.2f} GiB, "
          f"KV cache {mem['kv_cache_per_token'] / 2 ** 10:.1f} KiB per token")


if __name__ == "__main__":
    main()
