"""The host loop: open the run directory, build and compile, run the compiled calls,
log their metrics, checkpoint. Python does nothing between the compiled calls but that.

A run ends in one of five ways, each with its own exception (the CLI's exit status):
done; `TrainingDiverged` (a non-finite metric or parameter: the state before the bad
iteration is checkpointed); `Preempted` (SIGTERM, as schedulers pre-empt jobs) and
`Interrupted` (Ctrl-C), both after checkpointing the last completed iteration; or a
refusal before anything runs (`ConfigError`, `RunDirectoryError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from metarl_jax import distributed, early_signals, loggers, programs, run_dir, watchdog
from metarl_jax.checkpoints import Checkpointer, NoIntactCheckpoint
from metarl_jax.config import ConfigError
from metarl_jax.run_config import RunConfig, build


class TrainingDiverged(RuntimeError):
    """A loss, return or parameter became non-finite."""


class Stopped(RuntimeError):
    """A signal stopped the run after the last completed iteration was checkpointed."""


class Preempted(Stopped):
    """SIGTERM: the scheduler asked the job to stop."""


class Interrupted(Stopped):
    """SIGINT (Ctrl-C)."""


@dataclasses.dataclass
class Training:
    """What `train` returns: the records of the iterations this call ran, and the
    training state after the last one."""

    history: list[dict]
    state: Any


def flatten_metrics(metrics: dict) -> dict:
    """Device metrics → JSON-ready floats; a [K] array `kl` becomes kl_0 … kl_{K-1}."""
    flat = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            flat[name] = float(value)
        else:
            for index, item in enumerate(value.reshape(-1)):
                flat[f"{name}_{index}"] = float(item)
    return flat


class StopSignals:
    """While active, SIGTERM and SIGINT only raise a flag, which the host loop reads
    after each compiled call: the call in flight finishes, its iterations are logged
    and checkpointed, and the run stops. A second Ctrl-C interrupts at once, except
    while a checkpoint is being written (`saving`), which it lets finish first."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._saving = False
        self._interrupt_after_save = False

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            if self._saving:
                self._interrupt_after_save = True
                return
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        pending = early_signals.take_pending()
        if pending is not None:
            self.received = pending
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def saving(self):
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self._interrupt_after_save:
            raise KeyboardInterrupt

    def stop_requested(self) -> bool:
        """Whether to stop after this call; under several processes, whether any of
        them received a signal (all stop together, or their collectives would hang)."""
        stop = self.received is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.asarray(
                [self.received or 0], np.int32))
            received = [int(f) for f in np.ravel(flags) if f]
            if received and self.received is None:
                self.received = received[0]
            stop = bool(received)
        return stop

    def check(self, iteration: int, checkpoint_dir: str | None) -> None:
        if self.received is None:
            return
        where = (f"; iteration {iteration} is checkpointed in {checkpoint_dir}"
                 if checkpoint_dir and iteration else "")
        if self.received == signal.SIGTERM:
            raise Preempted(f"stopped by SIGTERM after iteration {iteration}{where}")
        raise Interrupted(f"interrupted after iteration {iteration}{where}")


def _open_run_directory(config: RunConfig, out_dir: str, force: bool, resume: bool,
                        primary: bool, stack: contextlib.ExitStack):
    """Locks `out_dir` (process 0) and, for a new run, clears it and writes
    config.yaml; returns its Checkpointer."""
    refusal = None
    if primary:
        try:
            os.makedirs(out_dir, exist_ok=True)
            stack.enter_context(run_dir.RunLock(out_dir))
            if not resume:
                run_dir.prepare_output_dir(out_dir, force)
                run_dir.write_config(out_dir, config.to_dict())
        except (ConfigError, run_dir.RunDirectoryError) as error:
            refusal = error
    if distributed.any_process(refusal is not None):  # the others must not wait for it
        raise refusal or run_dir.RunDirectoryError(
            f"process 0 could not prepare the run directory {out_dir} (its error says why)")
    distributed.barrier("run directory prepared")
    checkpointer = Checkpointer(os.path.join(out_dir, run_dir.CHECKPOINT_DIR),
                                max_to_keep=config.run.keep_checkpoints)
    stack.callback(checkpointer.close)
    return checkpointer


