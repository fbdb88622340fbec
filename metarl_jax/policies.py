"""The Gaussian MLP policy of docs/algorithms.md §0 and diagonal-Gaussian helpers.

Parameters are a plain pytree (`{"params": {...}}` from flax), so inner adaptation is
ordinary arithmetic on pytrees and every leaf, `log_std` included, is adapted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)
ACTIVATIONS = {"tanh": jnp.tanh, "relu": nn.relu}
# Output layers at most this wide are computed one column at a time on CPU (see
# `mlp_mean`).
COLUMNWISE_OUTPUT_MAX = 4


class _GaussianMLP(nn.Module):
    hidden_sizes: Sequence[int]
    action_size: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, obs):
        act = ACTIVATIONS[self.activation]
        x = obs
        for width in self.hidden_sizes:
            x = act(nn.Dense(width, kernel_init=nn.initializers.glorot_uniform(),
                             bias_init=nn.initializers.zeros)(x))
        mean = nn.Dense(self.action_size, kernel_init=nn.initializers.glorot_uniform(),
                        bias_init=nn.initializers.zeros)(x)
        # State-independent log standard deviation, learned and adapted like any weight.
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_size,))
        return mean, jnp.broadcast_to(log_std, mean.shape)


@dataclasses.dataclass(frozen=True)
class GaussianPolicy:
    """Diagonal-Gaussian policy with an MLP mean and a learned state-independent std.

    Hashable, so it can be closed over or passed as a static argument under `jit`.
    """

    observation_size: int
    action_size: int
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    # A floor under σ: the policy uses max(log_std, log min_std), as the reference
    # meta-policies do (their `min_std`); below it the parameter gets no gradient.
    min_std: float | None = None
    # σ at initialisation (every entry of `log_std` starts at its log), as the reference
    # policies' `init_std`.
    init_std: float = 1.0

    @property
    def network(self) -> _GaussianMLP:
        return _GaussianMLP(tuple(self.hidden_sizes), self.action_size, self.activation)

    def init(self, key: jax.Array):
        params = self.network.init(key, jnp.zeros((self.observation_size,)))
        return self._with_initial_std(params)

    def _with_initial_std(self, params):
        log_std = jnp.full((self.action_size,), math.log(self.init_std), jnp.float32)
        return {"params": {**params["params"], "log_std": log_std}}

    def distribution(self, params, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (mean, log_std), each shaped like `obs[..., :action_size]`.

        Computes what `self.network.apply(params, obs)` computes, on the same parameter
        tree, in the form that differentiates fastest (`mlp_mean`).
        """
        mean = mlp_mean(params, obs, self.activation)
        return mean, jnp.broadcast_to(self.log_std(params), mean.shape)

    def log_std(self, params) -> jax.Array:
        """The log σ the policy acts with: its parameter, floored at log `min_std`."""
        log_std = params["params"]["log_std"]
        if self.min_std is None:
            return log_std
        return jnp.maximum(log_std, jnp.log(self.min_std))

    def log_prob(self, params, obs: jax.Array, action: jax.Array) -> jax.Array:
        mean, log_std = self.distribution(params, obs)
        return gaussian_log_prob(mean, log_std, action)

    def sample(self, params, obs: jax.Array, key: jax.Array):
        """Returns (action, log_prob, mean, log_std) for one draw per observation."""
        mean, log_std = self.distribution(params, obs)
        action = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)
        return action, gaussian_log_prob(mean, log_std, action), mean, log_std


@dataclasses.dataclass(frozen=True)
class BiasTransformPolicy(GaussianPolicy):
    """A `GaussianPolicy` whose MLP reads the observation with a learned vector appended.

    The bias transformation (Finn et al. 2017), as in GMPS's reference meta-policy: a
    parameter `bias_transformation` of `bias_size` entries (initialised to `bias_init`)
    is concatenated to every observation before the first layer, so the first layer's
    kernel has `observation_size + bias_size` rows. It is an ordinary leaf of the
    parameter tree: adapted by the inner step and given its own step size like every
    other leaf. The observation itself keeps `observation_size` entries.
    """

    bias_size: int = 4
    bias_init: float = 1.0

    def init(self, key: jax.Array):
        params = self.network.init(key, jnp.zeros((self.observation_size + self.bias_size,)))
        params = self._with_initial_std(params)
        return {"params": {**params["params"],
                           "bias_transformation": jnp.full((self.bias_size,), self.bias_init,
                                                           jnp.float32)}}

    def distribution(self, params, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        bias = params["params"]["bias_transformation"]
        inputs = jnp.concatenate(
            [obs, jnp.broadcast_to(bias, obs.shape[:-1] + bias.shape).astype(obs.dtype)],
            axis=-1)
        mean = mlp_mean(params, inputs, self.activation)
        return mean, jnp.broadcast_to(self.log_std(params), mean.shape)


def mlp_mean(params, obs: jax.Array, activation: str = "tanh") -> jax.Array:
    """The MLP mean of `_GaussianMLP`, written out on its flax parameter tree.

    Two layout choices, both measured on the per-task second-order outer losses (ProMP,
    MAML-TRPO on point-nav, 2-core CPU; benchmarks/RESULTS.md):
    - the sample axes are flattened first, so every layer is one [samples, in] × [in, out]
      product: on [N, H, in] inputs XLA otherwise transposes [N, H, 64] activations
      for each weight gradient;
    - on CPU, an output layer of at most `COLUMNWISE_OUTPUT_MAX` units is a stack of
      matrix-vector products: XLA's CPU dot is slow on the weight gradient
      Σ_s x_s δ_sᵀ when δ has only a few columns.
    """
    layers = params["params"]
    num_layers = sum(name.startswith("Dense_") for name in layers)
    act = ACTIVATIONS[activation]
    batch_shape = obs.shape[:-1]
    x = obs.reshape(-1, obs.shape[-1])
    for i in range(num_layers - 1):
        x = act(x @ layers[f"Dense_{i}"]["kernel"] + layers[f"Dense_{i}"]["bias"])
    kernel = layers[f"Dense_{num_layers - 1}"]["kernel"]
    bias = layers[f"Dense_{num_layers - 1}"]["bias"]
    if kernel.shape[1] <= COLUMNWISE_OUTPUT_MAX and jax.default_backend() == "cpu":
        mean = jnp.stack([x @ kernel[:, j] for j in range(kernel.shape[1])], axis=-1) + bias
    else:
        mean = x @ kernel + bias
    return mean.reshape(*batch_shape, kernel.shape[1])


def gaussian_log_prob(mean, log_std, action):
    """log N(action; mean, diag(exp(log_std)²)), *summed* over the action dimensions.

    The sum (not the mean) is the reference definition; averaging would silently divide
    the effective inner step size by the action dimension.
    """
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * LOG_2PI, axis=-1)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """KL(p ‖ q) between diagonal Gaussians, closed form, summed over action dimensions:

        Σ_j [ log σ_q/σ_p + (σ_p² + (μ_p − μ_q)²) / (2 σ_q²) − 1/2 ]
    """
    var_p = jnp.exp(2.0 * log_std_p)
    var_q = jnp.exp(2.0 * log_std_q)
    return jnp.sum(log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2.0 * var_q)
                   - 0.5, axis=-1)


def gaussian_entropy(log_std):
    """Differential entropy of a diagonal Gaussian, summed over action dimensions."""
    return jnp.sum(log_std + 0.5 * (LOG_2PI + 1.0), axis=-1)
