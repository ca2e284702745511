"""Tests of stage 2: the tool-switch runtime, the policy-gradient mask and the ratio at mu = 1, a GRPO run that must
learn a toy reward, SFT examples, exact resume, and CPR groups under DDP. Run: python -m pytest tests/test_stage2.py"""
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

import cooper
import data
import reward
import train
from model import ModelConfig, UnifiedTransformer

TAGS = [data.THINK, data.THINK_END, data.DEPTH_TAG, data.DEPTH_TAG_END, data.SEG_TAG, data.SEG_TAG_END, data.ANSWER,
        data.ANSWER_END, data.IM_END]


@pytest.fixture(scope="module")
def agent(tiny_run):
    """The miniature run's (untrained) model with its output layer biased towards the protocol's tags, so that random
    rollouts call tools, answer and stop often."""
    c = cooper.Cooper.load(tiny_run)
    bias = torch.zeros(c.cfg.vocab_size)
    bias[TAGS] = 5.0
    c.model.lm_head.bias = torch.nn.Parameter(bias)
    return c


def rollouts(agent, n=8, turn_cap=12, seed=0):
    scenes = [data.make_scene(data.scene_seed("val", k)) for k in range(n)]
    qs = [data.make_questions(s, np.random.default_rng(k))[0].text for k, s in enumerate(scenes)]
    return agent.rollout(np.stack([s.rgb for s in scenes]), qs, "interleaved", temperature=1.0, seed=seed,
                         turn_cap=turn_cap)


def test_runtime_tool_switch(agent):
    """Random rollouts: after every sampled closing tool tag the runtime forces <|vision_start|>, exactly h×w sampled
    codes follow, then a forced <|vision_end|> and the forced reflection prompt; a rollout draws at most MAX_TURNS - 1
    maps and samples no tool tag after its last; <|vision_start|> is never sampled, no code is sampled outside a map, and
    a turn that samples more than turn_cap text tokens ends the
    rollout there. The maps the rollout reports match what it drew."""
    n_img, off = agent.cfg.image_tokens, agent.cfg.image_offset
    reflect = agent.tok.encode(data.REFLECTION_PROMPT).ids
    total = 0
    for seed in range(3):
        results, raw = rollouts(agent, n=16, seed=seed)
        T0 = raw["T0"]
        for b, res in enumerate(results):
            real = raw["mask"][b, T0:]
            gen, samp = raw["tokens"][b, T0:][real].tolist(), raw["sampled"][b][real].tolist()
            i, kinds, run = 0, [], 0
            while i < len(gen):
                t = gen[i]
                if samp[i] and t in (data.DEPTH_TAG_END, data.SEG_TAG_END):
                    block = gen[i + 1:i + 3 + n_img + len(reflect)]
                    forced = [not s for s in samp[i + 1:i + 3 + n_img + len(reflect)]]
                    want = [data.VISION_START] + [None] * n_img + [data.VISION_END] + reflect
                    want_forced = [True] + [False] * n_img + [True] * (1 + len(reflect))
                    for k, (x, w) in enumerate(zip(block, want)):  # a rollout may end inside the reflection prompt
                        assert (x >= off) if w is None else x == w, (b, k)
                        assert forced[k] == want_forced[k], (b, k)
                    kinds.append("depth" if t == data.DEPTH_TAG_END else "segmentation")
                    i, run = i + 1 + len(block), 0
                    continue
                if samp[i]:
                    assert t != data.VISION_START and t < off
                    run += 1
                    assert run <= 12 or (run == 13 and i == len(gen) - 1), (b, run)  # the 13th ends the rollout
                    assert not (len(kinds) >= reward.MAX_TURNS - 1 and t in (data.DEPTH_TAG, data.SEG_TAG))  # closing: above
                i += 1
            assert len(kinds) <= reward.MAX_TURNS - 1
            assert [k for k, _ in res["maps"]] == kinds[:len(res["maps"])]
            total += len(kinds)
    assert total >= 5  # the switch was exercised


def test_turn_cap_holds_every_reference_turn(tiny_run):
    """The runtime ends a rollout whose turn outgrows cooper.TURN_CAP text tokens, so every model-written turn that SFT
    teaches must fit in it (a 64-token cap once cut 20 % of the relative-size answers and failed their format)."""
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    rng, longest = np.random.default_rng(0), 0
    for i in range(150):
        s = data.make_scene(data.scene_seed("train", i))
        for q in data.make_questions(s, rng):
            for mode in data.MODES:
                turns = [seg[1] for seg in data.make_trajectory(s, q, rng, mode=mode) if seg[0] == "text" and seg[2]]
                longest = max([longest] + [len(tok.encode(t).ids) for t in turns])
    assert longest <= cooper.TURN_CAP, longest