def _restore(checkpointer: Checkpointer, state, algorithm):
    """(state, first iteration, env_steps, elapsed seconds) from the newest intact
    checkpoint, or the fresh state when there is none."""
    try:
        found = checkpointer.restore_latest_intact(state)
    except NoIntactCheckpoint as error:
        raise run_dir.RunDirectoryError(str(error)) from None
    if found is None:
        return state, 1, 0, 0.0
    iteration, state, host = found
    algorithm.load_host_state(host.get("algorithm", {}))
    return state, iteration + 1, int(host["env_steps"]), float(host["time_s"])


def _divergence(programs_, call_input, first_iteration: int, offset: int,
                metrics: dict, quantity: str, save, checkpointer, elapsed_at):
    """Checkpoints the state before the bad iteration (replayed from the call's input
    when it is not the call's first) and returns the error to raise."""
    last_good = first_iteration + offset - 1
    save(last_good, programs_.replay(call_input, offset), elapsed_at(offset))
    where = (f"; the last good checkpoint is iteration {last_good} in "
             f"{checkpointer.directory}" if checkpointer and last_good else "")
    name = "parameters" if quantity == "nonfinite_params" else quantity
    return TrainingDiverged(f"training diverged at iteration {first_iteration + offset}: "
                            f"{name} non-finite ({metrics[quantity]}){where}")


