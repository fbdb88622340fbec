"""GMPS — guided meta-policy search (Mendonca et al., NeurIPS 2019).

Reinforcement learning in the inner loop, supervised imitation in the outer loop. Phase 1
(per-task experts, or a demonstrations file) happens once, in `prepare`; phase 2 is the
compiled `meta_iteration`, read top to bottom:

1. M of the T meta-training tasks. On them, GMPS's meta-test adaptation from the current
   θ: N fresh episodes of π_θ, the plain policy-gradient step with the learned step
   sizes (φ_i = θ − α ⊙ ∇L_PG(θ)), N fresh episodes of each π_φi. Their mean episode
   returns are `pre_return` and `post_return`, measured as for every other algorithm.
2. The outer loss on θ's episodes of step 1: per task, θ'_i = θ − α ⊙ ∇L_in(θ) with the
   importance-weighted PG loss (π_θ/π_θinit, θ_init the sampling θ: at the first Adam
   step it is the plain PG step of step 1), then the imitation loss of θ'_i on that
   task's expert data; `imitation_steps` Adam steps on the same batch (a scan; from
   iteration `imitation_steps_switch` on, `imitation_steps_late` when set),
   differentiating through the inner step, θ, α and log σ all trained.
3. DAgger, every `dagger_every` iterations (from `dagger_start` on): the states the adapted policies φ_i visited
   in step 1 are labelled with the task's expert action and written to that task's
   DAgger buffer, a bounded ring beside its demonstrations (the demonstrations are never
   displaced). The outer loss sees both. Both live in the training state, so they are
   checkpointed with it.

Expert labels (demonstrations and DAgger) are the experts' mean actions clipped to the
environment's action bound in the policy's raw action space (`TaskEnv.raw_action_bound`),
as the reference clips its experts' actions to its ±1 action box.

The meta-policy by default appends a learned bias-transformation vector to the
observation (`gmps.bias_transform_size` entries, initialised to 1; the reference's
`..._adaptivestep_biastransform` policy), adapted by the inner step with a step size of
its own like every other parameter.

Environment steps (`env_steps`): 2·M·N·H per iteration, the two phases of step 1. θ's
episodes serve both `pre_return` and the imitation batch, the adapted policies' episodes
both `post_return` and DAgger, so measuring costs nothing beyond what training samples.
The returns of iteration i are those of θ as it was when the iteration began (as for
ProMP and MAML, whose metrics also come from the samples of the update). The experts'
own steps are reported apart, as `expert_env_steps`.

Meta-test (`adaptation_returns`): the same plain policy-gradient step(s) from θ with the
learned step sizes, on new tasks, using only their reward.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarl_jax.algorithms.base import MetaLearner, MetaState
from metarl_jax.algorithms.common import (adaptation_returns, phase_returns,
                                          sample_adaptation_phases)
from metarl_jax.config import (ConfigError, SamplingConfig, at_least, check, field, one_of,
                               positive)
from metarl_jax.demonstrations import (DaggerRing, DemonstrationBuffer, expert_actions,
                                       load_demonstrations)
from metarl_jax.envs.base import TaskEnv
from metarl_jax.experts import ExpertConfig, train_and_collect
from metarl_jax.losses import (imitation_loss, importance_weighted_pg_loss, inner_update,
                               kl_to_sampler, log_likelihood_loss, masked_mean)
from metarl_jax.policies import ACTIVATIONS, BiasTransformPolicy, GaussianPolicy


@dataclasses.dataclass(frozen=True)
class GMPSOptions:
    # Demonstrations file (`metarl experts` writes one); null: train experts first.
    demos: str | None = None
    num_train_tasks: int = field(40, **at_least(1))  # T, the finite meta-training set
    expert_iterations: int = field(200, **at_least(1))  # PPO updates in experts mode
    expert_hidden_sizes: tuple[int, ...] = (64, 64)
    expert_activation: str = field("tanh", **one_of(*ACTIVATIONS))
    learned_step_sizes: bool = True
    step_size_init: float = field(0.5, **positive())
    # The meta-policy's floor under σ (the reference policy's `min_std`, 1e-6).
    min_std: float = field(1e-6, **positive())
    # Learned entries appended to the meta-policy's observation; 0: the plain MLP.
    bias_transform_size: int = field(4, **at_least(0))
    imitation: str = field("mse", **one_of("mse", "nll"))
    # c ≥ 0: the MSE adds c·‖σ‖² of the adapted policy (the reference's `l2loss_std_mult`;
    # its released launcher uses 0). Ignored by the NLL, which trains σ itself.
    std_penalty: float = field(0.0, **at_least(0))
    imitation_steps: int = field(500, **at_least(1))
    # From iteration `imitation_steps_switch` on, `imitation_steps_late` Adam steps per
    # iteration instead (0: `imitation_steps` throughout): many steps while the policy
    # learns the basics, fewer once θ's drift over thousands of steps is the risk.
    imitation_steps_late: int = field(0, **at_least(0))
    imitation_steps_switch: int = field(0, **at_least(0))
    # c > 1: the inner loss's importance weights π_θ/π_θinit clipped to [1/c, c] (the
    # reference's `clip0.5_2.0` weight modifier is c = 2); 0: unclipped, its default.
    importance_clip: float = field(0.0, **check(lambda v: v == 0 or v > 1, "0 or > 1"))
    dagger_every: int = field(0, **at_least(0))  # 0: no DAgger
    # The first iteration whose adapted policies' states DAgger aggregates (a multiple
    # of `dagger_every` from there on); until then the outer loss sees only the
    # demonstrations. 0: from the first round, as the reference.
    dagger_start: int = field(0, **at_least(0))
    demo_buffer_size: int = field(2000, **at_least(1))  # per task, >= its demonstrations
    dagger_buffer_size: int = field(2000, **at_least(1))  # DAgger states per task (a ring)


@dataclasses.dataclass(frozen=True)
class GMPSConfig(SamplingConfig):
    """`inner_lr` is the fixed α when `gmps.learned_step_sizes` is false."""

    outer_lr: float = field(1e-3, **positive())
    gmps: GMPSOptions = GMPSOptions()


@flax.struct.dataclass
class GMPSState(MetaState):  # params: {"policy": θ, "step_sizes": α shaped like θ}
    train_tasks: dict  # the T meta-training tasks, leading axis T
    demos: DemonstrationBuffer  # [T, D, ...], the demonstrations, fixed after `prepare`
    dagger: DaggerRing  # [T, B, ...], states the adapted policies visited, expert-labelled
    expert_params: dict  # experts, leading axis T (zeros when there are none)


def clipped_importance_weighted_pg_loss(policy: GaussianPolicy, params, batch,
                                        clip: float):
    """`importance_weighted_pg_loss` with the weights sg(π_θ/π_θinit) clipped to
    [1/clip, clip]: as θ moves away from the sampling θ_init during the many imitation
    steps on one batch, a narrow policy's weights can grow by orders of magnitude and
    the inner step with them; clipped, the inner gradient stays bounded. At θ = θ_init
    it is the plain policy gradient, as unclipped."""
    log_probs = policy.log_prob(params, batch.observations, batch.actions)
    log_weights = jnp.clip(jax.lax.stop_gradient(log_probs - batch.log_probs),
                           -np.log(clip), np.log(clip))
    return -masked_mean(log_probs * jnp.exp(log_weights) * batch.advantages, batch.masks)


def adapted_std_metrics(post_batch) -> dict:
    """σ of the adapted policies φ_i that sampled the post-update phase: the mean over
    tasks and the largest, so an inner step that widens one task's policy shows."""
    per_task = jnp.mean(jnp.exp(post_batch.log_stds[..., 0, 0, :]), axis=-1)  # [M]
    return {"adapted_std": jnp.mean(per_task), "adapted_std_max": jnp.max(per_task)}


