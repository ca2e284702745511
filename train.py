"""train.py — one script for every stage and scale of small COOPER.

    python train.py --stage 1                                  # tiny preset on a laptop CPU: VQ tokenizer, then AMG + VQA
    python train.py --stage 1 --resume                         # continue a stopped run exactly where it stopped
    python train.py --stage 1 --amg-share 0 --out runs/control --tokenizer-from runs/tiny   # the control (no AMG)
    python train.py --stage 1 --preset small --steps 3000     # one GPU: bf16 autocast, SDPA (5 min on an H200)
    torchrun --nproc_per_node 8 train.py --stage 1 --preset base              # same script, DDP on 8 GPUs
    torchrun --nproc_per_node 8 train.py --stage 1 --preset bagel-7b --fsdp   # sharded parameters (FSDP)

Stage 1 (PAPER.md "Auxiliary Modality Generation"): if the run folder has no VQ tokenizer, train one on RGB,
depth-as-RGB and segmentation-as-RGB images; then train the unified transformer on a mixture of depth generation,
segmentation generation (cross-entropy on the target map's codes only, as the paper puts the loss only on the target
image) and direct-answer spatial VQA (loss on the answer only). Horizontal flips are applied to image and targets
together (data.flip_scene, which also swaps left and right in the questions). Held-out evaluation, sample grids and
loss curves are written to the run folder.

Deviations from the paper (see also data.py and model.py):
- No pretrained base model exists here, so stage 1 also teaches understanding (direct-answer VQA) from scratch;
  `--amg-share 0` trains the control that only learns to answer (the "BAGEL" row), to compare at equal steps.
- The AMG loss is next-code cross-entropy on VQ codes instead of BAGEL's rectified-flow loss on VAE latents.
- Stage 2 (SFT on interleaved trajectories, then GRPO with the CPR reward) uses `grpo_loss` below and reward.py;
  its training loop is not part of this script yet, and `--stage 2` says so.

Never lose work: checkpoints (weights, optimizer, step, configs, RNG; the data stream is a pure function of the step)
are written atomically every --save-every steps, on Ctrl-C and at the end of each phase; --resume continues exactly.

Tests: python -m pytest tests/test_train.py tests/test_grpo.py
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cooper
import data
import kernels
from model import PRESETS, UnifiedTransformer, VQTokenizer


# ----------------------------------------------------------------------------------------------------------------------
# GRPO objective (PAPER.md "GRPO as run by the authors", EQUATIONS.md "GRPO family"). Normalisation choices: the
# advantage is computed per group outside this function (reward.group_advantages; std-scaled for GRPO, centred only
# for Dr. GRPO); the loss is aggregated per sequence then averaged ("grpo", the paper's choice), per token over the
# batch ("dapo") or over a fixed G × T budget ("dr_grpo"). Only tokens the policy wrote as text are in the mask;
# prompt, reflection prompt, image codes and padding are not.


def grpo_loss(logps, old_logps, advantages, mask, ref_logps=None, beta=0.0, eps_low=0.2, eps_high=0.2,
              loss_type="grpo"):
    """Clipped-ratio GRPO policy loss over G sampled completions of one or more prompts.

    Args:
        logps:      (G, T) log pi_theta of each sampled token under the current policy (with grad). These
                    are next-token log-probs: position t scores token t + 1 given tokens <= t, computed from
                    logits divided by the sampling temperature.
        old_logps:  (G, T) log pi_old of the same tokens under the policy that sampled them (detached here).
        advantages: (G,) one advantage per completion, shared by all of its tokens (detached here).
        mask:       (G, T) bool or 0/1: True on the tokens the policy wrote (its text turns). Everything else
                    (prompt, reflection prompt, image codes, padding) is excluded from the loss and gets
                    exactly zero gradient, whatever logps / old_logps / ref_logps hold there (inf and NaN
                    included): masked-out entries are replaced with torch.where before any arithmetic.
        ref_logps:  (G, T) log pi_ref for the KL penalty, or None (no reference model).
        beta:       KL weight; the penalty is added only when beta > 0 and ref_logps is given.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of the ratio (eps_high > eps_low is
                    DAPO's "clip-higher").
        loss_type:  how the per-token losses l[i, t] are aggregated, n_i = number of masked tokens of row i:
                    "grpo"    (1/G) sum_i (1/n_i) sum_t l[i, t]   per-sequence token mean, then mean over
                              sequences (DeepSeekMath; what the paper runs). A row with n_i = 0 contributes 0
                              but still counts in the 1/G.
                    "dapo"    sum_{i,t} l[i, t] / sum_i n_i        one token mean over the whole batch.
                    "dr_grpo" sum_{i,t} l[i, t] / (G * T)          a constant divisor; T (the padded width)
                              stands for the generation budget L_max, so pad to the budget to keep it fixed.
                    With no masked token at all, every type returns 0 (with a graph, so backward works).

    Per token, r = exp(logp - old_logp) and
        l[i, t] = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + beta * KL[i, t],
        KL[i, t] = exp(ref - logp) - (ref - logp) - 1      (the k3 estimator: unbiased, always >= 0).
    On-policy (one update per batch of rollouts, old_logps = logps.detach(), as in the paper) r = 1 in value,
    clipping never fires and the gradient is the REINFORCE gradient: d loss / d logp[i, t] = -A_i times the
    aggregation weight (1 / (G n_i) for "grpo"). The loss value is then minus a weighted mean advantage,
    ~0 by construction for centred advantages: read progress from the reward, not from the loss.
    All arithmetic is done in float32 or wider, whatever dtype the log-probs arrive in.

    Returns (loss, stats): loss a scalar tensor; stats a dict of floats over masked tokens:
        clip_low_frac   share of tokens with r < 1 - eps_low and A < 0 (clipped, no gradient),
        clip_high_frac  share of tokens with r > 1 + eps_high and A > 0 (clipped, no gradient),
        kl              mean k3 KL to the reference (0.0 without ref_logps; reported even when beta = 0),
        ratio_mean      mean ratio r,   tokens  number of masked tokens.
    """
    dt = torch.promote_types(logps.dtype, torch.float32)  # bf16 log-probs are upcast for the loss
    mask = mask.bool()  # (G, T)
    zero = torch.zeros((), dtype=dt, device=logps.device)
    # Masked-out entries become 0 through torch.where (not a multiply), so inf / NaN there never reaches
    # exp(), the loss or the gradient: where() routes zero gradient to the unselected branch.
    logp = torch.where(mask, logps.to(dt), zero)  # (G, T)
    old = torch.where(mask, old_logps.detach().to(dt), zero)  # (G, T)
    adv = advantages.detach().to(dt).unsqueeze(1)  # (G, 1), one advantage per completion
    ratio = torch.exp(logp - old)  # (G, T) importance ratio pi_theta / pi_old; 1 on masked entries
    surr = ratio * adv  # (G, T) unclipped surrogate r A
    surr_clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv  # (G, T) clipped surrogate
    per_token = -torch.minimum(surr, surr_clipped)  # (G, T) pessimistic (clipped) PPO/GRPO objective

    kl = torch.zeros_like(per_token)  # (G, T)
    if ref_logps is not None:
        d = torch.where(mask, ref_logps.detach().to(dt), zero) - logp  # (G, T) ref - logp
        kl = torch.exp(d) - d - 1  # (G, T) k3 estimator of KL(pi_theta || pi_ref)
        if beta > 0:
            per_token = per_token + beta * kl  # KL penalty in the loss, per token
    per_token = torch.where(mask, per_token, zero)  # (G, T) masked tokens contribute nothing

    n_i = mask.sum(dim=1)  # (G,) masked tokens per completion
    n = n_i.sum().clamp(min=1)  # total masked tokens, at least 1 so an empty batch gives 0, not NaN
    G, T = per_token.shape
    if loss_type == "grpo":  # mean over sequences of each sequence's token mean
        loss = (per_token.sum(dim=1) / n_i.clamp(min=1)).mean()
    elif loss_type == "dapo":  # token-level mean over the whole batch
        loss = per_token.sum() / n
    elif loss_type == "dr_grpo":  # constant normaliser G * T (Dr. GRPO's G * L_max)
        loss = per_token.sum() / (G * T)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use 'grpo', 'dapo' or 'dr_grpo'")

    with torch.no_grad():  # logging only
        low = mask & (ratio < 1 - eps_low) & (adv < 0)  # (G, T) clipped at the bottom
        high = mask & (ratio > 1 + eps_high) & (adv > 0)  # (G, T) clipped at the top
        stats = {"clip_low_frac": (low.sum() / n).item(), "clip_high_frac": (high.sum() / n).item(),
                 "kl": (torch.where(mask, kl, zero).sum() / n).item(),
                 "ratio_mean": (torch.where(mask, ratio, zero).sum() / n).item(),
                 "tokens": int(n_i.sum().item())}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------------
# Configuration: typed dataclass, flags generated from its fields (STYLE.md habit 4)


@dataclass
class TrainConfig:
    stage: int = 1                 # 1 = VQ tokenizer (if absent) then AMG + VQA; 2 = SFT then GRPO
    preset: str = "tiny"           # a model.PRESETS name
    out: str = ""                  # run folder; default runs/<preset>
    resume: bool = False           # continue the run in --out exactly where it stopped
    max_steps: int = 0             # > 0 caps every training phase at this many steps (smoke tests)
    device: str = "auto"           # auto | cpu | cuda | mps
    seed: int = 0
    compile: bool = False          # torch.compile the transformer (opt-in: slow to start, faster on GPUs)
    attn: str = ""                 # attention kernel, same maths: fused | sdpa | reference; "" = sdpa on CUDA
                                   # (4-6× faster there, docs/gpu.md), the preset's (fused) elsewhere
    fsdp: bool = False             # shard parameters with FSDP under torchrun (large presets) instead of DDP
    tokenizer_from: str = ""       # copy tokenizer.json + vq.pt from this run instead of training a new VQ tokenizer
    # VQ tokenizer phase
    vq_steps: int = 1500
    vq_batch: int = 16
    vq_lr: float = 2e-3
    # stage-1 phase: auxiliary modality generation (AMG) + direct-answer VQA
    steps: int = 1000
    batch_size: int = 32           # sequences per optimizer step, all ranks together
    micro_batch: int = 32          # sequences per forward pass on one rank; accumulation = batch_size / (micro × ranks)
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    amg_share: float = 0.5         # share of AMG examples (depth + segmentation); 0 trains the control (VQA only)
    depth_share: float = 0.5       # depth's share within AMG (paper: 50 % depth, 50 % segmentation)
    vqa_turns: int = 4             # questions per VQA dialogue (the image's 66 tokens are shared by its questions)
    n_train_scenes: int = 4000     # size of the training scene pool (× 2 with horizontal flips)
    eval_every: int = 500
    n_eval: int = 64               # held-out scenes per evaluation
    save_every: int = 250
    log_every: int = 25


# fields whose change does not change what a run computes: allowed to differ on --resume
RUNTIME_FIELDS = {"resume", "max_steps", "device", "out", "compile", "attn", "eval_every", "save_every", "log_every", "n_eval"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=typ, default=f.default)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    if cfg.preset not in PRESETS:
        p.error(f"unknown preset {cfg.preset!r}; choose one of: {', '.join(PRESETS)}")
    if cfg.attn and cfg.attn not in kernels.IMPLS:
        p.error(f"unknown --attn {cfg.attn!r}; choose one of: {', '.join(kernels.IMPLS)}")
    if cfg.stage not in (1, 2):
        p.error("--stage must be 1 or 2")
    cfg.out = cfg.out or os.path.join("runs", cfg.preset)
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Distributed set-up, device choice, printing (one script from laptop to torchrun, STYLE.md habit 5)

DDP_RANK, DDP_WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def print0(*args, **kwargs):
    if DDP_RANK == 0:
        print(*args, **kwargs, flush=True)


def pick_device(name):
    """cuda → mps → cpu, printing the choice and why."""
    if name != "auto":
        return torch.device(name), f"asked for with --device {name}"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"CUDA is available ({torch.cuda.get_device_name(0)})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps"), "Apple MPS is available and CUDA is not"
    return torch.device("cpu"), "no CUDA or MPS device found"


def setup_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    device, why = pick_device(cfg.device)
    if DDP_WORLD > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        why += f"; rank {DDP_RANK} of {DDP_WORLD}"
    print0(f"device: {device} ({why})")
    return device


def autocast_for(device):
    """bf16 autocast only where the hardware supports it; float32 elsewhere (CPU bf16 matmuls are slow here)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, clear errors, exact resume (STYLE.md habit 7)


def atomic_save(obj, path):
    """Write to a temporary file in the same folder, then rename: a killed run never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp) if not isinstance(obj, (str, bytes)) else open(tmp, "w").write(obj)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, unreadable, …
        sys.exit(f"error: cannot read checkpoint {path} ({type(e).__name__}: {e}). "
                 f"Delete it to start that phase again, or point --out at another run.")


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"]); np.random.set_state(s["numpy"]); random.setstate(s["python"])


# ----------------------------------------------------------------------------------------------------------------------
# Stage-1 data: a fixed pool of training scenes (and their horizontal flips); every batch is a pure function of
# (seed, phase, step), so the data position to resume from is just the step number.


class ScenePool:
    """n training scenes and their mirror images. Horizontal flip augmentation (PAPER.md stage 1) is applied to the
    image and every target together by `data.flip_scene`, which also mirrors the 3-D metadata, so left/right answers
    made from a flipped scene are right."""

    def __init__(self, n, size=data.IMAGE_SIZE, desc="scenes"):
        base = [data.make_scene(data.scene_seed("train", i), size)
                for i in tqdm(range(n), desc=desc, disable=DDP_RANK > 0)]
        self.scenes = base + [data.flip_scene(s) for s in base]  # index i + n is the mirror of scene i

    def __len__(self):
        return len(self.scenes)

    def images(self, modality):
        """(N, H, W, 3) uint8: the RGB images, or the depth / segmentation maps encoded as RGB (PAPER.md AMG)."""
        return np.stack([data.scene_image(s, modality) for s in self.scenes])


# ----------------------------------------------------------------------------------------------------------------------
# A training phase: lr schedule, accumulation, clipping, progress, metrics, checkpoints, Ctrl-C


class MetricsLog:
    """metrics.jsonl: one JSON object a line. On resume, lines of the resumed phase past its checkpoint are dropped, so
    the file reads as if the run had never stopped."""

    def __init__(self, path, phase=None, keep_until=None):
        self.path = path
        if DDP_RANK == 0 and phase is not None and os.path.exists(path):
            rows = [json.loads(l) for l in open(path) if l.strip()]
            rows = [r for r in rows if r.get("phase") != phase or r.get("step", 0) <= keep_until]
            atomic_write_text("".join(json.dumps(r) + "\n" for r in rows), path)

    def write(self, row):
        if DDP_RANK == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def atomic_write_text(text, path):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def cosine_lr(step, total, peak, floor, warmup):
    """Linear warm-up, then cosine decay from peak to floor."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def run_phase(name, cfg, run, module, wrapped, opt, total, peak_lr, step_fn, state_extra, on_eval=None):
    """Train `module` (through `wrapped`, its DDP/FSDP/compiled view) for `total` optimizer steps, resuming from
    run/<name>.pt when it exists. step_fn(step) does forward + backward of one global batch and returns a stats dict
    with at least "loss". Checkpoints hold weights, optimizer, step, configs, RNG; the data position is the step."""
    ckpt_path = os.path.join(run, f"{name}.pt")
    start = 0
    if os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        check_same_config(ck, cfg, module.cfg, ckpt_path)
        set_full_state(module, opt, ck["model"], ck["optimizer"], sharded(module, cfg), ckpt_path); set_rng_state(ck["rng"])
        start = ck["step"]
        print0(f"{name}: resumed from {ckpt_path} at step {start}")
    log = MetricsLog(os.path.join(run, "metrics.jsonl"), name, start)
    stop = min(total, cfg.max_steps) if cfg.max_steps > 0 else total

    def save(step):
        weights, opt_state = full_state(module, opt, sharded(module, cfg))  # every rank takes part under FSDP
        if DDP_RANK == 0:
            atomic_save({"model": weights, "optimizer": opt_state, "step": step,
                         "train_config": asdict(cfg), "model_config": asdict(module.cfg), "rng": rng_state(),
                         **state_extra}, ckpt_path)

    step = start
    bar = tqdm(range(start, stop), desc=name, initial=start, total=stop, disable=DDP_RANK > 0, dynamic_ncols=True)
    try:
        for step in bar:
            t0 = time.time()
            lr = cosine_lr(step, total, peak_lr, peak_lr * cfg.min_lr / cfg.lr, cfg.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            stats = step_fn(step)
            gnorm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats.update(lr=lr, grad_norm=float(gnorm), dt=time.time() - t0)
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("loss", "usage", "lr", "tok/s")})
            if (step + 1) % cfg.log_every == 0 or step + 1 == stop:
                log.write({"phase": name, "step": step + 1, **stats})
            if (step + 1) % cfg.save_every == 0:
                save(step + 1)
            if on_eval and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                on_eval(step + 1)
        step = stop
    except KeyboardInterrupt:
        save(step)
        print0(f"\ninterrupted: {name} saved at step {step} to {ckpt_path}; continue with the same command and --resume")
        sys.exit(130)
    check_replicas(module, name, cfg)
    save(stop)
    return stop == total


