"""Tests of cooper.py: evaluation metrics against hand-computed values, and the user API / command line on a
miniature run. Run: python -m pytest tests/test_cooper.py"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import cooper
import data
import train
from conftest import FAST
from model import PRESETS, UnifiedTransformer, VQTokenizer


def test_scale_shift_alignment_recovers_affine_depth():
    """Marigold alignment: a prediction that is an exact affine map of the truth aligns back to it (AbsRel 0, δ1 1)."""
    gt = np.linspace(1.0, 9.0, 64, dtype=np.float32).reshape(8, 8)
    pred = 0.5 * gt - 0.3
    aligned = cooper.align_scale_shift(pred, gt, np.ones_like(gt, bool))
    np.testing.assert_allclose(aligned, gt, rtol=1e-5)
    assert cooper.depth_metrics(aligned, gt) == pytest.approx((0.0, 1.0), abs=1e-5)


def test_depth_metrics_hand_computed():
    """AbsRel and δ1 on four pixels: p = (1, 2, 3, 8), g = (1, 1, 3, 4) → |p−g|/g = (0, 1, 0, 1) → AbsRel 0.5;
    max(p/g, g/p) = (1, 2, 1, 2) → δ1 = 2/4. With a mask on the first and third pixels: (0, 1)."""
    p, g = np.array([[1.0, 2.0], [3.0, 8.0]]), np.array([[1.0, 1.0], [3.0, 4.0]])
    assert cooper.depth_metrics(p, g) == pytest.approx((0.5, 0.5))
    assert cooper.depth_metrics(p, g, np.array([[True, False], [True, False]])) == pytest.approx((0.0, 1.0))


def test_seg_metrics_ignore_colour_permutation_and_score_errors():
    """Instances painted in other colours still score 1; one wrong pixel out of 8 costs 1/8 of pixel accuracy and
    the IoU of both instances involved (hand-computed below: object 1 IoU 1/2, object 2 IoU 2/3)."""
    gt = np.array([[0, 1, 1, 0], [0, 0, 2, 2]])
    assert cooper.seg_metrics(np.where(gt == 1, 7, np.where(gt == 2, 3, 0)), gt) == pytest.approx((1.0, 1.0))
    pred = np.array([[0, 1, 2, 0], [0, 0, 2, 2]])  # one pixel of object 1 predicted as object 2
    acc, miou = cooper.seg_metrics(pred, gt)
    assert acc == pytest.approx(7 / 8)
    assert miou == pytest.approx((1 / 2 + 2 / 3) / 2)  # object 1: 1/2 (1 ∩, 2 ∪); object 2: 2/3 (2 ∩, 3 ∪)


def test_count_and_psnr():
    """Counting reads distinct non-background ids that fill a 2×2 block (a one-pixel seam does not count);
    PSNR of a 1-grey-level error is 48.13 dB."""
    seg = np.zeros((8, 8), int)
    seg[:2, :2], seg[5:, 5:], seg[0, 4:8], seg[2, 2] = 1, 2, 3, 4  # ids 3 (a 1×4 seam) and 4 (one pixel) are thin
    assert cooper.count_instances(seg) == 2
    seg[1, 4:6] = 3  # now id 3 fills a 2×2 block
    assert cooper.count_instances(seg) == 3
    a = np.zeros((4, 4, 3), np.uint8)
    assert cooper.psnr(a, a + 1) == pytest.approx(10 * np.log10(255.0 ** 2), rel=1e-6)


def test_cooper_load_generate_answer(tiny_run):
    """Cooper.load reads a run; generated maps have the image's size and the right types; answers come back as text;
    generation is deterministic at temperature 0."""
    c = cooper.Cooper.load(tiny_run)
    scene = data.make_scene(data.scene_seed("test", 0))
    d = c.generate_map(scene.rgb, "depth")
    s = c.generate_map(scene.rgb, "segmentation")
    assert d.shape == s.shape == scene.depth.shape and d.dtype == np.float32 and s.dtype.kind == "i"
    assert (d >= 0).all() and (d <= data.MAX_DEPTH + 1e-4).all()
    assert 0 <= s.min() and s.max() <= data.MAX_OBJECTS  # snapped to the world's instance colours only
    np.testing.assert_array_equal(d, c.generate_map(scene.rgb, "depth"))
    q = data.make_questions(scene, np.random.default_rng(0))[0]
    out = c.answer(scene.rgb, q.text)
    assert isinstance(out["text"], str) and "answer" in out


def test_cooper_errors(tmp_path, tiny_run):
    """A missing run, a missing checkpoint and an unreadable image give a RunError that says what to do."""
    with pytest.raises(cooper.RunError, match="does not exist"):
        cooper.Cooper.load(str(tmp_path / "nope"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokenizer.json").write_bytes(open(os.path.join(tiny_run, "tokenizer.json"), "rb").read())
    with pytest.raises(cooper.RunError, match="--resume"):
        cooper.Cooper.load(str(partial))
    stale = tmp_path / "stale"  # weights written by another version of model.py: a parameter renamed
    shutil.copytree(tiny_run, stale)
    ck = torch.load(stale / "stage1.pt", weights_only=False)
    ck["model"]["renamed"] = ck["model"].pop("pos2d")
    torch.save(ck, stale / "stage1.pt")
    with pytest.raises(cooper.RunError, match="does not fit this version of model.py"):
        cooper.Cooper.load(str(stale))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(cooper.RunError, match="cannot read image"):
        cooper.load_image(str(tmp_path / "bad.png"), 64)


def test_ask_command_writes_maps(tiny_run, tmp_path, capsys):
    """`cooper.py ask` with an image file of another size: prints the answer and writes the coloured maps."""
    Image.fromarray(data.make_scene(5, size=96).rgb).save(tmp_path / "in.png")
    cooper.main(["ask", "--run", tiny_run, "--image", str(tmp_path / "in.png"), "--question", "How many objects are there?",
                 "--out", str(tmp_path / "maps")])
    text = capsys.readouterr().out
    assert "answer:" in text and "resizing" in text
    for f in ("input.png", "depth.png", "segmentation.png"):
        assert Image.open(tmp_path / "maps" / f).size == (64, 64)


def test_eval_command_reproduces_the_runs_evaluation(tiny_run, tmp_path):
    """`cooper.py eval --split val --seed S` with the run's sizes gives exactly the numbers of train.py's final
    evaluation (which draws its questions with the run's --seed), and writes them to eval_val.json."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    cooper.main(["eval", "--run", str(run), "--split", "val", "--seed", "0", "--n", "2", "--n-vqa", "3"])
    got = json.load(open(run / "eval_val.json"))
    want = [json.loads(line) for line in open(run / "metrics.jsonl") if '"eval"' in line][-1]
    keys = [k for k in want if "/" in k]
    assert any(k.startswith("vqa/") for k in keys) and any(k.startswith("depth/") for k in keys)
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}


