"""Take a GMPS point-nav collapse apart: replay iterations 96 and 97 from a run's
checkpoint of iteration 95, check the replay against metrics.jsonl, and split each
task's inner policy-gradient step by parameter group (which part of the step moves the
adapted mean, and which part makes a goal's adapted policy run away).

    python experiments/gmps_collapse.py RUN_DIR

RUN_DIR is seed 2 of the sweep in experiments/README.md ("What a collapse is once σ is
floored and DAgger is off"): `metarl train --config experiments/gmps_point_nav.yaml
--seeds 0-2 --cpu-devices 1 --set episodes_per_task=40 --set gmps.imitation_steps=20
--set checkpoint_every=5 --out runs/gmps_n40_s20`, then RUN_DIR=runs/gmps_n40_s20/seed2.
The iterations (95 to 97) and the goals examined in part 4 are that run's.
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from metarl_jax import programs, run_dir
from metarl_jax.algorithms.common import sample_adaptation_phases
from metarl_jax.checkpoints import Checkpointer
from metarl_jax.losses import log_likelihood_loss
from metarl_jax.run_config import build, resolve_config

RUN = sys.argv[1]
CKPT = os.path.join(RUN, "checkpoints")
np.set_printoptions(precision=4, suppress=True, linewidth=160)

config = resolve_config(run_dir.read_config_dict(RUN))
env, _, algo = build(config)
policy = algo.policy
c = config.algorithm
print("policy:", type(policy).__name__, "min_std", policy.min_std, "devices", jax.devices())

template = algo.init(jax.random.PRNGKey(config.run.seed))
ckpt = Checkpointer(CKPT, max_to_keep=100)
state95, host = ckpt.restore(template, 95)
ckpt.close()
print("restored iteration", int(state95.iteration), "host", {k: v for k, v in host.items()})

logged = {}
with open(os.path.join(RUN, "metrics.jsonl")) as f:
    for line in f:
        r = json.loads(line)
        logged[r["iteration"]] = r

# ---- 1. replay -------------------------------------------------------------------------
step = jax.jit(programs.with_finiteness_check(algo.meta_iteration))
t0 = time.time()
states = {95: state95}
replay = {}
for it in (96, 97):
    new_state, metrics = step(states[it - 1])
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    states[it] = new_state
    replay[it] = metrics
    print(f"replay it {it} ({time.time() - t0:.0f}s):")
    for k in ("pre_return", "post_return", "imitation_loss_first", "imitation_loss",
              "step_size", "theta_kl", "adapted_std_max"):
        a, b = metrics[k], logged[it][k]
        print(f"   {k:22s} replay {a!r:>22}  logged {b!r:>22}  diff {a - b:.3e}"
              f"{'  EXACT' if a == b else ''}")
    sys.stdout.flush()

# ---- 2. per-task dissection ------------------------------------------------------------
GRID_N = 41
g1 = np.linspace(-2.0, 2.0, GRID_N)
GRID = jnp.asarray(np.stack(np.meshgrid(g1, g1, indexing="ij"), -1).reshape(-1, 2),
                   jnp.float32)
START = jnp.zeros((2,), jnp.float32)
BOUND = env.max_step


def leaf_masks(params):
    """Masks (pytrees of 0/1 like params) for each parameter group."""
    p = params["params"]
    zero = jax.tree.map(jnp.zeros_like, params)
    nobs = env.observation_size

    def only(path_fn):
        return path_fn(zero)

    def set_leaf(tree, keys, value):
        tree = jax.tree.map(lambda x: x, tree)
        d = tree["params"]
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
        return tree

    def m(*specs):
        tree = jax.tree.map(jnp.zeros_like, params)
        for keys, rows in specs:
            leaf = p
            for k in keys:
                leaf = leaf[k]
            mask = jnp.zeros_like(leaf)
            mask = mask.at[rows].set(1.0) if rows is not None else jnp.ones_like(leaf)
            cur = tree["params"]
            for k in keys[:-1]:
                cur = cur[k]
            cur[keys[-1]] = jnp.maximum(cur[keys[-1]], mask)
        return tree

    nl = sum(k.startswith("Dense_") for k in p)
    out = f"Dense_{nl - 1}"
    groups = {
        "out_b": m(((out, "bias"), None)),
        "out_W": m(((out, "kernel"), None)),
        "hidden": m(*[((f"Dense_{i}", n), None) for i in range(1, nl - 1)
                      for n in ("kernel", "bias")]),
        "in_b": m((("Dense_0", "bias"), None)),
        "in_W_obs": m((("Dense_0", "kernel"), slice(0, nobs))),
        "in_W_bt": m((("Dense_0", "kernel"), slice(nobs, None))),
        "bt": m((("bias_transformation",), None)),
        "log_std": m((("log_std",), None)),
    }
    groups["bt_path"] = jax.tree.map(jnp.maximum, jax.tree.map(
        jnp.maximum, groups["in_b"], groups["in_W_bt"]), groups["bt"])  # 1st-layer bias
    groups["bias_like"] = jax.tree.map(jnp.maximum, groups["bt_path"], groups["out_b"])
    groups["state_dep"] = jax.tree.map(
        lambda a, b, cc: jnp.maximum(jnp.maximum(a, b), cc),
        groups["out_W"], groups["hidden"], groups["in_W_obs"])
    return groups, out


GROUPS, OUT = leaf_masks(state95.params["policy"])
GROUP_NAMES = list(GROUPS)


def tree_norm(t):
    return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t)))


def mean_at(params, obs):
    return policy.distribution(params, obs)[0]


def mean_rollout(params, goal):
    """Deterministic rollout of the mean action (clipped by the env) from the start."""
    def body(carry, _):
        pos, alive = carry
        a = mean_at(params, pos)
        new = pos + jnp.clip(a, -BOUND, BOUND)
        off = new - goal
        r = -jnp.sqrt(jnp.sum(off ** 2))
        done = jnp.all(jnp.abs(off) < env.success_radius)
        new_pos = jnp.where(alive, new, pos)
        return (new_pos, alive & ~done), jnp.where(alive, r, 0.0)

    (pos, alive), rewards = jax.lax.scan(body, (START, jnp.array(True)), None,
                                         length=c.horizon)
    return jnp.sum(rewards), pos, alive


@jax.jit
def dissect(state):
    theta = state.params["policy"]
    alpha = state.params["step_sizes"]
    key, choice_key, sample_key = jax.random.split(state.key, 3)
    task_ids = jax.random.choice(choice_key, c.gmps.num_train_tasks, (c.meta_batch_size,),
                                 replace=False)
    tasks = jax.tree.map(lambda x: x[task_ids], state.train_tasks)
    pre_batches, post_batch, adapted = sample_adaptation_phases(
        env, policy, c, theta, tasks, sample_key, inner_loss=log_likelihood_loss,
        inner_lr=alpha, return_adapted=True)
    batch = jax.tree.map(lambda x: x[:, 0], pre_batches)
    grads = jax.vmap(lambda b: jax.grad(lambda p: log_likelihood_loss(policy, p, b))(theta))(
        batch)
    steps = jax.tree.map(lambda a, g: a * g, alpha, grads)  # [M, ...]
    phi_check = jax.tree.map(lambda t, s: t - s, theta, steps)
    phi_err = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in
                                 zip(jax.tree.leaves(phi_check), jax.tree.leaves(adapted))]))

    goals = tasks["goal"]
    mu_theta_grid = mean_at(theta, GRID)  # [K, 2]
    mu_theta_0 = mean_at(theta, START)

    def per_task(step_i, phi_i, goal):
        mu_grid = mean_at(phi_i, GRID)
        mu_0 = mean_at(phi_i, START)
        d_grid = mu_grid - mu_theta_grid
        d_mean = jnp.mean(d_grid, axis=0)
        d_resid = jnp.mean(jnp.linalg.norm(d_grid - d_mean, axis=-1))
        clipped = jnp.clip(mu_grid, -BOUND, BOUND)
        sat = jnp.all(jnp.abs(mu_grid) >= BOUND, axis=-1)
        pattern = (mu_grid[:, 0] > 0).astype(jnp.int32) * 2 + (mu_grid[:, 1] > 0)
        counts = jnp.bincount(pattern, length=4)
        modal = jnp.argmax(counts)
        frac_same_dir = counts[modal] / pattern.shape[0]
        frac_same_sat = jnp.mean(sat & (pattern == modal))
        toward_goal = jnp.mean(jnp.sum(clipped * (goal - GRID), -1) > 0)
        per_group_d0 = jnp.stack([
            mean_at(jax.tree.map(lambda t, s, m: t - m * s, theta, step_i, GROUPS[n]), START)
            - mu_theta_0 for n in GROUP_NAMES])  # [G, 2]
        per_group_dgrid_resid = jnp.stack([
            (lambda dg: jnp.mean(jnp.linalg.norm(dg - jnp.mean(dg, 0), axis=-1)))(
                mean_at(jax.tree.map(lambda t, s, m: t - m * s, theta, step_i, GROUPS[n]),
                        GRID) - mu_theta_grid) for n in GROUP_NAMES])
        per_group_dgrid_mean = jnp.stack([
            jnp.mean(mean_at(jax.tree.map(lambda t, s, m: t - m * s, theta, step_i,
                                          GROUPS[n]), GRID) - mu_theta_grid, 0)
            for n in GROUP_NAMES])
        step_norms = jnp.stack([tree_norm(jax.tree.map(lambda s, m: s * m, step_i, GROUPS[n]))
                                for n in GROUP_NAMES])
        ret_det, pos_det, alive_det = mean_rollout(phi_i, goal)
        ret_det_theta, pos_det_theta, _ = mean_rollout(theta, goal)
        pp = phi_i["params"]
        tp = theta["params"]
        nobs = env.observation_size
        eff_b = lambda q: q["Dense_0"]["bias"] + q["bias_transformation"] @ q["Dense_0"]["kernel"][nobs:]
        d_eff_b = jnp.linalg.norm(eff_b(pp) - eff_b(tp))
        return dict(mu_0=mu_0, d0=mu_0 - mu_theta_0, d_mean=d_mean, d_resid=d_resid,
                    frac_same_dir=frac_same_dir, frac_same_sat=frac_same_sat,
                    frac_sat=jnp.mean(sat), toward_goal=toward_goal,
                    per_group_d0=per_group_d0, per_group_dgrid_mean=per_group_dgrid_mean,
                    per_group_dgrid_resid=per_group_dgrid_resid, step_norms=step_norms,
                    ret_det=ret_det, pos_det=pos_det, reached_det=~alive_det,
                    ret_det_theta=ret_det_theta, d_eff_b=d_eff_b,
                    std_phi=jnp.exp(policy.log_std(phi_i)),
                    d_out_b=-step_i["params"][OUT]["bias"])

    out = jax.vmap(per_task)(steps, adapted, goals)
    # the post batch: lane final positions
    last_obs = post_batch.observations[:, :, -1]  # [M, N, 2] (idle lanes hold last state)
    out.update(
        task_ids=task_ids, goals=goals,
        pre_ret=pre_batches.mean_episode_return(axis=(1, 2)),
        post_ret=post_batch.mean_episode_return(axis=-1),
        post_return=post_batch.mean_episode_return(),
        pre_return=pre_batches.mean_episode_return(),
        post_final_dist=jnp.mean(jnp.linalg.norm(last_obs - goals[:, None], axis=-1), 1),
        post_reach=jnp.mean(jnp.sum(post_batch.dones, -1) > 0, axis=1),
        pre_reach=jnp.mean(jnp.sum(batch.dones, -1) > 0, axis=1),
        grad_out_b=grads["params"][OUT]["bias"],
        phi_err=phi_err, mu_theta_0=mu_theta_0,
        theta_grid_frac_same_dir=jnp.max(jnp.bincount(
            (mu_theta_grid[:, 0] > 0).astype(jnp.int32) * 2 + (mu_theta_grid[:, 1] > 0),
            length=4)) / GRID.shape[0],
        theta_grid_frac_sat=jnp.mean(jnp.all(jnp.abs(mu_theta_grid) >= BOUND, -1)),
        theta_std=jnp.exp(policy.log_std(theta)),
        adv_abs_mean=jnp.sum(jnp.abs(batch.advantages) * batch.masks, (1, 2))
        / jnp.sum(batch.masks, (1, 2)),
        n_real=jnp.sum(batch.masks, (1, 2)),
    )
    return out


def alpha_summary(state):
    alpha = state.params["step_sizes"]
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(alpha):
        leaf = np.asarray(leaf)
        rows.append((jax.tree_util.keystr(path), leaf.shape, float(leaf.mean()),
                     float(leaf.min()), float(leaf.max())))
    a0 = np.asarray(alpha["params"]["Dense_0"]["kernel"])
    rows.append(("  Dense_0 kernel obs rows", a0[:2].shape, float(a0[:2].mean()),
                 float(a0[:2].min()), float(a0[:2].max())))
    rows.append(("  Dense_0 kernel bt rows", a0[2:].shape, float(a0[2:].mean()),
                 float(a0[2:].min()), float(a0[2:].max())))
    return rows


results = {}
for it in (96, 97):
    s = states[it - 1]
    print(f"\n================ iteration {it} (from state after {it - 1}) ================")
    print("step sizes alpha (mean, min, max) per leaf:")
    for name, shape, mean, lo, hi in alpha_summary(s):
        print(f"   {name:45s} {str(shape):10s} mean {mean:.4f}  min {lo:.4f}  max {hi:.4f}")
    theta = s.params["policy"]["params"]
    print("theta: bias_transformation", np.asarray(theta["bias_transformation"]),
          " out bias", np.asarray(theta[OUT]["bias"]), " log_std", np.asarray(theta["log_std"]))
    d = jax.device_get(dissect(s))
    d = jax.tree.map(np.asarray, d)
    results[it] = d
    print(f"dissect: post_return {float(d['post_return'])!r} (replay {replay[it]['post_return']!r},"
          f" logged {logged[it]['post_return']!r}); pre_return {float(d['pre_return'])!r}"
          f" (logged {logged[it]['pre_return']!r}); max|phi - (theta - a*g)| {float(d['phi_err']):.2e}")
    print("theta: mu(start)", d["mu_theta_0"], " sigma", d["theta_std"],
          f" grid frac same quadrant {float(d['theta_grid_frac_same_dir']):.2f},"
          f" frac saturated {float(d['theta_grid_frac_sat']):.2f}")
    print("\nper task (sorted by post return):  goal | pre ret | post ret | post reach | "
          "post final dist | mu_phi(0) | dmu(0) | |dmu(0)| | cos(dmu0, goal) | grid: |mean dmu| "
          "resid | same quad | same sat quad | sat | toward goal | det ret | sigma_phi")
    order = np.argsort(d["post_ret"])
    for i in order:
        g = d["goals"][i]
        d0 = d["d0"][i]
        cos = float(d0 @ g / (np.linalg.norm(d0) * np.linalg.norm(g) + 1e-12))
        print(f" t{int(d['task_ids'][i]):2d} ({g[0]:+.2f},{g[1]:+.2f}) | {d['pre_ret'][i]:7.1f} |"
              f" {d['post_ret'][i]:7.1f} | {d['post_reach'][i]:.2f} | {d['post_final_dist'][i]:5.2f} |"
              f" ({d['mu_0'][i][0]:+.3f},{d['mu_0'][i][1]:+.3f}) | ({d0[0]:+.3f},{d0[1]:+.3f}) |"
              f" {np.linalg.norm(d0):.3f} | {cos:+.2f} | {np.linalg.norm(d['d_mean'][i]):.3f}"
              f" {d['d_resid'][i]:.3f} | {d['frac_same_dir'][i]:.2f} | {d['frac_same_sat'][i]:.2f} |"
              f" {d['frac_sat'][i]:.2f} | {d['toward_goal'][i]:.2f} | {d['ret_det'][i]:7.1f} |"
              f" ({d['std_phi'][i][0]:.3f},{d['std_phi'][i][1]:.3f})")
    print("\nper task: step norm ||alpha*grad|| per group; then |dmu(start)| from that group's "
          "step alone (groups: " + ", ".join(GROUP_NAMES) + ")")
    for i in order:
        print(f" t{int(d['task_ids'][i]):2d} post {d['post_ret'][i]:7.1f} | norms "
              + " ".join(f"{x:7.3f}" for x in d["step_norms"][i])
              + " | |dmu0| " + " ".join(f"{np.linalg.norm(x):6.3f}" for x in d["per_group_d0"][i])
              + f" | d_eff_b1 {d['d_eff_b'][i]:.3f} | d_out_b ({d['d_out_b'][i][0]:+.3f},"
              f"{d['d_out_b'][i][1]:+.3f})")
    bad = d["post_ret"] < -60
    for label, sel in (("collapsing (post < -60)", bad), ("fine (post >= -60)", ~bad)):
        if not sel.any():
            print(f"\n{label}: none")
            continue
        print(f"\n{label}: {int(sel.sum())} tasks; mean over them:")
        print("   group       step-norm  |dmu0| alone  |grid-mean dmu| alone  grid resid alone")
        for j, n in enumerate(GROUP_NAMES):
            print(f"   {n:10s} {d['step_norms'][sel, j].mean():9.3f}  "
                  f"{np.linalg.norm(d['per_group_d0'][sel, j], axis=-1).mean():12.3f}  "
                  f"{np.linalg.norm(d['per_group_dgrid_mean'][sel, j], axis=-1).mean():20.3f}  "
                  f"{d['per_group_dgrid_resid'][sel, j].mean():16.3f}")
        print(f"   full step: |dmu0| {np.linalg.norm(d['d0'][sel], axis=-1).mean():.3f}, "
              f"|grid-mean dmu| {np.linalg.norm(d['d_mean'][sel], axis=-1).mean():.3f}, "
              f"grid resid {d['d_resid'][sel].mean():.3f}, same-quadrant {d['frac_same_dir'][sel].mean():.2f},"
              f" same saturated quadrant {d['frac_same_sat'][sel].mean():.2f}, toward goal "
              f"{d['toward_goal'][sel].mean():.2f}; |adv| {d['adv_abs_mean'][sel].mean():.3f};"
              f" pre reach {d['pre_reach'][sel].mean():.2f}")
    sys.stdout.flush()

print(f"\ntotal {time.time() - t0:.0f}s")


# ---- 3. why does one task run away? the adapted field near the goal ----------------------
ANGLES = jnp.linspace(0, 2 * np.pi, 64, endpoint=False)
CIRCLE = jnp.stack([jnp.cos(ANGLES), jnp.sin(ANGLES)], -1)
RADII = (0.05, 0.1, 0.2, 0.4, 0.8)
VARIANTS = ("full", "out_b only", "all but out_b", "bt_path only", "all but bt_path",
            "state_dep only", "out_b+out_W", "out_b+hidden", "out_b+in_W_obs",
            "out_b+state_dep", "0.5x", "0.75x", "1.25x", "theta")


def variant_params(theta, step_i, name):
    def minus(mask=None, scale=1.0):
        if mask is None:
            return jax.tree.map(lambda t, s: t - scale * s, theta, step_i)
        return jax.tree.map(lambda t, s, m: t - m * s, theta, step_i, mask)
    inv = lambda m: jax.tree.map(lambda x: 1.0 - x, m)
    return {"full": lambda: minus(), "out_b only": lambda: minus(GROUPS["out_b"]),
            "all but out_b": lambda: minus(inv(GROUPS["out_b"])),
            "bt_path only": lambda: minus(GROUPS["bt_path"]),
            "all but bt_path": lambda: minus(inv(GROUPS["bt_path"])),
            "state_dep only": lambda: minus(GROUPS["state_dep"]),
            "out_b+out_W": lambda: minus(jax.tree.map(jnp.maximum, GROUPS["out_b"], GROUPS["out_W"])),
            "out_b+hidden": lambda: minus(jax.tree.map(jnp.maximum, GROUPS["out_b"], GROUPS["hidden"])),
            "out_b+in_W_obs": lambda: minus(jax.tree.map(jnp.maximum, GROUPS["out_b"], GROUPS["in_W_obs"])),
            "out_b+state_dep": lambda: minus(jax.tree.map(jnp.maximum, GROUPS["out_b"], GROUPS["state_dep"])),
            "0.5x": lambda: minus(scale=0.5), "0.75x": lambda: minus(scale=0.75),
            "1.25x": lambda: minus(scale=1.25), "theta": lambda: theta}[name]()


def iteration_batches(state):
    """θ, α, the goals (indices and tasks) and θ's and φ's episodes of the iteration that `state` begins, drawn
    with the keys `meta_iteration` uses."""
    theta = state.params["policy"]
    alpha = state.params["step_sizes"]
    _, choice_key, sample_key = jax.random.split(state.key, 3)
    task_ids = jax.random.choice(choice_key, c.gmps.num_train_tasks, (c.meta_batch_size,),
                                 replace=False)
    tasks = jax.tree.map(lambda x: x[task_ids], state.train_tasks)
    pre_batches, post_batch = sample_adaptation_phases(
        env, policy, c, theta, tasks, sample_key, inner_loss=log_likelihood_loss,
        inner_lr=alpha)
    return (theta, alpha, task_ids, tasks, jax.tree.map(lambda x: x[:, 0], pre_batches),
            post_batch)


@jax.jit
def field_near_goal(state):
    theta, alpha, task_ids, tasks, batch, post_batch = iteration_batches(state)
    grads = jax.vmap(lambda b: jax.grad(lambda p: log_likelihood_loss(policy, p, b))(theta))(
        batch)
    steps = jax.tree.map(lambda a, g: a * g, alpha, grads)

    def per_task(step_i, goal):
        out = {}
        for v in VARIANTS:
            p = variant_params(theta, step_i, v)
            inward = []
            for r in RADII:
                pts = goal + r * CIRCLE
                a = jnp.clip(mean_at(p, pts), -BOUND, BOUND)
                inward.append(jnp.mean(jnp.sum(a * (goal - pts), -1) > 0))
            ret, pos, alive = mean_rollout(p, goal)
            out[v] = dict(inward=jnp.stack(inward), det_ret=ret, det_final=pos,
                          reached=~alive)
        # trajectory of the full adapted mean policy
        phi = variant_params(theta, step_i, "full")

        def body(pos, _):
            a = jnp.clip(mean_at(phi, pos), -BOUND, BOUND)
            return pos + a, (pos, a, jnp.clip(mean_at(theta, pos), -BOUND, BOUND))
        _, (traj, acts, theta_acts) = jax.lax.scan(body, START, None, length=c.horizon)
        out["traj"], out["acts"], out["theta_acts"] = traj, acts, theta_acts
        return out

    res = jax.vmap(per_task)(steps, tasks["goal"])
    last_obs = post_batch.observations[:, :, -1]
    res["post_final_mean"] = jnp.mean(last_obs, 1)
    res["post_final_far"] = jnp.mean(jnp.linalg.norm(last_obs - tasks["goal"][:, None], axis=-1) > 1, 1)
    res["post_ret"] = post_batch.mean_episode_return(axis=-1)
    res["task_ids"], res["goals"] = task_ids, tasks["goal"]
    return res


for it in (96, 97):
    r = jax.tree.map(np.asarray, jax.device_get(field_near_goal(states[it - 1])))
    order = np.argsort(r["post_ret"])
    print(f"\n==== iteration {it}: field of the adapted mean near the goal ====")
    print("fraction of points on circles of radius " + str(RADII) + " around the goal where "
          "the clipped mean points inward; det = deterministic mean-action rollout return")
    for i in order:
        line = (f" t{int(r['task_ids'][i]):2d} post {r['post_ret'][i]:7.1f} far {r['post_final_far'][i]:.2f}"
                f" final-mean ({r['post_final_mean'][i][0]:+.2f},{r['post_final_mean'][i][1]:+.2f})")
        for v in ("full", "theta"):
            line += f" | {v}: in " + " ".join(f"{x:.2f}" for x in r[v]["inward"][i]) + \
                f" det {r[v]['det_ret'][i]:7.1f}"
        print(line)
    print("\ndeterministic rollout return per variant of the step (worst 3 and 3 best tasks;"
          " R = reached the goal box):")
    print("   " + " | ".join(f"{v:>15s}" for v in VARIANTS))
    for i in list(order[:3]) + list(order[-3:]):
        print(f" t{int(r['task_ids'][i]):2d} " + " | ".join(
            f"{r[v]['det_ret'][i]:8.1f} {'R' if r[v]['reached'][i] else ' '}      " for v in VARIANTS))
    for i in list(order[:1]) + [j for j in range(len(order)) if int(r['task_ids'][j]) == 28][:1]:
        print(f"\n  task {int(r['task_ids'][i])} goal {r['goals'][i]}: mean-policy trajectory "
              "(t: position | clipped a_phi | clipped a_theta)")
        for t in (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 40, 60, 99):
            print(f"    t={t:2d} pos ({r['traj'][i][t][0]:+.3f},{r['traj'][i][t][1]:+.3f}) "
                  f"a_phi ({r['acts'][i][t][0]:+.3f},{r['acts'][i][t][1]:+.3f}) "
                  f"a_theta ({r['theta_acts'][i][t][0]:+.3f},{r['theta_acts'][i][t][1]:+.3f})")


# ---- 4. raw (unclipped) mean change along the escape path, per parameter group ----------
@jax.jit
def along_path(state, task_id, points):
    theta, alpha, task_ids, _, batch, _ = iteration_batches(state)
    i = jnp.argmax(task_ids == task_id)
    b = jax.tree.map(lambda x: x[i], batch)
    g = jax.grad(lambda p: log_likelihood_loss(policy, p, b))(theta)
    step_i = jax.tree.map(lambda a, gg: a * gg, alpha, g)
    mu_t = mean_at(theta, points)
    mu_p = mean_at(jax.tree.map(lambda t, s: t - s, theta, step_i), points)
    per_group = {n: mean_at(jax.tree.map(lambda t, s, m: t - m * s, theta, step_i, GROUPS[n]),
                            points) - mu_t for n in ("out_b", "out_W", "hidden", "bt_path",
                                                     "in_W_obs", "state_dep")}
    return task_ids[i], mu_t, mu_p, per_group


PATH = jnp.asarray([[0.0, 0.0], [0.2778, 0.427], [0.39, 0.5], [0.7, 1.0], [1.4, 2.0],
                    [3.0, 4.0], [5.0, 6.0], [8.9, 9.9], [-0.5, -0.5], [1.5, 0.0],
                    [0.0, 1.5], [-1.5, 1.5]], jnp.float32)
for it, tid in ((97, 28), (96, 28), (96, 20), (97, 1)):
    found, mu_t, mu_p, pg = jax.device_get(along_path(states[it - 1], tid, PATH))
    if int(found) != tid:
        print(f"\niteration {it}: task {tid} not in the meta-batch")
        continue
    print(f"\n==== iteration {it}, task {tid}: raw means along the escape path (unclipped) ====")
    print("   point          | mu_theta          | mu_phi            | dmu from: " +
          " ".join(f"{n:>15s}" for n in pg))
    for k in range(PATH.shape[0]):
        pt = np.asarray(PATH[k])
        print(f"   ({pt[0]:+.2f},{pt[1]:+.2f}) | ({mu_t[k][0]:+.3f},{mu_t[k][1]:+.3f}) |"
              f" ({mu_p[k][0]:+.3f},{mu_p[k][1]:+.3f}) | " + " ".join(
                  f"({pg[n][k][0]:+.3f},{pg[n][k][1]:+.3f})" for n in pg))
print(f"\ndone, total {time.time() - t0:.0f}s")
