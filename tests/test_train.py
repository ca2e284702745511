"""Tests of train.py's stage-1 machinery: flags, exact resume, errors that say what to do, DDP replicas.
Run: python -m pytest tests/test_train.py"""
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import fields, replace

import numpy as np
import pytest
import torch

import data
import train
from conftest import FAST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(run, phase):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["phase"] == phase}


def test_every_flag_is_read(capsys):
    """Each TrainConfig field has a flag whose --help line gives its comment in TrainConfig and its default, and passing
    it changes exactly that field (no flag is parsed and ignored)."""
    helps = train.field_help()
    assert all(len(helps.get(f.name, "")) > 5 for f in fields(train.TrainConfig)), helps
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--vq-lr VQ_LR peak learning rate of the VQ tokenizer (default: 0.002)" in text
    assert "the control (questions only) (default: 0.25)" in text
    base = train.parse_args([])
    for f in fields(train.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            argv, want = [flag if not f.default else "--no-" + flag[2:]], not f.default
        elif f.name == "preset":
            argv, want = [flag, "small"], "small"
        elif f.name == "stage":
            argv, want = [flag, "2"], 2
        elif f.name == "attn":
            argv, want = [flag, "sdpa"], "sdpa"
        elif f.name == "loss_type":
            argv, want = [flag, "dapo"], "dapo"
        elif f.type in (str, "str"):
            argv, want = [flag, "x/y"], "x/y"
        else:
            want = type(f.default)(f.default * 2 + 1)
            argv = [flag, str(want)]
        cfg = train.parse_args(argv)
        assert getattr(cfg, f.name) == want, f.name
        others = [g.name for g in fields(train.TrainConfig) if g.name not in (f.name, "out")]
        assert all(getattr(cfg, n) == getattr(base, n) for n in others), f.name


@pytest.fixture
def one_thread():
    """Single-threaded CPU kernels: float sums then happen in one fixed order, so two runs can match bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_is_exact(tmp_path, one_thread):
    """A run stopped twice (inside the VQ phase, then inside the transformer phase) and resumed each time logs
    exactly the same losses, step for step, and ends with the same weights as an uninterrupted run."""
    ref = str(tmp_path / "uninterrupted")
    train.main(["--stage", "1", "--out", ref] + FAST)
    out = str(tmp_path / "resumed")
    train.main(["--stage", "1", "--out", out, "--max-steps", "2"] + FAST)  # stops at VQ step 2 of 4
    assert not os.path.exists(os.path.join(out, "stage1.pt"))
    train.main(["--stage", "1", "--out", out, "--max-steps", "3", "--resume"] + FAST)  # VQ 2 → 3
    train.main(["--stage", "1", "--out", out, "--max-steps", "4", "--resume"] + FAST)  # VQ 3 → 4, stage 1 0 → 4
    train.main(["--stage", "1", "--out", out, "--resume"] + FAST)  # stage 1 4 → 6
    for phase, n in (("vq", 4), ("stage1", 6)):
        a, b = losses(ref, phase), losses(out, phase)
        assert sorted(a) == sorted(b) == list(range(1, n + 1))
        assert a == b, phase  # bit-for-bit: same data, same RNG, same optimizer state
    wa = torch.load(os.path.join(ref, "stage1.pt"), weights_only=False)["model"]
    wb = torch.load(os.path.join(out, "stage1.pt"), weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_folder_files(tiny_run):
    """A finished run holds what DESIGN.md lists: config, tokenizer, checkpoints, metrics with an evaluation, PNGs."""
    for f in ("config.json", "tokenizer.json", "vq.pt", "stage1.pt", "metrics.jsonl", "samples.png", "loss.png"):
        assert os.path.getsize(os.path.join(tiny_run, f)) > 0, f
    rows = [json.loads(l) for l in open(os.path.join(tiny_run, "metrics.jsonl"))]
    ev = [r for r in rows if r["phase"] == "eval"]
    assert ev and 0.0 <= ev[-1]["seg/pixel_acc"] <= 1.0 and "vq/psnr_rgb" in ev[-1] and "vqa/mean" in ev[-1]
    assert 0.0 <= ev[-1]["vq/seg_count"] <= 1.0 and 0.0 <= ev[-1]["use/count_from_seg"] <= 1.0


def test_errors_say_what_to_do(tiny_run, tmp_path):
    """Bad input stops with a one-line message naming the problem and the fix, not a traceback."""
    with pytest.raises(SystemExit) as e:  # argparse error: unknown preset
        train.parse_args(["--preset", "huge"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # unknown attention kernel
        train.parse_args(["--attn", "flash3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="already holds a run"):  # would overwrite a run
        train.main(["--stage", "1", "--out", tiny_run] + FAST)
    with pytest.raises(SystemExit, match="different configuration"):  # resume with other settings
        train.main(["--stage", "1", "--out", tiny_run, "--resume", "--lr", "0.5"] + FAST)
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in ("tokenizer.json", "config.json"):
        (bad / f).write_bytes(open(os.path.join(tiny_run, f), "rb").read())
    (bad / "vq.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):  # corrupt checkpoint
        train.main(["--stage", "1", "--out", str(bad), "--resume"] + FAST)
    (bad / "vq.pt").write_bytes(open(os.path.join(tiny_run, "vq.pt"), "rb").read())
    ck = torch.load(bad / "vq.pt", weights_only=False)
    ck["model"] = {"x" + k: v for k, v in ck["model"].items()}  # written by another version of model.py
    torch.save(ck, bad / "vq.pt")
    with pytest.raises(SystemExit, match="does not fit this version of model.py"):
        train.main(["--stage", "1", "--out", str(bad), "--resume"] + FAST)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write to run folder"):  # unwritable folder
        train.main(["--stage", "1", "--out", str(blocker / "run")] + FAST)


def test_cosine_schedule():
    """Warm-up rises linearly to the peak; the cosine reaches the floor at the last step."""
    assert train.cosine_lr(0, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert train.cosine_lr(9, 100, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert train.cosine_lr(10, 100, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert train.cosine_lr(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)


def test_curriculum_examples(tiny_run):
    """The stage-1 curriculum: until ground_steps every question is a lookup that must find a word (locate, existence
    or shape); then every category. AMG examples are unaffected."""
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    pool = train.ScenePool(12)
    codes = {"rgb": np.zeros((len(pool), 8, 8), int)}
    cfg = train.TrainConfig(amg_share=0.0, ground_steps=20)
    rng, seen = np.random.default_rng(0), {}
    for step in (0, 19, 20):
        for _ in range(60):
            ids, mask, kind, i = train.stage1_example(cfg, pool, codes, tok, 1000, rng, step)
            question = tok.decode([t for t in ids if t < 1000], skip_special_tokens=True)
            seen.setdefault(step, set()).add((kind, question.startswith(("Where is the", "Is there", "What shape is the"))))
    assert seen[0] == seen[19] == {("ground", True)}
    assert ("vqa", False) in seen[20] and ("ground", True) in seen[20]


def test_compare_phase(tiny_run):
    """After the find-first part, compare_steps steps whose spatial questions are the two-object comparisons (lookups
    keep their share); then every category. The random stream is the same as without the phase (same scenes)."""
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    pool = train.ScenePool(12)
    codes = {"rgb": np.zeros((len(pool), 8, 8), int)}
    compare = lambda q: q.startswith(("Which is closer", "Which object is bigger")) or "to the left of" in q
    for cfg, comparing in ((train.TrainConfig(amg_share=0.0, ground_steps=5, compare_steps=10), (True, True, False)),
                           (train.TrainConfig(amg_share=0.0, ground_steps=5, compare_steps=0), (False, False, False))):
        rng, scenes = np.random.default_rng(0), []
        for step, want in zip((5, 14, 15), comparing):
            kinds = set()
            for _ in range(80):
                ids, mask, kind, i = train.stage1_example(cfg, pool, codes, tok, 1000, rng, step)
                question = tok.decode([t for t in ids if t < 1000], skip_special_tokens=True)
                scenes.append(i)
                if kind == "vqa":
                    kinds.add(compare(question))
            assert kinds == ({True} if want else {True, False}), (step, kinds)
        if cfg.compare_steps:
            first = scenes
    assert scenes == first  # the phase changes which question is asked, not the scenes drawn


def test_detail_phase(tiny_run):
    """detail_steps: after the comparison phase, that many steps whose spatial questions are attribute and count
    (DETAILS); then every category again. Off (0) the phase is absent."""
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    pool = train.ScenePool(12)
    codes = {"rgb": np.zeros((len(pool), 8, 8), int)}
    def detail(q):  # a count question, or an attribute question ("Is the red cube a sphere?")
        return q.startswith("How many") or q.startswith("Is the ") and q.split("?")[0].split()[-1] in data.SHAPES
    both, comparing, details = {True, False}, {False}, {True}
    for detail_steps, wants in ((10, (comparing, details, details, both)), (0, (comparing, both, both, both))):
        cfg = train.TrainConfig(amg_share=0.0, ground_steps=5, compare_steps=5, detail_steps=detail_steps)
        rng = np.random.default_rng(0)
        for step, want in zip((9, 10, 19, 20), wants):
            kinds = set()
            for _ in range(80):
                ids, mask, kind, i = train.stage1_example(cfg, pool, codes, tok, 1000, rng, step)
                if kind == "vqa":
                    kinds.add(detail(tok.decode([t for t in ids if t < 1000], skip_special_tokens=True)))
            assert kinds == want, (detail_steps, step, kinds)


def test_shape_lookups(tiny_run):
    """shape_lookups: "what shape is the red object?" is among the finding phase's questions and the later lookups;
    off, it is never asked."""
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    pool = train.ScenePool(12)
    codes = {"rgb": np.zeros((len(pool), 8, 8), int)}
    for on in (True, False):
        cfg, rng = train.TrainConfig(amg_share=0.0, ground_steps=5, shape_lookups=on), np.random.default_rng(0)
        for step in (0, 50):  # finding phase, then the mixture
            texts = [tok.decode([t for t in train.stage1_example(cfg, pool, codes, tok, 1000, rng, step)[0] if t < 1000],
                                skip_special_tokens=True) for _ in range(150)]
            assert any("What shape is the" in t for t in texts) == on, (on, step)


def test_find_attribute(tiny_run):
    """find_attribute: "is the red object a cube?" is among the finding phase's questions (off: only locate and
    existence are); after the finding phase the mixture is the same either way."""
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    pool = train.ScenePool(12)
    codes = {"rgb": np.zeros((len(pool), 8, 8), int)}
    texts = {}
    for on in (True, False):
        cfg = train.TrainConfig(amg_share=0.0, ground_steps=5, compare_steps=0, find_attribute=on)
        for step in (0, 50):
            rng = np.random.default_rng(0)
            texts[on, step] = [tok.decode([t for t in train.stage1_example(cfg, pool, codes, tok, 1000, rng, step)[0]
                                           if t < 1000], skip_special_tokens=True) for _ in range(150)]
    attribute = lambda t: "Is the " in t  # existence asks "Is there ..."
    assert any(map(attribute, texts[True, 0])) and not any(map(attribute, texts[False, 0]))
    assert texts[True, 50] == texts[False, 50] and any(map(attribute, texts[True, 50]))


def test_find_amg(tiny_run):
    """find_amg off: before ground_steps every example is a question (the finding phase gets the whole batch); from it
    on AMG takes its share, as it does from the start with find_amg on."""
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    pool = train.ScenePool(12)
    codes = {k: np.zeros((len(pool), 8, 8), int) for k in ("rgb", "depth", "segmentation")}
    runs = {}
    for find_amg in (True, False):
        cfg, rng = train.TrainConfig(amg_share=0.5, find_amg=find_amg, ground_steps=10), np.random.default_rng(0)
        runs[find_amg] = [train.stage1_example(cfg, pool, codes, tok, 1000, rng, step)[2:]
                          for step in (9, 10) for _ in range(100)]
    before, after = [k for k, _ in runs[False][:100]], [k for k, _ in runs[False][100:]]
    assert "depth" not in before and "segmentation" not in before
    assert 30 < sum(k in ("depth", "segmentation") for k in after) < 70
    amg0 = [k in ("depth", "segmentation") for k, _ in runs[True][:100]]
    assert 30 < sum(amg0) < 70  # find_amg on: the share from the start


def test_branch_run(tiny_run, tmp_path):
    """docs/branch_run.py: a copy of a run at its checkpoint whose training config carries the changed flag, so that
    train.py --resume accepts the new flag and refuses the old one."""
    dst = str(tmp_path / "branch")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "branch_run.py"), tiny_run,
                        os.path.join(tiny_run, "stage1.pt"), dst, "compare_steps=7"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    path = os.path.join(dst, "stage1.pt")
    ck = torch.load(path, weights_only=False)
    assert ck["train_config"]["compare_steps"] == 7
    assert all(os.path.getsize(os.path.join(dst, f)) > 0 for f in ("tokenizer.json", "vq.pt", "metrics.jsonl"))
    model_cfg = train.ModelConfig(**ck["model_config"])
    base = ["--stage", "1", "--out", dst, "--resume"] + FAST
    args = train.parse_args(base + ["--compare-steps", "7"])
    train.check_same_config(ck, args, model_cfg, path)  # accepted
    with pytest.raises(SystemExit, match="compare_steps"):
        train.check_same_config(ck, train.parse_args(base), model_cfg, path)
    ck["train_config"]["gone_steps"] = 0  # a flag since removed from TrainConfig, off in this run: changes nothing
    train.check_same_config(ck, args, model_cfg, path)
    ck["train_config"]["gone_steps"] = 1500  # ... on in this run: another run
    with pytest.raises(SystemExit, match="gone_steps"):
        train.check_same_config(ck, args, model_cfg, path)


TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(out, *extra, stage=1):
    """Run train.py under torchrun with 2 CPU processes (gloo). A rank that aborts inside gloo's C++ teardown with
    TEARDOWN_ABORT (seen about once in a few dozen runs, only on a loaded machine, after every phase had finished
    and passed its replica check) gets one retry from the same starting folder, with a warning; any other failure,
    or the abort twice, fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), "--stage", str(stage), "--out", out, "--device", "cpu", *extra] + FAST
    saved = out + ".before"
    shutil.rmtree(saved, ignore_errors=True)
    if os.path.isdir(out):
        shutil.copytree(out, saved)
    for attempt in (1, 2):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                           timeout=600)
        if r.returncode == 0 or TEARDOWN_ABORT not in r.stderr or attempt == 2:
            break
        warnings.warn(f"torchrun: a rank aborted in gloo's teardown ({TEARDOWN_ABORT!r}); retrying once")
        shutil.rmtree(out, ignore_errors=True)  # back to the folder as it was before the run
        if os.path.isdir(saved):
            shutil.copytree(saved, out)
    # on failure show each rank's own error lines (a crashing rank's message sits mid-stderr) and the summary
    errs = [l for l in r.stderr.splitlines() if any(w in l for w in ("Error", "error", "terminate", "what()", "Abort"))]
    assert r.returncode == 0, r.stdout[-2000:] + "\n".join(errs[:40]) + r.stderr[-4000:]
    return r.stdout


