"""GMPS — guided meta-policy search (Mendonca et al., NeurIPS 2019), ALGORITHMS.md §4.

Reinforcement learning in the inner loop, supervised imitation in the outer loop. Phase 1
(per-task experts, or a demonstrations file) happens once, in `prepare`; phase 2 is the
compiled `meta_iteration`, read top to bottom:

1. M of the T meta-training tasks; N episodes per task from π_θ (θ_init = θ).
2. The outer loss: per task, θ'_i = θ − α ⊙ ∇L_in(θ) with the importance-weighted PG
   loss (α per parameter, learned, or a fixed scalar), then the imitation loss of θ'_i on
   that task's expert data; `imitation_steps` Adam steps on the same batch (a scan),
   differentiating through the inner step, θ, α and log σ all trained.
3. The post-update phase: the adapted policies of the new θ roll out (post_return).
4. DAgger, every `dagger_every` iterations: the states the adapted policies visited in
   step 3 are labelled with the task's expert action and appended to a bounded per-task
   buffer, held in the training state (so it is checkpointed with it).

Meta-test (`adaptation_returns`): the ordinary policy-gradient step(s) from θ with the
learned step sizes on new tasks, using only their reward.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarl_jax.algorithms.common import (MetaLearner, adaptation_returns,
                                          standard_advantages)
from metarl_jax.config import (ConfigError, SamplingConfig, at_least, field, one_of,
                               positive)
from metarl_jax.distributed import shard_tasks
from metarl_jax.envs.base import TaskEnv
from metarl_jax.losses import (imitation_loss, importance_weighted_pg_loss, inner_update,
                               log_likelihood_loss)
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import collect


@dataclasses.dataclass(frozen=True)
class GMPSOptions:
    # Demonstrations file (`metarl experts` writes one); null: train experts first.
    demos: str | None = None
    num_train_tasks: int = field(40, **at_least(1))  # T, the finite meta-training set
    expert_iterations: int = field(200, **at_least(1))  # PPO updates in experts mode
    expert_hidden_sizes: tuple[int, ...] = (64, 64)
    learned_step_sizes: bool = True
    step_size_init: float = field(0.5, **positive())
    imitation: str = field("mse", **one_of("mse", "nll"))
    imitation_steps: int = field(500, **at_least(1))
    dagger_every: int = field(0, **at_least(0))  # 0: no DAgger
    buffer_size: int = field(2000, **at_least(1))  # per task, demonstrations included


@dataclasses.dataclass(frozen=True)
class GMPSConfig(SamplingConfig):
    """`inner_lr` is the fixed α when `gmps.learned_step_sizes` is false."""

    outer_lr: float = field(1e-3, **positive())
    gmps: GMPSOptions = GMPSOptions()


@flax.struct.dataclass
class GMPSState:
    params: dict  # {"policy": θ, "step_sizes": α shaped like θ}
    opt_state: optax.OptState
    key: jax.Array
    iteration: jax.Array
    train_tasks: dict  # the T meta-training tasks, leading axis T
    buffer_observations: jax.Array  # [T, B, obs]
    buffer_actions: jax.Array  # [T, B, act], the experts' actions
    buffer_counts: jax.Array  # [T], filled entries
    buffer_next: jax.Array  # [T], next write position (a ring once full)
    expert_params: dict  # experts, leading axis T (zeros when there are none)


def append_to_buffer(observations, actions, counts, next_slot, new_observations,
                     new_actions, new_masks):
    """Appends the masked-in rows of `new_*` ([K, ...], mask [K]) to ONE task's ring
    buffer ([B, ...]); once full, the oldest entries are overwritten."""
    capacity = observations.shape[0]
    offsets = jnp.cumsum(new_masks.astype(jnp.int32)) - 1
    slots = jnp.where(new_masks > 0, (next_slot + offsets) % capacity, capacity)  # drop
    observations = observations.at[slots].set(new_observations, mode="drop")
    actions = actions.at[slots].set(new_actions, mode="drop")
    added = jnp.sum(new_masks > 0).astype(jnp.int32)
    return (observations, actions, jnp.minimum(counts + added, capacity),
            (next_slot + added) % capacity)


class GMPS(MetaLearner):
    name = "gmps"
    config_class = GMPSConfig

    def __init__(self, config: GMPSConfig, env: TaskEnv, policy: GaussianPolicy):
        if config.inner_steps != 1:
            raise ConfigError("config: inner_steps: gmps takes one inner step; expected 1")
        if config.meta_batch_size > config.gmps.num_train_tasks:
            raise ConfigError("config: meta_batch_size: at most gmps.num_train_tasks "
                              f"({config.gmps.num_train_tasks}) for gmps")
        env.check_training_task_count(config.gmps.num_train_tasks, "gmps.num_train_tasks")
        super().__init__(config, env, policy)
        self.expert_policy = GaussianPolicy(env.observation_size, env.action_size,
                                            tuple(config.gmps.expert_hidden_sizes))
        self.optimizer = optax.adam(config.outer_lr, b1=0.9, b2=0.999, eps=1e-8)
        self.expert_env_steps = 0

    @property
    def env_steps_per_iteration(self) -> int:
        c = self.config
        return 2 * c.meta_batch_size * c.episodes_per_task * c.horizon  # pre + post

    def host_counters(self) -> dict:
        """Reported in every metrics record: the experts' own environment steps, counted
        apart from the meta-training steps in `env_steps`."""
        return {"expert_env_steps": self.expert_env_steps}

    def step_sizes(self, params):
        if self.config.gmps.learned_step_sizes:
            return params["step_sizes"]
        return self.config.inner_lr

    def init(self, key: jax.Array) -> GMPSState:
        """A state of the right shapes, with an empty buffer; `prepare` fills it."""
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
        T, B = g.num_train_tasks, g.buffer_size
        return GMPSState(
            params=params, opt_state=self.optimizer.init(params), key=key,
            iteration=jnp.zeros((), jnp.int32),
            train_tasks=self.env.training_tasks(task_key, T),
            buffer_observations=jnp.zeros((T, B, self.env.observation_size)),
            buffer_actions=jnp.zeros((T, B, self.env.action_size)),
            buffer_counts=jnp.zeros((T,), jnp.int32), buffer_next=jnp.zeros((T,), jnp.int32),
            expert_params=experts)

    def prepare(self, state: GMPSState, seed: int = 0) -> GMPSState:
        """Phase 1, on the host before training: load the demonstrations (and experts)
        from `gmps.demos`, or train per-task experts and record their demonstrations."""
        from metarl_jax import experts as experts_lib

        g = self.config.gmps
        if g.demos is not None:
            demos = experts_lib.load_demonstrations(g.demos, self.env)
        else:
            demos = self.train_experts(state.train_tasks, seed)
        T, D = demos.observations.shape[:2]
        if T != g.num_train_tasks:
            raise ConfigError(f"config: gmps.num_train_tasks: {g.num_train_tasks}, but the "
                              f"demonstrations hold {T} tasks")
        if D > g.buffer_size:
            raise ConfigError(f"config: gmps.buffer_size: {g.buffer_size} is smaller than the "
                              f"{D} demonstrations per task")
        if g.dagger_every > 0 and demos.expert_params is None:
            raise ConfigError("config: gmps.dagger_every: DAgger needs the experts to label "
                              "states, and the demonstrations file has none")
        pad = g.buffer_size - D
        observations = np.pad(demos.observations, ((0, 0), (0, pad), (0, 0)))
        actions = np.pad(demos.actions, ((0, 0), (0, pad), (0, 0)))
        counts = np.asarray(demos.counts, np.int32)
        expert_params = state.expert_params
        if demos.expert_params is not None:
            expert_params = jax.tree.map(jnp.asarray, demos.expert_params)
            if jax.tree.structure(expert_params) != jax.tree.structure(state.expert_params) or any(
                    a.shape != b.shape for a, b in zip(jax.tree.leaves(expert_params),
                                                       jax.tree.leaves(state.expert_params))):
                raise ConfigError("config: gmps.expert_hidden_sizes: does not match the "
                                  "experts in the demonstrations file")
        self.expert_env_steps = int(demos.expert_env_steps)
        return state.replace(
            train_tasks=jax.tree.map(jnp.asarray, demos.tasks),
            buffer_observations=jnp.asarray(observations, jnp.float32),
            buffer_actions=jnp.asarray(actions, jnp.float32),
            buffer_counts=jnp.asarray(counts), buffer_next=jnp.asarray(counts % g.buffer_size),
            expert_params=expert_params)

    def train_experts(self, tasks, seed: int):
        """Experts mode: one PPO expert per training task (all vmapped, one compiled
        program) and their demonstrations, as `metarl experts` would write them."""
        from metarl_jax import experts as experts_lib

        g = self.config.gmps
        config = experts_lib.ExpertConfig(
            num_tasks=g.num_train_tasks, iterations=g.expert_iterations,
            horizon=self.config.horizon, hidden_sizes=tuple(g.expert_hidden_sizes), seed=seed)
        train_key, demo_key = jax.random.split(jax.random.PRNGKey(seed + 7919))
        expert_params, info = experts_lib.train_experts(self.env, tasks, config, train_key)
        demos = experts_lib.collect_demonstrations(
            self.env, self.expert_policy, expert_params, tasks, demo_key,
            config.demos_per_task, self.config.horizon)
        return experts_lib.Demonstrations(
            env_name=self.env.name, observations=np.asarray(demos.observations),
            actions=np.asarray(demos.actions), counts=np.asarray(demos.counts),
            tasks=jax.device_get(tasks), expert_params=jax.device_get(expert_params),
            hidden_sizes=tuple(g.expert_hidden_sizes),
            expert_env_steps=int(info["env_steps"]) + int(demos.env_steps))

    def outer_loss(self, params, batch, demo_observations, demo_actions, demo_weights):
        """mean_i imitation(θ'_i), θ'_i = θ − α ⊙ ∇L_in(θ; batch_i) (batch [M, N, H])."""
        step_sizes = self.step_sizes(params)

        def task_loss(task_batch, observations, actions, weights):
            adapted = inner_update(importance_weighted_pg_loss, self.policy, params["policy"],
                                   task_batch, step_sizes)
            return imitation_loss(self.policy, adapted, observations, actions, weights,
                                  self.config.gmps.imitation)

        return jnp.mean(jax.vmap(task_loss)(batch, demo_observations, demo_actions,
                                            demo_weights))

    def adaptation_returns(self, params, key, num_tasks, adapt_steps, episodes_per_task):
        """Meta-test: ordinary PG steps from θ with the learned step sizes, fresh tasks."""
        return adaptation_returns(self.env, self.policy, self.config, params["policy"], key,
                                  num_tasks, adapt_steps, episodes_per_task,
                                  log_likelihood_loss, inner_lr=self.step_sizes(params))

    def meta_iteration(self, state: GMPSState):
        c, g = self.config, self.config.gmps
        key, choice_key, sample_key, post_key = jax.random.split(state.key, 4)

        # 1. M of the T training tasks; episodes of π_θ with their advantages.
        task_ids = jax.random.choice(choice_key, g.num_train_tasks, (c.meta_batch_size,),
                                     replace=False)
        tasks = shard_tasks(jax.tree.map(lambda x: x[task_ids], state.train_tasks))
        theta = state.params["policy"]
        batch = standard_advantages(collect(self.env, self.policy, theta, tasks, sample_key,
                                            c.episodes_per_task, c.horizon,
                                            per_task_params=False), c)
        demo_observations = state.buffer_observations[task_ids]
        demo_actions = state.buffer_actions[task_ids]
        demo_weights = (jnp.arange(g.buffer_size)[None, :]
                        < state.buffer_counts[task_ids][:, None]).astype(jnp.float32)

        # 2. Many Adam steps of imitation through the inner step, on this batch.
        def imitation_step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(self.outer_loss)(
                params, batch, demo_observations, demo_actions, demo_weights)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            imitation_step, (state.params, state.opt_state), None, length=g.imitation_steps)

        # 3. The adapted policies of the new θ roll out.
        adapted = jax.vmap(inner_update, in_axes=(None, None, None, 0, None))(
            importance_weighted_pg_loss, self.policy, params["policy"], batch,
            self.step_sizes(params))
        post = collect(self.env, self.policy, adapted, tasks, post_key, c.episodes_per_task,
                       c.horizon)

        # 4. DAgger: label the visited states with the experts' actions, append.
        buffers = (state.buffer_observations, state.buffer_actions, state.buffer_counts,
                   state.buffer_next)
        if g.dagger_every > 0:
            def aggregate(buffers):
                observations, actions, counts, next_slot = buffers
                visited = post.observations.reshape(c.meta_batch_size, -1,
                                                    self.env.observation_size)
                masks = post.masks.reshape(c.meta_batch_size, -1)
                experts = jax.tree.map(lambda x: x[task_ids], state.expert_params)
                labels = jax.vmap(lambda p, o: self.expert_policy.distribution(p, o)[0])(
                    experts, visited)
                updated = jax.vmap(append_to_buffer)(
                    observations[task_ids], actions[task_ids], counts[task_ids],
                    next_slot[task_ids], visited, labels, masks)
                return tuple(full.at[task_ids].set(part)
                             for full, part in zip(buffers, updated))

            due = (state.iteration + 1) % g.dagger_every == 0
            buffers = jax.lax.cond(due, aggregate, lambda b: b, buffers)

        metrics = {"pre_return": jnp.mean(batch.episode_returns()),
                   "post_return": jnp.mean(post.episode_returns()),
                   "imitation_loss_first": losses[0], "imitation_loss": losses[-1],
                   "buffer_fill": jnp.mean(buffers[2].astype(jnp.float32)),
                   "policy_std": jnp.mean(jnp.exp(params["policy"]["params"]["log_std"]))}
        if g.learned_step_sizes:
            metrics["step_size"] = jnp.mean(jnp.concatenate(
                [jnp.ravel(a) for a in jax.tree.leaves(params["step_sizes"])]))
        new_state = state.replace(params=params, opt_state=opt_state, key=key,
                                  iteration=state.iteration + 1,
                                  buffer_observations=buffers[0], buffer_actions=buffers[1],
                                  buffer_counts=buffers[2], buffer_next=buffers[3])
        return new_state, metrics
