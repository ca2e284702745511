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
- Understanding from scratch needs a curriculum the paper (which starts from BAGEL) does not: first only lookups that
  find what a word names, half a batch more of them per step (FINDS, --find-extra), then two-object comparisons
  (COMPARES), then every category with a batch more of attribute and count questions per step (DETAILS,
  --detail-extra) (docs/perception.md).
- Stage 2 (`--stage 2`: SFT on interleaved trajectories, then GRPO with the CPR reward) is `stage2`,
  `grpo_step` and `grpo_loss` below, with reward.py and the runtime of cooper.py.

Never lose work: checkpoints (weights, optimizer, step, configs, RNG; the data stream is a pure function of the step)
are written atomically every --save-every steps, on Ctrl-C and at the end of each phase; --resume continues exactly.

Tests: python -m pytest tests/test_train.py tests/test_grpo.py
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import random
import re
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
import reward
from model import PRESETS, ModelConfig, UnifiedTransformer, VQTokenizer


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
    # exercise 9 begin: group advantages and the clipped GRPO loss
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
    # exercise 9 end

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
    seed: int = 0                  # seed of the weights, the data stream and sampling
    compile: bool = False          # torch.compile the transformer (opt-in: slow to start, faster on GPUs)
    attn: str = ""                 # attention kernel, same maths: fused | sdpa | reference; "" = sdpa on CUDA
                                   # (4-6× faster there, docs/gpu.md), the preset's (fused) elsewhere
    fsdp: bool = False             # shard parameters with FSDP under torchrun (large presets) instead of DDP
    tokenizer_from: str = ""       # copy tokenizer.json + vq.pt from this run instead of training a new VQ tokenizer
    patch_embed: bool = True       # the understanding path: pixel patches of the input image added to its codes
    cpu_bf16: bool = False         # bf16 autocast on a CPU too (opt-in: steps 1.2-1.5x faster on an AVX512-BF16 CPU, a
                                   # run 11 % shorter, other numerics; docs/perception.md "bfloat16 autocast on the CPU")
    # VQ tokenizer phase
    vq_steps: int = 1500           # optimizer steps of the VQ image tokenizer
    vq_batch: int = 16             # images per VQ step
    vq_lr: float = 2e-3            # peak learning rate of the VQ tokenizer
    # stage-1 phase: auxiliary modality generation (AMG) + direct-answer VQA
    steps: int = 6500              # optimizer steps of the stage-1 transformer phase (docs/perception.md: why so many)
    batch_size: int = 32           # sequences per optimizer step, all ranks together
    micro_batch: int = 32          # sequences per forward pass on one rank; accumulation = batch_size / (micro × ranks)
    lr: float = 2e-3               # peak learning rate (linear warm-up, then cosine)
    min_lr: float = 2e-4           # end of the cosine; every phase decays to peak × min_lr / lr
    warmup: int = 100              # warm-up steps of the stage-1 phase
    weight_decay: float = 0.1      # AdamW weight decay on weight matrices (not on norms and biases)
    grad_clip: float = 1.0         # clip the gradient's global norm to this
    amg_share: float = 0.25        # share of AMG examples (depth + segmentation); 0 trains the control (questions only)
    find_amg: bool = True          # AMG during the finding phase too; False: it starts at ground_steps, so finding gets
                                   # the whole batch (README, "Making the model see")
    shape_lookups: bool = False    # "what shape is the red object?" among the lookups (FINDS and LOOKUPS) too (opt-in:
                                   # docs/perception.md, "A shape lookup by name")
    find_attribute: bool = False   # "is the red object a cube?" among the finding phase's questions too (opt-in; it
                                   # delayed finding, attribute stayed at chance: docs/perception.md)
    find_extra: float = 0.5        # extra lookup questions per step of the finding phase, as a share of --batch-size,
                                   # beside the batch: finding takes off only after tens of thousands of them
    depth_share: float = 0.5       # depth's share within AMG (paper: 50 % depth, 50 % segmentation)
    ground_share: float = 0.25     # share of lookup questions (locate / identify / existence) among the question examples
    ground_steps: int = 3500       # the curriculum: for this many steps every question is locate or existence (FINDS)
    compare_steps: int = 1000      # then this many steps whose spatial questions compare two objects (COMPARES)
    detail_steps: int = 0          # then this many steps whose spatial questions are attribute and count (DETAILS)
    compare_extra: float = 1.0     # like find_extra, comparisons in their phase (COMPARES: at chance in 1 of 2 seeds without)
    detail_extra: float = 1.0      # after those phases, extra attribute and count questions per step, as a share of
                                   # --batch-size, beside the batch (DETAILS: learned only when asked often)
    n_train_scenes: int = 4000     # size of the training scene pool (× 2 with horizontal flips)
    # stage 2: SFT on interleaved trajectories, then GRPO with the CPR reward
    init: str = ""                 # finished stage-1 run to start from; "" = --out (sft.pt and grpo.pt go beside stage1.pt)
    sft_steps: int = 300           # optimizer steps of the SFT phase
    sft_lr: float = 5e-4           # peak learning rate of SFT
    sft_mix: float = 0.5           # share of stage-1 examples (AMG, grounding, VQA) in SFT batches: keeps the maps trained
    rl_steps: int = 80             # GRPO steps (each: rollouts, rewards, mu policy updates)
    rl_batch: int = 8              # prompts per GRPO step, all ranks together (each gets group_size rollouts)
    group_size: int = 8            # G rollouts per prompt (paper: 8)
    rl_lr: float = 3e-5            # paper 3e-6 for 7 B parameters; here 1e-4 diverged in 1 of 2 seeds (entropy rose)
    beta: float = 0.0              # KL weight to a frozen reference, the SFT model (paper: 0, no reference)
    eps_low: float = 0.2           # clip range [1 - eps_low, 1 + eps_high] of the ratio (paper: 0.2 both)
    eps_high: float = 0.2          # > eps_low is DAPO's clip-higher
    loss_type: str = "grpo"        # grpo | dapo | dr_grpo: how per-token losses are averaged (see grpo_loss)
    mu: int = 1                    # policy updates per batch of rollouts (paper: 1, so the ratio is 1)
    temperature: float = 1.0       # sampling temperature of the rollouts (paper: 1.0)
    turn_cap: int = cooper.TURN_CAP  # text tokens one turn may hold; a longer turn ends the rollout
    image_pg: bool = False         # beyond the paper: policy gradient on the generated maps' codes as well
    n_eval2: int = 64              # held-out scenes for the stage-2 evaluation (every question, every mode; the CPR
                                   # reward on half as many prompts × group_size sampled rollouts)
    eval_every: int = 1000         # steps between held-out VQA evaluations (the learning curve)
    n_eval: int = 64               # held-out scenes for the map metrics of the final evaluation
    n_vqa: int = 256               # held-out scenes for VQA (every question of each), at every evaluation
    save_every: int = 250          # steps between checkpoints (also on Ctrl-C and at the end of a phase)
    log_every: int = 25            # steps between metrics.jsonl rows


