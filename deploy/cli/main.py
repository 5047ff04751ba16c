"""The `streamcl` command line. Every flag has a STREAMCL_* environment twin."""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any, get_args

import click

from streamcl.deploy.cli.envvars import PREFIX as ENV_PREFIX
from streamcl.deploy.cli.envvars import apply_rule, check_environment
from streamcl.deploy.cli.kafka import demo, publish, record, serve
from streamcl.deploy.cli.logs import LogFormat, configure_logging
from streamcl.deploy.cli.outputs import check_dir, check_file
from streamcl.deploy.cli.schema import Settings, learner_settings, setting
from streamcl.deploy.runtime.config import ReplayConfig, read_config_file, validated
from streamcl.ingest import strictjson
from streamcl.ingest.errors import StreamclError
from streamcl.ingest.scenarios import NoiseType, ScenarioConfig, ScenarioName


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Eager `--config`: the file's values become defaults that flags and env vars override."""
    if value is None:
        return
    try:
        settings = read_config_file(value)
    except StreamclError as err:
        raise click.BadParameter(str(err)) from err
    params = {p.name: p for p in ctx.command.params if p.expose_value}
    unknown = sorted(set(settings) - set(params))
    if unknown:
        hints = [_unknown_hint(key, sorted(k for k in params if k)) for key in unknown]
        raise click.BadParameter(f"unknown settings in {value}: {', '.join(hints)}")
    for key, raw in settings.items():
        try:  # here, so that an error names the file and key rather than the flag
            params[key].type_cast_value(ctx, raw)
        except click.BadParameter as err:
            raise click.BadParameter(f"{value}: {key}: {err.message}") from err
    ctx.default_map = {**(ctx.default_map or {}), **settings}


def _unknown_hint(key: str, known: list[str]) -> str:
    if key == "learner":
        return "learner (this command takes the learner's settings at the top level)"
    close = difflib.get_close_matches(key, known, n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


config_option = click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    callback=_load_config_file,
    is_eager=True,
    expose_value=False,
    show_envvar=True,
    help="YAML or TOML file holding any of these flags (flags override it).",
)


SERVICE_COMMANDS = ("serve", "demo")
"""Long-running commands: they log at INFO by default (listening, consuming, progress)."""


@click.group(context_settings={"auto_envvar_prefix": ENV_PREFIX, "show_default": True})
@click.version_option(package_name="streamcl", prog_name="streamcl")
@click.option(
    "--log-level",
    default=None,
    show_envvar=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging verbosity (logs go to stderr) [default: INFO for serve and demo, else WARNING].",
)
@click.option(
    "--log-format",
    default="text",
    show_envvar=True,
    type=click.Choice(["text", "json"]),
    help="text, or json: one object per line with the message's key=value fields.",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, log_format: LogFormat) -> None:
    """streamcl: streaming continual learning.

    Build benchmark streams from real data, then replay them through an online
    learner that fights forgetting, and get accuracy/forgetting reports.
    """
    service = ctx.invoked_subcommand in SERVICE_COMMANDS
    configure_logging(log_level or ("INFO" if service else "WARNING"), log_format)
    check_environment(ctx, ENV_RULE, os.environ)


@cli.group()
def stream() -> None:
    """Build and inspect recorded stream files."""