def test_policy_mask_gradient_and_ratio(agent):
    """The policy-gradient mask is exactly the sampled text tokens (codes only with image_pg); the GRPO loss sends
    zero gradient to every other position (forced tokens, reflection prompt, codes, prompt, padding) and a non-zero
    one to each masked token; the old log-probs grpo_step takes (the graded pass, detached) equal a separate no-grad
    pass bit for bit, and at mu = 1 the ratio is exactly 1 and nothing is clipped; log-probs computed at the masked
    tokens only equal the full computation's there."""
    results, raw = rollouts(agent, n=16)  # 16: rollouts that draw a map occur (4 of 16)
    T0, off = raw["T0"], agent.cfg.image_offset
    width = agent.max_tokens(12)
    pg = train.policy_mask(raw, off, width)
    gen = raw["tokens"][:, T0:]
    n = gen.shape[1]
    assert torch.equal(pg[:, :n], raw["sampled"] & (gen < off)) and not pg[:, n:].any()
    assert (raw["sampled"] & (gen >= off)).any() and (~raw["sampled"] & raw["mask"][:, T0:]).any()  # both kinds occur
    pgi = train.policy_mask(raw, off, width, image_pg=True)
    assert torch.equal(pgi[:, :n], raw["sampled"])
    scenes = [data.make_scene(data.scene_seed("val", k)) for k in range(16)]
    pixels = agent.pixels(np.stack([s.rgb for s in scenes]))
    with torch.no_grad():
        old, _ = train.token_logps(agent.model, raw["tokens"], raw["mask"], pixels, T0, width, 1.0)
    logps, _ = train.token_logps(agent.model, raw["tokens"], raw["mask"], pixels, T0, width, 1.0)
    assert torch.equal(old, logps.detach())
    # grpo_step computes the log-probs at the masked tokens only (where=pg): the same numbers there, 0 elsewhere
    part, ent = train.token_logps(agent.model, raw["tokens"], raw["mask"], pixels, T0, width, 1.0, pg)
    torch.testing.assert_close(part[pg], old[pg], atol=1e-6, rtol=1e-6)
    assert (part[~pg] == 0).all() and (ent[~pg] == 0).all() and (ent[pg] > 0).all()
    logps.retain_grad()
    loss, st = train.grpo_loss(logps, logps.detach(), torch.linspace(-1, 1, 16), pg)
    loss.backward()
    assert st["ratio_mean"] == 1.0 and st["clip_low_frac"] == st["clip_high_frac"] == 0.0
    assert (logps.grad[~pg] == 0).all()
    has_adv = torch.linspace(-1, 1, 16)[:, None].expand_as(pg) != 0
    assert (logps.grad[pg & has_adv] != 0).all()