# fields whose change does not change what a run computes: allowed to differ on --resume
RUNTIME_FIELDS = {"resume", "max_steps", "device", "out", "compile", "attn", "cpu_bf16", "eval_every", "save_every",
                  "log_every", "n_eval", "n_vqa", "n_eval2", "init"}


def field_help():
    """{field: its comment in TrainConfig's source}: the help text of each flag (continuation lines included)."""
    out, last = {}, None
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): \w+ = [^#]*(?:#\s*(.*))?$", line)
        if m:
            last = m.group(1)
            out[last] = m.group(2) or ""
        elif last and re.match(r"\s+#", line) and line.index("#") > 20:  # a comment continued on the next line
            out[last] += " " + line.strip()[1:].strip()
        else:
            last = None
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help()
    for f in fields(TrainConfig):
        h = f"{helps.get(f.name, '')} (default: {f.default!r})".strip().replace("%", "%%")  # argparse formats with %
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=h)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=typ, default=f.default, help=h)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    if cfg.preset not in PRESETS:
        p.error(f"unknown preset {cfg.preset!r}; choose one of: {', '.join(PRESETS)}")
    if cfg.attn and cfg.attn not in kernels.IMPLS:
        p.error(f"unknown --attn {cfg.attn!r}; choose one of: {', '.join(kernels.IMPLS)}")
    if cfg.stage not in (1, 2):
        p.error("--stage must be 1 or 2")
    if cfg.loss_type not in ("grpo", "dapo", "dr_grpo"):
        p.error(f"unknown --loss-type {cfg.loss_type!r}; choose grpo, dapo or dr_grpo")
    for flag, share in ((f"--{k}-extra", getattr(cfg, f"{k}_extra")) for k in ("find", "compare", "detail")):
        if share < 0 or round(share * cfg.batch_size) % DDP_WORLD:
            p.error(f"{flag} {share} × --batch-size {cfg.batch_size} must be >= 0 and split evenly over {DDP_WORLD} "
                    "processes")
    if cfg.rl_batch % DDP_WORLD:
        p.error(f"--rl-batch {cfg.rl_batch} must split evenly over {DDP_WORLD} processes (groups are never split)")
    if cfg.stage == 1 and cfg.steps <= cfg.ground_steps and cfg.amg_share < 1:
        print0(f"note: --steps {cfg.steps} <= --ground-steps {cfg.ground_steps}: every question trained is a lookup "
               "(locate / existence); add --ground-steps 0 to train every category")
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