@stream.command("make")
@config_option
@click.option(
    "--dataset",
    type=click.Choice(["fashion-mnist", "digits"]),
    default="fashion-mnist",
    show_envvar=True,
    help="Source data: Fashion-MNIST IDX files, or sklearn's digits.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    show_envvar=True,
    help="Directory with the Fashion-MNIST IDX files (else $STREAMCL_DATA; with neither, "
    "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist). A named "
    "directory without the files is an error.",
)
@click.option(
    "--scenario",
    type=click.Choice(get_args(ScenarioName)),
    default=ScenarioConfig.scenario,
    show_envvar=True,
    help="class-incremental: disjoint classes per task; permuted: a fixed pixel "
    "permutation per task (domain-incremental).",
)
@click.option(
    "--tasks",
    type=click.IntRange(min=1),
    default=ScenarioConfig.tasks,
    show_envvar=True,
    help="Number of tasks; class-incremental needs classes divisible by it.",
)
@click.option(
    "--samples-per-task",
    type=click.IntRange(min=1),
    default=ScenarioConfig.samples_per_task,
    show_envvar=True,
    help="Keep at most this many training samples per task (default: all).",
)
@click.option(
    "--noise",
    type=click.FloatRange(0, 1, max_open=True),
    default=ScenarioConfig.noise,
    show_envvar=True,
    help="Fraction of training labels to corrupt.",
)
@click.option(
    "--noise-type",
    type=click.Choice(get_args(NoiseType)),
    default=ScenarioConfig.noise_type,
    show_envvar=True,
    help="symmetric: random other class; pairflip: c -> c+1.",
)
@click.option(
    "--imbalance",
    type=click.FloatRange(min=1),
    default=ScenarioConfig.imbalance,
    show_envvar=True,
    help="Long tail: ratio of largest to smallest class count (1 = balanced).",
)
@click.option(
    "--seed",
    type=int,
    default=ScenarioConfig.seed,
    show_envvar=True,
    help="Seed for every random choice.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    show_envvar=True,
    help="Stream file to write; the held-out set goes beside it as OUT.eval.npz.",
)
def stream_make(**opts: Any) -> None:
    """Build a continual-learning stream file from real data."""
    from streamcl.ingest.datasets import load
    from streamcl.ingest.scenarios import ScenarioConfig, build, write

    scenario = ScenarioConfig(
        scenario=opts["scenario"],
        tasks=opts["tasks"],
        noise=opts["noise"],
        noise_type=opts["noise_type"],
        imbalance=opts["imbalance"],
        samples_per_task=opts["samples_per_task"],
        seed=opts["seed"],
    )
    check_file(opts["out"], "stream")
    built = build(load(opts["dataset"], opts["data_dir"]), scenario)
    sidecar = write(built, opts["out"])
    click.echo(
        f"wrote {built.meta['num_messages']} messages to {opts['out']} "
        f"(held-out set: {sidecar}, {len(built.heldout.labels)} samples)"
    )


@stream.command("inspect")
@click.argument("stream_file", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--heldout",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    show_envvar=True,
    help="Held-out set with the label-noise ground truth (default: FILE.eval.npz, if any).",
)
@click.option("--json", "as_json", is_flag=True, default=False, help="Print one JSON object.")
def stream_inspect(stream_file: str, heldout: str | None, as_json: bool) -> None:
    """Show a stream file's header, spec, counts per class and task, noise and damage.

    Every frame is decoded as a replay would; the file is only read.
    """
    from streamcl.ingest.inventory import take_inventory

    inventory = take_inventory(stream_file, heldout)
    if as_json:
        click.echo(strictjson.dumps(inventory.to_dict(), indent=2))
    else:
        for line in inventory.lines():
            click.echo(line)


