"""Where a stage-1 step's time goes: building the batch, padding, and the forward + backward of one step of each phase.

For one step of the finding phase, the comparison phase and the mixed phase of the default schedule, it builds the
batch exactly as `train.py` does (`stage1_batch`) and times it, counts the padded tokens of `lm_step`'s two
length-sorted chunks against the real ones, and times `lm_step` (median of --reps after one warm-up) with the fused
attention and with SDPA, each in float32 and under bfloat16 autocast (`train.py` uses it on GPUs and with
--cpu-bf16). A fresh model: a step's cost does not depend on the weights.

    python docs/step_cost.py runs/tiny [--threads 2] [--reps 5] [--scenes 1000] [train.py flags, e.g. --compare-extra 0]

Results: README ("Time") and docs/perception.md ("What is left").
"""
import argparse
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
from model import PRESETS, UnifiedTransformer, VQTokenizer  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("run", help="a stage-1 run folder with tokenizer.json and vq.pt")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=5, help="timed repetitions per step (after one warm-up)")
p.add_argument("--scenes", type=int, default=1000, help="training scenes in the pool (the default run has 2,000)")
args, flags = p.parse_known_args()  # the rest: train.py flags, the schedule to time (default: the default run's)
for f in ("tokenizer.json", "vq.pt"):
    if not os.path.exists(os.path.join(args.run, f)):
        p.error(f"{args.run} has no {f}: give a stage-1 run folder")
torch.set_num_threads(args.threads)
cfg = train.parse_args(["--stage", "1"] + [f for f in flags if f != "--"])
tok = data.load_tokenizer(os.path.join(args.run, "tokenizer.json"))
mcfg = replace(PRESETS[cfg.preset], text_vocab=tok.get_vocab_size())
vq = VQTokenizer(mcfg)
cooper.load_weights(vq, train.load_checkpoint(os.path.join(args.run, "vq.pt"))["model"], args.run)
pool = train.ScenePool(args.scenes, mcfg.image_size)
codes, rgb = train.encode_pool(vq.eval(), pool, "cpu"), pool.images("rgb")
steps = {"finding": 1000, "comparison": cfg.ground_steps + 500, "mixed": cfg.ground_steps + cfg.compare_steps + 500}
cpu = torch.device("cpu")
amps = {"float32": train.autocast_for(cpu), "bf16 autocast": train.autocast_for(cpu, cpu_bf16=True)}


print(f"{args.threads} thread(s); seconds per step (median of {args.reps})")
for phase, step in steps.items():
    t0 = time.perf_counter()
    batch = train.stage1_batch(cfg, pool, codes, tok, mcfg.image_offset, step)
    t_data = time.perf_counter() - t0
    lens = sorted(len(e[0]) - 1 for e in batch)
    cuts = train.chunk_cuts(lens, 1)  # lm_step's forward chunks; each is padded to its longest sequence
    padded = sum((b - a) * lens[b - 1] for a, b in zip(cuts, cuts[1:]))
    row = [f"{phase:<10} step {step}: {len(batch)} sequences, {sum(lens)} tokens, padding "
           f"{padded / sum(lens) - 1:.1%}, batch built in {t_data:.3f} s"]
    for impl in ("fused", "sdpa"):
        for name, amp in amps.items():
            torch.manual_seed(0)
            model = UnifiedTransformer(replace(mcfg, attn_impl=impl))
            ts = []
            for _ in range(args.reps + 1):
                t0 = time.perf_counter()
                train.lm_step(batch, model, "cpu", rgb, 1, amp, t0)
                ts.append(time.perf_counter() - t0)
            row.append(f"    {impl:<5} {name:<13} {np.median(ts[1:]):.3f} s")
    print("\n".join(row), flush=True)
