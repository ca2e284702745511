"""The data side of small COOPER: a synthetic 3-D world, the RGB encodings of depth and segmentation
(PAPER.md, stage 1), spatial questions with ground-truth answers and CPR flags, interleaved reasoning
trajectories (PAPER.md, stage 2), the byte-level BPE text tokenizer, the token layout of every training
sequence (DESIGN.md "Sequence layout") and a loader for your own RGB-D(+seg) folders.

Deviations from the paper, and why:
- Synthetic world instead of Hypersim / Virtual KITTI / ADE20K / SIBench: a ray-cast ground plane with
  2-6 cubes, spheres and cylinders gives exact metric depth, instance masks and answers for free, any
  number of scenes, no downloads. MAX_DEPTH is 20 m (the paper clamps at 65 m / 80 m for its datasets).
- The camera is fixed (height 1.6 m, 15 degrees down, fx = fy = image width): a small model can only learn
  metric answers from pixels when the camera does not change.
- Trajectories are written from templates over the ground truth rather than by a large model; the
  reasoning after a map quotes what the true map shows (depth under each object, segmented regions).
- Trajectories use one generated map at most (2 model turns); the format allows up to 3 turns and the
  sequence layout, verifier and sampler handle that, but one map already answers every question here.
- Flags (positive / negative / boundary) come per category from how the question is answered here:
  depth settles distances and relative size, segmentation settles counting, the RGB image alone settles
  existence and attributes; height and left/right are boundary cases.
- Counting by shape ("how many cubes?") is asked only in scenes whose every object covers SHAPE_PIXELS, the rule
  of the attribute question: in the others a shape cannot be read through 8×8 code cells, and the model answered
  them below the wording's prior (docs/perception.md, "Counting a shape where it can be seen").
- Tags are single added tokens of the tokenizer (DESIGN.md item 5); they decode to the same text.
- Segmentation targets number their instances in the raster order a generator meets them (`reading_order`),
  not in an arbitrary order: a raster-order generator then gives each new object "the next colour". With
  nearest-first numbering the far objects, met first, needed the total count in advance. Counting from
  generated maps rose from 13 % to 25 % (128 val scenes, default run).

Layout of this file: constants -> world (make_scene, flip_scene) -> encodings -> questions ->
trajectories -> sequence layout -> tokenizer -> your own data -> command line.

Test:   python -m pytest tests/test_data.py
Look:   python data.py --out /tmp/look --n 16      Bench:  python data.py --bench
"""
import argparse
import dataclasses
import json
import math
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- constants
IMAGE_SIZE = 64
MAX_DEPTH = 20.0          # metres; sky and far ground read MAX_DEPTH (paper: 65 m Hypersim, 80 m KITTI)
CAMERA_HEIGHT = 1.6       # metres above the ground
PITCH = math.radians(15)  # camera looks this much below the horizon
MAX_OBJECTS = 6           # objects per scene: 2..MAX_OBJECTS, each of its own colour
NEAR, FAR = 2.2, 8.0      # metres ahead of the camera (along the ground) where object centres stand
MIN_PIXELS = 64           # at 64x64 (scaled with area): every object shows at least one 8x8 code cell of pixels
SHAPE_PIXELS = 128        # shape is asked about only for objects at least two code cells large

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<think>", "</think>", "<answer>", "</answer>", "<depth-estimation>", "</depth-estimation>",
                  "<segmentation>", "</segmentation>"]
TAG_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}  # the tokenizer gives exactly these ids
PAD_ID, IM_START, IM_END, VISION_START, VISION_END = 0, 1, 2, 3, 4
THINK, THINK_END, ANSWER, ANSWER_END = 5, 6, 7, 8
DEPTH_TAG, DEPTH_TAG_END, SEG_TAG, SEG_TAG_END = 9, 10, 11, 12

# Stage-1 instructions: tag plus instruction (PAPER.md). The same strings are the stage-2 tool calls.
DEPTH_PROMPT = "<depth-estimation>Draw the depth map of this image.</depth-estimation>"
SEG_PROMPT = "<segmentation>Paint each object in its own colour.</segmentation>"
TOOL_PROMPTS = {"depth": DEPTH_PROMPT, "segmentation": SEG_PROMPT}
# Context after a generated map, no loss (PAPER.md: the map may be wrong; think again, then tool or answer).
REFLECTION_PROMPT = ("The map above was generated and may contain mistakes. Check it against the image, "
                     "then ask for another map or give the answer.")

# Disjoint seed ranges: scene i of a split is make_scene(scene_seed(split, i)).
SPLITS = {"train": (0, 10_000_000), "val": (10_000_000, 10_100_000), "test": (10_100_000, 10_200_000)}

SHAPES = ("cube", "sphere", "cylinder")
PLURALS = {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders"}
COLORS = {"red": (205, 45, 40), "green": (45, 165, 60), "blue": (45, 85, 215), "yellow": (235, 205, 45),
          "purple": (135, 60, 180), "orange": (240, 135, 35), "cyan": (50, 195, 205), "pink": (240, 125, 175)}

# Instance palette for segmentation maps: id 0 (background) black, ids 1..15 colours on the {0, 128, 255}^3
# grid, so any two are >= 128 apart and rgb_to_seg survives per-channel errors of up to ~64.
# Ids above 15 wrap around (id -> 1 + (id - 1) % 15), so rgb_to_seg cannot tell id 1 from id 16.
# The world has at most MAX_OBJECTS objects, so its maps use ids 1..6 only: the six corners of the RGB cube. A pixel
# where a decoded map blends two of them (red + green -> (128, 128, 0)) lies nearest to an unused id (7..15); snapping
# the world's maps with rgb_to_seg(rgb, max_id=MAX_OBJECTS) sends it to a colour that exists instead.
PALETTE = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
                    (0, 255, 255), (255, 128, 0), (128, 0, 255), (0, 128, 255), (255, 0, 128), (128, 255, 0),
                    (0, 255, 128), (255, 255, 255), (128, 128, 255), (255, 128, 128)], np.uint8)
# Spectral-like display ramp, near (0) dark red -> far (1) violet blue.
_SPECTRAL = np.array([(158, 1, 66), (213, 62, 79), (244, 109, 67), (253, 174, 97), (254, 224, 139),
                      (255, 255, 191), (230, 245, 152), (171, 221, 164), (102, 194, 165), (50, 136, 189),
                      (94, 79, 162)], np.float64)


def scene_seed(split, i):
    """Seed of scene i of a split; raises if i falls outside the split's range."""
    lo, hi = SPLITS[split]
    if not 0 <= i < hi - lo:
        raise IndexError(f"scene {i} is outside split {split!r} (size {hi - lo})")
    return lo + i