# --- Avalanche bridge: `stream import` / `stream export` (issue 13) ---
@stream.command("import")
@config_option
@click.argument("source")
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=None,
    show_envvar=True,
    help="Declared classes: labels must lie in [0, N) (default: highest label + 1).",
)
@click.option(
    "--benchmark-args",
    type=Settings(),
    default=None,
    show_envvar=True,
    help="Keyword arguments for an Avalanche benchmark SOURCE, e.g. n_experiences=5,seed=0 "
    "(values read as YAML scalars).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    show_envvar=True,
    help="Stream file to write; a held-out set goes beside it as OUT.eval.npz.",
)
def stream_import(
    source: str, num_classes: int | None, benchmark_args: dict[str, Any] | None, out: str
) -> None:
    """Record an external arrival order as a stream file.

    SOURCE is a NumPy .npz (arrays features, labels; optional tasks, noisy, clean_labels,
    eval_features, eval_labels, eval_tasks), or an Avalanche benchmark: 'avalanche:NAME'
    for avalanche.benchmarks.classic.NAME (e.g. avalanche:SplitFMNIST) or
    'package.module:function' returning one; its train stream becomes the stream and its
    test stream the held-out set (needs the 'avalanche' extra).
    """
    from streamcl.ingest.importers import from_npz, write

    check_file(out, "stream")
    if source.endswith(".npz"):
        if benchmark_args:
            raise click.UsageError("--benchmark-args is for an Avalanche SOURCE, not a .npz")
        built = from_npz(source, num_classes)
    else:
        import yaml

        from streamcl.ingest.avalanche import import_benchmark

        kwargs = {k: yaml.safe_load(v) for k, v in (benchmark_args or {}).items()}
        built = import_benchmark(source, kwargs, num_classes)
    sidecar = write(built, out)
    held = (
        f"held-out set: {sidecar}, {len(built.heldout.labels)} samples"
        if sidecar
        else "no held-out set"
    )
    click.echo(f"wrote {built.meta['num_messages']} messages to {out} ({held})")


@stream.command("export")
@config_option
@click.argument("stream_file", metavar="STREAM", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--heldout",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    show_envvar=True,
    help="Held-out set (default: STREAM.eval.npz beside the stream, when there is one).",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=None,
    show_envvar=True,
    help="Samples per Avalanche experience (default: one experience per task; required "
    "when samples carry no task id).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    show_envvar=True,
    help=".npz to write; ingest.avalanche.load_benchmark(OUT) turns it into an Avalanche "
    "benchmark, and `stream import` reads it back.",
)
def stream_export(stream_file: str, heldout: str | None, window: int | None, out: str) -> None:
    """Write a recorded stream (e.g. one taken with `streamcl record`) for Avalanche."""
    from streamcl.ingest.exporters import export_npz

    check_file(out, "export")
    done = export_npz(stream_file, out, heldout, window)
    skipped = f", skipped {dict(done.skipped)}" if done.skipped else ""
    click.echo(
        f"wrote {done.samples} samples in {done.experiences} experiences to {out} "
        f"({'with' if done.heldout else 'without'} a held-out set{skipped})"
    )


# --- end of the Avalanche bridge block ---


@cli.command()
@config_option
@setting(ReplayConfig, "stream", type=click.Path(exists=True, dir_okay=False))
@setting(ReplayConfig, "heldout", type=click.Path(exists=True, dir_okay=False))
@learner_settings(ReplayConfig)
@setting(ReplayConfig, "eval_every")
@setting(ReplayConfig, "prequential_window")
@setting(ReplayConfig, "report", type=click.Path(dir_okay=False))
@setting(ReplayConfig, "plots", type=click.Path(file_okay=False))
@click.option(
    "--metrics-out",
    type=click.Path(dir_okay=False),
    default=None,
    show_envvar=True,
    help="Write the final metrics here in Prometheus' text format (node-exporter textfile).",
)
@click.option(
    "--pushgateway",
    default=None,
    show_envvar=True,
    help="Push the final metrics to this Pushgateway URL (job streamcl_replay).",
)
@setting(ReplayConfig, "stop_after")
@setting(ReplayConfig, "checkpoint", type=click.Path(dir_okay=False))
@setting(ReplayConfig, "resume", type=click.Path(exists=True, dir_okay=False))
@setting(ReplayConfig, "allow_partial")
@click.option(
    "--progress/--no-progress",
    default=None,
    show_envvar=True,
    help="Progress bar (default: only on a terminal).",
)
def replay(
    progress: bool | None, metrics_out: str | None, pushgateway: str | None, **opts: Any
) -> None:
    """Replay a recorded stream through the online learner and report the metrics."""
    from streamcl.deploy.cli.summary import summary_lines
    from streamcl.deploy.runtime.replay import check_outcome, run_replay
    from streamcl.evaluation.report import write_plots

    config = validated(ReplayConfig, opts)
    check_file(config.report, "report")
    check_dir(config.plots, "plots")
    check_file(metrics_out, "metrics")
    check_file(config.checkpoint, "checkpoint")
    report = run_replay(config, progress=progress)
    for line in summary_lines(report):
        click.echo(line)
    click.echo(
        f"scenario                {report['scenario']}, {report['task_boundaries']} task "
        f"boundaries {report['task_boundaries_by_reason'] or ''}, "
        f"{report['drift_event_count']} drift event(s)"
    )
    damage = report.get("stream_damage", {}).get("problem")
    if damage:
        click.echo(f"stream damage           {damage}")
    if "stopped_after" in report:
        click.echo(f"stopped after {report['stopped_after']} messages: {report['checkpoint']}")
    if config.report:
        config.report.parent.mkdir(parents=True, exist_ok=True)
        config.report.write_text(strictjson.dumps(report, indent=2) + "\n")
        click.echo(f"report: {config.report}")
    if config.plots:
        for path in write_plots(report, config.plots):
            click.echo(f"plot: {path}")
    if metrics_out or pushgateway:
        export_metrics(report, metrics_out, pushgateway)
    check_outcome(report, config)