def autocast_for(device, cpu_bf16=False):
    """bf16 autocast on GPUs that support it, and on a CPU when asked (cpu_bf16: fast only on CPUs with bf16 matmuls,
    such as AVX512-BF16); float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported() or device.type == "cpu" and cpu_bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, clear errors, exact resume (STYLE.md habit 7)


def atomic_save(obj, path):
    """Write to a temporary file in the same folder, then rename: a killed run never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w" if isinstance(obj, str) else "wb") as f:  # text (JSON, metrics) or a checkpoint, closed before
        f.write(obj) if isinstance(obj, str) else torch.save(obj, f)  # the rename
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
            atomic_save("".join(json.dumps(r) + "\n" for r in rows), path)

    def write(self, row):
        if DDP_RANK == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def cosine_lr(step, total, peak, floor, warmup):
    """Linear warm-up, then cosine decay from peak to floor."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def run_phase(name, cfg, run, module, wrapped, opt, total, peak_lr, step_fn, state_extra, on_eval=None, warmup=None,
              log_every=None):
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
            lr = cosine_lr(step, total, peak_lr, peak_lr * cfg.min_lr / cfg.lr, cfg.warmup if warmup is None else warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            stats = step_fn(step)
            gnorm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats.update(lr=lr, grad_norm=float(gnorm), dt=time.time() - t0)
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("loss", "reward", "tool_rate", "usage", "lr", "tok/s")})
            if (step + 1) % (log_every or cfg.log_every) == 0 or step + 1 == stop:
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
    old = {k: v for k, v in ck["train_config"].items()  # a flag since removed counts only where it was on
           if k not in RUNTIME_FIELDS and (k in TrainConfig.__dataclass_fields__ or v)}
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


LOOKUPS = ("locate", "identify", "existence")  # questions about one named object: where is it, what is there, is it there
FINDS = ("locate", "existence")  # the lookups that must find what a word names (identify goes from place to name)
COMPARES = ("relative_distance", "left_right", "relative_size")  # questions that need two named objects found and compared
DETAILS = ("attribute", "count")  # questions that need the shape of found objects: at chance when mixed among all


def stage1_example(cfg, pool, codes, tok, image_offset, rng, step=None, amg=True, cats=()):
    """One training sequence of the stage-1 mixture, as (ids, loss mask, task, scene index): AMG (depth or segmentation
    generation, loss on the target codes only, as in the paper) with probability amg_share (with find_amg off: from
    step ground_steps on),
    otherwise one question with its answer (loss on the answer): a lookup question (LOOKUPS: "where is the red
    object?", "what colour is the object at row r, column c?", "is there a red object?", with shape_lookups "what
    shape is the red object?") with probability ground_share, else a spatial question of any
    category. Before step ground_steps (the curriculum) every question is a lookup that must find what a word names
    (FINDS, and shape): a fresh model learns that only after tens of thousands of such questions (README, "Making the model see"),
    and every other category needs it. For the next compare_steps steps the spatial questions are two-object
    comparisons (COMPARES; any category in a scene that has none): mixed among all categories they stayed at chance.
    amg=False: always a question (the finding phase's find_extra lookups); cats: a spatial question of these categories
    (the compare_extra and detail_extra questions)."""
    i = int(rng.integers(len(pool)))
    if cats:  # a scene with a question of these categories: count is always asked; without a comparison, redraw
        for _ in range(len(pool)):
            if qs := [q for q in data.make_questions(pool.scenes[i], rng) if q.category in cats]:
                break
            i = int(rng.integers(len(pool)))
        qs = qs or data.make_questions(pool.scenes[i], rng)  # a pool without any (a tiny one): any question
        segs, images, kind = data.vqa_segments(qs[rng.integers(len(qs))]), {"rgb": codes["rgb"][i]}, "vqa"
    elif amg and rng.random() < cfg.amg_share and (cfg.find_amg or step is None or step >= cfg.ground_steps):
        kind = "depth" if rng.random() < cfg.depth_share else "segmentation"
        segs, images = data.amg_segments(kind), {"rgb": codes["rgb"][i], kind: codes[kind][i]}
    else:
        first = step is not None and step < cfg.ground_steps  # the curriculum's first part: find what a word names
        lookup = first or rng.random() < cfg.ground_share
        kind = "ground" if lookup else "vqa"
        # the curriculum's second part: the spatial questions are comparisons of two objects the model can now find;
        # then, if asked, a third for shape and counting (DETAILS)
        end = cfg.ground_steps + cfg.compare_steps
        only = () if first or step is None else COMPARES if step < end else DETAILS if step < end + cfg.detail_steps else ()
        qs = data.grounding_questions(pool.scenes[i], rng) + data.make_questions(pool.scenes[i], rng)
        shape = ("shape",) if cfg.shape_lookups else ()
        finds = FINDS + shape + (("attribute",) if cfg.find_attribute else ())  # attribute: find, then read its shape
        qs = ([q for q in qs if q.category in only] if only and not lookup else []) or \
            [q for q in qs if q.category in (finds if first else LOOKUPS + shape if lookup else data.CATEGORIES)]
        segs, images = data.vqa_segments(qs[rng.integers(len(qs))]), {"rgb": codes["rgb"][i]}
    ids, mask = data.encode_segments(segs, tok, image_offset, images)
    return ids, mask, kind, i


def stage1_batch(cfg, pool, codes, tok, image_offset, step, rank=0, world=1):
    """One rank's share of the stage-1 batch of a step, a pure function of (seed, step): its batch_size / world
    examples, plus every world-th of the extra questions beside it: find_extra × batch_size lookups during the finding
    phase, compare_extra × batch_size comparisons during the comparison phase, and after the curriculum's phases
    detail_extra × batch_size attribute and count questions."""
    rng = np.random.default_rng([cfg.seed, 2, step])
    batch = [stage1_example(cfg, pool, codes, tok, image_offset, rng, step) for _ in range(cfg.batch_size)]
    per_rank = max(1, cfg.batch_size // world)
    batch = batch[rank * per_rank:(rank + 1) * per_rank]
    found, compared = cfg.ground_steps, cfg.ground_steps + cfg.compare_steps  # the ends of the first two phases
    share, stream, kw = (cfg.find_extra, 3, {"amg": False}) if step < found else (cfg.compare_extra, 5, {"cats": COMPARES}) \
        if step < compared else (cfg.detail_extra * (step >= compared + cfg.detail_steps), 4, {"cats": DETAILS})
    batch += [stage1_example(cfg, pool, codes, tok, image_offset, np.random.default_rng([cfg.seed, stream, step, j]),
                             step, **kw) for j in range(rank, round(share * cfg.batch_size), world)]  # own streams
    return batch


def collate(examples, device, rgb=None):
    """Right-pad to the longest sequence; inputs = ids[:-1], targets = ids[1:], loss on targets whose mask is set.
    Right padding needs no attention mask: under causal attention real tokens never see the pads after them.
    examples: (ids, mask, task, scene index); rgb (N, H, W, 3) uint8 images by scene index, for the understanding
    path. Returns (idx, targets, loss mask, pixels (B, 3, H, W) in [-1, 1] or None)."""
    T = max(len(e[0]) for e in examples) - 1
    idx = torch.full((len(examples), T), data.PAD_ID, dtype=torch.long)
    tgt = torch.full((len(examples), T), data.PAD_ID, dtype=torch.long)
    lm = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, (ids, mask, *_) in enumerate(examples):
        n = len(ids) - 1
        idx[b, :n] = torch.tensor(ids[:-1])  # (T,) inputs
        tgt[b, :n] = torch.tensor(ids[1:])  # (T,) next-token targets
        lm[b, :n] = torch.tensor(mask[1:])  # (T,) is target t a training target?
    pixels = None if rgb is None else cooper.to_unit(rgb[[e[3] for e in examples]]).to(device)  # (B, 3, H, W)
    return idx.to(device), tgt.to(device), lm.to(device), pixels


def chunk_cuts(lens, accum):
    """Forward-chunk boundaries of ascending lengths: accum equal chunks, or two cut where padding is least."""
    n = len(lens)
    if accum > 1 or n < 2:
        return [a * n // accum for a in range(accum + 1)]
    return [0, min(range(1, n), key=lambda k: k * lens[k - 1] + (n - k) * lens[-1]), n]


def lm_step(examples, wrapped, device, rgb, accum, amp, t0):
    """Forward + backward of one rank's share of a batch of (ids, loss mask, task, scene index) examples; returns the
    stats of the progress line. Each task's loss is a mean over its own target tokens, weighted by its share of the
    sequences, so that an answer's few tokens are not drowned by the 65 target codes of a map."""
    mine = sorted(examples, key=lambda e: len(e[0]))
    n_tok, n_seq = {}, {}
    for ids, m, kind, _ in mine:
        n_tok[kind] = n_tok.get(kind, 0) + sum(m[1:])
        n_seq[kind] = n_seq.get(kind, 0) + 1
    # forward passes over length-sorted chunks: short question and long map sequences are not padded to one length
    cuts = chunk_cuts([len(e[0]) for e in mine], accum)
    sums, total = {}, 0.0
    for a in range(len(cuts) - 1):
        chunk = mine[cuts[a]:cuts[a + 1]]
        idx, tgt, lm, pixels = collate(chunk, device, rgb)
        # per-token weight: (task's share of the sequences) / (task's target tokens in the whole batch)
        w = torch.tensor([n_seq[e[2]] / len(mine) / max(1, n_tok[e[2]]) for e in chunk], device=device)  # (B,)
        with no_sync(wrapped, a == len(cuts) - 2), amp():
            # loss on the target image codes (AMG) or the answer text only: lm marks those targets
            _, ce = wrapped(idx, tgt, lm, reduction="none", pixels=pixels)  # (N_masked,) per-token cross-entropy
            loss = (ce * w[lm.nonzero()[:, 0]]).sum()  # (N_masked,) weighted by each token's task
            loss.backward()
        total += loss.item()
        per_seq = torch.zeros(len(chunk), device=ce.device).index_add_(0, lm.nonzero()[:, 0], ce.detach())  # (B,)
        # per-task loss, for the progress line and the curves: one device-to-host copy per chunk, not per sequence
        for e, l in zip(chunk, per_seq.tolist()):
            sums[e[2]] = sums.get(e[2], 0.0) + l
    stats = {"loss": total, "tok/s": sum(len(e[0]) for e in mine) / (time.time() - t0)}
    stats.update({f"loss_{k}": sums[k] / max(1, n_tok[k]) for k in sums})
    return stats


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
    amp = autocast_for(device, cfg.cpu_bf16)

    rgb = pool.images("rgb") if mcfg.patch_embed else None  # (N, H, W, 3) input images for the understanding path

    def step_fn(step):
        t0 = time.time()
        batch = stage1_batch(cfg, pool, codes, tok, mcfg.image_offset, step, DDP_RANK, DDP_WORLD)
        return lm_step(batch, wrapped, device, rgb, accum, amp, t0)

    def on_eval(step):  # a point of the VQA learning curve
        evaluate_and_report(cfg, run, model, vq, tok, device, step, maps=False)

    # under FSDP rank 0 alone cannot run the sharded model, so evaluation waits for the gathered final checkpoint
    done = run_phase("stage1", cfg, run, model, wrapped, opt, cfg.steps, cfg.lr, step_fn, {},
                     None if sharded(model, cfg) else on_eval)
    if sharded(model, cfg) and DDP_RANK == 0:
        model = UnifiedTransformer(mcfg).to(device)
        path = os.path.join(run, "stage1.pt")
        cooper.load_weights(model, load_checkpoint(path)["model"], path)
    return model, done


def evaluate_and_report(cfg, run, model, vq, tok, device, step, maps=True):
    """Held-out evaluation into metrics.jsonl, a printed table, the VQA learning curve and (with maps) the sample grid
    PNG (rank 0 only). Without maps only VQA is measured: the points of the learning curve during training."""
    if DDP_RANK != 0:
        return None
    model.eval()
    c = cooper.Cooper(model, vq, tok, device)
    if maps:
        m, samples = cooper.evaluate(c, n=cfg.n_eval, split="val", seed=cfg.seed, n_vqa=cfg.n_vqa)
        cooper.sample_grid(samples).save(os.path.join(run, "samples.png"))
    else:
        m = cooper.evaluate_vqa(c, n=cfg.n_vqa, split="val", seed=cfg.seed) if cfg.n_vqa else {}
    model.train()
    MetricsLog(os.path.join(run, "metrics.jsonl")).write({"phase": "eval", "step": step, **m})
    print0(f"\nevaluation at step {step} on held-out scenes ({cfg.n_eval if maps else 0} for maps, {cfg.n_vqa} for VQA):\n"
           + cooper.format_table(m))
    plot_curves(os.path.join(run, "metrics.jsonl"), os.path.join(run, "loss.png"))
    return m


def plot_curves(metrics_path, out_path):
    """loss.png: the loss curves of every training phase (log scale); beside it vqa.png: the VQA learning curve, one
    panel per category with the held-out score, the blind score and the chance level against the step; and after GRPO
    rewards.png: the reward curves."""
    rows = [json.loads(l) for l in open(metrics_path) if l.strip()]
    charts = []
    for ph in ("vq", "stage1", "sft", "grpo"):
        rr = [r for r in rows if r.get("phase") == ph]
        if rr:
            keys = ["loss"] + sorted({k for r in rr for k in r if k.startswith("loss_")})
            charts.append(cooper.line_chart({k: [(r["step"], r[k]) for r in rr if k in r] for k in keys},
                                            title=f"{ph}: training loss", ylabel="loss", log_y=True))
    if charts:
        cooper.stack_images(charts).save(out_path)
    rl = [r for r in rows if r.get("phase") == "grpo"]
    if rl:  # the paper's reward curves: total, answer, format and exploration reward against the GRPO step
        keys = ["reward", "reward_answer", "reward_format", "reward_explore", "tool_rate"]
        cooper.line_chart({k: [(r["step"], r[k]) for r in rl if k in r] for k in keys}, title="GRPO: mean reward of "
                          "the rollouts (CPR)", ylabel="reward").save(os.path.join(os.path.dirname(out_path), "rewards.png"))
    ev = [r for r in rows if r.get("phase") == "eval" and "vqa/mean" in r]
    if ev:
        cats = [c for c in ["mean"] + data.CATEGORIES + data.GROUNDING if f"vqa/{c}" in ev[-1]]
        panels = [cooper.line_chart({"model": [(r["step"], r[f"vqa/{c}"]) for r in ev if f"vqa/{c}" in r],
                                     "blind": [(r["step"], r[f"vqa_blind/{c}"]) for r in ev if f"vqa/{c}" in r]},
                                    dashed={"chance": [(r["step"], r[f"vqa_chance/{c}"]) for r in ev if f"vqa/{c}" in r]},
                                    title=f"VQA {c} (held out)", ylabel="score", size=(400, 220)) for c in cats]
        pairs = [cooper.stack_images(panels[i::2]) for i in range(2)]
        page = Image.new("RGB", (pairs[0].width * 2, pairs[0].height), "white")
        for i, p in enumerate(pairs):
            page.paste(p, (i * pairs[0].width, 0))
        page.save(os.path.join(os.path.dirname(out_path), "vqa.png"))


def stage1(cfg):
    device = setup_distributed(cfg)
    run = prepare_run(cfg)
    attn = cfg.attn or ("sdpa" if device.type == "cuda" else PRESETS[cfg.preset].attn_impl)
    mcfg = replace(PRESETS[cfg.preset], attn_impl=attn, patch_embed=cfg.patch_embed)
    print0(f"attention kernel: {attn}" + ("" if cfg.attn else " (choose with --attn)"))
    tok_path, vq_path = os.path.join(run, "tokenizer.json"), os.path.join(run, "vq.pt")
    if DDP_RANK == 0 and not os.path.exists(tok_path):  # the text tokenizer: byte-level BPE on the world's text
        data.save_tokenizer(data.train_tokenizer(), tok_path)
    barrier()  # on every rank, file or not: ranks that skip it fall out of step with rank 0 and hang
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


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2 (PAPER.md "Stage 2", DESIGN.md "Stage 2"): SFT on balanced interleaved trajectories, then GRPO with the CPR
# reward. Rollouts run through cooper.Cooper.rollout, the same tool-switch runtime that answers at inference.


def sft_example(cfg, pool, codes, tok, image_offset, rng):
    """One SFT sequence: with probability sft_mix a stage-1 example (AMG / grounding / direct VQA), so that drawing maps
    and answering at once are not forgotten; otherwise a balanced interleaved trajectory (data.sample_trajectory: depth,
    segmentation and text-only in equal shares). A trajectory's loss is on the model's text turns only (PAPER.md), not
    on the question, the reflection prompt or the map: the map inside it is the true map, context the model did not
    write (at inference it is the model's own), and the AMG examples keep map generation trained."""
    if rng.random() < cfg.sft_mix:
        return stage1_example(cfg, pool, codes, tok, image_offset, rng)
    i = int(rng.integers(len(pool)))
    _, segs, mode = data.sample_trajectory(pool.scenes[i], rng)
    images = {"rgb": codes["rgb"][i], **({mode: codes[mode][i]} if mode != "text" else {})}
    ids, mask = data.encode_segments(segs, tok, image_offset, images)
    return ids, mask, f"sft_{mode}", i


def token_logps(model, tokens, mask, pixels, start, width, temperature, where=None):
    """Next-token log-probs of tokens[:, start:start + width] under the temperature-scaled model (EQUATIONS.md: logits
    divided by the sampling temperature), and the entropy of each of those distributions: (B, width) each, zero-padded
    past the sequence. tokens / mask (B, T) with left-padded prompts; pixels the input images. where (B, width) bool:
    compute only those (the policy-gradient mask), the rest are 0: the output layer skips the maps' codes."""
    B, T = tokens.shape
    N = T - start  # generated positions
    at = torch.zeros(B, T - 1, dtype=torch.bool, device=tokens.device)  # (B, T-1): position t predicts token t+1
    at[:, start - 1:] = True if where is None else where[:, :N]
    logits, _ = model(tokens[:, :-1], key_padding_mask=mask[:, :-1], pixels=pixels, logits_at=at)  # (n, V)
    logp = (logits.float() / temperature).log_softmax(-1)  # (n, V)
    sel = F.pad(at[:, start - 1:], (0, width - N))  # (B, width)
    got = torch.zeros(B, width, device=tokens.device, dtype=logp.dtype).masked_scatter(
        sel, logp.gather(-1, tokens[:, 1:][at][:, None]).squeeze(-1))
    with torch.no_grad():
        ent = torch.zeros_like(got).masked_scatter(sel, -(logp.exp() * logp).sum(-1))
    return got, ent


def policy_mask(raw, image_offset, width, image_pg=False):
    """(B, width) bool over the generated tokens of rollouts (generate's dict with T0): True on the tokens the policy
    sampled as text, which alone get the policy gradient (PAPER.md: generated images are context, not actions); with
    image_pg also on the map codes it sampled. Forced tokens (<|vision_start|>, <|vision_end|>, the reflection prompt),
    the prompt and padding are never in it."""
    # exercise 10 begin: the tool-switching runtime
    gen = raw["tokens"][:, raw["T0"]:]  # (B, N)
    m = raw["sampled"] & ((gen < image_offset) | image_pg)
    return F.pad(m, (0, width - m.shape[1]))
    # exercise 10 end


def rl_items(cfg, pool, step):
    """This rank's prompts of a GRPO step: (scene index, question) pairs, a pure function of the step. Groups are never
    split across ranks: each rank draws its own prompts and generates all G rollouts of each."""
    rng = np.random.default_rng([cfg.seed, 4, step])
    items = []
    for _ in range(cfg.rl_batch):
        i = int(rng.integers(len(pool)))
        qs = data.make_questions(pool.scenes[i], rng)
        items.append((i, qs[int(rng.integers(len(qs)))]))
    per = cfg.rl_batch // DDP_WORLD
    return items[DDP_RANK * per:(DDP_RANK + 1) * per]


def grpo_step(cfg, agent, wrapped, ref, opt, pool, rgb, step, amp):
    """One GRPO step (PAPER.md "GRPO as run by the authors"): B prompts × G rollouts sampled together, CPR rewards,
    group advantages, then mu policy updates on the same rollouts; run_phase takes the last optimizer step. Returns the
    logged stats."""
    t0, G, model = time.time(), cfg.group_size, agent.model
    items = rl_items(cfg, pool, step)
    scenes = [i for i, _ in items for _ in range(G)]  # (B·G,) rollouts, groups consecutive
    qs = [q for _, q in items for _ in range(G)]
    results, raw = agent.rollout(rgb[scenes], [q.text for q in qs], "interleaved", temperature=cfg.temperature,
                                 seed=(cfg.seed * 100003 + step) * DDP_WORLD + DDP_RANK, turn_cap=cfg.turn_cap)
    model.train()
    t_roll = time.time() - t0
    # CPR reward per rollout, then advantages within each group of G (std-scaled, or only centred for Dr. GRPO)
    totals, comp = reward.cpr_rewards([r["text"] for r in results], [q.answer for q in qs], [q.kind for q in qs],
                                      [q.flag for q in qs], group_size=G)
    adv = reward.group_advantages(totals, G, scale=cfg.loss_type != "dr_grpo").to(agent.device)  # (B·G,)
    # what each generated token is: only tokens the policy sampled as text get the policy gradient (with --image-pg
    # also the codes of the maps it drew); forced tokens, the reflection prompt, the prompt and padding never do
    T0, width = raw["T0"], agent.max_tokens(cfg.turn_cap)
    tokens, mask = raw["tokens"].to(agent.device), raw["mask"].to(agent.device)
    pg = policy_mask(raw, agent.cfg.image_offset, width, cfg.image_pg).to(agent.device)  # (B·G, width)
    pixels = agent.pixels(rgb[scenes])
    with torch.no_grad(), amp():
        ref_lp = token_logps(ref, tokens, mask, pixels, T0, width, cfg.temperature, pg)[0] if ref is not None else None
    old = None
    for u in range(cfg.mu):
        with amp():
            logps, ent = token_logps(wrapped, tokens, mask, pixels, T0, width, cfg.temperature, pg)
            # old policy = the first update's log-probs, detached: the parameters the rollouts were sampled with, no
            # extra forward pass, and the ratio is exactly 1 at mu = 1
            old = logps.detach() if old is None else old
            loss, st = grpo_loss(logps, old, adv, pg, ref_lp, cfg.beta, cfg.eps_low, cfg.eps_high, cfg.loss_type)
        loss.backward()
        if u < cfg.mu - 1:  # the last update's optimizer step is run_phase's
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    # logging: rewards, tool use per flag and per category, lengths, clipping, KL, entropy, speed
    used = np.array([reward.count_tool_calls(r["turns"]) > 0 for r in results])
    groups = adv.view(-1, G)
    n_gen = int(mask[:, T0:].sum())
    stats = {"loss": loss.item(), "reward": float(np.mean(totals)), "reward_answer": float(np.mean(comp["answer"])),
             "reward_format": float(np.mean(comp["format"])), "reward_explore": float(np.mean(comp["explore"])),
             "tool_rate": float(used.mean()), "turns": float(np.mean([len(r["turns"]) for r in results])),
             "text_tokens": float(pg.sum()) / len(results), "clip_frac": st["clip_low_frac"] + st["clip_high_frac"],
             "kl": st["kl"], "entropy": float((ent * pg).sum() / pg.sum().clamp(min=1)),
             "zero_adv_groups": float((groups == 0).all(1).float().mean()), "rollout_tok/s": n_gen / t_roll,
             "tok/s": n_gen / (time.time() - t0)}
    stats.update({f"tool_rate_{f}": r for f, (r, _) in cooper.tool_rates(results, [q.flag for q in qs]).items()})
    stats.update({f"tool_rate/{c}": r for c, (r, _) in cooper.tool_rates(results, [q.category for q in qs]).items()})
    return stats


def stage2(cfg):
    """Stage 2 from a finished stage-1 run: SFT (phase "sft", sft.pt), then GRPO with CPR (phase "grpo", grpo.pt)."""
    device = setup_distributed(cfg)
    init = cfg.init or cfg.out
    ck_path = os.path.join(init, "stage1.pt")
    ck = load_checkpoint(ck_path) if os.path.exists(ck_path) else None
    if ck is None or ck["step"] < ck["train_config"]["steps"]:
        sys.exit(f"error: {init} holds no finished stage-1 run; train one first: python train.py --stage 1 --out {init}"
                 + ("" if ck is None else " --resume"))
    run = prepare_run(cfg)
    if DDP_RANK == 0 and os.path.abspath(run) != os.path.abspath(init):
        for f in ("tokenizer.json", "vq.pt", "stage1.pt"):
            if not os.path.exists(os.path.join(run, f)):
                shutil.copyfile(os.path.join(init, f), os.path.join(run, f))
    barrier()
    tok = data.load_tokenizer(os.path.join(run, "tokenizer.json"))
    attn = cfg.attn or ("sdpa" if device.type == "cuda" else ck["model_config"]["attn_impl"])
    mcfg = replace(ModelConfig(**ck["model_config"]), attn_impl=attn)
    vq, model = VQTokenizer(mcfg).to(device), UnifiedTransformer(mcfg).to(device)
    cooper.load_weights(vq, load_checkpoint(os.path.join(run, "vq.pt"))["model"], os.path.join(run, "vq.pt"))
    cooper.load_weights(model, ck["model"], ck_path)
    s1 = TrainConfig(**{**asdict(cfg), "shape_lookups": False,  # (a stage-1 run older than the flag had none)
                        **{k: v for k, v in ck["train_config"].items() if k in
                           ("amg_share", "depth_share", "ground_share", "n_train_scenes", "shape_lookups")}})
    pool = ScenePool(s1.n_train_scenes, mcfg.image_size)
    codes = encode_pool(vq.eval(), pool, device)
    rgb = pool.images("rgb")
    amp = autocast_for(device, cfg.cpu_bf16)
    per_rank = max(1, cfg.batch_size // DDP_WORLD)
    accum = max(1, per_rank // cfg.micro_batch)

    def optimizer(lr):
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def report(phase, step):
        evaluate_stage2(cfg, run, model, vq, tok, device, phase, step)

    # SFT: trajectories (+ a share of the stage-1 mixture), loss on the model's text turns
    wrapped = wrap(model, cfg, device)
    opt = optimizer(cfg.sft_lr)

    def sft_fn(step):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, 3, step])
        batch = [sft_example(s1, pool, codes, tok, mcfg.image_offset, rng) for _ in range(cfg.batch_size)]
        return lm_step(batch[DDP_RANK * per_rank:(DDP_RANK + 1) * per_rank], wrapped, device,
                       rgb if mcfg.patch_embed else None, accum, amp, t0)

    done = run_phase("sft", cfg, run, model, wrapped, opt, cfg.sft_steps, cfg.sft_lr, sft_fn, {},
                     warmup=min(cfg.warmup, cfg.sft_steps // 10))
    if not done:
        return print0(f"stopped after --max-steps {cfg.max_steps} in the SFT phase; continue with --resume")
    if not os.path.exists(os.path.join(run, "grpo.pt")):
        report("sft", cfg.sft_steps)
    # GRPO with the CPR reward; the reference for the KL term (beta > 0) is the SFT model, frozen
    ref = None
    if cfg.beta > 0:
        ref = UnifiedTransformer(mcfg).to(device).eval().requires_grad_(False)
        ref.load_state_dict(model.state_dict())
    agent = cooper.Cooper(model, vq, tok, device)
    opt = optimizer(cfg.rl_lr)
    done = run_phase("grpo", cfg, run, model, wrapped, opt, cfg.rl_steps, cfg.rl_lr,
                     lambda step: grpo_step(cfg, agent, wrapped, ref, opt, pool, rgb, step, amp), {}, warmup=0,
                     log_every=1)  # every GRPO step is logged (its reward curves)
    if not done:
        return print0(f"stopped after --max-steps {cfg.max_steps} in the GRPO phase; continue with --resume")
    report("grpo", cfg.rl_steps)
    print0(f"run folder: {run} (sft.pt, grpo.pt, metrics.jsonl, rewards.png, tools.png, eval_stage2.json)")


def evaluate_stage2(cfg, run, model, vq, tok, device, phase, step):
    """Held-out evaluation of every answering mode (cooper.evaluate_modes) into metrics.jsonl, eval_stage2.json, the
    tool-usage chart and the printed table (rank 0 only)."""
    if DDP_RANK != 0:
        return None
    model.eval()
    agent = cooper.Cooper(model, vq, tok, device)
    m = cooper.evaluate_modes(agent, n=cfg.n_eval2, seed=cfg.seed)
    m.update(cooper.evaluate_rewards(agent, n=max(2, cfg.n_eval2 // 2), group_size=cfg.group_size, seed=cfg.seed,
                                     temperature=cfg.temperature, turn_cap=cfg.turn_cap))
    model.train()
    if phase == "grpo":  # GRPO's gain over the SFT model: the same prompts and sampling seeds, so a paired comparison
        rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
        sft = [r for r in rows if r.get("phase") == "eval2" and r.get("after") == "sft"]
        if sft and len(sft[-1].get("reward/per_prompt", [])) == len(m["reward/per_prompt"]):
            m["reward_gain/total"], m["reward_gain_se/total"] = cooper.paired_gain(sft[-1]["reward/per_prompt"],
                                                                                   m["reward/per_prompt"])
    MetricsLog(os.path.join(run, "metrics.jsonl")).write({"phase": "eval2", "after": phase, "step": step, **m})
    atomic_save(json.dumps(m, indent=1), os.path.join(run, "eval_stage2.json"))
    cooper.tool_chart(m).save(os.path.join(run, "tools.png"))
    print0(f"\nevaluation after {phase} on {cfg.n_eval2} held-out scenes:\n" + cooper.format_modes(m))
    plot_curves(os.path.join(run, "metrics.jsonl"), os.path.join(run, "loss.png"))
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
        name = "config.json" if cfg.stage == 1 else "config_stage2.json"  # stage 2 may share stage 1's folder
        atomic_save(json.dumps({"train": asdict(cfg), "model": asdict(PRESETS[cfg.preset])}, indent=1),
                    os.path.join(run, name))
    barrier()
    return run


def main(argv=None):
    cfg = parse_args(argv)
    try:
        stage1(cfg) if cfg.stage == 1 else stage2(cfg)
        barrier()  # every rank finished (rank 0 evaluates last): no rank tears down gloo while a peer is still busy
    except cooper.RunError as e:  # e.g. a checkpoint written by another version of model.py
        sys.exit(f"error: {e}")
    finally:
        if DDP_WORLD > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
