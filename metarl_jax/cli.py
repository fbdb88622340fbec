"""The `metarl` command line: `metarl train | eval | plot | envs | info | experts`."""

from __future__ import annotations

import os
import sys

import click
import yaml

from metarl_jax.config import ConfigError, load_yaml, merge, parse_overrides

# Exit statuses of `metarl train` (the README's run section lists them).
EXIT_CONFIG_ERROR = 2  # refused before running: bad configuration or input file
EXIT_DIVERGED = 3  # non-finite loss or parameters; the last good iteration is checkpointed
EXIT_RUN_DIRECTORY = 4  # the run directory is in use by another process, or has no
#                         intact checkpoint to resume from
EXIT_PREEMPTED = 75  # SIGTERM: the last completed iteration is checkpointed; resume it
EXIT_INTERRUPTED = 130  # Ctrl-C, likewise checkpointed


# Set by `run`, the `metarl` program: only a process of its own splits its CPU by default;
# a caller of `main` inside a process (a test, a notebook) keeps that process's devices.
_OWN_PROCESS = False


def _split_cpu(cpu_devices: int | None, per_core_by_default: bool = False) -> None:
    """`--cpu-devices`: the host CPU split before JAX starts, or one line and exit 2.
    Without it, `per_core_by_default` splits it into one device per core."""
    from metarl_jax import distributed

    if cpu_devices is None:
        if per_core_by_default:
            distributed.split_cpu_per_core()
        return

    try:
        distributed.split_cpu(cpu_devices)
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Meta-reinforcement learning compiled with JAX."""


@main.command()
@click.option("--algo", help="Meta-learner, e.g. promp.")
@click.option("--env", "env_name", help="Task distribution (see `metarl envs`), or "
              "module:attribute naming one of your own.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file of configuration keys.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one key (dotted for sections: env.backend=spring). Repeatable.")
@click.option("--iterations", type=int, help="Number of meta-iterations (the total).")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--seeds", "seeds_text", metavar="LIST", help="Train several seeds as one "
              "compiled sweep: 0,1,2 or 0-4. Each gets its own run directory under --out.")
@click.option("--sweep", "sweep_items", multiple=True, metavar="KEY=V1,V2,...",
              help="Sweep a number (inner_lr=0.05,0.1); repeatable, the grid is the "
              "product, trained as one compiled program with --seeds.")
@click.option("--devices", type=int, help="Shard the tasks over this many devices "
              "(default: as many as divide the meta-batch evenly, all when they do).")
@click.option("--cpu-devices", type=int, help="Split the host CPU into this many devices "
              "for the task sharding (default: one per core, the fastest on a CPU-only "
              "machine; 1 keeps it whole).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Run directory for config.yaml, metrics.jsonl, checkpoints/ and the "
              "logger's files (tensorboard/ by default).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite a run already in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as YAML "
              "(every key, defaults filled in) and exit without training.")
@click.option("--coordinator", help="host:port of process 0, to train as one of several "
              "processes (or METARL_COORDINATOR).")
@click.option("--num-processes", type=int, help="Processes in the run (METARL_NUM_PROCESSES).")
@click.option("--process-id", type=int, help="This process's rank (METARL_PROCESS_ID).")
def train(algo, env_name, config_path, overrides, iterations, seed, seeds_text, sweep_items,
          devices, cpu_devices, out_dir, resume_dir, force, quiet, print_config, coordinator,
          num_processes, process_id):
    """Train a meta-policy; writes OUT/config.yaml, OUT/metrics.jsonl, checkpoints and
    the logger's files (TensorBoard events by default).

    Keys not given take, lowest first: the algorithm's defaults, the task's published
    setting, and, when neither --algo nor --env (nor the file) names one, the built-in
    experiment (ProMP on point-nav, 100 iterations); then the --config file, the flags
    and --set."""
    from metarl_jax import early_signals

    restore = early_signals.hold_from_now()  # before JAX is imported
    try:
        _train(algo, env_name, config_path, overrides, iterations, seed, seeds_text,
               sweep_items, devices, cpu_devices, out_dir, resume_dir, force, quiet,
               print_config, coordinator, num_processes, process_id)
    finally:
        restore()


def _train(algo, env_name, config_path, overrides, iterations, seed, seeds_text, sweep_items,
           devices, cpu_devices, out_dir, resume_dir, force, quiet, print_config, coordinator,
           num_processes, process_id):
    from metarl_jax import distributed, run_config, run_dir, sweep, trainer

    # Several processes share out the devices of every process; each keeps its CPU whole
    # unless told otherwise.
    several_processes = bool(coordinator or os.environ.get("METARL_COORDINATOR"))
    _split_cpu(cpu_devices, per_core_by_default=_OWN_PROCESS and not several_processes)
    distributed.initialize(coordinator, num_processes, process_id)

    members = None  # a sweep's members, or None for a single run
    try:
        if resume_dir is not None:
            conflicting = [flag for flag, value in (
                ("--algo", algo), ("--env", env_name), ("--config", config_path),
                ("--set", overrides), ("--seed", seed), ("--seeds", seeds_text),
                ("--sweep", sweep_items), ("--devices", devices), ("--out", out_dir),
                ("--force", force)) if value]
            if conflicting:
                raise ConfigError(f"config: {conflicting[0]}: not allowed with --resume, which "
                                  "takes the configuration saved in the run "
                                  "(only --iterations and --quiet may be given)")
            if os.path.exists(os.path.join(resume_dir, sweep.SWEEP_INDEX)):
                members = sweep.load_members(resume_dir, iterations)
                config = members[0].config
            else:
                config = run_dir.load_run_config(resume_dir)
                if iterations is not None:
                    config = run_config.resolve_config({**config.to_dict(),
                                                        "iterations": iterations})
            out_dir = resume_dir
        else:
            if seed is not None and seeds_text is not None:
                raise ConfigError("config: --seed: not allowed with --seeds")
            # The task's published setting and the built-in experiment are filled in by
            # resolve_config, below the file, the flags and --set.
            raw = load_yaml(config_path) if config_path else {}
            flags = {"algo": algo, "iterations": iterations, "seed": seed, "devices": devices}
            raw = merge(raw, {k: v for k, v in flags.items() if v is not None})
            if env_name is not None:
                raw = merge(raw, {"env": {"name": env_name}})
            raw = merge(raw, parse_overrides(overrides))
            config = run_config.resolve_config(raw)
            if seeds_text is not None or sweep_items:
                seeds = sweep.parse_seeds(seeds_text) if seeds_text is not None else None
                members = sweep.expand(raw, seeds, sweep.parse_sweep(sweep_items))
        if print_config:
            for member in members or [None]:
                if member is not None:
                    click.echo(f"# {member.name}")
                click.echo(yaml.safe_dump((member.config if member else config).to_dict(),
                                          sort_keys=False), nl=False)
            return
        if resume_dir is None:
            if out_dir is None:
                suffix = "_sweep" if members else f"_seed{config.run.seed}"
                out_dir = os.path.join("runs", f"{config.run.algo}_{config.run.env.name}"
                                               f"{suffix}")
            import jax

            if jax.process_index() == 0:  # refused here; cleared once it is locked
                for path in [out_dir] + [os.path.join(out_dir, m.name)
                                         for m in members or []]:
                    run_dir.check_new_output_dir(path, force)
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)

    try:
        if members is not None:
            results = sweep.train_sweep(members, out_dir, force=force,
                                        resume=resume_dir is not None, progress=not quiet,
                                        log=lambda line: click.echo(line, err=True))
            history = [record for result in results for record in result.history[-1:]]
        else:
            history = trainer.train(config, out_dir, force=force,
                                    resume=resume_dir is not None, progress=not quiet).history
    except ConfigError as error:  # found while preparing (a demonstrations file, say)
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    except run_dir.RunDirectoryError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_RUN_DIRECTORY)
    except trainer.TrainingDiverged as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_DIVERGED)
    except trainer.Stopped as error:
        click.echo(f"{error}; continue with `metarl train --resume {out_dir}`", err=True)
        sys.exit(EXIT_PREEMPTED if isinstance(error, trainer.Preempted) else EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # a second Ctrl-C before the first iteration completed
        click.echo(f"interrupted before an iteration completed; nothing new to keep in "
                   f"{out_dir}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if members is not None:
        if not history:
            click.echo(f"nothing to do: {out_dir} already ran {config.run.iterations} "
                       "iterations")
            return
        diverged = sweep.read_index(out_dir).get("diverged", {})
        for member, result in zip(members, results):
            if member.name in diverged:
                click.echo(f"{member.name}: diverged at iteration {diverged[member.name]}, "
                           f"stopped (its last good iteration is checkpointed)")
            elif result.history:
                last = result.history[-1]
                click.echo(f"{member.name}: {last['iteration']} iterations, pre_return "
                           f"{last['pre_return']:.3f}, post_return {last['post_return']:.3f}")
        click.echo(f"done: {len(members) - len(diverged)} of {len(members)} runs finished in "
                   f"{out_dir} (index: {out_dir}/{sweep.SWEEP_INDEX})")
        if diverged:
            sys.exit(EXIT_DIVERGED)
        return
    if not history:
        click.echo(f"nothing to do: {out_dir} already ran {config.run.iterations} iterations")
        return
    last = history[-1]
    click.echo(f"done: {last['iteration']} iterations, {last['env_steps']} env steps, "
               f"pre_return {last['pre_return']:.3f}, post_return {last['post_return']:.3f}; "
               f"results in {out_dir}/metrics.jsonl")


@main.command(name="eval")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory (with checkpoints/).")
@click.option("--tasks", "num_tasks", type=click.IntRange(min=1), default=40, show_default=True,
              help="Held-out tasks to adapt on.")
@click.option("--adapt-steps", type=click.IntRange(min=0),
              help="Adaptation steps (default: the run's inner_steps).")
@click.option("--episodes", type=click.IntRange(min=1),
              help="Episodes per task and step (default: the run's episodes_per_task).")
@click.option("--seed", type=int, default=0, show_default=True, help="Evaluation seed.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw return against adaptation step to this PNG.")
def eval_command(run_dir, num_tasks, adapt_steps, episodes, seed, plot_path):
    """Adapt the saved meta-policy on new tasks; writes RUN/eval.json."""
    from metarl_jax import evaluation

    try:
        result = evaluation.evaluate(run_dir, num_tasks, adapt_steps, seed, episodes)
    except (ConfigError, FileNotFoundError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    click.echo(evaluation.format_table(result))
    click.echo(f"written: {os.path.join(run_dir, 'eval.json')}")
    if plot_path:
        from metarl_jax.plotting import plot_adaptation

        click.echo(f"written: {plot_adaptation(result, plot_path)}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
@click.option("--no-pre", is_flag=True, help="Draw only the post-update return.")
def plot(run_dirs, out_path, no_pre):
    """Draw return against environment steps for one or more runs (seeds grouped)."""
    from metarl_jax.plotting import plot_runs

    try:
        click.echo(f"written: {plot_runs(list(run_dirs), out_path, show_pre=not no_pre)}")
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)


@main.command()
def envs():
    """List every task distribution with its sizes, horizon, default backend and tasks."""
    from metarl_jax.envs import BRAX_BACKENDS, describe_envs

    rows = describe_envs()
    header = ("name", "obs", "act", "horizon", "body", "backend", "tasks")
    table = [header] + [(r["name"], str(r["observation_size"]), str(r["action_size"]),
                         str(r["horizon"]), r["body"], r["backend"], r["tasks"])
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(6)]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                   + "  " + row[6])
    click.echo(f"\nBrax backends (env.backend): {', '.join(BRAX_BACKENDS)}; the backend "
               "column is each task's default. A task of your own: --env module:attribute "
               "(docs/custom_tasks.md)")


@main.command()
@click.option("--cpu-devices", type=int, help="Split the host CPU into this many devices "
              "first, as `metarl train --cpu-devices` does.")
def info(cpu_devices):
    """Print versions (JAX, jaxlib, flax, optax, brax, orbax, mujoco), Python, the platform,
    XLA_FLAGS, the CPU split, and each device with its memory."""
    from metarl_jax.info import collect, format_rows

    _split_cpu(cpu_devices)
    click.echo(format_rows(collect()))


@main.command()
@click.option("--env", "env_name", required=True, help="Task distribution (see `metarl envs`).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Demonstrations file (.npz) to write.")
@click.option("--tasks", "num_tasks", type=click.IntRange(min=1),
              help="Training tasks, one expert each (default 40).")
@click.option("--iterations", type=click.IntRange(min=1), help="PPO iterations (default 200).")
@click.option("--seed", type=int, help="Random seed (tasks, training, demonstrations).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override an expert option (horizon=50, hidden_sizes=[32,32], "
                   "env.backend=spring, ...). Repeatable.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def experts(env_name, out_path, num_tasks, iterations, seed, overrides, quiet):
    """GMPS phase 1: train one PPO expert per task and write their demonstrations (and
    parameters) to OUT."""
    from metarl_jax import experts as expert_lib

    try:
        raw = parse_overrides(overrides)
        flags = {"num_tasks": num_tasks, "iterations": iterations, "seed": seed}
        raw = merge(raw, {k: v for k, v in flags.items() if v is not None})
        env, config = expert_lib.resolve_expert_config(env_name, raw)
        if os.path.isdir(out_path):
            raise ConfigError(f"config: --out: {out_path} is a directory, expected a file")
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    summary = expert_lib.run_experts(env, config, out_path, log=None if quiet else click.echo)
    click.echo(f"experts: {summary['num_tasks']} tasks, mean return "
               f"{summary['final_return']:.3f} (initial {summary['initial_return']:.3f}), "
               f"{summary['env_steps']} env steps ({summary['training_env_steps']} training); "
               f"demonstrations: {summary['real_steps']} steps; written: {summary['path']}")


def run():
    """The `metarl` program: `main` in a process of its own."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    main()


if __name__ == "__main__":
    run()