@cli.command("report")
@click.option(
    "--checkpoint",
    type=click.Path(exists=True),
    required=True,
    show_envvar=True,
    help="A checkpoint file (`replay --checkpoint`) or a service's checkpoint directory "
    "(its newest checkpoint that loads).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="condensed.png",
    show_envvar=True,
    help="PNG to write: the condensed exemplars, one row per class, one column per exemplar.",
)
def report_command(checkpoint: str, out: str) -> None:
    """Draw the condensed exemplars of a checkpoint's memory as a PNG grid."""
    from pathlib import Path

    from streamcl.evaluation.report import find_condensed, write_condensed_grid
    from streamcl.learner.checkpoint import CheckpointStore, read_checkpoint

    source = Path(checkpoint)
    if source.is_dir():
        restored = CheckpointStore(source).load_latest()
        if restored is None:
            raise click.ClickException(f"no checkpoint in {source}")
        source, state = restored.path, restored.state
    else:
        state = read_checkpoint(source)
    condensed = find_condensed(state)
    if condensed is None:
        raise click.ClickException(
            f"{source} holds no condensed exemplars (the run had memory_condensed 0)"
        )
    check_file(out, "condensed exemplar grid")
    classes = write_condensed_grid(condensed, out)
    click.echo(f"condensed exemplars of classes {classes} from {source}: {out}")


def export_metrics(report: dict[str, Any], path: str | None, gateway: str | None) -> None:
    """Publish a replay's final metrics for batch evaluations (text file and/or push)."""
    from prometheus_client import CollectorRegistry, push_to_gateway, write_to_textfile

    from streamcl.deploy.runtime.metrics import ServiceMetrics, record_report

    registry = CollectorRegistry()
    record_report(ServiceMetrics(registry), report)
    if path:
        write_to_textfile(path, registry)
        click.echo(f"metrics: {path}")
    if gateway:
        try:
            push_to_gateway(gateway, job="streamcl_replay", registry=registry, timeout=10)
        except OSError as err:
            raise click.ClickException(f"cannot push metrics to {gateway}: {err}") from err
        click.echo(f"metrics pushed to {gateway}")


cli.add_command(serve)
cli.add_command(publish)
cli.add_command(record)
cli.add_command(demo)
ENV_RULE = apply_rule(cli)


def main() -> None:
    """Console entry point: streamcl errors become a one-line message and exit code 2."""
    try:
        cli(standalone_mode=True)
    except StreamclError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
