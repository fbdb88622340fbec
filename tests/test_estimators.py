"""Meta-gradient estimators of `metarl_jax.losses` against exact values (ProMP, §2).

Rothfuss et al. (2019) split the Hessian of the expected return J(θ) = E[Σ_t γ^t r_t]

    ∇²J = H1 + H2 + H12 + H12ᵀ,
    H1  = E[Σ_t ∇log π(a_t|s_t) ∇log π(a_t|s_t)ᵀ G_t],
    H2  = E[Σ_t ∇²log π(a_t|s_t) G_t],
    G_t = Σ_{t' ≥ t} γ^{t'} r_{t'}   (reward-to-go, discount counted from t = 0),

and state which part each inner loss keeps when differentiated through an inner step:
MAML's log-likelihood loss keeps H2 only, the LVC (likelihood-ratio) loss keeps H1 + H2,
DiCE keeps everything (unbiased). These tests check exactly that, on a 3-state,
2-action, horizon-3 tabular MDP with a tabular softmax policy, where every expectation
is computed *exactly* by enumerating all 3³·2³ = 216 trajectories (float64 throughout).

The losses average over the N·H steps of a batch, so an estimator of ∇J from a batch D
is ĝ_E(θ; D) = H · ∇_θ(−loss_E(θ; D)); each loss is fed what the spec gives it:
advantages G_t for `log_likelihood_loss` and `likelihood_ratio_loss` (with `log_probs`
the sampling policy's, so the ratio is 1 at θ), advantages γ^t r_t (adjusted rewards
with zero baseline) for `dice_loss`.

1. Gradient/Hessian level, at θ = the sampling policy: the mean over batches of ĝ_E is
   the exact ∇J for all three losses; the mean of ∇ĝ_E is H2 (log-likelihood),
   H1 + H2 (LVC), exact ∇²J (DiCE).
2. Meta-gradient level, one inner step of size α = 0.5 taken with
   `metarl_jax.losses.inner_update(loss, ..., inner_lr = α·H)` (a descent step on the
   loss, i.e. θ + α ĝ_E). Its *value* is replaced by the exact θ + α∇J(θ) while its
   *derivative* is kept (φ = φ_lib − sg(φ_lib) + sg(θ + α∇J(θ))); the outer objective
   is the exact J(φ). Then ∇_θ J(φ(θ)) = (I + α ∇ĝ_E)ᵀ ∇J(φ*) is linear in the
   estimator, and its mean over batches must be (I + α Ĥ)ᵀ ∇J(φ*) with Ĥ = ∇²J for DiCE
   (= the exact gradient of the MAML objective F(θ) = J(θ + α∇J(θ)), by autodiff of the
   enumeration), Ĥ = H2 for the log-likelihood loss, Ĥ = H1 + H2 for LVC and Ĥ = 0
   (just ∇J(φ*)) for `first_order=True`. The mean of the library step's value
   φ_lib must be θ + α∇J(θ) (checks sign and scale of `inner_update`).

Tolerance rule: B = 16000 independent batches of N = 20 episodes; for every element,
|mean over batches − exact| ≤ 4.5 · SE + 1e-9, SE = sample std over batches / √B. With a
fixed PRNG seed the run is deterministic; the 4.5-SE band keeps the per-element false
failure probability below 1e-5 for the seed-free reading of the test as well. Each test
also asserts that the quantity the estimator should *not* match (e.g. ∇²J for the
log-likelihood estimator) lies far outside that band (some element off by more than 10
times its band), so the tests can fail, and the MDP is checked to make H1 and
H12 + H12ᵀ = ∇²J − (H1 + H2) clearly non-zero.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl_jax.losses import (dice_loss, inner_update, likelihood_ratio_loss,
                               log_likelihood_loss, lvc_inner_loss)
from metarl_jax.rollout import Trajectories

S, A, H = 3, 2, 3
D = S * A  # number of policy parameters
GAMMA = 0.9
ALPHA = 0.5
NUM_BATCHES, EPISODES = 16000, 20
CHUNK = 2000  # batches per call of the compiled, vmapped estimator
N_SIGMA, ATOL = 4.5, 1e-9
SEED = 0

# P[s, a, s'], all entries positive, rows sum to 1 (picked so that H1, H2 and the cross
# terms H12 + H12ᵀ are all of comparable size).
TRANSITIONS = np.array([
    [[0.25, 0.10, 0.65], [0.80, 0.16, 0.04]],
    [[0.60, 0.19, 0.21], [0.19, 0.46, 0.35]],
    [[0.49, 0.44, 0.07], [0.27, 0.04, 0.69]],
])
REWARDS = np.array([[-0.5, 0.9], [-0.6, 0.0], [-0.7, 0.6]])  # R[s, a]
INITIAL = np.array([0.5, 0.3, 0.2])
THETA0 = np.array([[0.5, 0.2], [-0.4, -0.2], [0.8, -0.1]])  # sampling policy's logits


@dataclasses.dataclass(frozen=True)
class TabularSoftmaxPolicy:
    """π(a|s) = softmax(θ[s])_a; obs one-hot [..., S], actions [..., 1] (float index)."""

    num_states: int
    num_actions: int

    def log_prob(self, params, obs, actions):
        logits = obs @ params["logits"]  # [..., A]
        log_pi = jax.nn.log_softmax(logits, axis=-1)
        index = actions[..., 0].astype(jnp.int32)
        return jnp.take_along_axis(log_pi, index[..., None], axis=-1)[..., 0]


POLICY = TabularSoftmaxPolicy(S, A)


def unflatten(theta_flat):
    return {"logits": theta_flat.reshape(S, A)}


def flatten(params):
    return params["logits"].reshape(-1)


# ---------------------------------------------------------------------------------------
# Exact quantities by enumeration.


def _all_trajectories():
    states = np.array(list(itertools.product(range(S), repeat=H)))
    actions = np.array(list(itertools.product(range(A), repeat=H)))
    s = np.repeat(states, len(actions), axis=0)
    a = np.tile(actions, (len(states), 1))
    return s, a  # [T, H] each


def _exact_quantities():
    s, a = _all_trajectories()
    trans, rew = jnp.asarray(TRANSITIONS), jnp.asarray(REWARDS)
    fixed_log_prob = (jnp.log(jnp.asarray(INITIAL))[s[:, 0]]
                      + jnp.sum(jnp.log(trans[s[:, :-1], a[:, :-1], s[:, 1:]]), axis=1))
    discounts = GAMMA ** jnp.arange(H)
    discounted = discounts * rew[s, a]  # γ^t r_t, [T, H]
    to_go = jnp.cumsum(discounted[:, ::-1], axis=1)[:, ::-1]  # G_t

    def step_log_pi(theta_flat, si, ai):
        return jax.nn.log_softmax(theta_flat.reshape(S, A)[si])[ai]

    def traj_probs(theta_flat):
        log_pi = jax.vmap(jax.vmap(step_log_pi, (None, 0, 0)), (None, 0, 0))(theta_flat, s, a)
        return jnp.exp(fixed_log_prob + jnp.sum(log_pi, axis=1))

    def expected_return(theta_flat):
        return jnp.sum(traj_probs(theta_flat) * jnp.sum(discounted, axis=1))

    theta = jnp.asarray(THETA0).reshape(-1)
    probs = traj_probs(theta)
    per_step = jax.vmap(jax.vmap(lambda si, ai: (jax.grad(step_log_pi)(theta, si, ai),
                                                 jax.hessian(step_log_pi)(theta, si, ai))))
    scores, log_pi_hessians = per_step(s, a)  # [T, H, D], [T, H, D, D]
    h1 = jnp.einsum("n,nt,nti,ntj->ij", probs, to_go, scores, scores)
    h2 = jnp.einsum("n,nt,ntij->ij", probs, to_go, log_pi_hessians)
    grad_j = jax.grad(expected_return)
    hess_j = jax.hessian(expected_return)(theta)
    phi_star = theta + ALPHA * grad_j(theta)

    def maml_objective(th):
        return expected_return(th + ALPHA * grad_j(th))

    return dict(
        probs_sum=jnp.sum(probs),
        grad=grad_j(theta), hess=hess_j, h1=h1, h2=h2,
        pg_grad=jnp.einsum("n,nt,nti->i", probs, to_go, scores),
        phi_star=phi_star, grad_at_phi_star=grad_j(phi_star),
        maml_grad=jax.grad(maml_objective)(theta),
    ), expected_return, grad_j


# ---------------------------------------------------------------------------------------
# Sampling and per-batch estimators.


def _sample(key, theta, num):
    """`num` episodes of the MDP under logits `theta`: states, actions [num, H] (int)."""
    init_key, key = jax.random.split(key)
    s0 = jax.random.categorical(init_key, jnp.log(jnp.asarray(INITIAL)), shape=(num,))
    log_trans = jnp.log(jnp.asarray(TRANSITIONS))

    def step(state, step_key):
        action_key, next_key = jax.random.split(step_key)
        action = jax.random.categorical(action_key, theta[state])
        next_state = jax.random.categorical(next_key, log_trans[state, action])
        return next_state, (state, action)

    _, (states, actions) = jax.lax.scan(step, s0, jax.random.split(key, H))
    return states.T, actions.T


def _batch(states, actions, theta):
    """`Trajectories` [N, H] for one task, advantages G_t; and the DiCE copy (γ^t r_t)."""
    obs = jax.nn.one_hot(states, S)
    act = actions[..., None].astype(obs.dtype)
    rewards = jnp.asarray(REWARDS)[states, actions]
    discounted = GAMMA ** jnp.arange(H) * rewards
    to_go = jnp.cumsum(discounted[..., ::-1], axis=-1)[..., ::-1]
    zeros = jnp.zeros_like(act)
    batch = Trajectories(observations=obs, actions=act, rewards=rewards,
                         masks=jnp.ones_like(rewards), dones=jnp.zeros_like(rewards),
                         timesteps=jnp.broadcast_to(jnp.arange(H, dtype=rewards.dtype),
                                                    rewards.shape),
                         log_probs=POLICY.log_prob(unflatten(theta), obs, act),
                         means=zeros, log_stds=zeros, returns=to_go, advantages=to_go)
    return batch, batch.replace(advantages=discounted)


def _estimates(states, actions, expected_return, grad_j):
    """Per-batch estimates (vmapped over the leading batch axis by the caller)."""
    theta = jnp.asarray(THETA0).reshape(-1)
    pg_batch, dice_batch = _batch(states, actions, theta)
    out = {}
    cases = {"ll": (log_likelihood_loss, pg_batch, False),
             "lvc": (likelihood_ratio_loss, pg_batch, False),
             "dice": (dice_loss, dice_batch, False),
             "fo": (lvc_inner_loss, pg_batch, True)}
    for name, (loss, batch, first_order) in cases.items():
        def estimate(theta_flat, loss=loss, batch=batch):
            return H * jax.grad(lambda v: -loss(POLICY, unflatten(v), batch))(theta_flat)

        def adapted(theta_flat, loss=loss, batch=batch, first_order=first_order):
            return flatten(inner_update(loss, POLICY, unflatten(theta_flat), batch,
                                        ALPHA * H, first_order=first_order))

        def meta_objective(theta_flat, adapted=adapted):
            phi_lib = adapted(theta_flat)
            exact = jax.lax.stop_gradient(theta_flat + ALPHA * grad_j(theta_flat))
            return expected_return(phi_lib - jax.lax.stop_gradient(phi_lib) + exact)

        if name != "fo":
            out[name + "_grad"] = estimate(theta)
            out[name + "_hess"] = jax.jacfwd(estimate)(theta)
        out[name + "_phi"] = adapted(theta)
        out[name + "_meta"] = jax.grad(meta_objective)(theta)
    return out


@pytest.fixture(scope="module")
def results():
    with jax.enable_x64(True):
        exact, expected_return, grad_j = _exact_quantities()
        states, actions = _sample(jax.random.key(SEED), jnp.asarray(THETA0),
                                  NUM_BATCHES * EPISODES)
        states = states.reshape(NUM_BATCHES, EPISODES, H)
        actions = actions.reshape(NUM_BATCHES, EPISODES, H)
        estimator = jax.jit(jax.vmap(
            lambda s, a: _estimates(s, a, expected_return, grad_j)))
        chunks = [estimator(states[i:i + CHUNK], actions[i:i + CHUNK])
                  for i in range(0, NUM_BATCHES, CHUNK)]
        per_batch = {k: np.concatenate([np.asarray(c[k]) for c in chunks])
                     for k in chunks[0]}
        exact = {k: np.asarray(v) for k, v in exact.items()}
    assert per_batch["dice_hess"].dtype == np.float64
    means = {k: v.mean(axis=0) for k, v in per_batch.items()}
    ses = {k: v.std(axis=0, ddof=1) / np.sqrt(NUM_BATCHES) for k, v in per_batch.items()}
    return exact, means, ses


def _band(se):
    return N_SIGMA * se + ATOL


def assert_matches(mean, se, expected, what):
    err = np.abs(mean - expected)
    bad = err > _band(se)
    assert not bad.any(), (
        f"{what}: mean over batches differs from its expected value beyond "
        f"{N_SIGMA} SE + {ATOL}:\nmean=\n{mean}\nexpected=\n{expected}\nSE=\n{se}")


def assert_excludes(mean, se, wrong, what, factor=10.0):
    """Some element of `wrong` is off `mean` by more than `factor` tolerance bands."""
    ratio = np.max(np.abs(mean - wrong) / _band(se))
    assert ratio > factor, f"{what}: cannot tell apart (max |diff|/band = {ratio:.2f})"


# ---------------------------------------------------------------------------------------
# Tests.


def test_mdp_discriminates(results):
    """Sanity of the exact side: probabilities sum to 1, H1 and H12 + H12ᵀ are large."""
    exact, _, ses = results
    np.testing.assert_allclose(exact["probs_sum"], 1.0, rtol=1e-12)
    # The policy-gradient theorem holds on the enumeration: E[Σ_t ∇log π G_t] = ∇J.
    np.testing.assert_allclose(exact["pg_grad"], exact["grad"], rtol=1e-10, atol=1e-12)
    cross = exact["hess"] - exact["h1"] - exact["h2"]  # H12 + H12ᵀ
    np.testing.assert_allclose(cross, cross.T, atol=1e-12)
    np.testing.assert_allclose(exact["h1"], exact["h1"].T, atol=1e-12)
    np.testing.assert_allclose(exact["h2"], exact["h2"].T, atol=1e-12)
    largest_se = max(ses["dice_hess"].max(), ses["lvc_hess"].max(), ses["ll_hess"].max())
    for name, term in (("H1", exact["h1"]), ("H2", exact["h2"]), ("H12 + H12^T", cross)):
        assert np.abs(term).max() > 10 * N_SIGMA * largest_se, (name, term, largest_se)
    # The MAML objective's gradient differs from the first-order one.
    assert np.abs(exact["maml_grad"] - exact["grad_at_phi_star"]).max() > 0.05


@pytest.mark.parametrize("name", ["ll", "lvc", "dice"])
def test_first_derivative_is_unbiased(results, name):
    exact, means, ses = results
    assert_matches(means[name + "_grad"], ses[name + "_grad"], exact["grad"],
                   f"{name}: H·∇(−loss)")
    assert_excludes(means[name + "_grad"], ses[name + "_grad"], 0.0 * exact["grad"],
                    f"{name}: gradient vs 0")


def test_log_likelihood_hessian_is_h2(results):
    exact, means, ses = results
    mean, se = means["ll_hess"], ses["ll_hess"]
    assert_matches(mean, se, exact["h2"], "log-likelihood Hessian vs H2")
    assert_excludes(mean, se, exact["h1"] + exact["h2"], "log-likelihood vs H1 + H2")
    assert_excludes(mean, se, exact["hess"], "log-likelihood vs exact Hessian")


def test_lvc_hessian_is_h1_plus_h2(results):
    exact, means, ses = results
    mean, se = means["lvc_hess"], ses["lvc_hess"]
    assert_matches(mean, se, exact["h1"] + exact["h2"], "LVC Hessian vs H1 + H2")
    assert_excludes(mean, se, exact["h2"], "LVC vs H2")
    assert_excludes(mean, se, exact["hess"], "LVC vs exact Hessian")


def test_dice_hessian_is_unbiased(results):
    exact, means, ses = results
    mean, se = means["dice_hess"], ses["dice_hess"]
    assert_matches(mean, se, exact["hess"], "DiCE Hessian vs exact Hessian")
    assert_excludes(mean, se, exact["h1"] + exact["h2"], "DiCE vs H1 + H2")


@pytest.mark.parametrize("name", ["ll", "lvc", "dice", "fo"])
def test_inner_update_value(results, name):
    """`inner_update(loss, ..., inner_lr=α·H)` is θ + α ĝ: its mean is θ + α ∇J(θ)."""
    exact, means, ses = results
    assert_matches(means[name + "_phi"], ses[name + "_phi"], exact["phi_star"],
                   f"{name}: adapted parameters")
    assert_excludes(means[name + "_phi"], ses[name + "_phi"], THETA0.reshape(-1),
                    f"{name}: adapted parameters vs θ")


def _expected_meta_gradient(exact, hessian):
    return (np.eye(D) + ALPHA * hessian).T @ exact["grad_at_phi_star"]


def test_dice_meta_gradient_is_unbiased(results):
    exact, means, ses = results
    mean, se = means["dice_meta"], ses["dice_meta"]
    np.testing.assert_allclose(_expected_meta_gradient(exact, exact["hess"]),
                               exact["maml_grad"], rtol=1e-10, atol=1e-12)
    assert_matches(mean, se, exact["maml_grad"], "DiCE meta-gradient vs ∇F")
    assert_excludes(mean, se, _expected_meta_gradient(exact, exact["h1"] + exact["h2"]),
                    "DiCE vs LVC's expectation")
    assert_excludes(mean, se, exact["grad_at_phi_star"], "DiCE vs first order")


def test_log_likelihood_meta_gradient_keeps_h2(results):
    exact, means, ses = results
    mean, se = means["ll_meta"], ses["ll_meta"]
    assert_matches(mean, se, _expected_meta_gradient(exact, exact["h2"]),
                   "MAML (log-likelihood) meta-gradient vs (I + α H2)ᵀ ∇J(φ*)")
    assert_excludes(mean, se, exact["maml_grad"], "MAML (log-likelihood) vs ∇F")


def test_lvc_meta_gradient_keeps_h1_h2(results):
    exact, means, ses = results
    mean, se = means["lvc_meta"], ses["lvc_meta"]
    assert_matches(mean, se, _expected_meta_gradient(exact, exact["h1"] + exact["h2"]),
                   "LVC meta-gradient vs (I + α (H1 + H2))ᵀ ∇J(φ*)")
    assert_excludes(mean, se, exact["maml_grad"], "LVC vs ∇F")
    assert_excludes(mean, se, _expected_meta_gradient(exact, exact["h2"]), "LVC vs LL")


def test_first_order_meta_gradient(results):
    exact, means, ses = results
    mean, se = means["fo_meta"], ses["fo_meta"]
    assert_matches(mean, se, exact["grad_at_phi_star"], "first-order meta-gradient")
    # Deterministic: the first-order derivative does not depend on the batch.
    np.testing.assert_allclose(se, 0.0, atol=1e-12)
    assert np.abs(mean - exact["maml_grad"]).max() > 0.01