def train(config: RunConfig, out_dir: str | None = None, force: bool = False,
          resume: bool = False, progress: bool = True,
          on_iteration: Callable[[dict], None] | None = None) -> Training:
    """Runs meta-iterations up to `config.run.iterations`.

    With `out_dir` (see `metarl_jax.run_dir`): locks it, writes `config.yaml`, appends
    one JSON line per iteration to `metrics.jsonl` and the same scalars to the run's
    `logger` (TensorBoard by default; `metarl_jax.loggers`), and saves the full
    training state every `checkpoint_every` iterations and at the end. With `resume`,
    continues from the newest intact checkpoint: the result is the same, iteration for
    iteration, as a run never interrupted.

    Under `jax.distributed` every process runs this same loop on the global device mesh;
    only process 0 writes the run's files, while all take part in checkpointing.

    Raises TrainingDiverged, Preempted, Interrupted (see the module docstring),
    ConfigError or RunDirectoryError (before anything is compiled).
    """
    run = config.run
    primary = jax.process_index() == 0
    if out_dir is None and resume:
        raise ValueError("resume needs the run directory")
    if out_dir is not None and primary:
        loggers.check_available(run.logger)
    with contextlib.ExitStack() as stack:
        # From here on SIGTERM and Ctrl-C wait for a point where the run can stop whole.
        signals = stack.enter_context(StopSignals())
        checkpointer = (_open_run_directory(config, out_dir, force, resume, primary, stack)
                        if out_dir is not None else None)
        env, _, algorithm = build(config)
        sharding = distributed.sharding_for_tasks(config.algorithm.meta_batch_size,
                                                  run.devices)
        programs.check_memory(config.algorithm, env, sharding)

        state = algorithm.init(jax.random.PRNGKey(run.seed))
        first_iteration, env_steps, elapsed_before = 1, 0, 0.0
        if resume:
            state, first_iteration, env_steps, elapsed_before = _restore(
                checkpointer, state, algorithm)
            if primary:
                run_dir.truncate_metrics(out_dir, first_iteration - 1)
        if first_iteration == 1:
            state = algorithm.prepare(state, run.seed)

        start = time.perf_counter()
        state = jax.device_put(state, distributed.replicated(sharding))
        compiled = programs.IterationPrograms(algorithm, run, sharding)
        compiled.compile_for(first_iteration, state)

        log = bar = None
        if out_dir is not None and primary:
            log = run_dir.MetricsLog(out_dir, first_iteration, run.logger, config.to_dict(),
                                     resume)
            stack.callback(log.close)
        if progress and primary:
            from tqdm.auto import tqdm

            bar = tqdm(total=run.iterations, initial=first_iteration - 1, unit="it",
                       dynamic_ncols=True)
            stack.callback(bar.close)

        def save(iteration, saved_state, elapsed):
            if checkpointer is not None and iteration > 0 and (
                    checkpointer.latest_iteration() or 0) < iteration:
                with signals.saving():
                    checkpointer.save(iteration, saved_state,
                                      {"env_steps": iteration_env_steps(iteration),
                                       "time_s": elapsed, "algorithm": algorithm.host_state()})

        def iteration_env_steps(iteration):
            return env_steps + (iteration - first_iteration + 1) * \
                algorithm.env_steps_per_iteration

        history = []
        dog = watchdog.Watchdog()  # says so on stderr if a compiled call never returns
        completed = None  # (iteration, state, time_s) of the last logged call
        last_done = first_iteration - 1
        checkpoint_dir = checkpointer.directory if checkpointer else None
        if signals.stop_requested():  # while preparing or compiling: nothing new to keep
            signals.check(last_done, checkpoint_dir)
        try:
            for call_start, length in compiled.calls(first_iteration):
                tick = time.perf_counter()
                call_input = state
                with dog.watch(f"meta-iteration call (iterations {call_start}-"
                               f"{call_start + length - 1})"):
                    state, device_metrics = compiled(state, length)
                    host_metrics = jax.device_get(device_metrics)
                per_iteration_s = (time.perf_counter() - tick) / length

                def elapsed_at(offset, tick=tick, per_iteration_s=per_iteration_s):
                    return elapsed_before + tick + offset * per_iteration_s - start

                for offset in range(length):
                    metrics = flatten_metrics(host_metrics if length == 1 else jax.tree.map(
                        lambda x, i=offset: x[i], host_metrics))
                    quantity = programs.first_nonfinite(metrics)
                    if quantity is not None:
                        raise _divergence(compiled, call_input, call_start, offset, metrics,
                                          quantity, save, checkpointer, elapsed_at)
                    del metrics["nonfinite_params"]
                    iteration = call_start + offset
                    record = {"iteration": iteration,
                              "env_steps": iteration_env_steps(iteration),
                              "time_s": elapsed_at(offset + 1), "iteration_s": per_iteration_s,
                              "devices": sharding.mesh.size, **algorithm.host_state(),
                              **metrics}
                    history.append(record)
                    if log is not None:
                        log.write(record)
                last_done = call_start + length - 1
                completed = (last_done, state, history[-1]["time_s"])
                stop = signals.stop_requested()
                if last_done % run.checkpoint_every == 0 or last_done == run.iterations \
                        or stop:
                    save(last_done, state, history[-1]["time_s"])
                if on_iteration:
                    for record in history[-length:]:
                        on_iteration(record)
                if bar is not None:
                    steps_per_s = algorithm.env_steps_per_iteration / per_iteration_s
                    bar.set_postfix(pre=f"{record['pre_return']:.2f}",
                                    post=f"{record['post_return']:.2f}",
                                    steps_s=f"{steps_per_s:.3g}")
                    bar.update(length)
                if stop:
                    signals.check(last_done, checkpoint_dir)
        except KeyboardInterrupt:
            # A second Ctrl-C, or any Ctrl-C where no handler could be installed (a
            # program driven from a thread other than the main one): keep the state
            # after the last logged call.
            if completed is not None:
                save(*completed)
            raise Interrupted(f"interrupted after iteration {last_done}") from None
    return Training(history=history, state=state)