# ----------------------------------------------------------------------------- the world
@dataclass
class Obj:
    shape: str                # cube | sphere | cylinder
    color: str                # a key of COLORS
    height: float             # metres (cube side, sphere diameter, cylinder height)
    width: float              # metres, horizontal extent (cube side, diameters)
    yaw: float                # radians, rotation about the vertical axis (cubes only)
    position: tuple           # (x, y, z) centre in the OpenCV camera frame: x right, y down, z forward
    distance: float           # metres from camera centre to object centre
    pixels: int = 0           # visible pixel count in the rendered image

    @property
    def name(self):
        return f"{self.color} {self.shape}"

    @property
    def ref(self):
        """How questions refer to the object: by its colour, which no other object of the scene shares."""
        return f"{self.color} object"

    @property
    def volume(self):
        r = self.width / 2
        return {"cube": self.width ** 3, "sphere": 4 / 3 * math.pi * r ** 3,
                "cylinder": math.pi * r * r * self.height}[self.shape]


@dataclass
class Scene:
    rgb: np.ndarray           # (H, W, 3) uint8
    depth: np.ndarray         # (H, W) float32 metres, z-depth; background = MAX_DEPTH
    seg: np.ndarray           # (H, W) int64; 0 background, i + 1 = objects[i]
    objects: list
    intrinsics: tuple         # (fx, fy, cx, cy) pixels; None for user images of unknown camera
    seed: int = -1
    name: str = ""


def camera_rotation(pitch=PITCH):
    """3x3 matrix whose columns are the camera axes (x right, y down, z forward) in the world frame
    (X right, Y forward, Z up): p_world = camera_centre + R @ p_cam."""
    s, c = math.sin(pitch), math.cos(pitch)
    return np.array([[1, 0, 0], [0, -s, c], [0, -c, -s]], np.float64)


_R = camera_rotation()
_EYE = np.array([[0.0], [0.0], [CAMERA_HEIGHT]])                                # (3, 1)
_LIGHT = np.array([[-0.45], [-0.55], [0.75]]) / np.linalg.norm([-0.45, -0.55, 0.75])  # (3, 1) to the sun

# Ray arrays are stored components-first, (3, P) for P rays (or (3, 1) for one shared origin or
# direction), so each dot product is three fast element-wise products instead of a slow small-axis sum.


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


@lru_cache(maxsize=8)
def _rays(size):
    """Intrinsics and one world-space ray per pixel, scaled so that the ray parameter t IS z-depth."""
    f, c = float(size), (size - 1) / 2          # fx = fy = size: a 53-degree horizontal field of view
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    d_cam = np.stack([(u - c) / f, (v - c) / f, np.ones_like(u)]).reshape(3, -1)  # (3, P), z = 1
    return (f, f, c, c), _R @ d_cam                                                # (3, P) world


def _hit_sphere(oc, d, r):
    """Rays o + t d against a sphere; oc = o - centre. Returns (t, normal): t = inf where missed."""
    b, a, c = _dot(d, oc), _dot(d, d), _dot(oc, oc) - r * r
    disc = b * b - a * c                                               # quadratic with half-b
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    t = np.where((disc >= 0) & (t > 1e-6), t, np.inf)
    return t, (oc + np.where(np.isfinite(t), t, 0) * d) / r


def _hit_cylinder(oc, d, r, h):
    """Vertical capped cylinder standing on the ground; the bottom cap is never seen from above."""
    a = d[0] ** 2 + d[1] ** 2
    b = d[0] * oc[0] + d[1] * oc[1]
    c = oc[0] ** 2 + oc[1] ** 2 - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / a                   # side wall
        tt = (h / 2 - oc[2]) / d[2]                                    # plane of the top cap
    ts = np.where((disc >= 0) & (ts > 1e-6) & (np.abs(oc[2] + ts * d[2]) <= h / 2), ts, np.inf)
    xt, yt = oc[0] + tt * d[0], oc[1] + tt * d[1]
    tt = np.where((tt > 1e-6) & (xt * xt + yt * yt <= r * r), tt, np.inf)
    t = np.minimum(ts, tt)
    p = oc + np.where(np.isfinite(t), t, 0) * d                         # (3, P) hit point - centre
    side = np.stack([p[0] / r, p[1] / r, np.zeros_like(t)])
    return t, np.where(tt < ts, np.array([[0.0], [0.0], [1.0]]), side)


def _hit_box(oc, d, half, yaw):
    """Cube rotated by yaw about the vertical: slab test in the cube's own frame."""
    cs, sn = math.cos(yaw), math.sin(yaw)
    rot = np.array([[cs, sn, 0], [-sn, cs, 0], [0, 0, 1]])             # world -> cube frame
    ol, dl = rot @ oc, rot @ d                                         # (3, P) each
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - ol) / dl, (half - ol) / dl                   # (3, P) slab entries / exits
    tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
    near, far = tn.max(0), tf.min(0)
    t = np.where((near <= far) & (near > 1e-6), near, np.inf)
    axis, cols = tn.argmax(0), np.arange(t.shape[0])                   # the face each ray enters by
    nl = np.zeros((3, t.shape[0]))
    nl[axis, cols] = -np.sign(np.broadcast_to(dl, t1.shape)[axis, cols])
    return t, rot.T @ nl                                               # normal back to the world frame


def _hit(obj, o, d, sel):
    """First hit of rays o + t d with one object, testing only the rays `sel` (those that pass the
    object's bounding sphere): (t (P,), normals (3, P)), t = inf where missed."""
    P = max(o.shape[1], d.shape[1])
    t, n = np.full(P, np.inf), np.zeros((3, P))
    if len(sel):
        oc = o - obj["c"][:, None]                                     # (3, P) or (3, 1)
        oc, d = (x if x.shape[1] == 1 else x[:, sel] for x in (oc, d))  # keep only the selected rays
        if obj["shape"] == "sphere":
            t[sel], n[:, sel] = _hit_sphere(oc, d, obj["w"] / 2)
        elif obj["shape"] == "cylinder":
            t[sel], n[:, sel] = _hit_cylinder(oc, d, obj["w"] / 2, obj["h"])
        else:
            t[sel], n[:, sel] = _hit_box(oc, d, obj["w"] / 2, obj["yaw"])
    return t, n


def _cast(objs, size):
    """Primary rays only: z-depth t (P,), winner idx (P,) (0 ground, i + 1 object i), per-object hits."""
    _, d = _rays(size)
    with np.errstate(divide="ignore"):
        tg = np.where(d[2] < 0, -CAMERA_HEIGHT / d[2], np.inf)          # ground plane Z = 0
    u = d / np.sqrt(_dot(d, d))                                          # (3, P) unit directions
    hits = []
    for ob in objs:
        # bounding-sphere cull: the angle between a ray and the centre must be below asin(R / dist)
        oc = ob["c"] - _EYE[:, 0]
        dist = np.linalg.norm(oc)
        sel = np.flatnonzero(oc @ u >= dist * math.sqrt(max(0.0, 1 - (ob["R"] / dist) ** 2)))
        hits.append(_hit(ob, _EYE, d, sel))
    ts = np.stack([tg] + [t for t, _ in hits])                           # (N + 1, P)
    idx = ts.argmin(0)
    return ts[idx, np.arange(d.shape[1])], idx, hits


@lru_cache(maxsize=8)
def _sky(size):
    """(P, 3) sky colour of every pixel: a vertical gradient, pale towards the horizon."""
    rows = np.repeat(np.arange(size), size)[:, None] / size
    return np.array([150.0, 185, 230]) + rows * np.array([60.0, 45, 20])