def test_evaluate_uses_the_models_image_size(tiny_run):
    """A preset with another image size (base: 128×128) is evaluated on scenes rendered at its size, and its training
    pool is rendered at that size too (a 64×64 world under a 128×128 model once crashed the evaluation)."""
    assert train.ScenePool(2, size=32).images("depth").shape == (4, 32, 32, 3)
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], image_size=32, text_vocab=tok.get_vocab_size())  # 4×4 codes per image
    m, samples = cooper.evaluate(cooper.Cooper(UnifiedTransformer(cfg), VQTokenizer(cfg), tok), n=2, n_vqa=0)
    assert samples["rgb"].shape == (2, 32, 32, 3) and samples["gen_depth"].shape == samples["gen_seg"].shape == (2, 32, 32)
    assert 0 <= m["seg/pixel_acc"] <= 1


def test_answer_confusion(tiny_run, tmp_path):
    """docs/answer_confusion.py: one truth x answer table per category (count split in two), whose cells add up to the
    questions asked and whose diagonal is the exact count it prints; a folder that is not a run gives a one-line error.
    (Counting a shape is asked only in scenes whose every object shows its shape: the first in scene 10.)"""
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "answer_confusion.py")
    r = subprocess.run([sys.executable, script, tiny_run, "--n", "10", "--categories", "count,existence"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    blocks = [b.splitlines() for b in r.stdout.strip().split("\n\n")]
    assert sorted(b[0].split(":")[0] for b in blocks) == ["count (all objects)", "count (one shape)", "existence"]
    for b in blocks:
        right, total = map(int, b[0].split(": ")[1].split(" ")[0].split("/"))
        answers = b[1].split()
        rows = {line.split()[0]: list(map(int, line.split()[1:])) for line in b[2:]}
        assert sum(map(sum, rows.values())) == total
        assert sum(v[answers.index(t)] for t, v in rows.items() if t in answers) == right
    r = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "python train.py" in r.stderr and "Traceback" not in r.stderr


def test_perception_scripts(tiny_run, tmp_path):
    """docs/lookup_probe.py trains and scores a fresh model on chosen categories (with a curriculum switch) and prints
    held-out and blind accuracy per category; docs/vqa_curves.py runs the recipe as train.py runs and summarises their
    evaluations into curves.json and curves.png; a folder that is not a run gives a one-line error."""
    docs = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs")
    r = subprocess.run([sys.executable, os.path.join(docs, "lookup_probe.py"), "--run", tiny_run, "--tasks", "locate",
                        "--then", "existence,relative_distance", "--switch", "1", "--steps", "2", "--eval-every", "2",
                        "--n-train", "8", "--batch", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("EVAL") == 2 and "existence" in r.stdout and "(blind" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(docs, "lookup_probe.py"), "--run", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "python train.py" in r.stderr
    out = str(tmp_path / "curves")
    r = subprocess.run([sys.executable, os.path.join(docs, "vqa_curves.py"), "--tokenizer-from", tiny_run, "--out", out,
                        "--variants", "recipe", "--seeds", "0", "--eval-every", "3", "--"] + FAST,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "recipe: held-out score" in r.stdout and os.path.getsize(os.path.join(out, "curves.png")) > 0
    curves = json.load(open(os.path.join(out, "curves.json")))
    assert [p["step"] for p in curves["recipe"]["locate"]] == [3, 6]
    # the difference table pairs runs by seed: a variant whose run is a copy of the recipe's differs by exactly 0
    shutil.copytree(os.path.join(out, "recipe_s0"), os.path.join(out, "control_s0"))
    r = subprocess.run([sys.executable, os.path.join(docs, "vqa_curves.py"), "--summary-only", "--out", out,
                        "--variants", "recipe,control", "--seeds", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    diff = r.stdout.split("recipe - control at step 6")[1].split("\n\n")[0].splitlines()[1:]  # the table's rows
    assert len(diff) >= 10 and any(l.startswith("locate") for l in diff)
    assert all(l.split()[1] in ("+0.000", "-0.000") for l in diff), diff
