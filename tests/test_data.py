"""Tests for data.py: encodings, the ray-cast world, questions, trajectories, sequence layout, tokenizer,
and the folder loader. Run: python -m pytest tests/test_data.py"""
import dataclasses
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

import data

SEEDS = range(40)


@pytest.fixture(scope="module")
def scenes():
    return [data.make_scene(s) for s in SEEDS]


@pytest.fixture(scope="module")
def tok():
    return data.train_tokenizer(n_scenes=30)


def to_world(p):
    """Camera (x right, y down, z forward) -> world (X right, Y forward, Z up, ground Z = 0), written out
    independently of data.py: the camera sits CAMERA_HEIGHT up, pitched PITCH below the horizon."""
    s, c = math.sin(data.PITCH), math.cos(data.PITCH)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return np.stack([x, -s * y + c * z, data.CAMERA_HEIGHT - c * y - s * z], -1)


def backproject(scene, mask):
    """Pixels (u, v) with depth z -> ((u - cx) z / fx, (v - cy) z / fy, z) (DESIGN.md)."""
    fx, fy, cx, cy = scene.intrinsics
    v, u = np.nonzero(mask)
    z = scene.depth[v, u].astype(np.float64)
    return np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], -1)


def surface_error(o, pts_world):
    """Distance of world points from the surface of object o, in its own frame."""
    cw = to_world(np.array(o.position))
    q = pts_world - cw
    if o.shape == "sphere":
        return np.abs(np.linalg.norm(q, axis=-1) - o.width / 2)
    if o.shape == "cylinder":
        rad, hz = np.hypot(q[:, 0], q[:, 1]), np.abs(q[:, 2])
        side = np.abs(rad - o.width / 2) + np.maximum(hz - o.height / 2, 0)
        top = np.abs(hz - o.height / 2) + np.maximum(rad - o.width / 2, 0)
        return np.minimum(side, top)
    c, s = math.cos(o.yaw), math.sin(o.yaw)
    local = np.stack([c * q[:, 0] + s * q[:, 1], -s * q[:, 0] + c * q[:, 1], q[:, 2]], -1)
    return np.abs(np.abs(local).max(-1) - o.width / 2)