def _shade(objs, size, t, idx, hits):
    """Colours for a cast image: (rgb uint8 (H, W, 3), z-depth float32 (H, W), seg int64 (H, W))."""
    _, d = _rays(size)
    P = d.shape[1]
    hit = np.isfinite(t)
    cols = np.arange(P)
    normals = np.stack([np.broadcast_to([[0.0], [0.0], [1.0]], (3, P))] + [ni for _, ni in hits])  # (N+1, 3, P)
    n = normals[idx, :, cols].T                                          # (3, P) normal of the winner
    base = np.array([(0, 0, 0)] + [COLORS[ob["color"]] for ob in objs], np.float64)[idx]  # (P, 3)
    pts = _EYE + np.where(hit, t, 0) * d                                 # (3, P) world hit points
    # A checkered ground that fades with distance (a perspective cue without far-field aliasing).
    check = (np.floor(pts[0]) + np.floor(pts[1])) % 2
    tone = (check * 18 - 9) * np.clip(1 - t / MAX_DEPTH, 0, 1)
    base = np.where(((idx == 0) & hit)[:, None], np.array([150.0, 142, 128]) + tone[:, None], base)
    # Lambert shading plus one shadow ray per lit point towards the sun.
    lam = np.clip(_dot(n, _LIGHT), 0, 1)
    lit = np.flatnonzero(hit & (lam > 0))
    if objs and len(lit):
        o2 = pts[:, lit] + n[:, lit] * 1e-4                                # (3, L) shadow-ray origins
        o2sq, lo2 = _dot(o2, o2), _LIGHT[:, 0] @ o2
        blocked = np.zeros(len(lit), bool)
        for ob in objs:
            # squared distance from the centre c to each shadow ray's line: |o - c|^2 - (L.(o - c))^2
            c = ob["c"]
            far2 = o2sq - 2 * (c @ o2) + c @ c - (lo2 - _LIGHT[:, 0] @ c) ** 2
            blocked |= _hit(ob, o2, _LIGHT, np.flatnonzero(far2 <= ob["R"] ** 2))[0] < np.inf
        lam[lit[blocked]] = 0
    rgb = np.where(hit[:, None], base * (0.4 + 0.6 * lam)[:, None], _sky(size))
    depth = np.minimum(np.where(hit, t, MAX_DEPTH), MAX_DEPTH)          # sky and far ground: MAX_DEPTH
    return (np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(size, size, 3),
            depth.astype(np.float32).reshape(size, size), idx.reshape(size, size))


def _place(rng, ob, others):
    """Sample a ground position that keeps ob's footprint clear of the others' (non-intersecting)."""
    for _ in range(100):
        fwd = rng.uniform(NEAR, FAR)                     # metres ahead of the camera along the ground
        x = rng.uniform(-0.42, 0.42) * fwd               # inside the horizontal field of view
        if all(math.hypot(x - o["c"][0], fwd - o["c"][1]) > (ob["r"] + o["r"] + 0.15) for o in others):
            ob["c"] = np.array([x, fwd, ob["h"] / 2])    # resting on the ground: centre at half height
            return True
    return False


def _sample_object(rng, color):
    shape = SHAPES[rng.integers(3)]
    if shape == "cube":
        w = h = rng.uniform(0.5, 1.4)
    elif shape == "sphere":
        w = h = 2 * rng.uniform(0.3, 0.75)
    else:
        w, h = 2 * rng.uniform(0.25, 0.6), rng.uniform(0.5, 2.0)
    yaw = rng.uniform(0, math.pi / 2) if shape == "cube" else 0.0
    r = w / math.sqrt(2) if shape == "cube" else w / 2   # radius of the footprint's bounding circle
    R = math.hypot(r, h / 2) + 1e-6                      # radius of the bounding sphere, for ray culling
    return dict(shape=shape, color=color, w=w, h=h, yaw=yaw, r=r, R=R)


def make_scene(seed, size=IMAGE_SIZE):
    """Scene number `seed`: 2-6 objects of different colours on a ground plane, each visibly at least MIN_PIXELS
    pixels, so that "the red object" names one object and every object covers at least one code cell.

    Objects that end up (nearly) hidden are moved, up to 20 times; any still hidden are dropped, which can
    only uncover the others. Deterministic: the same (seed, size) always gives the same scene."""
    rng = np.random.default_rng(seed)
    min_px = max(1, round(MIN_PIXELS * (size / IMAGE_SIZE) ** 2))
    objs = []
    for c in rng.permutation(len(COLORS))[:rng.integers(2, MAX_OBJECTS + 1)]:  # colours without repetition
        ob = _sample_object(rng, list(COLORS)[c])
        if _place(rng, ob, objs):
            objs.append(ob)
    for attempt in range(21):
        cast = _cast(objs, size)                         # geometry only; shading happens once below
        pixels = np.bincount(cast[1], minlength=len(objs) + 1)[1:]
        hidden = [i for i in range(len(objs)) if pixels[i] < min_px]
        if not hidden:
            break
        if attempt == 20:                               # give up on those: drop them and render again
            objs = [ob for i, ob in enumerate(objs) if i not in hidden]
            cast = _cast(objs, size)
            pixels = np.bincount(cast[1], minlength=len(objs) + 1)[1:]
            break
        for i in hidden:
            _place(rng, objs[i], objs[:i] + objs[i + 1:])
    # Canonical object order, nearest first: object i is painted in PALETTE[i + 1] by seg_to_rgb, so a model
    # that generates segmentation maps can know which colour each object gets (and the order survives flips).
    order = np.argsort([np.linalg.norm(ob["c"] - _EYE[:, 0]) for ob in objs], kind="stable")
    objs, pixels = [objs[k] for k in order], pixels[order]
    remap = np.concatenate([[0], np.argsort(order) + 1])            # old seg id -> new seg id
    cast = (cast[0], remap[cast[1]], [cast[2][k] for k in order])
    rgb, depth, seg = _shade(objs, size, *cast)
    intr, out = _rays(size)[0], []
    for ob, px in zip(objs, pixels):
        p = _R.T @ (ob["c"] - _EYE[:, 0])                   # world -> OpenCV camera frame
        out.append(Obj(ob["shape"], ob["color"], float(ob["h"]), float(ob["w"]), float(ob["yaw"]),
                       tuple(float(v) for v in p), float(np.linalg.norm(p)), int(px)))
    return Scene(rgb, depth, seg, out, intr, seed=seed)


def flip_scene(scene):
    """Horizontal flip (PAPER.md stage-1 augmentation) of images AND metadata: pixel u -> W-1-u,
    camera x -> -x, cx -> W-1-cx, yaw -> -yaw; questions made from the result swap left and right."""
    W = scene.rgb.shape[1]
    objs = [dataclasses.replace(o, position=(-o.position[0], *o.position[1:]), yaw=-o.yaw)
            for o in scene.objects]
    intr = None if scene.intrinsics is None else (*scene.intrinsics[:2], W - 1 - scene.intrinsics[2],
                                                  scene.intrinsics[3])
    return dataclasses.replace(scene, rgb=scene.rgb[:, ::-1].copy(), depth=scene.depth[:, ::-1].copy(),
                               seg=scene.seg[:, ::-1].copy(), objects=objs, intrinsics=intr)


