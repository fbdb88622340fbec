"""Configuration: frozen dataclasses, YAML files, `--set key=value` overrides, validation.

A run's configuration is flat, with the names of the papers' hyperparameters, plus an
`env` section:

    algo: promp
    seed: 0
    iterations: 100
    env: {name: point-nav, backend: generalized}
    meta_batch_size: 20
    inner_lr: 0.1
    ...

Every value is checked (known key, type, range) before anything is built or compiled,
and a mistake raises `ConfigError` whose one-line message names the field and what is
allowed. The defaults a run gets from its task (the published settings) and the
built-in experiment are filled in by `metarl_jax.run_config.resolve_config`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """A configuration mistake; `str()` is one line naming the field."""


# --- field constraints --------------------------------------------------------------


def check(predicate: Callable[[Any], bool], allowed: str) -> dict:
    """Field metadata: the value must satisfy `predicate`; `allowed` says what passes."""
    return {"check": predicate, "allowed": allowed}


def positive() -> dict:
    return check(lambda v: v > 0, "> 0")


def at_least(bound) -> dict:
    return check(lambda v: v >= bound, f">= {bound}")


def unit_interval(open_low: bool = False) -> dict:
    if open_low:
        return check(lambda v: 0 < v <= 1, "in (0, 1]")
    return check(lambda v: 0 <= v <= 1, "in [0, 1]")


def one_of(*choices) -> dict:
    return check(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def field(default, **metadata):
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not allowed in configs")
    return dataclasses.field(default=default, metadata=metadata)


# --- dataclasses ----------------------------------------------------------------------


# The Brax physics pipelines a Brax task can run on (`env.backend`); the first is the
# default of a Brax task that names none of its own (`BraxTaskEnv.default_backend`).
# Pure-JAX tasks ignore the backend.
BRAX_BACKENDS = ("generalized", "positional", "spring", "mjx")


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    # A registered task (`metarl envs`) or `module:attribute` naming a task of your own.
    name: str = "point-nav"
    # None: the task's own default, filled in when the configuration is resolved.
    backend: str | None = field(None, **one_of(*BRAX_BACKENDS))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """What every on-policy meta-learner shares: batch sizes, adaptation, advantages."""

    meta_batch_size: int = field(40, **at_least(1))
    episodes_per_task: int = field(20, **at_least(1))
    horizon: int | None = field(None, **at_least(1))  # None: the environment's default
    inner_steps: int = field(1, **at_least(1))
    inner_lr: float = field(0.1, **at_least(0.0))
    discount: float = field(0.99, **unit_interval())
    gae_lambda: float = field(1.0, **unit_interval())
    normalize_advantages: bool = True
    hidden_sizes: tuple[int, ...] = field((64, 64), **check(
        lambda v: len(v) >= 1 and all(w >= 1 for w in v), "a non-empty list of widths >= 1"))
    activation: str = field("tanh", **one_of("tanh", "relu"))  # hidden layers of the policy
    init_std: float = field(1.0, **positive())  # the policy's σ before training (rllab's)
    # A floor under the policy's σ (`GaussianPolicy.min_std`); None: none, in effect the
    # reference policies' 1e-6.
    min_std: float | None = field(None, **positive())


# --- loading --------------------------------------------------------------------------


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    return {type(None): "null"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(value, annotation, name: str):
    """Converts a YAML value to `annotation` or raises ConfigError naming `name`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, name)
            except ConfigError:
                continue
    elif annotation is type(None):
        if value is None:
            return None
    elif origin is tuple:
        item_type = typing.get_args(annotation)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item_type, name) for v in value)
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-4 (no dot) as a string.
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {annotation!r}")
    raise ConfigError(f"config: {name}: expected {_type_name(annotation)}, got {value!r}")


def build_dataclass(cls, values: dict, prefix: str = ""):
    """Instantiates config dataclass `cls` from `values`, checking keys, types, ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"config: unknown key {prefix + unknown[0]!r}; allowed: "
                          + ", ".join(prefix + k for k in fields))
    kwargs = {}
    for name, value in values.items():
        full_name = prefix + name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"config: {full_name}: expected a mapping, got {value!r}")
            kwargs[name] = build_dataclass(annotation, value, full_name + ".")
            continue
        value = _coerce(value, annotation, full_name)
        constraint = fields[name].metadata.get("check")
        if value is not None and constraint is not None:
            if not constraint(value):
                raise ConfigError(f"config: {full_name}: {value!r} not allowed; expected "
                                  f"{fields[name].metadata['allowed']}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(config) -> dict:
    """A plain, YAML-ready dict (tuples become lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(config)


def parse_overrides(assignments: typing.Iterable[str]) -> dict:
    """Turns `["env.backend=spring", "inner_lr=0.05"]` into a nested dict.

    Values are read as YAML scalars/lists, so `0.05`, `true`, `[64, 64]` and `null` get
    their natural types.
    """
    nested: dict = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"config: --set expects KEY=VALUE, got {assignment!r}")
        key, raw = assignment.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config: {key}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as error:
        raise ConfigError(f"config: cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config: {path} is not valid YAML: "
                          f"{str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys to values")
    return data
