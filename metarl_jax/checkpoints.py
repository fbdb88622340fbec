"""Checkpoints of the full training state with orbax-checkpoint.

A checkpoint holds the algorithm's state pytree (parameters, optimiser state, random
key, iteration, algorithm state such as KL coefficients) plus a small JSON record of the
host-side counters (environment steps, elapsed time). Orbax writes each step into a
temporary directory and renames it into place when complete, so a process killed
mid-write leaves the earlier checkpoints untouched and the partial one invisible.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores `(state, host_info)` under `directory/<iteration>/`."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, iteration: int, state, host_info: dict) -> None:
        self.manager.save(iteration, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_info)),
            force=True)
        self.manager.wait_until_finished()

    def latest_iteration(self) -> int | None:
        return self.manager.latest_step()

    def all_iterations(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, template_state, iteration: int | None = None):
        """Returns (state, host_info) of `iteration` (default: the latest).

        `template_state` gives the tree structure, shapes and dtypes (an `init` state).
        """
        if iteration is None:
            iteration = self.latest_iteration()
        if iteration is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        restored = self.manager.restore(iteration, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["host"])

    def close(self) -> None:
        self.manager.close()