# ----------------------------------------------------------------------------- RGB encodings (stage 1)
def depth_to_rgb(depth, max_depth=MAX_DEPTH):
    """Depth -> grey image: clamp to [0, max_depth], scale linearly to [0, 255], 3 equal channels
    (PAPER.md: no log, no inverse, no per-image normalisation). (..., H, W) -> (..., H, W, 3) uint8."""
    # exercise 1 begin: depth and segmentation as RGB images
    g = np.rint(np.clip(np.asarray(depth, np.float64), 0, max_depth) / max_depth * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, -1)
    # exercise 1 end


def rgb_to_depth(rgb, max_depth=MAX_DEPTH):
    """Inverse of depth_to_rgb: channel mean / 255 * max_depth. (..., 3) -> (...) float32 metres."""
    # exercise 1 begin: depth and segmentation as RGB images
    return (np.asarray(rgb, np.float64).mean(-1) / 255 * max_depth).astype(np.float32)
    # exercise 1 end


def seg_to_rgb(seg):
    """Instance ids -> palette colours (id 0 black). (..., H, W) -> (..., H, W, 3) uint8."""
    # exercise 1 begin: depth and segmentation as RGB images
    seg = np.asarray(seg, np.int64)
    return PALETTE[np.where(seg > 0, 1 + (seg - 1) % (len(PALETTE) - 1), 0)]
    # exercise 1 end


SEG_CELL = 8  # pixels per side of one code cell of the tiny / small / base tokenizers (vq_downsample)


