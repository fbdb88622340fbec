"""`metarl info`: the versions, platform and devices a run would use, for bug reports and
for checking that an accelerator is seen."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

# Distributions whose versions matter to a run, as pip names them.
PACKAGES = ("metarl-jax", "jax", "jaxlib", "flax", "optax", "brax", "orbax-checkpoint",
            "mujoco", "mujoco-mjx")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _bytes(count) -> str:
    return f"{count / 2 ** 30:.1f} GiB"


def device_memory(device) -> str:
    """In use and limit as JAX reports them; `n/a` where it reports none (the CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if not stats or "bytes_limit" not in stats:
        return "n/a"
    return f"{_bytes(stats.get('bytes_in_use', 0))} in use of {_bytes(stats['bytes_limit'])}"


def collect() -> list[tuple[str, str]]:
    """(label, value) rows; starts JAX's backends (which fixes the CPU split)."""
    import jax

    rows = [(name, package_version(name)) for name in PACKAGES]
    rows += [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", f"{platform.platform()} ({platform.machine()}), "
                     f"{os.cpu_count()} CPU cores"),
        ("XLA_FLAGS", os.environ.get("XLA_FLAGS") or "(not set)"),
        ("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS") or "(not set)"),
        ("backend", jax.default_backend()),
    ]
    split = jax.config.jax_num_cpu_devices
    cpu_devices = len(jax.devices("cpu"))
    rows.append(("CPU split", f"{cpu_devices} CPU device{'s' * (cpu_devices != 1)} "
                              f"(jax_num_cpu_devices {split}"
                              f"{', the default' if split < 0 else ''})"))
    for device in jax.devices():
        rows.append((f"device {device.id}", f"{device.platform} {device.device_kind}, "
                                            f"memory {device_memory(device)}"))
    return rows


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
