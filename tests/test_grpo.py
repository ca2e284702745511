"""Tests for train.grpo_loss: hand-computed losses, gradients and stats, masking, and the on-policy
REINFORCE identity. Run: python -m pytest tests/test_grpo.py
"""
import math

import pytest
import torch

from reward import group_advantages
from train import grpo_loss

LN = math.log
NAN, INF = float("nan"), float("inf")

# A hand example with G = 2 completions, T = 3 positions (eps = 0.2, clip range [0.8, 1.2]):
#   row 0: A = +1, mask [1, 1, 1], ratios [1.5, 0.5, 1.1]
#   row 1: A = -2, mask [1, 1, 0], ratios [0.5, 1.5, (padding)]
# per-token loss -min(rA, clip(r)A):
#   r0t0: min(1.5, 1.2) = 1.2   -> -1.2   (clipped high: r > 1.2 and A > 0, zero gradient)
#   r0t1: min(0.5, 0.8) = 0.5   -> -0.5
#   r0t2: min(1.1, 1.1) = 1.1   -> -1.1
#   r1t0: min(-1.0, -1.6) = -1.6 -> 1.6   (clipped low: r < 0.8 and A < 0, zero gradient)
#   r1t1: min(-3.0, -2.4) = -3.0 -> 3.0
# row sums: -2.8 (3 tokens), 4.6 (2 tokens)
#   grpo    = (-2.8/3 + 4.6/2) / 2 = (-0.933333 + 2.3) / 2 = 0.683333
#   dapo    = (-2.8 + 4.6) / 5 = 0.36
#   dr_grpo = 1.8 / (2 * 3) = 0.3
# gradient d loss / d logp = -rA * weight on unclipped tokens, 0 on clipped ones:
#   grpo weights 1/6 (row 0), 1/4 (row 1): [[0, -0.5/6, -1.1/6], [0, 3.0/4, 0]]
#   dapo weight 1/5:                      [[0, -0.1, -0.22],    [0, 0.6, 0]]
#   dr_grpo weight 1/6:                   [[0, -0.5/6, -1.1/6], [0, 0.5, 0]]
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], dtype=torch.float64)
DELTA = torch.tensor([[LN(1.5), LN(0.5), LN(1.1)], [LN(0.5), LN(1.5), 0.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
HAND = {"grpo": (0.683333333333, [[0, -0.5 / 6, -1.1 / 6], [0, 0.75, 0]]),
        "dapo": (0.36, [[0, -0.1, -0.22], [0, 0.6, 0]]),
        "dr_grpo": (0.3, [[0, -0.5 / 6, -1.1 / 6], [0, 0.5, 0]])}


def leaf(x):
    return x.clone().requires_grad_(True)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.exercise9
def test_off_policy_hand_values(loss_type):
    """Off-policy ratios clipped low and high: loss, gradient and stats equal the hand-computed numbers."""
    logps = leaf(OLD + DELTA)
    loss, stats = grpo_loss(logps, OLD, ADV, MASK, loss_type=loss_type)
    loss.backward()
    value, grad = HAND[loss_type]
    assert loss.item() == pytest.approx(value, abs=1e-9)
    assert torch.allclose(logps.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-12)
    # 1 of 5 tokens clipped low, 1 of 5 high; ratio mean (1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5 = 1.02.
    assert stats["clip_low_frac"] == pytest.approx(0.2) and stats["clip_high_frac"] == pytest.approx(0.2)
    assert stats["ratio_mean"] == pytest.approx(1.02) and stats["kl"] == 0.0 and stats["tokens"] == 5


@pytest.mark.parametrize("loss_type, value, grad", [
    # on-policy r = 1: l = -A per token. grpo: (-1 + 2) / 2 = 0.5, grads -A/(G n_i) = -1/6, +2/4.
    ("grpo", 0.5, [[-1 / 6] * 3, [0.5, 0.5, 0]]),
    # dapo: (3 * -1 + 2 * 2) / 5 = 0.2, grads -A/5.
    ("dapo", 0.2, [[-0.2] * 3, [0.4, 0.4, 0]]),
    # dr_grpo: 1 / 6, grads -A/6.
    ("dr_grpo", 1 / 6, [[-1 / 6] * 3, [1 / 3, 1 / 3, 0]]),
])
@pytest.mark.exercise9
def test_on_policy_hand_values(loss_type, value, grad):
    """On-policy (old = current): ratio 1, nothing clipped, loss = -weighted mean A, grad = -A x weight."""
    logps = leaf(OLD)
    loss, stats = grpo_loss(logps, logps.detach(), ADV, MASK, loss_type=loss_type)
    loss.backward()
    assert loss.item() == pytest.approx(value, abs=1e-12)
    assert torch.allclose(logps.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-12)
    assert stats["clip_low_frac"] == 0.0 and stats["clip_high_frac"] == 0.0 and stats["ratio_mean"] == 1.0


@pytest.mark.exercise9
def test_clip_higher_asymmetric_eps():
    """DAPO clip-higher: eps_high = 0.6 lets r = 1.5 through for A > 0 (hand value 0.3, no high clips)."""
    # r0t0 is now -1.5 instead of -1.2; r1t1 with A < 0 is unchanged (min(-3, 1.5 * -2) = -3).
    # dapo = (-1.5 - 0.5 - 1.1 + 1.6 + 3.0) / 5 = 1.5 / 5 = 0.3
    loss, stats = grpo_loss(OLD + DELTA, OLD, ADV, MASK, eps_high=0.6, loss_type="dapo")
    assert loss.item() == pytest.approx(0.3, abs=1e-12)
    assert stats["clip_high_frac"] == 0.0 and stats["clip_low_frac"] == pytest.approx(0.2)


@pytest.mark.exercise9
def test_clip_fractions_follow_the_advantage_sign():
    """With A = [+1, +1] only the high side can clip: r = 1.5 twice -> clip_high 2/5, clip_low 0 (r = 0.5 twice
    is below 0.8 but with A > 0 the unclipped term is the minimum). grpo = (-2.8/3 + (-0.5 - 1.2)/2) / 2."""
    loss, stats = grpo_loss(OLD + DELTA, OLD, torch.ones(2, dtype=torch.float64), MASK)
    assert stats["clip_high_frac"] == pytest.approx(0.4) and stats["clip_low_frac"] == 0.0
    assert loss.item() == pytest.approx((-2.8 / 3 - 0.85) / 2, abs=1e-9)  # -0.891667


@pytest.mark.exercise9
def test_kl_penalty_k3_hand_values():
    """beta = 0.1, ref - logp = ln 2 at r0t0 and -ln 2 at r1t1: k3 = 0.306853 and 0.193147 (sum exactly 0.5)."""
    ref = OLD + DELTA
    ref = ref + torch.tensor([[LN(2), 0, 0], [0, -LN(2), 0]], dtype=torch.float64)
    k3_a, k3_b = 2 - LN(2) - 1, 0.5 + LN(2) - 1
    logps = leaf(OLD + DELTA)
    loss, stats = grpo_loss(logps, OLD, ADV, MASK, ref_logps=ref, beta=0.1)
    loss.backward()
    # grpo adds 0.1 * (k3_a / 3 + k3_b / 2) / 2 = 0.00994289 to 0.683333.
    assert loss.item() == pytest.approx(0.683333333333 + 0.1 * (k3_a / 3 + k3_b / 2) / 2, abs=1e-9)
    assert stats["kl"] == pytest.approx(0.5 / 5)
    # d k3 / d logp = 1 - exp(ref - logp): -1 at r0t0, +0.5 at r1t1; times beta and the grpo weight.
    assert logps.grad[0, 0].item() == pytest.approx(0.1 * -1 / 6)
    assert logps.grad[1, 1].item() == pytest.approx(0.75 + 0.1 * 0.5 / 4)
    # beta = 0: the KL is still reported but does not enter the loss.
    loss0, stats0 = grpo_loss(OLD + DELTA, OLD, ADV, MASK, ref_logps=ref, beta=0.0)
    assert loss0.item() == pytest.approx(0.683333333333, abs=1e-9) and stats0["kl"] == pytest.approx(0.1)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.exercise9
def test_garbage_in_padding_does_not_matter(loss_type):
    """NaN / inf in masked positions of every input change neither loss nor stats, and get exactly zero grad."""
    clean = leaf(OLD + DELTA)
    loss_c, stats_c = grpo_loss(clean, OLD, ADV, MASK, ref_logps=OLD, beta=0.05, loss_type=loss_type)
    loss_c.backward()
    dirty_lp = (OLD + DELTA).clone()
    dirty_lp[1, 2] = NAN
    dirty_old, dirty_ref = OLD.clone(), OLD.clone()
    dirty_old[1, 2], dirty_ref[1, 2] = -INF, INF
    dirty = leaf(dirty_lp)
    loss_d, stats_d = grpo_loss(dirty, dirty_old, ADV, MASK.to(torch.float32), ref_logps=dirty_ref, beta=0.05,
                                loss_type=loss_type)
    loss_d.backward()
    assert loss_d.item() == loss_c.item() and stats_d == stats_c
    assert torch.isfinite(dirty.grad).all() and dirty.grad[1, 2].item() == 0.0
    assert torch.equal(dirty.grad, clean.grad)


@pytest.mark.exercise9
def test_empty_sequence_and_empty_batch():
    """A row with no masked tokens adds 0 but counts in the 1/G of "grpo"; an all-empty batch gives loss 0, grad 0."""
    mask = MASK.clone()
    mask[1] = False
    logps = leaf(OLD + DELTA)
    loss, stats = grpo_loss(logps, OLD, ADV, mask)
    loss.backward()
    # row 0 alone: -2.8 / 3 = -0.933333, divided by G = 2 -> -0.466667
    assert loss.item() == pytest.approx(-2.8 / 6, abs=1e-9) and stats["tokens"] == 3
    assert torch.equal(logps.grad[1], torch.zeros(3, dtype=torch.float64))
    for loss_type in ["grpo", "dapo", "dr_grpo"]:
        lp = leaf(OLD)
        loss, stats = grpo_loss(lp, OLD, ADV, torch.zeros_like(MASK), loss_type=loss_type)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp)) and stats["tokens"] == 0
        assert all(math.isfinite(v) for v in stats.values())


@pytest.mark.exercise9
def test_zero_variance_group_gives_zero_loss_and_gradient():
    """All rollouts of a group scored alike: advantages exactly 0, so loss and gradient are 0, with no NaN."""
    adv = group_advantages(torch.full((4,), 1.2, dtype=torch.float64), group_size=4)
    lp = leaf(torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    loss, _ = grpo_loss(lp, lp.detach() - 0.3, adv, torch.ones(4, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.exercise9
def test_on_policy_gradient_equals_reinforce(loss_type):
    """Toy softmax policy (float64): on-policy GRPO gradient wrt the weights == the REINFORCE gradient
    -sum_{i,t} w_{i,t} A_i grad log pi(token), with w the aggregation weight, for each loss type."""
    gen = torch.Generator().manual_seed(0)
    G, T, D, V = 4, 6, 5, 7
    feats = torch.randn(G, T, D, dtype=torch.float64, generator=gen)  # (G, T, D) context features
    W = torch.randn(D, V, dtype=torch.float64, generator=gen, requires_grad=True)  # the policy
    with torch.no_grad():  # sample the completions from the policy itself
        tokens = torch.multinomial(torch.softmax(feats @ W, -1).reshape(-1, V), 1, generator=gen).view(G, T)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]], dtype=torch.bool)
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.2, 1.2]), group_size=4).double()

    def logps():
        return torch.log_softmax(feats @ W, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (G, T)

    lp = logps()
    loss, _ = grpo_loss(lp, lp.detach(), adv, mask, loss_type=loss_type)
    (g_grpo,) = torch.autograd.grad(loss, W)

    n_i = mask.sum(1, keepdim=True).double()  # (G, 1)
    weight = {"grpo": 1 / (G * n_i), "dapo": 1 / mask.sum().double(), "dr_grpo": 1 / (G * T)}[loss_type]
    lp = logps()
    surrogate = -(weight * adv[:, None] * torch.where(mask, lp, torch.zeros_like(lp))).sum()  # REINFORCE
    (g_reinforce,) = torch.autograd.grad(surrogate, W)
    assert torch.allclose(g_grpo, g_reinforce, rtol=1e-12, atol=1e-14)
    assert g_grpo.abs().max() > 1e-3  # the check is not vacuous

    # Passing a non-detached old_logps must not zero the gradient (old_logps is detached inside).
    lp = logps()
    loss2, _ = grpo_loss(lp, lp, adv, mask, loss_type=loss_type)
    (g2,) = torch.autograd.grad(loss2, W)
    assert torch.allclose(g2, g_reinforce, rtol=1e-12, atol=1e-14)


@pytest.mark.exercise9
def test_low_precision_inputs_and_bad_type():
    """bf16 log-probs give a float32 loss equal to the float64 one within bf16 rounding; unknown type raises."""
    loss32, _ = grpo_loss((OLD + DELTA).bfloat16(), OLD.bfloat16(), ADV.bfloat16(), MASK)
    assert loss32.dtype == torch.float32 and loss32.item() == pytest.approx(0.683333, abs=0.05)
    with pytest.raises(ValueError):
        grpo_loss(OLD, OLD, ADV, MASK, loss_type="ppo")