class GMPS(MetaLearner):
    name = "gmps"
    config_class = GMPSConfig

    def __init__(self, config: GMPSConfig, env: TaskEnv, policy: GaussianPolicy):
        if config.min_std is not None:
            raise ConfigError("config: min_std: gmps floors its meta-policy's σ with "
                              "gmps.min_std; set that instead")
        if config.inner_steps != 1:
            raise ConfigError("config: inner_steps: gmps takes one inner step; expected 1")
        if config.meta_batch_size > config.gmps.num_train_tasks:
            raise ConfigError("config: meta_batch_size: at most gmps.num_train_tasks "
                              f"({config.gmps.num_train_tasks}) for gmps")
        env.check_training_task_count(config.gmps.num_train_tasks, "gmps.num_train_tasks")
        g = config.gmps
        if g.dagger_start > 0 and g.dagger_every == 0:
            raise ConfigError("config: gmps.dagger_start: needs DAgger on "
                              "(gmps.dagger_every >= 1); it is 0")
        if (g.imitation_steps_switch > 0) != (g.imitation_steps_late > 0):
            raise ConfigError("config: gmps.imitation_steps_switch, gmps.imitation_steps_late:"
                              " set both (an iteration >= 1 and a step count >= 1) or neither")
        if g.bias_transform_size > 0:
            policy = BiasTransformPolicy(policy.observation_size, policy.action_size,
                                         tuple(policy.hidden_sizes), policy.activation,
                                         init_std=policy.init_std,
                                         bias_size=g.bias_transform_size)
        policy = dataclasses.replace(policy, min_std=g.min_std)
        super().__init__(config, env, policy)
        self.expert_policy = GaussianPolicy(env.observation_size, env.action_size,
                                            tuple(g.expert_hidden_sizes), g.expert_activation)
        self.action_bound = env.raw_action_bound()
        self.optimizer = optax.adam(config.outer_lr, b1=0.9, b2=0.999, eps=1e-8)
        self.expert_env_steps = 0

    def host_state(self) -> dict:
        """The experts' own environment steps, counted apart from the meta-training
        steps in `env_steps` (reported in every metrics record)."""
        return {"expert_env_steps": self.expert_env_steps}

    def load_host_state(self, saved: dict) -> None:
        super().load_host_state(saved)
        self.expert_env_steps = int(saved.get("expert_env_steps", 0))

    def step_sizes(self, params):
        if self.config.gmps.learned_step_sizes:
            return params["step_sizes"]
        return self.config.inner_lr

    def init(self, key: jax.Array) -> GMPSState:
        """A state of the right shapes, with empty buffers; `prepare` fills them."""
        g = self.config.gmps
        init_key, task_key, key = jax.random.split(key, 3)
        theta = self.policy.init(init_key)
        params = {"policy": theta,
                  "step_sizes": jax.tree.map(lambda x: jnp.full_like(x, g.step_size_init),
                                             theta)}
        if not g.learned_step_sizes:
            params = {"policy": theta}
        experts = jax.vmap(self.expert_policy.init)(jax.random.split(key, g.num_train_tasks))
        experts = jax.tree.map(jnp.zeros_like, experts)
        T, D, B = g.num_train_tasks, g.demo_buffer_size, g.dagger_buffer_size
        obs, act = self.env.observation_size, self.env.action_size
        return GMPSState(
            params=params, opt_state=self.optimizer.init(params), key=key,
            iteration=jnp.zeros((), jnp.int32),
            train_tasks=self.env.training_tasks(task_key, T),
            demos=DemonstrationBuffer.empty(T, D, obs, act),
            dagger=DaggerRing.empty(T, B, obs, act),
            expert_params=experts)

    def prepare(self, state: GMPSState, seed: int = 0) -> GMPSState:
        """Phase 1, on the host before training: load the demonstrations (and experts)
        from `gmps.demos`, or train per-task experts and record their demonstrations."""
        g = self.config.gmps
        if g.demos is not None:
            demos = load_demonstrations(g.demos, self.env)
        else:
            demos = self.train_experts(state.train_tasks, seed)
        T, D = demos.observations.shape[:2]
        if T != g.num_train_tasks:
            raise ConfigError(f"config: gmps.num_train_tasks: {g.num_train_tasks}, but the "
                              f"demonstrations hold {T} tasks")
        if D > g.demo_buffer_size:
            raise ConfigError(f"config: gmps.demo_buffer_size: {g.demo_buffer_size} is "
                              f"smaller than the {D} demonstration steps per task")
        if g.dagger_every > 0 and demos.expert_params is None:
            raise ConfigError("config: gmps.dagger_every: DAgger needs the experts to label "
                              "states, and the demonstrations file has none")
        expert_params = state.expert_params
        if demos.expert_params is not None:
            expert_params = jax.tree.map(jnp.asarray, demos.expert_params)
            if jax.tree.structure(expert_params) != jax.tree.structure(state.expert_params) or any(
                    a.shape != b.shape for a, b in zip(jax.tree.leaves(expert_params),
                                                       jax.tree.leaves(state.expert_params))):
                raise ConfigError("config: gmps.expert_hidden_sizes: does not match the "
                                  "experts in the demonstrations file")
            if demos.activation != g.expert_activation:
                raise ConfigError(f"config: gmps.expert_activation: {g.expert_activation!r}, "
                                  "but the experts in the demonstrations file use "
                                  f"{demos.activation!r}")
        self.expert_env_steps = int(demos.expert_env_steps)
        return state.replace(
            train_tasks=jax.tree.map(jnp.asarray, demos.tasks),
            demos=DemonstrationBuffer.from_demonstrations(demos, g.demo_buffer_size,
                                                          self.action_bound),
            expert_params=expert_params)

    def train_experts(self, tasks, seed: int):
        """Experts mode: one PPO expert per training task (all vmapped, one compiled
        program) and their demonstrations, as `metarl experts` would write them."""
        g = self.config.gmps
        config = ExpertConfig(
            num_tasks=g.num_train_tasks, iterations=g.expert_iterations,
            horizon=self.config.horizon, hidden_sizes=tuple(g.expert_hidden_sizes),
            activation=g.expert_activation, seed=seed)
        train_key, demo_key = jax.random.split(jax.random.PRNGKey(seed + 7919))
        return train_and_collect(self.env, tasks, config, train_key, demo_key)[0]

    def outer_loss(self, params, batch, demo_observations, demo_actions, demo_weights):
        """mean_i imitation(θ'_i), θ'_i = θ − α ⊙ ∇L_in(θ; batch_i) (batch [M, N, H]),
        on each task's expert data ([M, D, ...], `demo_weights` [M, D] masking padding)."""
        step_sizes = self.step_sizes(params)
        clip = self.config.gmps.importance_clip
        inner_loss = importance_weighted_pg_loss if clip == 0 else functools.partial(
            clipped_importance_weighted_pg_loss, clip=clip)

        def task_loss(task_batch, observations, actions, weights):
            adapted = inner_update(inner_loss, self.policy, params["policy"], task_batch,
                                   step_sizes)
            return imitation_loss(self.policy, adapted, observations, actions, weights,
                                  self.config.gmps.imitation, self.config.gmps.std_penalty)

        return jnp.mean(jax.vmap(task_loss)(batch, demo_observations, demo_actions,
                                            demo_weights))

    def adaptation_returns(self, params, key, num_tasks, adapt_steps, episodes_per_task):
        """Meta-test: ordinary PG steps from θ with the learned step sizes, fresh tasks."""
        return adaptation_returns(self.env, self.policy, self.config, params["policy"], key,
                                  num_tasks, adapt_steps, episodes_per_task,
                                  log_likelihood_loss, inner_lr=self.step_sizes(params))

    def expert_data(self, state: GMPSState, task_ids):
        """The imitation targets of tasks `task_ids`: their demonstrations, then (with
        DAgger) their DAgger rings; observations, labels and 0/1 weights."""
        parts = [state.demos.take(task_ids)]
        if self.config.gmps.dagger_every > 0:
            parts.append(state.dagger.take(task_ids))
        return tuple(jnp.concatenate(part, axis=1) for part in zip(*parts))

    def meta_iteration(self, state: GMPSState):
        c, g = self.config, self.config.gmps
        key, choice_key, sample_key = jax.random.split(state.key, 3)

        # 1. M of the T training tasks; meta-test adaptation from θ on them.
        task_ids = jax.random.choice(choice_key, g.num_train_tasks, (c.meta_batch_size,),
                                     replace=False)
        tasks = jax.tree.map(lambda x: x[task_ids], state.train_tasks)
        pre_batches, post_batch = sample_adaptation_phases(
            self.env, self.policy, c, state.params["policy"], tasks, sample_key,
            inner_loss=log_likelihood_loss, inner_lr=self.step_sizes(state.params))
        batch = jax.tree.map(lambda x: x[:, 0], pre_batches)  # θ's episodes, [M, N, H]

        # 2. Many Adam steps of imitation through the inner step, on θ's batch.
        expert_observations, expert_labels, expert_weights = self.expert_data(state, task_ids)

        def imitation_step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(self.outer_loss)(
                params, batch, expert_observations, expert_labels, expert_weights)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def imitate(steps: int):
            def run(carry):
                (params, opt_state), losses = jax.lax.scan(imitation_step, carry, None,
                                                           length=steps)
                return params, opt_state, losses[0], losses[-1]
            return run

        carry = (state.params, state.opt_state)
        # Both lengths are compiled and the iteration picks one. Under a vmapped sweep
        # (members batched on an accelerator) the predicate is batched, so both run.
        if g.imitation_steps_late > 0:
            params, opt_state, first_loss, last_loss = jax.lax.cond(
                state.iteration + 1 >= g.imitation_steps_switch,
                imitate(g.imitation_steps_late), imitate(g.imitation_steps), carry)
        else:
            params, opt_state, first_loss, last_loss = imitate(g.imitation_steps)(carry)

        # 3. DAgger: the adapted policies' states, labelled by the experts, to the ring.
        dagger = state.dagger
        if g.dagger_every > 0:
            def aggregate(ring: DaggerRing) -> DaggerRing:
                visited = post_batch.observations.reshape(c.meta_batch_size, -1,
                                                          self.env.observation_size)
                masks = post_batch.masks.reshape(c.meta_batch_size, -1)
                labels = expert_actions(self.expert_policy, state.expert_params, task_ids,
                                        visited, self.action_bound)
                return ring.append(task_ids, visited, labels, masks)

            iteration = state.iteration + 1
            due = (iteration % g.dagger_every == 0) & (iteration >= g.dagger_start)
            dagger = jax.lax.cond(due, aggregate, lambda ring: ring, dagger)

        metrics = {**phase_returns(pre_batches, post_batch),
                   "imitation_loss_first": first_loss, "imitation_loss": last_loss,
                   "dagger_fill": jnp.mean(dagger.counts.astype(jnp.float32)),
                   "policy_std": jnp.mean(jnp.exp(self.policy.log_std(params["policy"]))),
                   # How far the imitation steps moved θ from the policy that sampled.
                   "theta_kl": jnp.mean(jax.vmap(kl_to_sampler, in_axes=(None, None, 0))(
                       self.policy, params["policy"], batch)),
                   **adapted_std_metrics(post_batch)}
        if g.learned_step_sizes:
            metrics["step_size"] = jnp.mean(jnp.concatenate(
                [jnp.ravel(a) for a in jax.tree.leaves(params["step_sizes"])]))
            metrics["step_size_log_std"] = jnp.mean(
                params["step_sizes"]["params"]["log_std"])
        new_state = state.replace(params=params, opt_state=opt_state, key=key,
                                  iteration=state.iteration + 1, dagger=dagger)
        return new_state, metrics