def test_grpo_learns_a_toy_reward():
    """GRPO with the project's pieces (generate -> group_advantages -> token_logps -> grpo_loss) on a toy reward, the
    share of sampled tokens equal to one chosen id: the mean reward of 8 prompts x 8 rollouts rises from ~1/64 to
    above 0.3 within 30 updates, for each loss type."""
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        torch.manual_seed(0)
        cfg = ModelConfig(text_vocab=64, codebook_size=16, image_size=16, vq_downsample=8, n_layer=2, n_head=4,
                          n_kv_head=2, n_embd=32, ffn_hidden=64, max_seq_len=64, attn_impl="reference", patch_embed=False)
        model = UnifiedTransformer(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        history = []
        for step in range(30):
            prompt = torch.randint(5, 64, (8, 4), generator=g).repeat_interleave(8, 0)  # 8 groups of 8
            with torch.no_grad():
                out = model.generate(prompt, 6, temperature=1.0, vision_start=3, vision_end=4, generator=g)
            gen = out["tokens"][:, 4:]
            r = (gen == 7).float().mean(1)  # the toy reward per rollout
            history.append(r.mean().item())
            adv = reward.group_advantages(r, 8, scale=loss_type != "dr_grpo")
            mask = torch.ones(64, 6, dtype=torch.bool)
            logps, _ = train.token_logps(model, out["tokens"], out["mask"], None, 4, 6, 1.0)
            loss, _ = train.grpo_loss(logps, logps.detach(), adv, mask, loss_type=loss_type)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert history[0] < 0.1 and np.mean(history[-5:]) > 0.3, (loss_type, history)


def test_sft_example_loss_on_model_text_only(tiny_run):
    """An SFT trajectory example puts its loss exactly on the model's text turns (the segments marked as such),
    decoding back to them; its map is the scene's true map, in context without loss."""
    tok = data.load_tokenizer(os.path.join(tiny_run, "tokenizer.json"))
    pool = train.ScenePool(6)
    codes = {m: np.stack([np.full((8, 8), 7 + k)] * len(pool)) for k, m in enumerate(train.MODALITIES)}
    cfg = train.TrainConfig(sft_mix=0.0)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(12):
        ids, mask, kind, i = train.sft_example(cfg, pool, codes, tok, 1000, rng)
        seen.add(kind)
        text = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
        assert text.startswith("<think>") and text.endswith("</answer><|im_end|>")
        assert all(t < 1000 for t, m in zip(ids, mask) if m)  # no image code carries a loss
        n_maps = ids.count(data.VISION_START) - 1
        assert n_maps == (kind != "sft_text")
    assert seen == {"sft_depth", "sft_segmentation", "sft_text"}


STAGE2 = ["--sft-steps", "4", "--rl-steps", "3", "--rl-batch", "2", "--group-size", "4", "--n-eval2", "2",
          "--log-every", "1", "--batch-size", "4", "--micro-batch", "2", "--turn-cap", "8"]


def rows(run, phase, key):
    return {r["step"]: r[key] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if r["phase"] == phase}


def test_stage2_resume_is_exact(tiny_run, tmp_path):
    """Stage 2 stopped inside SFT and inside GRPO and resumed logs the same SFT losses and GRPO rewards and losses, step
    for step, as an uninterrupted run, and ends with the same weights; the run folder holds what a user looks at."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for name in ("ref", "resumed"):
            runs[name] = str(tmp_path / name)
            shutil.copytree(tiny_run, runs[name])
        train.main(["--stage", "2", "--out", runs["ref"]] + STAGE2)
        out = runs["resumed"]
        train.main(["--stage", "2", "--out", out, "--max-steps", "2"] + STAGE2)  # SFT 0 -> 2
        train.main(["--stage", "2", "--out", out, "--max-steps", "4", "--resume"] + STAGE2)  # SFT 2 -> 4, GRPO 0 -> 3?
        train.main(["--stage", "2", "--out", out, "--resume"] + STAGE2)
    finally:
        torch.set_num_threads(n)
    assert rows(runs["ref"], "sft", "loss") == rows(out, "sft", "loss") and len(rows(out, "sft", "loss")) == 4
    for key in ("reward", "loss"):
        assert rows(runs["ref"], "grpo", key) == rows(out, "grpo", key) and len(rows(out, "grpo", key)) == 3
    wa = torch.load(os.path.join(runs["ref"], "grpo.pt"), weights_only=False)["model"]
    wb = torch.load(os.path.join(out, "grpo.pt"), weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for f in ("sft.pt", "grpo.pt", "rewards.png", "tools.png", "eval_stage2.json", "config_stage2.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    m = json.load(open(os.path.join(out, "eval_stage2.json")))
    assert {f"{mode}/mean" for mode in cooper.MODES} <= set(m) and "tools/count/none" in m
    sft = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r.get("after") == "sft"][-1]
    assert (m["reward_gain/total"], m["reward_gain_se/total"]) == pytest.approx(cooper.paired_gain(
        sft["reward/per_prompt"], m["reward/per_prompt"]))  # GRPO's gain over SFT, paired on the same prompts


def test_rl_groups_are_never_split(monkeypatch):
    """Under DDP each rank draws its own whole prompts (all G rollouts of a prompt stay on one rank): the ranks'
    prompts are disjoint slices that together give the single-process list."""
    pool = train.ScenePool(5)
    cfg = train.TrainConfig(rl_batch=6)
    full = train.rl_items(cfg, pool, 3)
    parts = []
    for rank in range(3):
        monkeypatch.setattr(train, "DDP_RANK", rank)
        monkeypatch.setattr(train, "DDP_WORLD", 3)
        parts += train.rl_items(cfg, pool, 3)
    assert [(i, q.text) for i, q in parts] == [(i, q.text) for i, q in full] and len(full) == 6


def test_stage2_errors(tmp_path, tiny_run):
    """Stage 2 without a finished stage-1 run says what to run."""
    with pytest.raises(SystemExit, match="no finished stage-1 run"):
        train.main(["--stage", "2", "--out", str(tmp_path / "none")] + STAGE2)


def test_evaluate_rewards_matches_cpr(agent):
    """The held-out CPR evaluation: groups of G sampled rollouts on n prompts; its total is the mean of the three
    components (weights 1), its standard error is over prompts, and the tool-call rates are shares."""
    m = cooper.evaluate_rewards(agent, n=4, group_size=4, turn_cap=12)
    assert m["reward/total"] == pytest.approx(m["reward/answer"] + m["reward/format"] + m["reward/explore"], abs=1e-9)
    assert m["reward_se/total"] >= 0 and 0 <= m["reward/format"] <= 1
    rates = [k for k in m if k.startswith("tool_rate/")]
    assert rates and all(0 <= m[k] <= 1 for k in rates)
    assert sum(m[f"tool_rate_n/{k.split('/')[1]}"] for k in rates) == 16  # every rollout counted under its flag
    assert len(m["reward/per_prompt"]) == 4 and np.mean(m["reward/per_prompt"]) == pytest.approx(m["reward/total"], abs=1e-3)
    again = cooper.evaluate_rewards(agent, n=4, group_size=4, turn_cap=12)  # same prompts, same seeds: paired
    assert again["reward/per_prompt"] == m["reward/per_prompt"]
    assert cooper.paired_gain(m["reward/per_prompt"], again["reward/per_prompt"]) == (0.0, 0.0)


def test_paired_gain_by_hand():
    """Differences 1, 0, 2: mean 1, sample std 1, standard error 1/sqrt(3); a constant shift has no spread."""
    gain, se = cooper.paired_gain([1, 2, 3], [2, 2, 5])
    assert gain == pytest.approx(1.0) and se == pytest.approx(1 / np.sqrt(3))
    assert cooper.paired_gain([0.5, 1.5, 0.2], [0.7, 1.7, 0.4]) == pytest.approx((0.2, 0.0), abs=1e-12)