def sharded(module, cfg):
    """FSDP shards the transformer only; the small VQ tokenizer always trains replicated (DDP)."""
    return DDP_WORLD > 1 and cfg.fsdp and isinstance(module, UnifiedTransformer)


def full_state(module, opt, is_sharded):
    """Unsharded weights and optimizer state on the CPU, for a checkpoint. Under FSDP this gathers the shards: a
    collective every rank must join."""
    if not is_sharded:
        return module.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def set_full_state(module, opt, weights, opt_state, is_sharded, path):
    """Load a checkpoint's unsharded state; under FSDP each rank keeps its own shard of it."""
    if not is_sharded:
        cooper.load_weights(module, weights, path); opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(module, opt, model_state_dict=weights, optim_state_dict=opt_state,
                   options=StateDictOptions(full_state_dict=True))


def check_replicas(module, name, cfg):
    """Under DDP every rank must hold identical weights after every step; verify it at the end of each phase."""
    if DDP_WORLD == 1 or cfg.fsdp:  # FSDP ranks hold different shards by design
        return
    flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)  # rank 0's weights
    same = torch.tensor([float(torch.equal(flat, ref))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if same.item() != 1.0:
        sys.exit(f"error: {name}: weights differ between ranks; the distributed set-up is broken")
    print0(f"{name}: weights identical on all {DDP_WORLD} ranks")


def check_same_config(ck, cfg, mcfg, path):
    """Refuse to resume a run whose configuration differs (silently mixing two runs is worse than stopping)."""
    old = {k: v for k, v in ck["train_config"].items() if k not in RUNTIME_FIELDS}
    new = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}
    diff = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    diff += [f"model.{k}: {v!r} → {asdict(mcfg).get(k)!r}" for k, v in ck["model_config"].items()
             if asdict(mcfg).get(k) != v and k != "attn_impl"]  # the attention kernel is a runtime choice too
    if diff:
        sys.exit(f"error: {path} was written with a different configuration ({'; '.join(diff)}). "
                 f"Resume with the original flags, or start a new run with another --out.")


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: VQ tokenizer, then auxiliary modality generation (AMG) + direct-answer VQA

MODALITIES = ("rgb", "depth", "segmentation")


def wrap(module, cfg, device):
    """The view of a module that training runs through: FSDP or DDP under torchrun, optionally compiled."""
    wrapped = module
    if sharded(module, cfg):
        from torch.distributed.fsdp import fully_shard
        for block in getattr(module, "blocks", []):
            fully_shard(block)  # shard each transformer block's parameters across ranks
        wrapped = fully_shard(module)
    elif DDP_WORLD > 1:
        wrapped = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped) if cfg.compile else wrapped