def test_ddp_and_fsdp_two_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo). DDP: every phase ends with identical weights on both ranks
    (train.check_replicas compares them bit for bit and exits with an error otherwise), stage 2's SFT and GRPO included. FSDP (sharded transformer):
    the same data gives the same losses as DDP up to float rounding, and the gathered checkpoint holds the weights."""
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    text = torchrun(ddp)
    assert "vq: weights identical on all 2 ranks" in text and "stage1: weights identical on all 2 ranks" in text
    # stage 2 under DDP: each rank rolls out whole groups of its own prompts; SFT and GRPO end with identical weights
    text = torchrun(ddp, "--sft-steps", "2", "--rl-steps", "2", "--rl-batch", "2", "--group-size", "2", "--n-eval2", "1",
                    "--turn-cap", "6", stage=2)
    assert "sft: weights identical on all 2 ranks" in text and "grpo: weights identical on all 2 ranks" in text
    torchrun(fsdp, "--fsdp", "--tokenizer-from", ddp)
    a, b = losses(ddp, "stage1"), losses(fsdp, "stage1")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[k] - b[k]) < 1e-4 * max(1.0, abs(a[k])) for k in a), (a, b)
    wa = torch.load(os.path.join(ddp, "stage1.pt"), weights_only=False)["model"]
    wb = torch.load(os.path.join(fsdp, "stage1.pt"), weights_only=False)["model"]
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_bf16_autocast_path(tmp_path):
    """The GPU path (every forward under bf16 autocast), on the CPU with --cpu-bf16: a miniature stage 1 trains with
    finite losses and evaluates. Autocast once broke the fused attention's fp32 accumulators, which a CPU-only
    float32 run never exercises. Without the flag a CPU step stays float32."""
    a = torch.randn(4, 4)
    for on, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        with train.autocast_for(torch.device("cpu"), on)():
            assert (a @ a).dtype == dtype
    out = str(tmp_path / "bf16")
    train.main(["--stage", "1", "--out", out, "--cpu-bf16"] + FAST)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(out, "stage1").values())
    assert len(losses(out, "stage1")) == 6


def test_compare_and_detail_extra(tiny_run):
    """compare_extra / detail_extra: during the comparison phase each step adds compare_extra × batch_size comparisons,
    after the curriculum's phases detail_extra × batch_size attribute and count questions, beside the batch, the batch
    itself unchanged; in the other phases nothing is added. Ranks split them."""
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    pool = train.ScenePool(12)
    codes = {k: np.zeros((len(pool), 8, 8), int) for k in ("rgb", "depth", "segmentation")}
    kw = dict(batch_size=8, ground_steps=4, compare_steps=3, detail_steps=2, find_extra=0)
    plain = train.TrainConfig(**kw, compare_extra=0, detail_extra=0)
    extra = train.TrainConfig(**kw, compare_extra=0.25, detail_extra=0.5)  # 2, then 4 beside the batch's 8
    texts = {"compare": [], "detail": []}
    for step in (0, 4, 6, 7, 8, 9, 10, 30):
        base = train.stage1_batch(plain, pool, codes, tok, 1000, step)
        more = train.stage1_batch(extra, pool, codes, tok, 1000, step)
        assert len(base) == 8 and len(more) == (10 if 4 <= step < 7 else 12 if step >= 9 else 8), step
        assert all(a[0] == b[0] for a, b in zip(base, more))  # the batch's own examples are unchanged
        for ids, mask, kind, i in more[8:]:
            texts["compare" if step < 7 else "detail"].append(
                tok.decode([t for t in ids if t < 1000], skip_special_tokens=True))
            assert kind == "vqa" and sum(mask) > 0
        halves = [train.stage1_batch(extra, pool, codes, tok, 1000, step, rank=r, world=2) for r in (0, 1)]
        assert sorted(map(str, halves[0] + halves[1])) == sorted(map(str, more))
    shape = lambda t: t.startswith("Is the ") and t.split("?")[0].split()[-1] in data.SHAPES  # "Is the red object a cube?"
    assert all(t.startswith("How many") or shape(t) for t in texts["detail"])
    assert any(map(shape, texts["detail"])) and any(t.startswith("How many") for t in texts["detail"])
    starts = ("Which is closer", "Which object is bigger", "Is the")  # relative distance, relative size, left / right
    assert len(texts["compare"]) == 4 and all(t.startswith(starts) and not shape(t) for t in texts["compare"])
    lonely = train.ScenePool(1)  # one object per scene: nothing to compare, so any question (no endless redrawing)
    lonely.scenes = [replace(sc, objects=sc.objects[:1]) for sc in lonely.scenes]
    ids, mask, kind, i = train.stage1_example(extra, lonely, codes, tok, 1000, np.random.default_rng(0), 5,
                                              cats=train.COMPARES)
    assert kind == "vqa" and sum(mask) > 0 and not tok.decode([t for t in ids if t < 1000]).startswith(starts[:2])


def test_find_extra(tiny_run):
    """find_extra: during the finding phase each step adds find_extra × batch_size lookup questions (locate / existence),
    the batch itself unchanged; after it the batch is the plain one. Two ranks' shares together are the whole batch."""
    def has(ids, sub):
        return any(ids[i:i + len(sub)] == sub for i in range(len(ids)))
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    pool = train.ScenePool(12)
    codes = {k: np.zeros((len(pool), 8, 8), int) for k in ("rgb", "depth", "segmentation")}
    plain = train.TrainConfig(batch_size=8, ground_steps=10, find_extra=0, compare_extra=0)
    extra = train.TrainConfig(batch_size=8, ground_steps=10, find_extra=0.75, compare_extra=0)  # 6 beside the batch's 8
    for step in (0, 1, 2, 3, 4, 9, 10, 11):
        base = train.stage1_batch(plain, pool, codes, tok, 1000, step)
        more = train.stage1_batch(extra, pool, codes, tok, 1000, step)
        assert len(base) == 8 and len(more) == (14 if step < 10 else 8)
        assert all(a[0] == b[0] for a, b in zip(base, more))  # the batch's own examples are unchanged
        if step < 10:
            assert all(e[2] == "ground" for e in more[8:])
            for ids, *_ in more[8:]:  # a locate ("... Give its cell."), existence ("... in the image?") or shape question
                assert any(has(ids, tok.encode(w).ids) for w in (" Give its cell.", " in the image?", "What shape is"))
        halves = [train.stage1_batch(extra, pool, codes, tok, 1000, step, rank=r, world=2) for r in (0, 1)]
        assert sorted(map(str, halves[0] + halves[1])) == sorted(map(str, more))
