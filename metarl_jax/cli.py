"""The `metarl` command line: `metarl train`, `metarl envs`."""

from __future__ import annotations

import os
import sys

import click

from metarl_jax.config import ConfigError, load_yaml, merge, parse_overrides

EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Meta-reinforcement learning compiled with JAX."""


@main.command()
@click.option("--algo", help="Meta-learner, e.g. promp.")
@click.option("--env", "env_name", help="Task distribution (see `metarl envs`).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file of configuration keys.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one key (dotted for sections: env.backend=spring). Repeatable.")
@click.option("--iterations", type=int, help="Number of meta-iterations.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Run directory for config.yaml and metrics.jsonl.")
@click.option("--force", is_flag=True, help="Overwrite a run already in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(algo, env_name, config_path, overrides, iterations, seed, out_dir, force, quiet):
    """Train a meta-policy; writes OUT/config.yaml and OUT/metrics.jsonl."""
    from metarl_jax import trainer

    try:
        raw = load_yaml(config_path) if config_path else dict(trainer.DEFAULT_EXPERIMENT)
        flags = {"algo": algo, "iterations": iterations, "seed": seed}
        raw = merge(raw, {k: v for k, v in flags.items() if v is not None})
        if env_name is not None:
            raw = merge(raw, {"env": {"name": env_name}})
        raw = merge(raw, parse_overrides(overrides))
        config = trainer.resolve_config(raw)
        if out_dir is None:
            out_dir = os.path.join("runs", f"{config.run.algo}_{config.run.env.name}"
                                           f"_seed{config.run.seed}")
        trainer.prepare_output_dir(out_dir, force)
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)

    try:
        history = trainer.train(config, out_dir, force=True, progress=not quiet)
    except trainer.TrainingDiverged as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_DIVERGED)
    last = history[-1]
    click.echo(f"done: {last['iteration']} iterations, {last['env_steps']} env steps, "
               f"pre_return {last['pre_return']:.3f}, post_return {last['post_return']:.3f}; "
               f"results in {out_dir}/metrics.jsonl")


@main.command()
def envs():
    """List every task distribution with its sizes, horizon and tasks."""
    from metarl_jax import trainer

    rows = trainer.describe_envs()
    header = ("name", "obs", "act", "horizon", "tasks")
    table = [header] + [(r["name"], str(r["observation_size"]), str(r["action_size"]),
                         str(r["horizon"]), r["tasks"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
                   + "  " + row[4])


if __name__ == "__main__":
    main()