def no_sync(wrapped, last):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation (DDP's own no_sync)."""
    return wrapped.no_sync() if isinstance(wrapped, DDP) and not last else contextlib.nullcontext()


def train_vq(cfg, mcfg, run, pool, device):
    """Phase 1a: the VQ image tokenizer on RGB, depth-as-RGB and segmentation-as-RGB images (PAPER.md AMG encodings)."""
    torch.manual_seed(cfg.seed)
    vq = VQTokenizer(mcfg).to(device)
    wrapped = wrap(vq, cfg, device)
    opt = torch.optim.AdamW(vq.parameters(), lr=cfg.vq_lr, betas=(0.9, 0.99), weight_decay=0.0)
    images = {m: pool.images(m) for m in MODALITIES}  # uint8 (N, H, W, 3) each
    per_rank = cfg.vq_batch // DDP_WORLD

    def step_fn(step):
        rng = np.random.default_rng([cfg.seed, 1, step])  # the batch is a pure function of the step
        idx = rng.integers(len(pool), size=cfg.vq_batch)
        mod = rng.integers(len(MODALITIES), size=cfg.vq_batch)
        mine = slice(DDP_RANK * per_rank, (DDP_RANK + 1) * per_rank)
        x = cooper.to_unit(np.stack([images[MODALITIES[m]][i] for i, m in zip(idx[mine], mod[mine])])).to(device)
        _, losses, codes = wrapped(x)
        losses["loss"].backward()
        usage = codes.unique().numel() / mcfg.codebook_size  # share of the codebook used by this batch
        return {"loss": losses["loss"].item(), "rec": losses["rec"].item(), "commit": losses["commit"].item(),
                "codebook": losses["codebook"].item(), "usage": usage}

    done = run_phase("vq", cfg, run, vq, wrapped, opt, cfg.vq_steps, cfg.vq_lr, step_fn, {})
    return vq.eval(), done


def stage1_example(cfg, pool, codes, tok, image_offset, rng):
    """One training sequence of the stage-1 mixture: AMG (depth or segmentation generation, loss on the target codes
    only, as in the paper) with probability amg_share, otherwise a direct-answer spatial question (loss on the answer)."""
    i = int(rng.integers(len(pool)))
    if rng.random() < cfg.amg_share:
        kind = "depth" if rng.random() < cfg.depth_share else "segmentation"
        segs, images = data.amg_segments(kind), {"rgb": codes["rgb"][i], kind: codes[kind][i]}
    else:
        kind = "vqa"
        qs = data.make_questions(pool.scenes[i], rng)
        pick = rng.permutation(len(qs))[:cfg.vqa_turns]  # a dialogue of up to vqa_turns questions about one image
        segs, images = data.vqa_segments(*[qs[k] for k in pick]), {"rgb": codes["rgb"][i]}
    ids, mask = data.encode_segments(segs, tok, image_offset, images)
    return ids, mask, kind


def collate(examples, device):
    """Right-pad to the longest sequence; inputs = ids[:-1], targets = ids[1:], loss on targets whose mask is set.
    Right padding needs no attention mask: under causal attention real tokens never see the pads after them."""
    T = max(len(ids) for ids, _, _ in examples) - 1
    idx = torch.full((len(examples), T), data.PAD_ID, dtype=torch.long)
    tgt = torch.full((len(examples), T), data.PAD_ID, dtype=torch.long)
    lm = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, (ids, mask, _) in enumerate(examples):
        n = len(ids) - 1
        idx[b, :n] = torch.tensor(ids[:-1])  # (T,) inputs
        tgt[b, :n] = torch.tensor(ids[1:])  # (T,) next-token targets
        lm[b, :n] = torch.tensor(mask[1:])  # (T,) is target t a training target?
    return idx.to(device), tgt.to(device), lm.to(device)


def encode_pool(vq, pool, device, batch=256):
    """VQ codes of every pool image for each modality, computed once: {modality: (N, h, w) numpy}."""
    out = {}
    for m in MODALITIES:
        imgs = pool.images(m)
        with torch.no_grad():
            out[m] = torch.cat([vq.encode(cooper.to_unit(imgs[i:i + batch]).to(device)).cpu()
                                for i in range(0, len(imgs), batch)]).numpy()
    return out


def train_stage1_lm(cfg, mcfg, run, pool, vq, tok, device):
    """Phase 1b: the unified transformer on the stage-1 mixture (AMG + VQA)."""
    codes = encode_pool(vq, pool, device)
    torch.manual_seed(cfg.seed)
    model = UnifiedTransformer(mcfg).to(device)
    wrapped = wrap(model, cfg, device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices only, not norms
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    assert cfg.batch_size % (cfg.micro_batch * DDP_WORLD) == 0 or cfg.batch_size < cfg.micro_batch * DDP_WORLD, \
        "--batch-size must be a multiple of --micro-batch × number of processes"
    per_rank = max(1, cfg.batch_size // DDP_WORLD)
    accum = max(1, per_rank // cfg.micro_batch)  # gradient accumulation derived from the total batch size
    print0(f"stage 1: {model.num_params() / 1e6:.2f} M parameters, batch {cfg.batch_size} = {DDP_WORLD} ranks × "
           f"{accum} micro-batches × {per_rank // accum}")
    amp = autocast_for(device)

    def step_fn(step):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, 2, step])  # the batch is a pure function of the step
        batch = [stage1_example(cfg, pool, codes, tok, mcfg.image_offset, rng) for _ in range(cfg.batch_size)]
        mine = sorted(batch[DDP_RANK * per_rank:(DDP_RANK + 1) * per_rank], key=lambda e: len(e[0]))
        n_tok = sum(sum(m[1:]) for _, m, _ in mine)  # loss tokens of the whole (per-rank) batch
        # forward passes over length-sorted chunks: short VQA and long AMG sequences are not padded to one length
        n_chunks = max(accum, min(2, len(mine)))
        sums, counts, total = {}, {}, 0.0
        for a in range(n_chunks):
            chunk = mine[a * len(mine) // n_chunks:(a + 1) * len(mine) // n_chunks]
            idx, tgt, lm = collate(chunk, device)
            with no_sync(wrapped, a == n_chunks - 1), amp():
                # loss on the target image codes (AMG) or the answer text (VQA) only: lm marks those targets
                _, ce = wrapped(idx, tgt, lm, reduction="none")  # (N_masked,) per-token cross-entropy
                loss = ce.sum() / n_tok  # normalised by the token count of the whole batch, not the chunk
                loss.backward()
            total += loss.item()
            per_seq = torch.zeros(len(chunk), device=ce.device).index_add_(0, lm.nonzero()[:, 0], ce.detach())  # (B,)
            # per-task loss, for the progress line and the curves: one device-to-host copy per chunk, not per sequence
            for (_, _, kind), l, n in zip(chunk, per_seq.tolist(), lm.sum(1).tolist()):
                sums[kind] = sums.get(kind, 0.0) + l
                counts[kind] = counts.get(kind, 0) + n
        stats = {"loss": total, "tok/s": sum(len(i) for i, _, _ in mine) / (time.time() - t0)}
        stats.update({f"loss_{k}": sums[k] / max(1, counts[k]) for k in sums})
        return stats

    def on_eval(step):
        evaluate_and_report(cfg, run, model, vq, tok, device, step)

    # under FSDP rank 0 alone cannot run the sharded model, so evaluation waits for the gathered final checkpoint
    done = run_phase("stage1", cfg, run, model, wrapped, opt, cfg.steps, cfg.lr, step_fn, {},
                     None if sharded(model, cfg) else on_eval)
    if sharded(model, cfg) and DDP_RANK == 0:
        model = UnifiedTransformer(mcfg).to(device)
        path = os.path.join(run, "stage1.pt")
        cooper.load_weights(model, load_checkpoint(path)["model"], path)
    return model, done


def evaluate_and_report(cfg, run, model, vq, tok, device, step):
    """Held-out evaluation into metrics.jsonl, a printed table and the sample grid PNG (rank 0 only)."""
    if DDP_RANK != 0:
        return None
    model.eval()
    m, samples = cooper.evaluate(cooper.Cooper(model, vq, tok, device), n=cfg.n_eval, split="val", seed=cfg.seed)
    model.train()
    MetricsLog(os.path.join(run, "metrics.jsonl")).write({"phase": "eval", "step": step, **m})
    print0(f"\nevaluation at step {step} on {cfg.n_eval} held-out scenes:\n" + cooper.format_table(m, data.chance))
    cooper.sample_grid(samples).save(os.path.join(run, "samples.png"))
    plot_curves(os.path.join(run, "metrics.jsonl"), os.path.join(run, "loss.png"))
    return m


def plot_curves(metrics_path, out_path, size=(640, 300)):
    """Loss curves drawn with Pillow: one panel per training phase, log-scale y."""
    rows = [json.loads(l) for l in open(metrics_path) if l.strip()]
    phases = [p for p in ("vq", "stage1", "sft", "grpo") if any(r.get("phase") == p for r in rows)]
    if not phases:
        return
    W, H = size
    img = Image.new("RGB", (W, H * len(phases)), "white")
    d = ImageDraw.Draw(img)
    colors = [(0, 0, 0), (200, 40, 40), (40, 80, 200), (40, 150, 60), (230, 140, 20)]  # one per curve
    for pi, ph in enumerate(phases):
        rr = [r for r in rows if r.get("phase") == ph]
        keys = ["loss"] + sorted(k for k in rr[-1] if k.startswith("loss_"))
        x0, y0, x1, y1 = 50, pi * H + 20, W - 10, (pi + 1) * H - 25
        d.rectangle([x0, y0, x1, y1], outline="gray")
        vals = [r[k] for r in rr for k in keys if k in r and r[k] > 0]
        if not vals:
            continue
        lo, hi = math.log(min(vals)), math.log(max(vals)) + 1e-9
        smax = max(r["step"] for r in rr)
        for ki, k in enumerate(keys):
            pts = [(x0 + (x1 - x0) * r["step"] / smax, y1 - (y1 - y0) * (math.log(r[k]) - lo) / (hi - lo))
                   for r in rr if k in r and r[k] > 0]
            if len(pts) > 1:
                d.line(pts, fill=colors[ki % len(colors)], width=2)
            d.text((x0 + 5 + 110 * ki, y0 + 3), k, fill=colors[ki % len(colors)])
        d.text((5, pi * H + 3), f"{ph}: step 0..{smax}, log loss {math.exp(lo):.3g}..{math.exp(hi):.3g}", fill="black")
    img.save(out_path)


def stage1(cfg):
    device = setup_distributed(cfg)
    run = prepare_run(cfg)
    attn = cfg.attn or ("sdpa" if device.type == "cuda" else PRESETS[cfg.preset].attn_impl)
    mcfg = replace(PRESETS[cfg.preset], attn_impl=attn)
    print0(f"attention kernel: {attn}" + ("" if cfg.attn else " (choose with --attn)"))
    tok_path, vq_path = os.path.join(run, "tokenizer.json"), os.path.join(run, "vq.pt")
    if not os.path.exists(tok_path):  # the text tokenizer: byte-level BPE on the world's text, deterministic
        if DDP_RANK == 0:
            data.save_tokenizer(data.train_tokenizer(), tok_path)
        barrier()
    tok = data.load_tokenizer(tok_path)
    mcfg.text_vocab = tok.get_vocab_size()
    pool = ScenePool(cfg.n_train_scenes, mcfg.image_size)
    vq_ck = load_checkpoint(vq_path) if os.path.exists(vq_path) else None
    if vq_ck is not None and vq_ck["step"] >= cfg.vq_steps:  # a finished VQ tokenizer: reuse it
        vq = VQTokenizer(mcfg).to(device)
        cooper.load_weights(vq, vq_ck["model"], vq_path)
        print0(f"VQ tokenizer: using {vq_path}")
    else:
        vq, done = train_vq(cfg, mcfg, run, pool, device)
        if not done:
            return print0(f"stopped after --max-steps {cfg.max_steps} in the VQ phase; continue with --resume")
    model, done = train_stage1_lm(cfg, mcfg, run, pool, vq.eval(), tok, device)
    m = evaluate_and_report(cfg, run, model, vq, tok, device, min(cfg.steps, cfg.max_steps or cfg.steps))
    print0(f"run folder: {run} (samples.png, loss.png, metrics.jsonl, stage1.pt)")
    return m


def barrier():
    if DDP_WORLD > 1:
        dist.barrier()


def prepare_run(cfg):
    """Create (or check) the run folder, refuse to overwrite a run by accident, write config.json."""
    run = cfg.out
    try:
        os.makedirs(run, exist_ok=True)
        probe = os.path.join(run, f".write_test{DDP_RANK}")
        open(probe, "w").close(); os.remove(probe)
    except OSError as e:
        sys.exit(f"error: cannot write to run folder {run!r} ({e.strerror}); choose a writable --out")
    phases = ["vq.pt", "stage1.pt"] if cfg.stage == 1 else ["sft.pt", "grpo.pt"]
    started = [p for p in phases if os.path.exists(os.path.join(run, p))]
    if started and not cfg.resume:
        sys.exit(f"error: {run} already holds a run ({', '.join(started)}); add --resume to continue it, "
                 f"or choose another --out")
    if cfg.resume and not started:
        print0(f"note: --resume given but {run} has no checkpoint yet; starting from the beginning")
    barrier()  # every rank has looked at the folder before rank 0 writes into it
    if cfg.tokenizer_from and DDP_RANK == 0 and not os.path.exists(os.path.join(run, "vq.pt")):
        for f in ("tokenizer.json", "vq.pt"):
            src = os.path.join(cfg.tokenizer_from, f)
            if not os.path.exists(src):
                sys.exit(f"error: --tokenizer-from {cfg.tokenizer_from}: no {f} there")
            shutil.copyfile(src, os.path.join(run, f))
    if DDP_RANK == 0:
        atomic_write_text(json.dumps({"train": asdict(cfg), "model": asdict(PRESETS[cfg.preset])}, indent=1), os.path.join(run, "config.json"))
    barrier()
    return run


def main(argv=None):
    cfg = parse_args(argv)
    try:
        if cfg.stage == 1:
            stage1(cfg)
        else:
            sys.exit("error: --stage 2 (SFT then GRPO) has no training loop yet; its objective is train.grpo_loss and "
                     "its reward is reward.cpr_rewards. Run --stage 1.")
    except cooper.RunError as e:  # e.g. a checkpoint written by another version of model.py
        sys.exit(f"error: {e}")
    finally:
        if DDP_WORLD > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