def reading_order(seg, cell=SEG_CELL):
    """Instance ids renumbered 1, 2, … in the order a raster-order generator meets them: by the first cell×cell
    block (row-major) holding a pixel of the instance, ties by its first pixel in reading order. (H, W) -> (H, W).
    The AMG segmentation targets are coloured this way, so when generation reaches a new object its colour is
    "the next unused one"; with nearest-first ids the far objects, met first, needed the total count in advance."""
    seg = np.asarray(seg, np.int64)
    v, u = np.nonzero(seg)                                          # object pixels, in reading order
    order = np.argsort((v // cell) * -(-seg.shape[1] // cell) + u // cell, kind="stable")  # by cell, ties kept
    ids, first = np.unique(seg[v, u][order], return_index=True)     # each id's first place in that order
    lut = np.zeros(seg.max() + 1, np.int64)
    lut[ids[np.argsort(first)]] = np.arange(1, len(ids) + 1)
    return lut[seg]


def rgb_to_seg(rgb, max_id=None):
    """Snap every pixel to the nearest palette colour, so a slightly wrong map still decodes. max_id limits the
    candidates to background + ids 1..max_id (this world's maps: max_id=MAX_OBJECTS); None = the whole palette."""
    x = np.asarray(rgb, np.float32)
    pal = PALETTE[:None if max_id is None else max_id + 1].astype(np.float32)  # (K, 3)
    d = ((x[..., None, :] - pal) ** 2).sum(-1)                              # (..., K) squared distances
    return d.argmin(-1).astype(np.int64)


def colorize_depth(depth, max_depth=MAX_DEPTH):
    """Display only: Spectral-like colours, near = red, far = blue. (..., H, W) -> (..., H, W, 3) uint8."""
    s = np.clip(np.asarray(depth, np.float64) / max_depth, 0, 1) * (len(_SPECTRAL) - 1)
    lo = np.minimum(np.floor(s).astype(int), len(_SPECTRAL) - 2)
    a = (s - lo)[..., None]
    return np.rint(_SPECTRAL[lo] * (1 - a) + _SPECTRAL[lo + 1] * a).astype(np.uint8)


def scene_image(scene, modality):
    """The RGB image a scene contributes to training for one modality: "rgb" (the input), "depth" or
    "segmentation" (the targets, encoded as RGB). Only the asked-for encoding is computed."""
    if modality == "depth":
        return depth_to_rgb(scene.depth)
    if modality == "segmentation":
        return seg_to_rgb(reading_order(scene.seg))  # colours in generation order (see reading_order)
    return scene.rgb


# ----------------------------------------------------------------------------- questions
CATEGORIES = ["relative_distance", "distance", "height", "relative_size", "count", "left_right",
              "existence", "attribute"]
# kind, helpful tool and CPR flag (does a generated map help? PAPER.md, r_explore) of each category.
CATEGORY_INFO = {
    "relative_distance": ("choice", "depth", "positive"),
    "distance": ("number", "depth", "positive"),
    "height": ("number", "depth", "boundary"),        # a depth map helps only with pixel-size geometry
    "relative_size": ("choice", "depth", "positive"),  # perspective: small in the picture may be far
    "count": ("count", "segmentation", "positive"),
    "left_right": ("yesno", "segmentation", "boundary"),
    "existence": ("yesno", None, "negative"),
    "attribute": ("yesno", None, "negative"),
    # grounding tasks (not benchmark categories): answers are a cell or a colour word, checked by exact match
    "locate": ("cell", "segmentation", "boundary"),
    "identify": ("word", None, "negative"),
    "shape": ("word", None, "negative"),
}
GROUNDING = ["locate", "identify", "shape"]


@dataclass
class Question:
    text: str
    answer: str               # "A"/"B", "yes"/"no", an integer count, or metres like "3.2"
    category: str
    kind: str                 # choice | yesno | count | number
    flag: str                 # positive | negative | boundary
    tool: object              # "depth" | "segmentation" | None
    objects: list = field(default_factory=list)   # indices into scene.objects the question refers to
    image: str = ""           # scene name, for questions loaded from qa.jsonl
    data_id: str = ""


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _map_reads(scene):
    """What the true maps show at each object: median depth under its mask, mask centroid column,
    and the number of pixel rows it spans. Trajectories quote these; questions check they agree."""
    reads = []
    for i in range(len(scene.objects)):
        v, u = np.nonzero(scene.seg == i + 1)
        if len(v) == 0:
            reads.append((MAX_DEPTH, float("nan"), 0))
            continue
        reads.append((float(np.median(scene.depth[v, u])), float(u.mean()), int(v.max() - v.min() + 1)))
    return reads


def _column(scene, o):
    """Image column of an object's 3-D centre: u = fx x / z + cx (pinhole projection)."""
    fx, _, cx, _ = scene.intrinsics
    return fx * o.position[0] / o.position[2] + cx


def _pick_pair(scene, cand, rng, ok):
    """A random unordered pair of candidate objects satisfying ok(i, j), in random (A, B) order."""
    pairs = [(i, j) for k, i in enumerate(cand) for j in cand[k + 1:] if ok(i, j)]
    if not pairs:
        return None
    i, j = pairs[rng.integers(len(pairs))]
    return (i, j) if rng.random() < 0.5 else (j, i)


def _q(category, text, answer, objects):
    kind, tool, flag = CATEGORY_INFO[category]
    return Question(text, answer, category, kind, flag, tool, list(objects))


def make_questions(scene, rng):
    """One question per category where an unambiguous one exists. Answers come from the 3-D ground truth.
    Objects are referred to by colour ("the red object": colours are unique in a scene); shape is asked about only
    for objects of at least SHAPE_PIXELS pixels, where 8x8-pixel code cells can still show it."""
    objs, reads = scene.objects, _map_reads(scene)
    cand = [i for i, o in enumerate(objs) if o.pixels > 0]
    f = scene.intrinsics[0] if scene.intrinsics else float(scene.rgb.shape[1])
    apart = lambda x, y, ratio: max(x, y) >= ratio * min(x, y)          # clearly different quantities
    qs = []
    if cand:
        # Relative distance: >= 10 % apart, and the depth map's median readings order them the same way.
        dist = [o.distance for o in objs]
        p = _pick_pair(scene, cand, rng, lambda i, j: apart(dist[i], dist[j], 1.1)
                       and (dist[i] < dist[j]) == (reads[i][0] < reads[j][0]))
        if p:
            a, b = p
            qs.append(_q("relative_distance", f"Which is closer to the camera? (A) the {objs[a].ref} (B) the "
                         f"{objs[b].ref}", "A" if dist[a] < dist[b] else "B", p))
        # Metric distance (camera to centre) and height, rounded to 0.1 m.
        i = cand[rng.integers(len(cand))]
        qs.append(_q("distance", f"How far is the {objs[i].ref} from the camera, in metres?",
                     f"{dist[i]:.1f}", [i]))
        i = cand[rng.integers(len(cand))]
        qs.append(_q("height", f"How tall is the {objs[i].ref}, in metres?", f"{objs[i].height:.1f}", [i]))
        # Relative 3-D size by volume: >= 1.5x apart, and the size estimated from the maps
        # (sqrt(visible pixels) * depth / f) agrees, so the depth map really settles it.
        vol = [o.volume for o in objs]
        est = [math.sqrt(o.pixels) * r[0] / f for o, r in zip(objs, reads)]
        p = _pick_pair(scene, cand, rng, lambda i, j: apart(vol[i], vol[j], 1.5)
                       and (vol[i] < vol[j]) == (est[i] < est[j]))
        if p:
            a, b = p
            qs.append(_q("relative_size", f"Which object is bigger in real 3-D size, not in the picture? "
                         f"(A) the {objs[a].ref} (B) the {objs[b].ref}", "A" if vol[a] > vol[b] else "B", p))
    # Counting: every object, or the objects of one shape where every object is large enough to show its shape (the
    # attribute question's rule; about a fifth of scenes). The same draws either way, so the stream is unchanged.
    big = [i for i, o in enumerate(objs) if o.pixels >= SHAPE_PIXELS * (scene.rgb.shape[1] / IMAGE_SIZE) ** 2]
    match, text = list(range(len(objs))), "How many objects are there?"
    if rng.random() >= 0.5:
        s = SHAPES[rng.integers(3)]
        if len(big) == len(objs):
            match, text = [i for i, o in enumerate(objs) if o.shape == s], f"How many {PLURALS[s]} are there?"
    qs.append(_q("count", text, str(len(match)), match))
    if cand:
        # Left / right in the image: projected 3-D centres >= 4 px apart (at 64 px) and mask centroids agree.
        # Pair order is random, so "yes" and "no" are equally likely.
        gap = 4 * scene.rgb.shape[1] / IMAGE_SIZE
        us = [_column(scene, o) for o in objs]
        p = _pick_pair(scene, cand, rng, lambda i, j: abs(us[i] - us[j]) >= gap and
                       (us[i] < us[j]) == (reads[i][1] < reads[j][1]))
        if p:
            a, b = p
            qs.append(_q("left_right", f"Is the {objs[a].ref} to the left of the {objs[b].ref} in the image?",
                         "yes" if us[a] < us[b] else "no", p))
    # Existence of a colour: half the time one that is there, else one that is not.
    if rng.random() < 0.5:
        i = int(rng.integers(len(objs)))
        qs.append(_q("existence", f"Is there {_a(objs[i].ref)} in the image?", "yes", [i]))
    else:
        absent = [c for c in COLORS if c not in {o.color for o in objs}]
        qs.append(_q("existence", f"Is there {_a(absent[rng.integers(len(absent))] + ' object')} in the image?",
                     "no", []))
    # Attribute: the shape of an object large enough to show it; half the time the true shape is asked.
    if big:
        i = big[rng.integers(len(big))]
        yes = rng.random() < 0.5
        s = objs[i].shape if yes else [x for x in SHAPES if x != objs[i].shape][rng.integers(2)]
        qs.append(_q("attribute", f"Is the {objs[i].ref} {_a(s)}?", "yes" if yes else "no", [i]))
    return qs


def object_cell(scene, i, cell=SEG_CELL):
    """(row, column), counted from 1, of the code cell holding the centroid of object i's visible pixels."""
    v, u = np.nonzero(scene.seg == i + 1)
    return int(v.mean()) // cell + 1, int(u.mean()) // cell + 1


def grounding_questions(scene, rng, cell=SEG_CELL):
    """Grounding tasks with many-bit answers (trained beside the benchmark's questions, scored on their own):
    "locate": where is the red object? -> the cell of its centroid ("row 3, column 5", as grounding models point);
    "identify": what colour is the object at row r, column c? -> a colour word, asked only about a cell that one
    object covers at least half of. Content -> position and position -> content, the two directions of a lookup.
    "shape": what shape is the red object? -> cube / sphere / cylinder, about the located object when it is at least
    SHAPE_PIXELS large (content -> content: what attribute and count-by-shape questions need)."""
    objs, qs = scene.objects, []
    if objs:
        i = int(rng.integers(len(objs)))
        r, c = object_cell(scene, i, cell)
        qs.append(_q("locate", f"Where is the {objs[i].ref}? Give its cell.", f"row {r}, column {c}", [i]))
        if objs[i].pixels >= SHAPE_PIXELS * (scene.rgb.shape[1] / IMAGE_SIZE) ** 2:  # no draw: other questions unchanged
            qs.append(_q("shape", f"What shape is the {objs[i].ref}?", objs[i].shape, [i]))
        g = scene.seg.shape[0] // cell
        blocks = scene.seg[:g * cell, :g * cell].reshape(g, cell, g, cell).transpose(0, 2, 1, 3).reshape(g, g, -1)
        cover = np.stack([(blocks == k + 1).sum(-1) for k in range(len(objs))])  # (n, g, g) pixels per cell
        k, rr, cc = np.nonzero(cover * 2 >= cell * cell)
        if len(k):
            j = int(rng.integers(len(k)))
            qs.append(_q("identify", f"What colour is the object at row {rr[j] + 1}, column {cc[j] + 1}?",
                         objs[k[j]].color, [int(k[j])]))
    return qs


def answer_text(question):
    """Canonical final answer, read by the rule-based verifier: <answer>\\boxed{X}</answer>."""
    return f"<answer>\\boxed{{{question.answer}}}</answer>"


def _scores(preds, gts, kind, metric="mra"):
    """(K, N) scores of K candidate answers against N true answers (strings): numbers by SIBench MRA or the Q-Spatial
    factor-2 hit (EQUATIONS.md), every other kind by exact match."""
    if kind != "number":
        return np.array([[float(p == g) for g in gts] for p in preds])
    p, g = np.array(preds, float)[:, None], np.array(gts, float)[None]     # (K, 1), (1, N)
    if metric == "qspatial":
        return (np.maximum(p / g, g / p) < 2).astype(float)
    tol = (10 - np.arange(10)) / 20                                        # 1 - theta for theta = 0.50 … 0.95
    return (np.abs(p - g)[..., None] / g[..., None] < tol).mean(-1)


_COLOUR_WORD = re.compile(r"\b(?:an? )?(?:" + "|".join(COLORS) + r")\b")


def wording(question):
    """What a model that does not look at the image knows of a question: its text with every colour word (and its
    article) replaced by "<colour>". Colours are drawn independently of everything else in the world, so they carry
    nothing about the answer."""
    return _COLOUR_WORD.sub("<colour>", question.text)


@lru_cache(maxsize=None)
def wording_prior(number_metric="mra", n_scenes=1000):
    """The best blind answer for each wording, fitted on train scenes: ({(category, wording): answer} for wordings
    seen at least 20 times, {category: answer}). "Best" = the highest mean score over the training answers."""
    rng, groups = np.random.default_rng(0), {}
    for k in range(n_scenes):
        scene = make_scene(scene_seed("train", k))
        for q in make_questions(scene, rng) + grounding_questions(scene, rng):
            groups.setdefault((q.category, wording(q)), []).append(q.answer)
            groups.setdefault((q.category, None), []).append(q.answer)

    def best(category, answers):
        cands = sorted(set(answers))
        return cands[int(_scores(cands, answers, CATEGORY_INFO[category][0], number_metric).mean(1).argmax())]
    table = {key: best(key[0], a) for key, a in groups.items() if key[1] is not None and len(a) >= 20}
    return table, {key[0]: best(key[0], a) for key, a in groups.items() if key[1] is None}


def prior_answer(question, number_metric="mra"):
    """The wording prior's answer to a question: the chance-level guess of a model that ignores the image."""
    table, per_category = wording_prior(number_metric)
    return table.get((question.category, wording(question)), per_category[question.category])


def answer_score(pred, question, number_metric="mra"):
    """Score of an answer string for a question: exact match, numbers by MRA (or the Q-Spatial hit)."""
    return float(_scores([pred], [question.answer], question.kind, number_metric)[0, 0])


@lru_cache(maxsize=None)
def chance_levels(number_metric="mra", n_scenes=300):
    """Chance level of every category: the mean score of the wording prior's answer (`prior_answer`, the best answer
    given the question's wording alone) on that category's questions of the first n_scenes validation scenes."""
    rng, hits = np.random.default_rng(0), {}
    for k in range(n_scenes):
        scene = make_scene(scene_seed("val", k))
        for q in make_questions(scene, rng) + grounding_questions(scene, rng):
            hits.setdefault(q.category, []).append(answer_score(prior_answer(q, number_metric), q, number_metric))
    return {c: float(np.mean(v)) for c, v in hits.items()}


def chance(category, number_metric="mra", n_scenes=300):
    """Chance level of one category (see `chance_levels`)."""
    return chance_levels(number_metric, n_scenes)[category]


# ----------------------------------------------------------------------------- trajectories (stage 2)
MODES = ("depth", "segmentation", "text")
# First thought of a turn, two phrasings per mode so the model does not key on one sentence.
PLANS = {"depth": ["A depth map shows how far away each object is.", "I will estimate depth to measure this."],
          "segmentation": ["A segmentation map separates the objects.",
                           "I will segment the image to find each object."],
          "text": ["The image alone is enough for this.", "No map is needed here."]}


def _fact(scene, q):
    """One sentence of 3-D ground truth that settles the question. Objects are named as the question names them (by
    colour), so a model can copy the name and only has to find the value."""
    o = scene.objects
    if q.category == "relative_distance":
        a, b = q.objects if q.answer == "A" else q.objects[::-1]
        return f"So the {o[a].ref} is closer to the camera than the {o[b].ref}."
    if q.category == "distance":
        return f"Its centre is about {q.answer} m from the camera."
    if q.category == "height":
        return f"The {o[q.objects[0]].ref} is about {q.answer} m tall."
    if q.category == "relative_size":
        a, b = q.objects if q.answer == "A" else q.objects[::-1]
        return f"So the {o[a].ref} is bigger in 3-D than the {o[b].ref}."
    if q.category == "count":
        return f"Counting {q.text[len('How many '):-len(' are there?')]}: {q.answer}."
    if q.category == "left_right":
        a, b = q.objects
        return f"The {o[a].ref} is {'left' if q.answer == 'yes' else 'right'} of the {o[b].ref}."
    if q.category == "existence":
        seen = ", ".join(_a(x.ref) for x in o)
        return f"I see {seen}; " + ("one of them matches." if q.answer == "yes" else "none of them matches.")
    if q.category == "attribute":
        x = o[q.objects[0]]
        return f"The {x.color} object is {_a(x.shape)}."
    return ""


def _reading(scene, q, mode):
    """What the true map shows, in words: depths under the referenced objects, or segmented regions."""
    o, reads = scene.objects, _map_reads(scene)
    refs = q.objects or list(range(len(o)))
    if mode == "depth":
        parts = [f"about {reads[i][0]:.1f} m on the {o[i].ref}" for i in refs[:4]]
        s = "The depth map reads " + ", ".join(parts) + "."
        if q.category == "height" and q.objects:
            i = q.objects[0]
            f = scene.intrinsics[1]
            s += (f" It spans {reads[i][2]} pixel rows, roughly {reads[i][2] * reads[i][0] / f:.1f} m at that "
                  f"depth.")
        if q.category == "relative_size":
            # visible width estimate sqrt(pixels) * depth / f, the same check make_questions applied
            est = [math.sqrt(o[i].pixels) * reads[i][0] / scene.intrinsics[0] for i in q.objects]
            s += f" Scaled by depth, their real sizes are roughly {est[0]:.1f} m and {est[1]:.1f} m."
        return s
    n = len(np.unique(scene.seg)) - 1
    s = f"The segmentation map shows {n} separate object{'s' * (n != 1)}."
    if q.category == "count":
        s += " They are " + ", ".join(_a(x.name) for x in o) + "."
    else:
        where = "; ".join(f"the {o[i].ref} is centred near column {reads[i][1]:.0f}" for i in refs[:4])
        s += " " + where[0].upper() + where[1:] + "."
    return s


def prompt_segments(question):
    """The user turn, up to where the model starts writing (also the GRPO prompt): the question, then the image.
    Question first, so that under causal attention every image code can attend to the question: a code can tell
    whether it shows "the red object" while the image is read. With the image first, "where is the red object?" was
    not learned in 1,000 steps; with the question first it was (README, "Making the model see")."""
    text = question.text if isinstance(question, Question) else question
    return [("text", "<|im_start|>" + text, False), ("image", "rgb", False), ("text", "<|im_end|><|im_start|>", False)]


def make_trajectory(scene, question, rng, mode=None):
    """Segments of one SFT example in PAPER.md's format: <think>...</think> then a tool tag (the map is
    generated, then the reflection prompt follows) or <answer>...</answer>; here 1 or 2 text turns.
    mode: "depth" | "segmentation" | "text"; default = the question's helpful tool.
    Loss (SFT): the model's text turns and the closing <|im_end|>; not question, reflection or images."""
    mode = mode or question.tool or "text"
    plan = PLANS[mode][rng.integers(2)]
    fact = _fact(scene, question)
    segs = prompt_segments(question)
    if mode == "text":
        return segs + [("text", f"<think>{plan} {fact}</think>{answer_text(question)}<|im_end|>", True)]
    return segs + [("text", f"<think>{plan}</think>{TOOL_PROMPTS[mode]}", True),
                   ("image", mode, False),                                   # the generated map: context
                   ("text", REFLECTION_PROMPT, False),
                   ("text", f"<think>{_reading(scene, question, mode)} {fact}</think>"
                            f"{answer_text(question)}<|im_end|>", True)]


def sample_trajectory(scene, rng, questions=None):
    """Balanced SFT sampling: a mode uniformly from MODES, then a question whose helpful tool is that
    mode (any question if none fits). Returns (question, segments, mode)."""
    qs = questions if questions is not None else make_questions(scene, rng)
    mode = MODES[rng.integers(3)]
    fit = [q for q in qs if (q.tool or "text") == mode] or qs
    q = fit[rng.integers(len(fit))]
    return q, make_trajectory(scene, q, rng, mode), mode


def trajectory_mix(n_scenes=300, seed=0, split="train"):
    """Counts of sampled modes and categories over n_scenes (used by --bench and the tests)."""
    rng, modes, cats = np.random.default_rng(seed), Counter(), Counter()
    for k in range(n_scenes):
        q, _, mode = sample_trajectory(make_scene(scene_seed(split, k)), rng)
        modes[mode] += 1
        cats[q.category] += 1
    return modes, cats


def amg_segments(kind):
    """Stage-1 AMG example: instruction + rgb, then the target map (loss only on its codes)."""
    return prompt_segments(TOOL_PROMPTS[kind]) + [("image", kind, True), ("text", "<|im_end|>", False)]


def vqa_segments(question):
    """Stage-1 direct-answer VQA example: question + rgb, then the answer (loss on it and the closing <|im_end|>)."""
    return prompt_segments(question) + [("text", answer_text(question) + "<|im_end|>", True)]


# ----------------------------------------------------------------------------- sequence layout
def encode_segments(segments, tokenizer, image_offset, images=None):
    """Segments -> (ids, loss_mask), both lists. Text ids come from the tokenizer ([0, image_offset));
    image code k becomes image_offset + k inside <|vision_start|> ... <|vision_end|>. loss_mask[t] is True
    when token t is a training target; an image with loss covers its codes and <|vision_end|>."""
    ids, mask = [], []
    # exercise 7 begin: the loss mask of a token sequence
    for kind, value, loss in segments:
        if kind == "text":
            # Each text segment is encoded on its own; special tokens inside it (<|im_end|>, <think>, ...)
            # are matched whole by the tokenizer before BPE runs, so they always become ids 0..12.
            new = tokenizer.encode(value).ids
            ids += new
            mask += [loss] * len(new)
        else:
            # An image: a name looked up in `images` ("rgb", "depth", "segmentation") or the codes themselves,
            # raster order, shifted past the text vocabulary (DESIGN.md: text ids | image codes).
            codes = np.asarray(images[value] if isinstance(value, str) else value).ravel()  # (h * w,)
            ids += [VISION_START] + (codes.astype(np.int64) + image_offset).tolist() + [VISION_END]
            # <|vision_start|> is never a target: in stage 2 the sampler inserts it after a tool tag.
            mask += [False] + [loss] * (len(codes) + 1)
    # exercise 7 end
    return ids, mask


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_corpus(n_scenes=200, seed=0):
    """Text the tokenizer learns from: questions, answers, prompts, grounding questions and trajectories of all three
    modes."""
    rng, texts = np.random.default_rng(seed), [DEPTH_PROMPT, SEG_PROMPT, REFLECTION_PROMPT]
    for k in range(n_scenes):
        scene = make_scene(scene_seed("train", k))
        # not the shape lookups' wording: they were measured with tokenizers that never saw it (docs/perception.md)
        texts += [q.text + answer_text(q) for q in grounding_questions(scene, rng) if q.category != "shape"]
        for q in make_questions(scene, rng):
            texts.append(answer_text(q))
            for mode in MODES:
                texts.append("".join(v for kind, v, _ in make_trajectory(scene, q, rng, mode) if kind == "text"))
    return texts


def train_tokenizer(vocab_size=1024, n_scenes=200, seed=0):
    """Byte-level BPE (any text encodes, no unknown token) with SPECIAL_TOKENS as ids 0..12."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # Byte-level: text is split into words on spaces/punctuation, then BPE merges bytes inside each word.
    # On this templated corpus the merges run out before vocab_size (every word becomes one token), which
    # is why the trained vocabulary is smaller than asked; unseen text still encodes byte by byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Special tokens are listed first, so they get ids 0..12 in SPECIAL_TOKENS order.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(n_scenes, seed), trainer)
    return tok


def save_tokenizer(tok, path):
    """Write tokenizer.json atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)                                 # a killed run leaves the old file or the new one


def load_tokenizer(path):
    """Load tokenizer.json; a clear error if it is missing, unreadable or has the wrong special ids."""
    from tokenizers import Tokenizer
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    wrong = [s for i, s in enumerate(SPECIAL_TOKENS) if tok.token_to_id(s) != i]
    if wrong:
        raise ValueError(f"{path}: special tokens {wrong} do not have the ids data.SPECIAL_TOKENS expects")
    return tok


# ----------------------------------------------------------------------------- your own data
class DataError(ValueError):
    """A user data folder is malformed; the message names the file and the reason."""


def _open(path, what):
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise DataError(f"{path}: missing {what} file") from None
    except Exception as e:
        raise DataError(f"{path}: cannot read {what} image ({e})") from None


def _square(img, size, resample):
    """Resize policy: centre-crop to a square on the shorter side, then resize to size x size."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return img.crop(box).resize((size, size), resample)


def load_folder(root, size=IMAGE_SIZE, max_depth=MAX_DEPTH):
    """Load a folder of your own data into (scenes, questions).

    Format:  root/rgb/NAME.png      8-bit RGB (RGBA / grey are converted)
             root/depth/NAME.png    16-bit single channel, millimetres; 0 = no reading -> max_depth
             root/seg/NAME.png      optional, instance ids (8- or 16-bit), 0 = background
             root/qa.jsonl          optional, one object per line with COOPER's fields:
                                    question, answer, image (NAME or NAME.png), data_id, flag; optional
                                    category, kind (inferred from the answer when absent)
    Resize policy: centre-crop to a square, then resize to size x size - RGB bilinear, depth and seg
    nearest (never mixing depths across an edge or ids). Scenes have no objects and intrinsics None."""
    root = Path(root)
    names = sorted(p.stem for p in (root / "rgb").glob("*.png"))
    if not names:
        raise DataError(f"{root / 'rgb'}: no .png images found")
    scenes = []
    for name in names:
        # Open everything first and check it, so that errors name the exact file at fault.
        rgb = _open(root / "rgb" / f"{name}.png", "rgb")
        dimg = _open(root / "depth" / f"{name}.png", "depth")
        if dimg.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise DataError(f"{root / 'depth' / (name + '.png')}: wrong bit depth (mode {dimg.mode}); "
                            f"depth must be a 16-bit single-channel PNG in millimetres")
        imgs = [("rgb", rgb), ("depth", dimg)]
        if (root / "seg").is_dir():
            imgs.append(("seg", _open(root / "seg" / f"{name}.png", "seg")))
        for what, img in imgs[1:]:
            if img.size != rgb.size:
                raise DataError(f"{root / what / (name + '.png')}: size {img.size} does not match the rgb "
                                f"image's {rgb.size}")
        rgb = np.asarray(_square(rgb.convert("RGB"), size, Image.BILINEAR))
        mm = np.asarray(dimg, np.int64)                     # read before resizing to keep 16-bit values
        depth = np.asarray(_square(Image.fromarray(mm.astype(np.int32)), size, Image.NEAREST), np.float64)
        depth = np.where(depth > 0, depth / 1000, max_depth).astype(np.float32)   # millimetres -> metres
        seg = np.zeros((size, size), np.int64)
        if len(imgs) == 3:
            ids = np.asarray(imgs[2][1], np.int64)
            if ids.ndim != 2:
                raise DataError(f"{root / 'seg' / (name + '.png')}: instance ids must be single-channel")
            seg = np.asarray(_square(Image.fromarray(ids.astype(np.int32)), size, Image.NEAREST), np.int64)
        scenes.append(Scene(rgb, depth, seg, [], None, name=name))
    # Questions: one JSON object per line; the line number goes into every error message.
    questions, qa = [], root / "qa.jsonl"
    if qa.exists():
        for ln, line in enumerate(qa.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                image, answer = Path(str(r["image"])).stem, str(r["answer"]).strip()
                text = r["question"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{qa}: line {ln}: bad record ({type(e).__name__}: {e})") from None
            if image not in names:
                raise DataError(f"{qa}: line {ln}: image {r['image']!r} is not in {root / 'rgb'}")
            flag = r.get("flag", "boundary")
            if flag not in ("positive", "negative", "boundary"):
                raise DataError(f"{qa}: line {ln}: flag {flag!r} is not positive / negative / boundary")
            kind = r.get("kind") or _infer_kind(answer)   # so the rule-based verifier knows how to judge it
            questions.append(Question(text, answer, r.get("category", "custom"), kind, flag, None, [], image,
                                      str(r.get("data_id", ln))))
    return scenes, questions


def _infer_kind(answer):
    """Answer kind from its text: yes/no, one letter, an integer, a number, else free text."""
    if answer.lower() in ("yes", "no"):
        return "yesno"
    if len(answer) == 1 and answer.isalpha():
        return "choice"
    if answer.isdigit():
        return "count"
    try:
        float(answer)
        return "number"
    except ValueError:
        return "text"


# ----------------------------------------------------------------------------- command line
def contact_sheet(scenes, scale=2):
    """One row per scene: RGB | coloured depth | segmentation, upscaled by `scale` (nearest)."""
    rows = [np.concatenate([s.rgb, colorize_depth(s.depth), seg_to_rgb(s.seg)], 1) for s in scenes]
    sheet = np.concatenate(rows, 0)                      # (n * H, 3 * W, 3)
    return sheet.repeat(scale, 0).repeat(scale, 1)


def _look(out, n, split):
    """Write the contact sheet and every question of the first n scenes of a split."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scenes = [make_scene(scene_seed(split, k)) for k in range(n)]
    Image.fromarray(contact_sheet(scenes)).save(out / "contact_sheet.png")
    with open(out / "questions.jsonl", "w") as fh:
        for k, s in enumerate(scenes):
            for q in make_questions(s, rng):
                fh.write(json.dumps({"split": split, "scene": k, "seed": s.seed, **dataclasses.asdict(q)}) + "\n")
    print(f"wrote {out / 'contact_sheet.png'} (rows: RGB | depth | segmentation) and {out / 'questions.jsonl'}")


def _bench(n_scenes=400):
    """Print the numbers worth knowing about the data: speed, question mix, trajectory mix, token counts."""
    # scenes per second, median of 5 repeats
    rates = []
    for r in range(5):
        t0 = time.perf_counter()
        for k in range(100):
            make_scene(scene_seed("train", 100 * r + k))
        rates.append(100 / (time.perf_counter() - t0))
    print(f"make_scene at {IMAGE_SIZE}x{IMAGE_SIZE}: {np.median(rates):.0f} scenes/s "
          f"(median of 5 x 100 scenes; min {min(rates):.0f}, max {max(rates):.0f})")
    # question statistics: per category, per flag, answer balance
    rng = np.random.default_rng(0)
    cats, flags, answers, nobj = Counter(), Counter(), Counter(), Counter()
    for k in range(n_scenes):
        s = make_scene(scene_seed("train", k))
        nobj[len(s.objects)] += 1
        for q in make_questions(s, rng):
            cats[q.category] += 1
            flags[q.flag] += 1
            if q.kind in ("choice", "yesno"):
                answers[q.answer] += 1
    print(f"\nover {n_scenes} train scenes; objects per scene: {dict(sorted(nobj.items()))}")
    print(f"{'category':<18}{'kind':>7}{'tool':>13}{'flag':>10}{'questions':>10}{'per scene':>10}{'chance':>8}")
    for c in CATEGORIES:
        kind, tool, flag = CATEGORY_INFO[c]
        share = cats[c] / n_scenes
        print(f"{c:<18}{kind:>7}{str(tool):>13}{flag:>10}{cats[c]:>10}{share:>10.2f}{chance(c):>8.2f}")
    print("flags:", dict(flags), "| answers of choice and yes/no questions:", dict(answers))
    modes, tcats = trajectory_mix(n_scenes)
    print("trajectory modes:", dict(modes), "| categories:", dict(tcats))
    t0 = time.perf_counter()
    tok = train_tokenizer()
    t_tok = time.perf_counter() - t0
    rng, lengths = np.random.default_rng(1), []
    for k in range(200):
        s = make_scene(scene_seed("val", k))
        _, segs, _ = sample_trajectory(s, rng)
        lengths.append(sum(len(tok.encode(v).ids) for kind, v, _ in segs if kind == "text"))
    print(f"tokenizer: vocab {tok.get_vocab_size()}, trained in {t_tok:.1f} s; text tokens per trajectory "
          f"(200 val scenes): mean {np.mean(lengths):.1f}, max {max(lengths)} (+ 2 + h*w per image)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write contact_sheet.png and questions.jsonl here")
    ap.add_argument("--n", type=int, default=16, help="number of scenes for --out")
    ap.add_argument("--split", default="val", choices=list(SPLITS), help="split for --out")
    ap.add_argument("--bench", action="store_true", help="print speed, question, trajectory and tokenizer stats")
    args = ap.parse_args()
    if args.out:
        _look(args.out, args.n, args.split)
    if args.bench:
        _bench()
    if not (args.out or args.bench):
        ap.print_help()
