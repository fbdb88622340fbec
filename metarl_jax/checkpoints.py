"""Checkpoints of the full training state with orbax-checkpoint.

A checkpoint holds the algorithm's state pytree (parameters, optimiser state, random
key, iteration, algorithm state such as KL coefficients) plus a small JSON record of the
host-side counters (environment steps, elapsed time). Orbax writes each step into a
temporary directory and renames it into place when complete, so a process killed
mid-write leaves the earlier checkpoints untouched and the partial one invisible.

Every checkpoint also records a SHA-256 digest of the state's array data. A checkpoint
whose data no longer matches its digest (a flipped bit on disk, a truncated file), or
that cannot be read at all, is skipped with a warning by `restore_latest_intact`, which
falls back to the newest intact one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

DIGEST_KEY = "state_sha256"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint's array data does not match the digest saved with it."""


class NoIntactCheckpoint(RuntimeError):
    """Checkpoints exist but none can be restored intact."""


def state_digest(state) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)  # replicated: every copy is the same
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class Checkpointer:
    """Saves and restores `(state, host_info)` under `directory/<iteration>/`."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                     enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def save(self, iteration: int, state, host_info: dict) -> None:
        host_info = {**host_info, DIGEST_KEY: state_digest(state)}
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
        Raises CorruptCheckpoint when the restored data does not match its digest.
        """
        if iteration is None:
            iteration = self.latest_iteration()
        if iteration is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        restored = self.manager.restore(iteration, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
        state, host = restored["state"], dict(restored["host"])
        expected = host.pop(DIGEST_KEY, None)  # None: written without one
        if expected is not None and state_digest(state) != expected:
            raise CorruptCheckpoint(f"checkpoint {iteration} in {self.directory}: its data "
                                    "does not match the digest saved with it")
        return state, host

    def restore_latest_intact(self, template_state):
        """(iteration, state, host_info) of the newest checkpoint that restores and
        matches its digest; None when there is no checkpoint at all.

        Raises NoIntactCheckpoint when there are checkpoints but none is intact.
        """
        skipped = []
        for iteration in reversed(self.all_iterations()):
            try:
                state, host = self.restore(template_state, iteration)
            except CorruptCheckpoint:
                problem = "is corrupt: its data does not match the digest saved with it"
            except Exception as error:  # unreadable files, or a state of another layout
                problem = (f"cannot be restored ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:160] if str(error) else ''})")
            else:
                self._set_aside(skipped)
                return iteration, state, host
            skipped.append(iteration)
            print(f"warning: checkpoint {iteration} in {self.directory} {problem}; "
                  f"skipping it (moved to {self.directory}.corrupt/{iteration})",
                  file=sys.stderr)
        if skipped:
            raise NoIntactCheckpoint(
                f"no intact checkpoint in {self.directory}: "
                f"{', '.join(map(str, skipped))} cannot be restored (see the warnings); "
                "the run cannot be resumed (start it again without --resume, with --force)")
        return None

    def _set_aside(self, iterations: list[int]) -> None:
        """Moves corrupt checkpoints out of the way (kept, for inspection), so that the
        resumed run writes its own at those iterations again."""
        if not iterations:
            return
        aside = self.directory + ".corrupt"
        os.makedirs(aside, exist_ok=True)
        for iteration in iterations:
            target = os.path.join(aside, str(iteration))
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(self.directory, str(iteration)), target)
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def close(self) -> None:
        self.manager.close()
