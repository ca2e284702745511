"""Branch a stage-1 run at one of its checkpoints, with changed training flags, for paired experiments.

Two runs that share everything up to step S and differ only after it are the cleanest comparison of a change to the
curriculum: the same weights, data and random stream up to S. This copies a run's tokenizers and a checkpoint of its
`stage1.pt` (taken at step S, e.g. a copy saved while the run was going) into a new folder, keeps its metrics.jsonl
up to S, and writes the changed flags into the checkpoint's training config, so that `train.py --resume` continues
with them (it refuses a config that differs from the checkpoint's). Only flags that change nothing before step S are
allowed here; the caller vouches for that (e.g. --compare-steps acts from --ground-steps on).

    cp runs/tiny/stage1.pt runs/ck3500/stage1.pt                     # while runs/tiny is at step 3,500
    python docs/branch_run.py runs/tiny runs/ck3500/stage1.pt runs/cmp compare_steps=1000
    python train.py --stage 1 --out runs/cmp --resume --compare-steps 1000
"""
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402

if len(sys.argv) < 5:
    sys.exit(__doc__)
src, ckpt, dst, sets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
ck = torch.load(ckpt, map_location="cpu", weights_only=False)
fields = train.TrainConfig.__dataclass_fields__
for s in sets:
    k, v = s.split("=", 1)
    if k not in fields:
        sys.exit(f"error: {k} is not a TrainConfig field")
    ck["train_config"][k] = type(fields[k].default)(v)
os.makedirs(dst, exist_ok=False)
for f in ("tokenizer.json", "vq.pt", "config.json"):
    shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
torch.save(ck, os.path.join(dst, "stage1.pt"))
rows = [json.loads(line) for line in open(os.path.join(src, "metrics.jsonl")) if line.strip()]
rows = [r for r in rows if r.get("phase") not in ("stage1", "eval") or r.get("step", 0) <= ck["step"]]
with open(os.path.join(dst, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
print(f"{dst}: branched from {ckpt} at step {ck['step']} with {' '.join(sets)}; continue with: "
      f"python train.py --stage 1 --out {dst} --resume " + " ".join(f"--{s.split('=')[0].replace('_', '-')} "
                                                                       f"{s.split('=')[1]}" for s in sets))
