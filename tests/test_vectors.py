"""The closed-form logit-space vectors against torch autograd, and their properties."""

from __future__ import annotations

import math

import pluggy
import pytest
import torch

from gadiag_core.errors import UsageError
from gadiag_core.options import build_options
import torch.nn.functional as F

from gadiag_core import hookspecs
from gadiag_core.scoring import vectors as vec
from gadiag_core.interfaces import Objective

N, V = 5, 11
TEMPERATURES = [1.0, 0.7, 1.5]
TOL = dict(rtol=1e-10, atol=1e-12)


def make(seed: int, n: int = N, v: int = V, scale: float = 2.0, dtype=torch.float64):
    """Random student logits and teacher log-probs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=dtype) * scale
    logp = F.log_softmax(torch.randn(n, v, generator=g, dtype=dtype) * scale, dim=-1)
    return z, logp


def grad_of(loss_fn, z):
    """∂(Σ over rows of loss_fn(z)) / ∂z: rows are independent, so this is per-row."""
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(z).sum(), z)
    return g


def student_logpi(z, tau):
    return F.log_softmax(z / tau, dim=-1)


# ----------------------------------------------------------------------------
# closed forms vs autograd


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_policy(tau):
    z, _ = make(0)
    torch.testing.assert_close(vec.policy(z, tau), torch.softmax(z / tau, -1), **TOL)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_reverse_kl_matches_autograd(tau):
    z, logp = make(1)

    def kl_pi_p(z):
        lpi = student_logpi(z, tau)
        return (lpi.exp() * (lpi - logp)).sum(-1)

    torch.testing.assert_close(vec.reverse_kl_vector(z, logp, tau), -grad_of(kl_pi_p, z), **TOL)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_forward_kl_matches_autograd(tau):
    z, logp = make(2)

    def kl_p_pi(z):
        return (logp.exp() * (logp - student_logpi(z, tau))).sum(-1)

    torch.testing.assert_close(vec.forward_kl_vector(z, logp, tau), -grad_of(kl_p_pi, z), **TOL)


def jsd_loss(z, logp, tau, beta):
    """JSD_β(p‖π) = β KL(p‖m) + (1−β) KL(π‖m), m = βp + (1−β)π, written plainly."""
    pi = torch.softmax(z / tau, -1)
    p = logp.exp()
    m = beta * p + (1 - beta) * pi
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (pi * (pi.log() - m.log())).sum(-1)


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9, 0.3])
def test_jsd_matches_autograd(tau, beta):
    z, logp = make(3)
    expected = -grad_of(lambda z: jsd_loss(z, logp, tau, beta), z)
    torch.testing.assert_close(vec.jsd_vector(z, logp, tau, beta), expected, **TOL)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_jsd_limits(tau):
    """JSD_β ≈ β KL(p‖π) near β=0 and ≈ (1−β) KL(π‖p) near β=1; the endpoints
    themselves return those limiting directions (GKD/TRL convention)."""
    z, logp = make(4)
    fwd = vec.forward_kl_vector(z, logp, tau)
    rev = vec.reverse_kl_vector(z, logp, tau)
    # first-order convergence: shrinking the distance to the end 1000x shrinks the error ~1000x
    def gaps(eps):
        near0 = (vec.jsd_vector(z, logp, tau, eps) / eps - fwd).abs().max() / fwd.abs().max()
        near1 = (vec.jsd_vector(z, logp, tau, 1 - eps) / eps - rev).abs().max() / rev.abs().max()
        return near0, near1

    for coarse, fine in zip(gaps(1e-6), gaps(1e-9)):
        assert fine < 1e-5
        assert fine < coarse / 300
    # and not the other way round: the β→0 limit is the FORWARD KL
    assert not torch.allclose(vec.jsd_vector(z, logp, tau, 1e-9) / 1e-9, rev, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(vec.jsd_vector(z, logp, tau, 0.0), fwd, **TOL)
    torch.testing.assert_close(vec.jsd_vector(z, logp, tau, 1.0), rev, **TOL)
    # the loss itself vanishes at both ends (the literal gradient would be 0 there)
    assert jsd_loss(z, logp, tau, 1e-12).abs().max() < 1e-9
    with pytest.raises(ValueError):
        vec.jsd_vector(z, logp, tau, 1.5)


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_reverse_kl_matches_autograd(tau, k):
    z, logp = make(5)
    top = z.topk(k, dim=-1).indices
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, top, True)

    def restricted_kl(z):
        # π^S and p^S: restrict to the student's top-k and renormalise (S held fixed)
        lpi_s = F.log_softmax(z.gather(-1, top) / tau, -1)
        lp_s = F.log_softmax(logp.gather(-1, top), -1)
        return (lpi_s.exp() * (lpi_s - lp_s)).sum(-1)

    b = vec.topk_reverse_kl_vector(z, logp, tau, k)
    torch.testing.assert_close(b, -grad_of(restricted_kl, z), **TOL)
    assert (b[~mask] == 0).all()
    torch.testing.assert_close(b.sum(-1), torch.zeros(N, dtype=z.dtype), **TOL)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_topk_full_vocab_is_reverse_kl(tau):
    z, logp = make(6)
    rev = vec.reverse_kl_vector(z, logp, tau)
    torch.testing.assert_close(vec.topk_reverse_kl_vector(z, logp, tau, V), rev, **TOL)
    torch.testing.assert_close(vec.topk_reverse_kl_vector(z, logp, tau, 10 * V), rev, **TOL)
    # k = V − 1 really computes the restricted version (and differs from the full one)
    assert not torch.allclose(vec.topk_reverse_kl_vector(z, logp, tau, V - 1), rev)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_ideal_vector_matches_autograd(tau):
    z, _ = make(7)
    q = torch.rand(N, V, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = grad_of(lambda z: (torch.softmax(z / tau, -1) * q).sum(-1), z)
    a = vec.ideal_vector(vec.policy(z, tau), q, tau)
    torch.testing.assert_close(a, expected, **TOL)
    torch.testing.assert_close(a.sum(-1), torch.zeros(N, dtype=z.dtype), **TOL)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_sampled_token_matches_autograd(tau):
    z, logp = make(8)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(8))

    def surrogate(z):
        lpi_y = student_logpi(z, tau).gather(-1, y[:, None]).squeeze(-1)
        advantage = (logp.gather(-1, y[:, None]).squeeze(-1) - lpi_y).detach()
        return advantage * lpi_y

    torch.testing.assert_close(vec.sampled_token_vector(z, logp, y, tau), grad_of(surrogate, z), **TOL)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_sampled_token_expectation_is_reverse_kl(tau):
    z, logp = make(9)
    pi = vec.policy(z, tau)
    expectation = torch.zeros_like(z)
    for y in range(V):
        ys = torch.full((N,), y, dtype=torch.long)
        expectation += pi[:, y : y + 1] * vec.sampled_token_vector(z, logp, ys, tau)
    torch.testing.assert_close(expectation, vec.reverse_kl_vector(z, logp, tau), **TOL)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_rl_outcome_matches_autograd(tau):
    z, _ = make(10)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(10))
    adv = torch.tensor([1.0, -0.25, 0.0, 0.5, -1.0], dtype=torch.float64)
    expected = grad_of(lambda z: adv * student_logpi(z, tau).gather(-1, y[:, None]).squeeze(-1), z)
    torch.testing.assert_close(vec.rl_outcome_vector(vec.policy(z, tau), y, adv, tau), expected, **TOL)


# ----------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_identical_distributions_give_zero(tau):
    z, _ = make(11)
    logp = student_logpi(z, tau)  # teacher == student policy
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(11))
    zero = torch.zeros_like(z)
    for b in [
        vec.reverse_kl_vector(z, logp, tau),
        vec.forward_kl_vector(z, logp, tau),
        vec.sampled_token_vector(z, logp, y, tau),
        vec.jsd_vector(z, logp, tau, 0.5),
        vec.jsd_vector(z, logp, tau, 0.1),
        vec.topk_reverse_kl_vector(z, logp, tau, 4),
    ]:
        torch.testing.assert_close(b, zero, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_candidates_whole_vocab_equals_ideal(tau):
    z, _ = make(12)
    pi = vec.policy(z, tau)
    q = torch.rand(N, V, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    a, value = vec.ideal_vector_on_candidates(pi, q, tau)
    torch.testing.assert_close(a, vec.ideal_vector(pi, q, tau), **TOL)
    torch.testing.assert_close(value, (pi * q).sum(-1), **TOL)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_candidates_value_neutral_rule(tau):
    z, _ = make(13)
    pi = vec.policy(z, tau)
    g = torch.Generator().manual_seed(13)
    q = torch.rand(N, V, generator=g, dtype=torch.float64)
    C = 4
    idx = torch.stack([torch.randperm(V, generator=g)[:C] for _ in range(N)])
    a, value = vec.ideal_vector_on_candidates(pi.gather(-1, idx), q.gather(-1, idx), tau)
    torch.testing.assert_close(a.sum(-1), torch.zeros(N, dtype=z.dtype), **TOL)
    # the same as the full ideal vector with Q_k := V off the candidates
    q_full = value[:, None].expand(N, V).clone().scatter_(-1, idx, q.gather(-1, idx))
    torch.testing.assert_close((pi * q_full).sum(-1), value, **TOL)  # V is self-consistent
    full = vec.ideal_vector(pi, q_full, tau)
    torch.testing.assert_close(full.gather(-1, idx), a, **TOL)
    off = torch.ones_like(full, dtype=torch.bool).scatter_(-1, idx, False)
    assert full[off].abs().max() < 1e-14


def test_candidates_zero_mass_and_padding():
    probs = torch.tensor([[0.0, 0.0], [0.3, 0.0]], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.0], [0.5, float("nan")]], dtype=torch.float64)  # padding with NaN Q
    a, value = vec.ideal_vector_on_candidates(probs, q, 1.0)
    assert torch.isfinite(a).all()
    assert (a[0] == 0).all() and math.isnan(value[0].item())
    assert value[1].item() == pytest.approx(0.5)
    assert (a[1] == 0).all()  # a single covered candidate carries no signal


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_screen_bound_holds(tau):
    g = torch.Generator().manual_seed(14)
    trials = 2000
    z = torch.randn(trials, V, generator=g, dtype=torch.float64) * torch.rand(trials, 1, generator=g, dtype=torch.float64) * 8
    pi = vec.policy(z, tau)
    bound = vec.screen_bound(pi, tau)
    for q in [
        torch.rand(trials, V, generator=g, dtype=torch.float64),
        (torch.rand(trials, V, generator=g, dtype=torch.float64) < 0.5).double(),  # extreme points of [0,1]^V
    ]:
        l1 = vec.ideal_vector(pi, q, tau).abs().sum(-1)
        assert (l1 <= bound * (1 + 1e-12)).all()


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_screen_bound_nearly_attained(tau):
    # π_max = 0.99 on a token with Q = 0, Q = 1 elsewhere: ‖a*‖₁ = 2 π_max (1 − π_max)/τ = π_max · bound
    pi = torch.full((1, V), 0.01 / (V - 1), dtype=torch.float64)
    pi[0, 0] = 0.99
    q = torch.ones_like(pi)
    q[0, 0] = 0.0
    l1 = vec.ideal_vector(pi, q, tau).abs().sum(-1)
    bound = vec.screen_bound(pi, tau)
    assert bound.item() == pytest.approx(2 * 0.01 / tau)
    assert l1.item() == pytest.approx(0.99 * bound.item())


def test_cosine_basic_and_nan():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0], [0.0, 0.0]])
    c = vec.cosine(a, b)
    assert c[0].item() == pytest.approx(1.0)
    assert c[1].item() == pytest.approx(-1.0)
    assert math.isnan(c[2].item()) and math.isnan(c[3].item())
    z, logp = make(15)
    torch.testing.assert_close(vec.cosine(z, logp), F.cosine_similarity(z, logp, dim=-1), **TOL)
    torch.testing.assert_close(vec.cosine(z.T, logp.T, dim=0), F.cosine_similarity(z, logp, dim=-1), **TOL)


def test_sparse_dense_cosine_matches_dense():
    g = torch.Generator().manual_seed(16)
    C = 5
    idx = torch.stack([torch.randperm(V, generator=g)[:C] for _ in range(N)])
    idx[0, 3:] = -1  # padding
    idx[1, 4] = -1
    a_vals = torch.randn(N, C, generator=g, dtype=torch.float64)
    a_vals[0, 3:] = 123.0  # padded values must be ignored
    b = torch.randn(N, V, generator=g, dtype=torch.float64)
    dense = torch.zeros(N, V, dtype=torch.float64)
    for n in range(N):
        for c in range(C):
            if idx[n, c] >= 0:
                dense[n, idx[n, c]] = a_vals[n, c]
    torch.testing.assert_close(vec.sparse_dense_cosine(idx, a_vals, b), vec.cosine(dense, b), **TOL)
    # zero norms: all-padding row, zero values, zero dense row
    idx2 = torch.tensor([[-1, -1], [0, 1], [0, 1]])
    vals2 = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    b2 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert torch.isnan(vec.sparse_dense_cosine(idx2, vals2, b2)).all()


def test_float32_is_accurate():
    """Vectors computed in float32 agree with float64 on the same (float32-representable)
    inputs, on a realistic vocabulary and logit scale."""
    tau = 0.7
    for seed, scale in [(17, 3.0), (3, 6.0)]:
        z32, logp32 = (t.float() for t in make(seed, n=4, v=8000, scale=scale))
        z64, logp64 = z32.double(), logp32.double()
        y = torch.randint(0, 8000, (4,), generator=torch.Generator().manual_seed(seed))
        fns = [
            lambda z, lp: vec.reverse_kl_vector(z, lp, tau),
            lambda z, lp: vec.forward_kl_vector(z, lp, tau),
            lambda z, lp: vec.jsd_vector(z, lp, tau, 0.5),
            lambda z, lp: vec.jsd_vector(z, lp, tau, 0.05),
            lambda z, lp: vec.topk_reverse_kl_vector(z, lp, tau, 20),
            lambda z, lp: vec.sampled_token_vector(z, lp, y, tau),
        ]
        for fn in fns:
            b32, b64 = fn(z32, logp32), fn(z64, logp64)
            assert b32.dtype == torch.float32
            err = (b32.double() - b64).abs().max(-1).values
            assert (err <= 1e-4 * b64.norm(dim=-1)).all()
            assert (vec.cosine(b32, b64) > 1 - 1e-8).all()


def test_masked_student_logits_give_no_nan():
    z, logp = make(18)
    z[:, :3] = -math.inf  # tokens the student can never sample
    for b in [
        vec.reverse_kl_vector(z, logp, 1.0),
        vec.forward_kl_vector(z, logp, 1.0),
        vec.jsd_vector(z, logp, 1.0, 0.5),
        vec.topk_reverse_kl_vector(z, logp, 1.0, 5),
    ]:
        assert torch.isfinite(b).all()
    assert (vec.reverse_kl_vector(z, logp, 1.0)[:, :3] == 0).all()


# ----------------------------------------------------------------------------
# the plugin module


def test_objectives_plugin_registers_and_matches():
    import gadiag_plugins.objectives as plugin_module
    from gadiag_plugins.objectives.uld import uld_vector

    pm = pluggy.PluginManager("gadiag")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin_module, name="objectives")
    pm.check_pending()
    registered = {}

    def register(name, factory, description="", options=None):
        assert name not in registered
        assert description
        owner = f"objective {name!r}"
        registered[name] = lambda _f=factory, _o=options, _owner=owner, **raw: _f(build_options(_o, raw, _owner), None)

    pm.hook.register_objectives(register=register)
    assert set(registered) == {"reverse_kl", "sampled_token", "forward_kl", "jsd", "topk_reverse_kl", "uld"}

    z, logp = make(19)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(19))
    tau = 0.7
    expected = {
        "reverse_kl": vec.reverse_kl_vector(z, logp, tau),
        "sampled_token": vec.sampled_token_vector(z, logp, y, tau),
        "forward_kl": vec.forward_kl_vector(z, logp, tau),
        "jsd": vec.jsd_vector(z, logp, tau, 0.5),
        "topk_reverse_kl": vec.topk_reverse_kl_vector(z, logp, tau, 20),
        "uld": uld_vector(z, logp, tau),
    }
    for name, factory in registered.items():
        obj = factory()
        assert isinstance(obj, Objective)
        assert obj.description
        torch.testing.assert_close(obj.vector(z, logp, y, tau), expected[name], rtol=0, atol=0)

    jsd = registered["jsd"](beta=0.2)
    torch.testing.assert_close(jsd.vector(z, logp, y, tau), vec.jsd_vector(z, logp, tau, 0.2), rtol=0, atol=0)
    topk = registered["topk_reverse_kl"](k=3)
    torch.testing.assert_close(topk.vector(z, logp, y, tau), vec.topk_reverse_kl_vector(z, logp, tau, 3), rtol=0, atol=0)
    with pytest.raises(UsageError, match="beta = -0.1 must be ≥ 0"):
        registered["jsd"](beta=-0.1)
    with pytest.raises(UsageError, match="k = 0 must be ≥ 1"):
        registered["topk_reverse_kl"](k=0)
    with pytest.raises(UsageError, match="objective 'reverse_kl' has no option 'beta'"):
        registered["reverse_kl"](beta=0.3)