# ----------------------------------------------------------------------------- encodings
@pytest.mark.exercise1
def test_depth_round_trip_within_half_grey_level():
    """rgb_to_depth(depth_to_rgb(d)) is within half a grey level (MAX_DEPTH / 510) of clamp(d); grey
    channels are equal; batched input keeps its shape."""
    rng = np.random.default_rng(0)
    d = rng.uniform(-2, data.MAX_DEPTH + 5, (3, 16, 16)).astype(np.float32)
    rgb = data.depth_to_rgb(d)
    assert rgb.shape == (3, 16, 16, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    back = data.rgb_to_depth(rgb)
    assert np.abs(back - np.clip(d, 0, data.MAX_DEPTH)).max() <= data.MAX_DEPTH / 510 + 1e-5
    assert data.depth_to_rgb(np.array([[0.0, data.MAX_DEPTH]]))[0, :, 0].tolist() == [0, 255]  # linear ends


@pytest.mark.exercise1
def test_seg_round_trip_exact_and_noise_robust():
    """rgb_to_seg(seg_to_rgb(s)) == s for every palette id, also after +-25 colour noise; palette colours
    are at least 120 apart (so the noise can never reach another colour's half-distance)."""
    K = len(data.PALETTE)
    pal = data.PALETTE.astype(float)
    dist = np.sqrt(((pal[:, None] - pal[None]) ** 2).sum(-1)) + np.eye(K) * 1e9
    assert dist.min() >= 120 and K >= 9 and (data.PALETTE[0] == 0).all()
    rng = np.random.default_rng(1)
    seg = rng.integers(0, K, (2, 20, 20))
    rgb = data.seg_to_rgb(seg)
    assert rgb.shape == (2, 20, 20, 3)
    assert (data.rgb_to_seg(rgb) == seg).all()
    noisy = np.clip(rgb.astype(int) + rng.integers(-25, 26, rgb.shape), 0, 255).astype(np.uint8)
    assert (data.rgb_to_seg(noisy) == seg).all()
    assert (data.seg_to_rgb(np.array([K])) == data.PALETTE[1]).all()   # documented wrap-around


def test_seg_snap_to_the_worlds_ids():
    """max_id=MAX_OBJECTS keeps ids 0..6 exact and sends a blend of two of them (an unused id under the full
    palette) to one of the two; scenes never hold more than MAX_OBJECTS objects."""
    ids = np.arange(data.MAX_OBJECTS + 1)[None]  # (1, 7)
    assert (data.rgb_to_seg(data.seg_to_rgb(ids), max_id=data.MAX_OBJECTS) == ids).all()
    red, green = data.PALETTE[1].astype(int), data.PALETTE[2].astype(int)
    blend = ((red * 3 + green * 2) // 5).astype(np.uint8)[None, None]  # mostly red: (153, 102, 0)
    assert data.rgb_to_seg(blend)[0, 0] > data.MAX_OBJECTS   # the full palette reads an id no world map uses
    assert data.rgb_to_seg(blend, max_id=data.MAX_OBJECTS)[0, 0] == 1
    assert max(len(data.make_scene(data.scene_seed("train", i)).objects) for i in range(60)) <= data.MAX_OBJECTS


def test_colorize_depth_near_red_far_blue():
    """The display colormap puts red first for near depths and blue first for far ones."""
    c = data.colorize_depth(np.array([[0.5, data.MAX_DEPTH - 0.5]])).astype(int)
    assert c.shape == (1, 2, 3)
    assert c[0, 0, 0] > c[0, 0, 2] + 50 and c[0, 1, 2] > c[0, 1, 0] + 50


# ----------------------------------------------------------------------------- the world
def test_scene_deterministic_and_splits_disjoint():
    """Same seed -> identical arrays and metadata; different seeds differ; split seed ranges are
    disjoint and out-of-range indices raise."""
    a, b, c = data.make_scene(7), data.make_scene(7), data.make_scene(8)
    assert (a.rgb == b.rgb).all() and (a.depth == b.depth).all() and (a.seg == b.seg).all()
    assert a.objects == b.objects and a.intrinsics == b.intrinsics
    assert not np.array_equal(a.rgb, c.rgb)
    ranges = sorted(data.SPLITS.values())
    assert all(r1[1] <= r2[0] for r1, r2 in zip(ranges, ranges[1:]))
    assert data.scene_seed("val", 0) == data.SPLITS["val"][0]
    with pytest.raises(IndexError):
        data.scene_seed("test", data.SPLITS["test"][1] - data.SPLITS["test"][0])


def test_scene_contents(scenes):
    """Types and shapes; 2-6 objects of the allowed shapes and of different colours, 2-9 m away, on the ground, with
    non-overlapping footprints; `pixels` equals the mask count and is >= MIN_PIXELS; sky = MAX_DEPTH."""
    for s in scenes:
        assert s.rgb.shape == (64, 64, 3) and s.rgb.dtype == np.uint8
        assert s.depth.dtype == np.float32 and s.seg.shape == (64, 64)
        assert 2 <= len(s.objects) <= 6 and s.seg.max() == len(s.objects)
        assert s.depth.max() <= data.MAX_DEPTH and (s.depth[0] == data.MAX_DEPTH).all()   # top row: sky
        assert len({o.color for o in s.objects}) == len(s.objects)                         # one object a colour
        for i, o in enumerate(s.objects):
            assert o.shape in data.SHAPES and o.color in data.COLORS
            assert o.pixels == (s.seg == i + 1).sum() >= data.MIN_PIXELS
            assert 2 <= o.distance <= 9 and math.isclose(o.distance, np.linalg.norm(o.position), rel_tol=1e-9)
            assert to_world(np.array(o.position))[2] == pytest.approx(o.height / 2, abs=1e-9)  # rests on ground
            foot = o.width / math.sqrt(2) if o.shape == "cube" else o.width / 2
            for p in s.objects[i + 1:]:
                foot2 = p.width / math.sqrt(2) if p.shape == "cube" else p.width / 2
                gap = np.linalg.norm(to_world(np.array(o.position))[:2] - to_world(np.array(p.position))[:2])
                assert gap > foot + foot2
    assert len(data.SHAPES) >= 3 and len(data.COLORS) >= 6


def test_backprojected_pixels_lie_on_objects_and_ground(scenes):
    """Every object pixel, back-projected with its depth and the intrinsics, lies on that object's
    surface (within 2 mm); visible ground pixels land on the plane Z = 0."""
    for s in scenes[:15]:
        for i, o in enumerate(s.objects):
            err = surface_error(o, to_world(backproject(s, s.seg == i + 1)))
            assert err.max() < 2e-3, (s.seed, o.shape, err.max())
        g = to_world(backproject(s, (s.seg == 0) & (s.depth < data.MAX_DEPTH)))
        assert len(g) > 100 and np.abs(g[:, 2]).max() < 2e-3


def test_flip_scene_consistent(scenes):
    """flip_scene mirrors images, negates x (and cube yaw) and moves cx so that back-projection still
    lands on the mirrored objects; left/right answers about the same pair swap; flipping twice restores."""
    swapped = 0
    for s in scenes[:10]:
        f = data.flip_scene(s)
        assert (f.rgb == s.rgb[:, ::-1]).all() and (f.seg == s.seg[:, ::-1]).all()
        assert (f.depth == s.depth[:, ::-1]).all() and f.intrinsics[2] == 63 - s.intrinsics[2]
        for i, o in enumerate(f.objects):
            assert surface_error(o, to_world(backproject(f, f.seg == i + 1))).max() < 2e-3
        ff = data.flip_scene(f)
        assert (ff.rgb == s.rgb).all() and ff.objects == s.objects and ff.intrinsics == s.intrinsics
        qs, qf = (data.make_questions(x, np.random.default_rng(5)) for x in (s, f))
        for q in (q for q in qs if q.category == "left_right"):
            (g,) = [x for x in qf if x.category == "left_right"]
            assert g.objects == q.objects and g.answer != q.answer
            swapped += 1
    assert swapped >= 5


# ----------------------------------------------------------------------------- questions
def parse_pair(text):
    m = re.search(r"\(A\) the (\w+) object \(B\) the (\w+) object", text)
    return m.group(1), m.group(2)


def check_answer(s, q):
    """Recompute the answer of q from the scene's 3-D metadata alone (objects are named by their colour)."""
    by_color = {o.color: o for o in s.objects}
    fx, _, cx, _ = s.intrinsics
    if q.category in ("relative_distance", "relative_size"):
        a, b = (by_color[n] for n in parse_pair(q.text))
        if q.category == "relative_distance":
            assert max(a.distance, b.distance) >= 1.1 * min(a.distance, b.distance)
            return "A" if a.distance < b.distance else "B"
        vol = {"cube": lambda o: o.width ** 3, "sphere": lambda o: math.pi / 6 * o.width ** 3,
               "cylinder": lambda o: math.pi / 4 * o.width ** 2 * o.height}
        va, vb = vol[a.shape](a), vol[b.shape](b)
        assert max(va, vb) >= 1.5 * min(va, vb)
        return "A" if va > vb else "B"
    if q.category == "distance":
        o = by_color[re.search(r"the (\w+) object from", q.text).group(1)]
        return f"{math.sqrt(sum(x * x for x in o.position)):.1f}"
    if q.category == "height":
        o = by_color[re.search(r"the (\w+) object,", q.text).group(1)]
        return f"{o.height:.1f}"
    if q.category == "count":
        what = re.search(r"How many (.+) are there", q.text).group(1)
        # a shape is counted only where every object is large enough for the code grid to show it
        assert what == "objects" or min(o.pixels for o in s.objects) >= data.SHAPE_PIXELS
        return str(sum(what == "objects" or o.shape + "s" == what for o in s.objects))
    if q.category == "left_right":
        a, b = (by_color[n] for n in re.search(r"Is the (\w+) object to the left of the (\w+) object", q.text).groups())
        ua, ub = (fx * o.position[0] / o.position[2] + cx for o in (a, b))
        assert abs(ua - ub) >= 4
        return "yes" if ua < ub else "no"
    if q.category == "existence":
        return "yes" if re.search(r"Is there an? (\w+) object in", q.text).group(1) in by_color else "no"
    if q.category == "attribute":
        color, shape = re.search(r"Is the (\w+) object an? (\w+)\?", q.text).groups()
        assert by_color[color].pixels >= data.SHAPE_PIXELS  # shape is asked only where the code grid can show it
        return "yes" if by_color[color].shape == shape else "no"
    raise AssertionError(q.category)


def test_answers_match_3d_ground_truth(scenes):
    """Each question's answer equals the one recomputed from the 3-D metadata; the objects it refers to are named
    by their colour; kind / flag / tool are valid; every category occurs."""
    rng, seen = np.random.default_rng(0), set()
    for s in scenes:
        for q in data.make_questions(s, rng):
            seen.add(q.category)
            assert q.kind == data.CATEGORY_INFO[q.category][0] and q.flag in ("positive", "negative", "boundary")
            assert q.tool in ("depth", "segmentation", None)
            for i in q.objects if q.category not in ("count", "existence", "attribute") else []:
                assert f"the {s.objects[i].color} object" in q.text
            assert check_answer(s, q) == q.answer, (s.seed, q)
            seen.add(q.text if q.category == "count" else q.category)
    assert seen >= set(data.CATEGORIES) and len(seen) >= 7
    assert {"How many objects are there?", "How many cubes are there?"} <= seen  # both kinds of counting occur


def test_answers_balanced():
    """Over 250 scenes, answer letters and each yes/no category are balanced within 40-60 %."""
    rng, stats = np.random.default_rng(1), {}
    for k in range(250):
        for q in data.make_questions(data.make_scene(data.scene_seed("val", k)), rng):
            if q.kind in ("choice", "yesno"):
                key = "choice" if q.kind == "choice" else q.category
                stats.setdefault(key, []).append(q.answer in ("A", "yes"))
    assert set(stats) == {"choice", "left_right", "existence", "attribute"}
    for key, v in stats.items():
        assert 0.4 <= np.mean(v) <= 0.6 and len(v) > 200, (key, np.mean(v))


def test_grounding_questions(monkeypatch):
    """locate answers the cell (from 1) holding the centroid of the object's visible pixels; identify asks about a cell
    that the named object covers at least half of; shape names the located object's shape when it is at least
    SHAPE_PIXELS large; all are exact-match kinds, and asking shape draws nothing from the generator."""
    rng, n, shapes = np.random.default_rng(3), 0, 0
    for k in range(30):
        s = data.make_scene(data.scene_seed("val", k))
        for q in data.grounding_questions(s, rng):
            n += 1
            (i,) = q.objects
            o = s.objects[i]
            if q.category == "locate":
                assert q.text == f"Where is the {o.color} object? Give its cell." and q.kind == "cell"
                v, u = np.nonzero(s.seg == i + 1)
                assert q.answer == f"row {int(v.mean()) // 8 + 1}, column {int(u.mean()) // 8 + 1}"
                located = i
            elif q.category == "shape":
                assert q.text == f"What shape is the {o.color} object?" and q.answer == o.shape and q.kind == "word"
                assert i == located and o.pixels >= data.SHAPE_PIXELS
                shapes += 1
            else:
                r, c = map(int, re.search(r"row (\d), column (\d)", q.text).groups())
                assert q.answer == o.color and q.kind == "word"
                assert (s.seg[8 * (r - 1):8 * r, 8 * (c - 1):8 * c] == i + 1).sum() >= 32
    assert n >= 55 and shapes >= 5
    # shape draws nothing: without it (no object large enough) the other questions and the generator's state are the same
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    with_shape = [q for k in range(30) for q in data.grounding_questions(data.make_scene(data.scene_seed("val", k)), a)]
    monkeypatch.setattr(data, "SHAPE_PIXELS", 10 ** 9)
    without = [q for k in range(30) for q in data.grounding_questions(data.make_scene(data.scene_seed("val", k)), b)]
    assert [q for q in with_shape if q.category != "shape"] == without and a.random() == b.random()


def test_chance_levels():
    """The chance level is the wording prior's score: colour words never change a question's wording key; the prior's
    answer for a wording is the best one on the training scenes it was fitted on (recounted here for the counting
    wordings); chance equals the mean score of the prior's answers on the validation questions (recomputed)."""
    q = data.make_questions(data.make_scene(data.scene_seed("val", 0)), np.random.default_rng(0))[0]
    assert data.wording(q) == data.wording(dataclasses.replace(q, text=q.text.replace(q.text.split()[-2], "pink")))
    rng, seen = np.random.default_rng(0), {}
    for k in range(1000):  # the prior's fitting set: benchmark and grounding questions of 1,000 training scenes
        s = data.make_scene(data.scene_seed("train", k))
        for x in data.make_questions(s, rng) + data.grounding_questions(s, rng):
            if x.category == "count":
                seen.setdefault(x.text, []).append(x.answer)
    for text, answers in seen.items():
        best = max(set(answers), key=answers.count)
        x = data.Question(text, "0", "count", "count", "positive", "segmentation")
        assert answers.count(data.prior_answer(x)) == answers.count(best), text
    rng, hits = np.random.default_rng(0), []
    for k in range(30):
        s = data.make_scene(data.scene_seed("val", k))
        hits += [data.answer_score(data.prior_answer(x), x) for x in data.make_questions(s, rng)
                 + data.grounding_questions(s, rng) if x.category == "distance"]
    assert data.chance("distance", n_scenes=30) == pytest.approx(np.mean(hits))
    assert 0.4 <= data.chance("existence") <= 0.6 and 0.4 <= data.chance("relative_distance") <= 0.6
    assert 0 < data.chance("distance", n_scenes=30) < data.chance("distance", "qspatial", n_scenes=30) <= 1


# ----------------------------------------------------------------------------- trajectories
TURN = re.compile(r"<think>[^<]*</think>(<depth-estimation>[^<]*</depth-estimation>|<segmentation>[^<]*"
                  r"</segmentation>|<answer>[^<]*\\boxed\{[^}]*\}[^<]*</answer><\|im_end\|>)")


def test_trajectory_format_loss_and_map_citations(scenes):
    """Each mode gives <= 3 model turns of the form think + one tool tag, the last one think + answer with
    \\boxed{answer}; loss only on model text; the map is followed by the reflection prompt; depths quoted
    after a depth map are the median true depth under each object's mask; the region count after a
    segmentation map is the number of instance ids."""
    rng = np.random.default_rng(2)
    for s in scenes[:12]:
        for q in data.make_questions(s, rng):
            for mode in data.MODES:
                segs = data.make_trajectory(s, q, rng, mode)
                assert segs[:3] == data.prompt_segments(q)
                model = [v for kind, v, loss in segs if kind == "text" and loss]
                assert all(not loss for kind, _, loss in segs if kind == "image")
                assert 1 <= len(model) <= 3 and all(TURN.fullmatch(t) for t in model)
                assert model[-1].endswith(data.answer_text(q) + "<|im_end|>")
                images = [v for kind, v, _ in segs if kind == "image"]
                assert images == (["rgb"] if mode == "text" else ["rgb", mode])
                if mode != "text":
                    assert segs[4] == ("image", mode, False) and segs[5] == ("text", data.REFLECTION_PROMPT, False)
                if mode == "depth":
                    for i in q.objects[:4]:
                        med = np.median(s.depth[s.seg == i + 1])
                        assert f"about {med:.1f} m on the {s.objects[i].ref}" in model[-1]
                if mode == "segmentation":
                    assert f"shows {len(s.objects)} separate object" in model[-1]


def test_trajectory_mix_balanced():
    """sample_trajectory draws depth / segmentation / text each about a third of the time (25-42 %)."""
    modes, cats = data.trajectory_mix(n_scenes=150, seed=3)
    assert sum(modes.values()) == 150
    for m in data.MODES:
        assert 0.25 <= modes[m] / 150 <= 0.42, modes


# ----------------------------------------------------------------------------- tokenizer + layout
def test_tokenizer_special_ids_round_trip_and_determinism(tok, tmp_path):
    """Special tokens have ids 0..12 and are single tokens; decode(encode(x)) == x for trajectory text and
    for unseen unicode; the same training twice gives an identical tokenizer.json; save/load round trips."""
    for i, t in enumerate(data.SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i and tok.encode(t).ids == [i]
    assert (data.PAD_ID, data.IM_START, data.IM_END, data.VISION_START, data.VISION_END) == (0, 1, 2, 3, 4)
    assert data.TAG_IDS["<think>"] == data.THINK == 5 and data.SEG_TAG_END == 12
    s = data.make_scene(1)
    q = data.make_questions(s, np.random.default_rng(0))[0]
    text = "".join(v for kind, v, _ in data.make_trajectory(s, q, np.random.default_rng(0), "depth") if kind == "text")
    for x in (text, "Wie weit ist der Würfel? 3,5 m — ünïcödé ✓"):
        assert tok.decode(tok.encode(x).ids, skip_special_tokens=False) == x
    assert data.train_tokenizer(n_scenes=30).to_str() == tok.to_str()
    path = tmp_path / "run" / "tokenizer.json"
    data.save_tokenizer(tok, path)
    assert data.load_tokenizer(path).to_str() == tok.to_str()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]   # no temporary file left


def test_load_tokenizer_errors(tmp_path):
    """A missing file and a corrupt file give clear errors naming the path."""
    with pytest.raises(FileNotFoundError, match="nope.json"):
        data.load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        data.load_tokenizer(bad)


@pytest.mark.exercise7
def test_encode_segments_layout_and_loss(tok):
    """Image blocks are <|vision_start|> offset+codes <|vision_end|>; AMG puts loss on exactly the target
    codes and <|vision_end|>; VQA and trajectories put loss on exactly the model's text, which decodes
    back to that text."""
    V = tok.get_vocab_size()
    codes = {k: np.arange(16).reshape(4, 4) + 10 * j for j, k in enumerate(("rgb", "depth", "segmentation"))}
    ids, mask = data.encode_segments(data.amg_segments("depth"), tok, V, codes)
    vs = ids.index(data.VISION_START)  # instruction first, then the image (question-first layout)
    assert len(ids) == len(mask) and ids[0] == data.IM_START
    assert tok.decode(ids[1:vs], skip_special_tokens=False) == data.DEPTH_PROMPT
    assert ids[vs + 1:vs + 17] == [V + c for c in range(16)] and ids[vs + 17] == data.VISION_END
    assert ids[vs + 18:vs + 20] == [data.IM_END, data.IM_START]
    tgt = [i for i, m in zip(ids, mask) if m]
    assert tgt == [V + 10 + c for c in range(16)] + [data.VISION_END]
    assert ids[-1] == data.IM_END and not mask[-1] and not any(mask[:vs + 21])
    s = data.make_scene(2)
    rng = np.random.default_rng(0)
    for q in data.make_questions(s, rng)[:4]:
        ids, mask = data.encode_segments(data.vqa_segments(q), tok, V, codes)
        assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == \
            data.answer_text(q) + "<|im_end|>"
        segs = data.make_trajectory(s, q, rng, "segmentation")
        ids, mask = data.encode_segments(segs, tok, V, codes)
        want = "".join(v for kind, v, loss in segs if kind == "text" and loss)
        assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == want
        assert sum(i >= V for i in ids) == 32 and ids.count(data.VISION_START) == 2
        raw, _ = data.encode_segments([("image", codes["depth"], True)], tok, V)   # codes passed directly
        assert raw == [data.VISION_START] + [V + 10 + c for c in range(16)] + [data.VISION_END]


# ----------------------------------------------------------------------------- your own data
def write_folder(root, w=80, h=60, seg=True, qa=True):
    rng = np.random.default_rng(0)
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mm = rng.integers(0, 30000, (h, w)).astype(np.uint16)
    Image.fromarray(rgb).save(root / "rgb" / "a.png")
    Image.fromarray(mm).save(root / "depth" / "a.png")
    ids = (np.arange(w)[None, :] // 20 + np.zeros((h, 1), int)).astype(np.uint8)
    if seg:
        (root / "seg").mkdir()
        Image.fromarray(ids).save(root / "seg" / "a.png")
    if qa:
        recs = [{"question": "Which is closer? (A) x (B) y", "answer": "B", "image": "a.png", "data_id": 7,
                 "flag": "positive"}, {"question": "How far?", "answer": "3.5", "image": "a"}]
        (root / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return rgb, mm, ids


def test_load_folder(tmp_path):
    """Depth PNG millimetres become metres (0 -> MAX_DEPTH) after the stated policy: centre crop to a
    square then nearest resize (checked against an independent index computation); seg ids kept;
    qa.jsonl fields loaded and kinds inferred."""
    rgb, mm, ids = write_folder(tmp_path)
    scenes, qs = data.load_folder(tmp_path, size=30)
    (s,) = scenes
    assert s.rgb.shape == (30, 30, 3) and s.depth.shape == (30, 30) and s.name == "a" and s.intrinsics is None
    crop = mm[:, 10:70].astype(float)                                  # (60, 60) centre square
    idx = np.floor((np.arange(30) + 0.5) * 2).astype(int)              # nearest source pixel per output
    want = crop[idx][:, idx] / 1000
    want[want == 0] = data.MAX_DEPTH
    assert np.allclose(s.depth, want, atol=1e-6)
    assert (s.seg == ids[:, 10:70][idx][:, idx]).all()
    assert [(q.answer, q.kind, q.flag, q.image) for q in qs] == [("B", "choice", "positive", "a"),
                                                                   ("3.5", "number", "boundary", "a")]
    assert qs[0].data_id == "7"


@pytest.mark.parametrize("case, message", [
    ("missing_depth", "depth/a.png: missing depth file"),
    ("eight_bit", "wrong bit depth"),
    ("size", "does not match"),
    ("garbage", "cannot read rgb image"),
    ("qa_image", "line 1: image 'zzz.png' is not in"),
    ("qa_json", "line 1: bad record"),
])
def test_load_folder_errors(tmp_path, case, message):
    """Each malformed folder raises DataError naming the file and the reason."""
    write_folder(tmp_path)
    if case == "missing_depth":
        (tmp_path / "depth" / "a.png").unlink()
    elif case == "eight_bit":
        Image.fromarray(np.zeros((60, 80), np.uint8)).save(tmp_path / "depth" / "a.png")
    elif case == "size":
        Image.fromarray(np.zeros((60, 81), np.uint16)).save(tmp_path / "depth" / "a.png")
    elif case == "garbage":
        (tmp_path / "rgb" / "a.png").write_bytes(b"not a png")
    elif case == "qa_image":
        (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q", "answer": "1", "image": "zzz.png"}))
    else:
        (tmp_path / "qa.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.load_folder(tmp_path)


def test_reading_order_numbering():
    """Instances are renumbered by their first 8×8 cell in raster order, ties by first pixel (hand-made map), the
    numbering ignores the input ids (any permutation gives the same map), and it is idempotent."""
    seg = np.zeros((16, 16), int)
    seg[10:12, 1:3], seg[2:4, 12:14], seg[0, 9] = 1, 2, 3  # cells: id 1 → (1, 0); ids 2 and 3 → (0, 1)
    r = data.reading_order(seg)
    assert (r[10, 1], r[2, 12], r[0, 9]) == (3, 2, 1)  # id 3's first pixel (0, 9) precedes id 2's (2, 12)
    assert ((r > 0) == (seg > 0)).all()
    for s in (data.make_scene(data.scene_seed("val", k)).seg for k in range(5)):
        perm = np.concatenate([[0], np.random.default_rng(0).permutation(s.max()) + 1])
        assert (data.reading_order(perm[s]) == data.reading_order(s)).all()
        assert (data.reading_order(data.reading_order(s)) == data.reading_order(s)).all()
