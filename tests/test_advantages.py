"""Returns, baseline, GAE, normalisation and Gaussian helpers,
against plain Python / numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl_jax.advantages import (baseline_features, discounted_returns,
                                   fit_linear_baseline, generalized_advantages, normalize,
                                   process_phase)
from metarl_jax.policies import gaussian_kl, gaussian_log_prob
from metarl_jax.rollout import Trajectories

GAMMA = 0.99


def _episode_lengths(masks):
    return np.asarray(masks).sum(axis=-1).astype(int)


def _masks(lengths, horizon):
    return (np.arange(horizon)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _ref_returns(rewards, masks, gamma):
    """G_t = Σ_{t ≤ t' < T} γ^{t'-t} r_{t'} with T the episode's real length; 0 after."""
    out = np.zeros(rewards.shape, np.float64)
    for n, length in enumerate(_episode_lengths(masks)):
        for t in range(length):
            out[n, t] = sum(gamma ** (k - t) * float(rewards[n, k]) for k in range(t, length))
    return out


def _ref_gae(rewards, values, masks, gamma, lam):
    out = np.zeros(rewards.shape, np.float64)
    for n, length in enumerate(_episode_lengths(masks)):
        deltas = []
        for t in range(length):
            next_value = float(values[n, t + 1]) if t + 1 < length else 0.0
            deltas.append(float(rewards[n, t]) + gamma * next_value - float(values[n, t]))
        for t in range(length):
            out[n, t] = sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, length))
    return out


def _ref_features(obs):
    obs = np.asarray(obs, np.float64)
    horizon = obs.shape[-2]
    s = np.clip(obs, -10, 10)
    t = np.broadcast_to((np.arange(horizon) / 100.0)[:, None], obs.shape[:-1] + (1,))
    return np.concatenate([s, s ** 2, t, t ** 2, t ** 3, np.ones_like(t)], axis=-1)


def _ref_ridge(features, targets, masks, reg=1e-5):
    x = np.asarray(features, np.float64).reshape(-1, features.shape[-1])
    y = np.asarray(targets, np.float64).reshape(-1)
    keep = np.asarray(masks).reshape(-1) > 0
    x, y = x[keep], y[keep]
    a = x.T @ x + reg * np.eye(x.shape[1])
    return np.linalg.lstsq(a, x.T @ y, rcond=None)[0]


@pytest.fixture(scope="module")
def batch():
    """4 episodes of horizon 10, three of which end early; garbage after the end."""
    rng = np.random.default_rng(0)
    horizon = 10
    masks = _masks([10, 6, 3, 1], horizon)
    rewards = rng.normal(size=(4, horizon)).astype(np.float32)
    values = rng.normal(size=(4, horizon)).astype(np.float32)
    # masked steps carry junk that must not leak into returns or advantages
    rewards = np.where(masks > 0, rewards, 123.0).astype(np.float32)
    values = np.where(masks > 0, values, -77.0).astype(np.float32)
    return rewards, values, masks


def test_discounted_returns_match_loop(batch):
    rewards, _, masks = batch
    got = np.asarray(discounted_returns(jnp.asarray(rewards), jnp.asarray(masks), GAMMA))
    expected = _ref_returns(rewards, masks, GAMMA)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.all(got[masks == 0] == 0.0)
    # hand value: one-step episode -> G_0 = r_0
    np.testing.assert_allclose(got[3, 0], rewards[3, 0], rtol=1e-6)
    # two-step check on the second episode's last two real steps
    np.testing.assert_allclose(got[1, 4], rewards[1, 4] + GAMMA * rewards[1, 5], rtol=1e-5)


def test_discounted_returns_hand_values():
    rewards = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    masks = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    got = np.asarray(discounted_returns(rewards, masks, 0.5))
    np.testing.assert_allclose(got, [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]])


@pytest.mark.parametrize("lam", [1.0, 0.95])
def test_gae_matches_loop(batch, lam):
    rewards, values, masks = batch
    got = np.asarray(generalized_advantages(jnp.asarray(rewards), jnp.asarray(values),
                                            jnp.asarray(masks), GAMMA, lam))
    expected = _ref_gae(rewards, values, masks, GAMMA, lam)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.all(got[masks == 0] == 0.0)


def test_gae_lambda_one_is_returns_minus_values(batch):
    rewards, values, masks = batch
    gae = np.asarray(generalized_advantages(jnp.asarray(rewards), jnp.asarray(values),
                                            jnp.asarray(masks), GAMMA, 1.0))
    returns = np.asarray(discounted_returns(jnp.asarray(rewards), jnp.asarray(masks), GAMMA))
    real = masks > 0
    np.testing.assert_allclose(gae[real], returns[real] - values[real], rtol=1e-5, atol=1e-5)


def test_gae_hand_values():
    # one episode of 2 real steps: δ_1 = r_1 - V_1 (the value after the end is 0),
    # δ_0 = r_0 + γ V_1 - V_0, A_0 = δ_0 + γλ δ_1
    r = jnp.array([[1.0, 2.0, 9.0]])
    v = jnp.array([[0.5, 1.5, 9.0]])
    m = jnp.array([[1.0, 1.0, 0.0]])
    got = np.asarray(generalized_advantages(r, v, m, 0.9, 0.5))
    d1 = 2.0 - 1.5
    d0 = 1.0 + 0.9 * 1.5 - 0.5
    np.testing.assert_allclose(got, [[d0 + 0.45 * d1, d1, 0.0]], rtol=1e-6)


def test_baseline_features_formula():
    rng = np.random.default_rng(1)
    obs = (rng.normal(size=(2, 5, 3)) * 8.0).astype(np.float32)
    obs[0, 1, 0] = 25.0   # clipped to 10
    obs[1, 3, 2] = -13.0  # clipped to -10
    got = np.asarray(baseline_features(jnp.asarray(obs)))
    assert got.shape == (2, 5, 10)
    np.testing.assert_allclose(got, _ref_features(obs), rtol=1e-6, atol=1e-7)
    # explicit entries
    np.testing.assert_allclose(got[0, 1, [0, 3]], [10.0, 100.0])
    np.testing.assert_allclose(got[1, 3, [2, 5]], [-10.0, 100.0])
    np.testing.assert_allclose(got[1, 4, 6:], [0.04, 0.0016, 0.000064, 1.0], rtol=1e-5)
    np.testing.assert_allclose(got[0, 0, 6:], [0.0, 0.0, 0.0, 1.0])


def test_fit_linear_baseline_matches_ridge_normal_equations():
    rng = np.random.default_rng(2)
    n, f = 300, 7
    x = rng.normal(size=(n, f)).astype(np.float32)
    y = (x @ rng.normal(size=f) + 0.3 * rng.normal(size=n)).astype(np.float32)
    masks = (rng.uniform(size=n) < 0.7).astype(np.float32)
    y_junk = np.where(masks > 0, y, 1e3).astype(np.float32)  # masked targets ignored
    got = np.asarray(fit_linear_baseline(jnp.asarray(x), jnp.asarray(y_junk),
                                         jnp.asarray(masks)))
    expected = _ref_ridge(x, y, masks)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(x @ got, x @ expected, rtol=1e-3, atol=1e-3)
    # ...and it is not the fit including the masked rows
    assert np.max(np.abs(got - _ref_ridge(x, y_junk, np.ones(n)))) > 1.0


def test_fit_linear_baseline_on_baseline_features():
    """The real use: [N, H, F] features of an episode batch, float32."""
    rng = np.random.default_rng(3)
    obs = rng.normal(size=(6, 40, 3)).astype(np.float32)
    masks = _masks([40, 40, 25, 33, 12, 40], 40)
    feats = baseline_features(jnp.asarray(obs))
    targets = (np.sin(obs[..., 0]) + np.arange(40) / 20.0
               + 0.1 * rng.normal(size=(6, 40))).astype(np.float32)
    coeffs = np.asarray(fit_linear_baseline(feats, jnp.asarray(targets), jnp.asarray(masks)))
    ref_feats = _ref_features(obs)
    expected = _ref_ridge(ref_feats, targets, masks)
    pred, pred_ref = ref_feats @ coeffs, ref_feats @ expected
    real = masks > 0
    np.testing.assert_allclose(pred[real], pred_ref[real], rtol=1e-3, atol=1e-3)


def test_fit_linear_baseline_escalates_regulariser():
    """Two identical columns with a large Gram block: in float32, 1024 + 1e-5 == 1024, so
    XᵀX + 1e-5 I is exactly singular and the first solve is non-finite; ×10 fixes it."""
    rng = np.random.default_rng(4)
    n = 16
    x = np.empty((n, 3), np.float32)
    x[:, 0] = x[:, 1] = 8.0  # Gram block 16 * 64 = 1024
    x[:, 2] = rng.normal(size=n)
    y = rng.normal(size=n).astype(np.float32)
    ones = jnp.ones(n)
    xj = jnp.asarray(x)
    gram = xj.T @ xj
    np.testing.assert_array_equal(np.asarray(gram)[:2, :2], 1024.0)
    first = np.asarray(jnp.linalg.solve(gram + 1e-5 * jnp.eye(3), xj.T @ jnp.asarray(y)))
    assert not np.all(np.isfinite(first))  # premise of the test

    no_retry = np.asarray(fit_linear_baseline(xj, jnp.asarray(y), ones, max_escalations=0))
    assert not np.all(np.isfinite(no_retry))

    coeffs = np.asarray(fit_linear_baseline(xj, jnp.asarray(y), ones))
    assert np.all(np.isfinite(coeffs))
    # the fit itself is the least-squares one (the duplicated columns share the weight)
    expected = _ref_ridge(x, y, np.ones(n), reg=1e-4)
    np.testing.assert_allclose(coeffs[0] + coeffs[1], expected[0] + expected[1], rtol=1e-2)
    np.testing.assert_allclose(coeffs[2], expected[2], rtol=1e-3)
    np.testing.assert_allclose(x @ coeffs, x @ expected, rtol=1e-3, atol=1e-4)


def test_fit_linear_baseline_well_conditioned_is_plain_ridge():
    # no escalation on a well-posed problem: exactly the 1e-5 ridge, not a 1e-4 one
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32) * 1e-3
    y = np.array([1.0, 2.0, 0.5], np.float32) * 1e-3
    got = np.asarray(fit_linear_baseline(jnp.asarray(x), jnp.asarray(y), jnp.ones(3)))
    expected = _ref_ridge(x, y, np.ones(3), reg=1e-5)
    other = _ref_ridge(x, y, np.ones(3), reg=1e-4)
    assert np.max(np.abs(expected - other)) > 0.1  # the two regularisers are tellable
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_normalize():
    rng = np.random.default_rng(5)
    adv = (rng.normal(size=(5, 8)) * 3 + 2).astype(np.float32)
    masks = _masks([8, 5, 8, 2, 7], 8)
    adv = np.where(masks > 0, adv, 500.0).astype(np.float32)
    got = np.asarray(normalize(jnp.asarray(adv), jnp.asarray(masks)))
    real = masks > 0
    np.testing.assert_allclose(got[real].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(got[real].std(), 1.0, rtol=1e-5)
    assert np.all(got[~real] == 0.0)
    a = adv[real].astype(np.float64)
    np.testing.assert_allclose(got[real], (a - a.mean()) / (a.std() + 1e-8), rtol=1e-4,
                               atol=1e-5)


def _phase_batch(rng, m, n, h, obs_size):
    lengths = rng.integers(3, h + 1, size=(m, n))
    lengths[:, 0] = h
    masks = np.stack([_masks(lengths[i], h) for i in range(m)])
    obs = rng.normal(size=(m, n, h, obs_size)).astype(np.float32)
    scale = np.array([1.0, 100.0, 0.01])[:m, None, None]
    offset = np.array([0.0, 50.0, -0.03])[:m, None, None]
    rewards = ((rng.normal(size=(m, n, h)) + obs[..., 0]) * scale + offset)
    rewards = (rewards * masks).astype(np.float32)
    obs = np.where(masks[..., None] > 0, obs, obs[:, :, :1]).astype(np.float32)
    zeros = np.zeros((m, n, h), np.float32)
    act = np.zeros((m, n, h, 2), np.float32)
    traj = Trajectories(observations=jnp.asarray(obs), actions=jnp.asarray(act),
                        rewards=jnp.asarray(rewards), masks=jnp.asarray(masks),
                        dones=jnp.asarray(zeros),
                        timesteps=jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32), (m, n, h)),
                        log_probs=jnp.asarray(zeros), means=jnp.asarray(act),
                        log_stds=jnp.asarray(act), returns=jnp.asarray(zeros),
                        advantages=jnp.asarray(zeros))
    return traj, obs, rewards, masks


def test_process_phase_normalises_per_task():
    rng = np.random.default_rng(6)
    traj, obs, rewards, masks = _phase_batch(rng, m=3, n=4, h=12, obs_size=2)
    out = process_phase(traj, GAMMA, 1.0)
    adv = np.asarray(out.advantages)
    returns = np.asarray(out.returns)
    for i in range(3):
        real = masks[i] > 0
        np.testing.assert_allclose(adv[i][real].mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(adv[i][real].std(), 1.0, rtol=1e-4)
        assert np.all(adv[i][~real] == 0.0)
        # independent numpy reference: returns, ridge baseline, G - V, per-task normalise
        ref_g = _ref_returns(rewards[i], masks[i], GAMMA)
        np.testing.assert_allclose(returns[i], ref_g, rtol=1e-4, atol=1e-4 * np.abs(ref_g).max())
        feats = _ref_features(obs[i])
        values = feats @ _ref_ridge(feats, ref_g, masks[i])
        raw = np.where(real, ref_g - values, 0.0)
        ref_adv = (raw[real] - raw[real].mean()) / raw[real].std()
        np.testing.assert_allclose(adv[i][real], ref_adv, atol=2e-3)
    # the tasks' reward scales differ by orders of magnitude, so one pooled mean/std
    # could not give every task zero mean and unit std (checked above per task)
    spreads = [returns[i][masks[i] > 0].std() for i in range(3)]
    assert spreads[1] > 10 * spreads[0] > 10 * spreads[2]


def test_process_phase_gae_lambda_and_no_normalisation():
    rng = np.random.default_rng(7)
    traj, obs, rewards, masks = _phase_batch(rng, m=2, n=3, h=10, obs_size=2)
    out = process_phase(traj, GAMMA, 0.95, False)
    adv = np.asarray(out.advantages)
    for i in range(2):
        ref_g = _ref_returns(rewards[i], masks[i], GAMMA)
        feats = _ref_features(obs[i])
        values = (feats @ _ref_ridge(feats, ref_g, masks[i])) * masks[i]
        ref_adv = _ref_gae(rewards[i], values, masks[i], GAMMA, 0.95)
        scale = np.abs(ref_adv).max()
        np.testing.assert_allclose(adv[i], ref_adv, atol=2e-3 * scale)


# ---------------------------------------------------------------------------------------
# Gaussian helpers
# ---------------------------------------------------------------------------------------


def _np_log_prob(mean, log_std, x):
    mean, log_std, x = (np.asarray(a, np.float64) for a in (mean, log_std, x))
    var = np.exp(2 * log_std)
    return np.sum(-0.5 * (x - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var), axis=-1)


def test_gaussian_log_prob_sums_over_dims():
    rng = np.random.default_rng(8)
    mean = rng.normal(size=(5, 3)).astype(np.float32)
    log_std = rng.normal(size=(5, 3)).astype(np.float32) * 0.5
    x = rng.normal(size=(5, 3)).astype(np.float32) * 2
    got = np.asarray(gaussian_log_prob(jnp.asarray(mean), jnp.asarray(log_std),
                                       jnp.asarray(x)))
    assert got.shape == (5,)
    np.testing.assert_allclose(got, _np_log_prob(mean, log_std, x), rtol=1e-5, atol=1e-5)
    # hand value: standard normal in 2 dims at the origin -> -log(2π)
    np.testing.assert_allclose(
        float(gaussian_log_prob(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2))),
        -np.log(2 * np.pi), rtol=1e-6)
    # the sum, not the mean, over dimensions: 3 dims -> 3× the 1-D value
    one = float(gaussian_log_prob(jnp.zeros(1), jnp.zeros(1), jnp.ones(1)))
    three = float(gaussian_log_prob(jnp.zeros(3), jnp.zeros(3), jnp.ones(3)))
    np.testing.assert_allclose(three, 3 * one, rtol=1e-6)
    np.testing.assert_allclose(one, -0.5 - 0.5 * np.log(2 * np.pi), rtol=1e-6)


def test_gaussian_kl_closed_form_matches_monte_carlo():
    mean_p = np.array([0.3, -0.2, 1.0])
    log_std_p = np.array([0.1, -0.3, 0.0])
    mean_q = np.array([0.0, 0.1, 0.6])
    log_std_q = np.array([0.2, -0.1, 0.3])
    kl = float(gaussian_kl(*(jnp.asarray(a, jnp.float32)
                             for a in (mean_p, log_std_p, mean_q, log_std_q))))
    rng = np.random.default_rng(9)
    x = mean_p + np.exp(log_std_p) * rng.normal(size=(200_000, 3))
    log_ratio = _np_log_prob(mean_p, log_std_p, x) - _np_log_prob(mean_q, log_std_q, x)
    mc, se = log_ratio.mean(), log_ratio.std() / np.sqrt(len(log_ratio))
    assert se < 2e-3
    assert abs(kl - mc) < max(4 * se, 3e-3), (kl, mc, se)
    # closed form by hand, in float64
    sp, sq = np.exp(log_std_p), np.exp(log_std_q)
    hand = np.sum(np.log(sq / sp) + (sp ** 2 + (mean_p - mean_q) ** 2) / (2 * sq ** 2) - 0.5)
    np.testing.assert_allclose(kl, hand, rtol=1e-5)
    assert kl > 0.1


def test_gaussian_kl_self_is_zero_and_batched():
    rng = np.random.default_rng(10)
    mean = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    log_std = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    kl = np.asarray(gaussian_kl(mean, log_std, mean, log_std))
    assert kl.shape == (4,)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    # KL is not symmetric: a hand-computed 1-D case in both directions
    pq = float(gaussian_kl(jnp.zeros(1), jnp.zeros(1), jnp.ones(1), jnp.log(2.0) * jnp.ones(1)))
    qp = float(gaussian_kl(jnp.ones(1), jnp.log(2.0) * jnp.ones(1), jnp.zeros(1), jnp.zeros(1)))
    np.testing.assert_allclose(pq, np.log(2) + (1 + 1) / 8 - 0.5, rtol=1e-5)
    np.testing.assert_allclose(qp, -np.log(2) + (4 + 1) / 2 - 0.5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Lanes holding several episodes (a body that fell and restarted)
# ---------------------------------------------------------------------------------------

def _episodes(dones_row, horizon):
    """[(start, end)] of the episodes of one lane; the last one is cut at the horizon."""
    ends = list(np.flatnonzero(dones_row)) + ([horizon - 1] if not dones_row[-1] else [])
    starts = [0] + [e + 1 for e in ends[:-1]]
    return list(zip(starts, ends))


@pytest.fixture
def restarting_lanes():
    rng = np.random.default_rng(11)
    n, h = 4, 15
    dones = np.zeros((n, h), np.float32)
    dones[0, [3, 9]] = 1.0  # three episodes, the last cut
    dones[1, 0] = 1.0  # a one-step episode first
    dones[2, h - 1] = 1.0  # ends exactly at the last step
    rewards = rng.normal(size=(n, h)).astype(np.float32)
    values = rng.normal(size=(n, h)).astype(np.float32)
    return rewards, values, dones


def test_returns_and_gae_restart_at_episode_boundaries(restarting_lanes):
    rewards, values, dones = restarting_lanes
    n, h = rewards.shape
    masks = np.ones_like(rewards)
    expected_returns = np.zeros((n, h))
    expected_gae = np.zeros((n, h))
    for lane in range(n):
        for start, end in _episodes(dones[lane], h):
            piece = slice(start, end + 1)
            one = np.ones((1, end + 1 - start), np.float32)
            expected_returns[lane, piece] = _ref_returns(rewards[None, lane, piece], one, GAMMA)
            expected_gae[lane, piece] = _ref_gae(rewards[None, lane, piece],
                                                 values[None, lane, piece], one, GAMMA, 0.9)
    got_returns = discounted_returns(jnp.asarray(rewards), jnp.asarray(masks), GAMMA,
                                     jnp.asarray(dones))
    got_gae = generalized_advantages(jnp.asarray(rewards), jnp.asarray(values),
                                     jnp.asarray(masks), GAMMA, 0.9, jnp.asarray(dones))
    np.testing.assert_allclose(np.asarray(got_returns), expected_returns, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_gae), expected_gae, atol=1e-5)
    # without the boundaries the lane-long sums differ (the test can fail)
    assert not np.allclose(np.asarray(discounted_returns(jnp.asarray(rewards),
                                                         jnp.asarray(masks), GAMMA)),
                           expected_returns, atol=1e-3)


def test_baseline_time_feature_restarts_with_the_episode():
    obs = np.zeros((6, 1), np.float32)
    timesteps = np.array([0, 1, 2, 0, 1, 2], np.float32)
    features = np.asarray(baseline_features(jnp.asarray(obs), jnp.asarray(timesteps)))
    np.testing.assert_allclose(features[:, 2], timesteps / 100.0, rtol=1e-6)
    np.testing.assert_allclose(features[:, 4], (timesteps / 100.0) ** 3, rtol=1e-6)


def test_episode_returns_average_the_ended_episodes(restarting_lanes):
    rewards, _, dones = restarting_lanes
    n, h = rewards.shape
    dones[3] = 0.0  # lane 3: no episode ended, its cut episode counts
    batch = _phase_batch(np.random.default_rng(0), 1, n, h, 2)[0]
    batch = jax.tree.map(lambda x: x[0], batch).replace(
        rewards=jnp.asarray(rewards), masks=jnp.ones((n, h)), dones=jnp.asarray(dones))
    counted = []
    for lane in range(n):
        episodes = _episodes(dones[lane], h)
        if dones[lane].any():
            episodes = [(s, e) for s, e in episodes if dones[lane, e]]
        counted += [rewards[lane, s:e + 1].sum() for s, e in episodes]
    assert len(counted) == 2 + 1 + 1 + 1
    np.testing.assert_allclose(float(batch.mean_episode_return()), np.mean(counted),
                               rtol=1e-5)
    assert float(batch.episode_count()) == len(counted)
