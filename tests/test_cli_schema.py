"""One schema: every flag that is a setting shows its config field's default and range.

The reference is the models' JSON schema (pydantic's own rendering of defaults, bounds
and Literal choices), not the code that builds the flags, so a flag that restates a
setting by hand, or a generator that drops a bound, fails here.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from streamcl.deploy.cli.kafka import DEMO_HTTP_PORT
from streamcl.deploy.cli.main import cli
from streamcl.deploy.cli.schema import SettingOption, learner_settings, setting
from streamcl.deploy.runtime.config import LearnerConfig, ReplayConfig, ServiceConfig
from streamcl.ingest.scenarios import ScenarioConfig


def setting_names(model: type[BaseModel]) -> set[str]:
    """Field names, also inside sections and as `section_field` (`checkpoint_dir`)."""
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names |= setting_names(section) | {f"{name}_{sub}" for sub in section.model_fields}
    return names


DELIBERATE = {("demo", "http_port"): DEMO_HTTP_PORT}
"""Flags that differ from their field on purpose: the demo listens on any free port."""
NOT_SETTINGS = {
    ("stream make", "noise"): "the scenario's label noise (ScenarioConfig, checked below)",
    ("stream make", "seed"): "the scenario's seed (ScenarioConfig, checked below)",
    ("stream inspect", "heldout"): "a file to read, not a run setting",
    ("stream export", "heldout"): "a file to read, not a run setting",
    ("stream import", "num_classes"): "default: the highest label + 1 of the data",
    ("publish", "stream"): "the file to publish, required",
    ("publish", "topic"): "the topic to write, required",
    ("record", "topic"): "the topic to read, required",
    ("record", "until_idle"): "when recording stops, not the service's exit",
    ("report", "checkpoint"): "a checkpoint file or directory to read, not a run setting",
}
"""Plain flags named like a setting that mean something else, and why."""
SETTING_NAMES = setting_names(ServiceConfig) | setting_names(ReplayConfig)


def commands(group: click.Group = cli, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    """Every command under `group`, named as typed (`stream make`)."""
    for name, command in group.commands.items():
        full = f"{prefix}{name}"
        if isinstance(command, click.Group):
            yield from commands(command, f"{full} ")
        else:
            yield full, command


def field_schema(model: type[BaseModel], path: tuple[str, ...]) -> tuple[dict[str, Any], bool]:
    """The JSON schema of the field at `path` and whether it is required."""
    schema = model.model_json_schema()
    node: dict[str, Any] = schema
    prop: dict[str, Any] = {}
    for key in path:
        fields = model.model_fields
        name = fields[key].alias or key
        required = name in node.get("required", ())
        prop = node["properties"][name]
        if "$ref" in prop:
            node = schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
            model = fields[key].annotation  # type: ignore[assignment]
    return prop, required


def value_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional field's schema."""
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    return branches[0] if len(branches) == 1 else prop


def expected_range(branch: dict[str, Any]) -> dict[str, Any]:
    """Bounds in click's terms: min, max and whether each is open."""
    found: dict[str, Any] = {"min": None, "max": None, "min_open": False, "max_open": False}
    for key, bound, is_open in (
        ("minimum", "min", False),
        ("exclusiveMinimum", "min", True),
        ("maximum", "max", False),
        ("exclusiveMaximum", "max", True),
    ):
        if key in branch:
            found.update({bound: branch[key], f"{bound}_open": is_open})
    return found


def option_range(option: click.Option) -> dict[str, Any]:
    kind = option.type
    if isinstance(kind, (click.IntRange, click.FloatRange)):
        return {k: getattr(kind, k) for k in ("min", "max", "min_open", "max_open")}
    return {"min": None, "max": None, "min_open": False, "max_open": False}


def mismatches(name: str, command: click.Command) -> list[str]:
    """What in `command`'s flags disagrees with the config models (empty: nothing)."""
    problems: list[str] = []
    for option in command.params:
        if not isinstance(option, SettingOption):
            continue
        flag = f"{name} --{option.name}"
        prop, required = field_schema(option.model, option.path)
        branch = value_branch(prop)
        if required != option.required:
            problems.append(f"{flag}: required {option.required}, model {required}")
        model_default = DELIBERATE.get((name, str(option.name)), prop.get("default"))
        if not required and to_jsonable_python(option.default) != model_default:
            problems.append(f"{flag}: default {option.default!r}, model {model_default!r}")
        if option_range(option) != expected_range(branch):
            problems.append(f"{flag}: range {option_range(option)}, model {expected_range(branch)}")
        choices = list(getattr(option.type, "choices", []) or [])
        if choices != branch.get("enum", []):
            problems.append(f"{flag}: choices {choices}, model {branch.get('enum', [])}")
        kinds = {"integer": click.types.IntParamType, "number": click.types.FloatParamType}
        if branch.get("type") in kinds and not isinstance(option.type, kinds[branch["type"]]):
            problems.append(f"{flag}: type {option.type.name}, model {branch['type']}")
        if branch.get("type") == "boolean" and not option.is_flag:
            problems.append(f"{flag}: not a flag, model boolean")
    for option in command.params:
        plain = isinstance(option, click.Option) and not isinstance(option, SettingOption)
        if plain and option.name in SETTING_NAMES and (name, option.name) not in NOT_SETTINGS:
            problems.append(f"{name} --{option.name}: restates a setting by hand")
    return problems


COMMANDS = dict(commands())


def test_every_command_is_checked() -> None:
    assert {"replay", "serve", "demo", "publish", "record", "stream make"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_that_is_a_setting_has_the_models_default_and_range(name: str) -> None:
    assert mismatches(name, COMMANDS[name]) == []


def test_replay_and_serve_share_every_learner_setting() -> None:
    def learner_flags(command: click.Command) -> dict[str, tuple[str, ...]]:
        return {
            opt.opts[0]: opt.path[-1:]
            for opt in command.params
            if isinstance(opt, SettingOption)
            and opt.path[-1] in LearnerConfig.model_fields
            and (opt.model is ReplayConfig or opt.path[0] == "learner")
        }

    replay, serve = learner_flags(cli.commands["replay"]), learner_flags(cli.commands["serve"])
    assert replay == serve
    assert {path[0] for path in replay.values()} == set(LearnerConfig.model_fields)


def test_stream_make_takes_its_defaults_and_choices_from_the_scenario() -> None:
    # ScenarioConfig is ingest's dataclass (ranges checked in its __post_init__): its
    # defaults and Literal choices are still the flags'.
    command = cli.commands["stream"].commands["make"]  # type: ignore[attr-defined]
    options = {opt.name: opt for opt in command.params}
    hints = typing.get_type_hints(ScenarioConfig)
    for field in dataclasses.fields(ScenarioConfig):
        assert options[field.name].default == field.default, field.name
        if typing.get_origin(hints[field.name]) is typing.Literal:
            choices = list(options[field.name].type.choices)
            assert choices == list(typing.get_args(hints[field.name])), field.name


def bad_command(*decorators: Any) -> click.Command:
    def run(**_: Any) -> None:
        """A command whose flags are checked, never run."""

    for decorate in reversed(decorators):
        run = decorate(run)
    return click.command("bad")(run)


@pytest.mark.parametrize(
    ("decorators", "problem"),
    [
        ([setting(ReplayConfig, "lr", default=0.2)], "bad --lr: default 0.2, model 0.1"),
        (
            [setting(ReplayConfig, "memory", type=click.IntRange(min=0))],
            "bad --memory: range {'min': 0,",
        ),
        (
            [setting(ReplayConfig, "momentum", type=click.FloatRange(0, 1))],
            "'max_open': False}, model {'min': 0, 'max': 1, 'min_open': False, 'max_open': True}",
        ),
        (
            [setting(ReplayConfig, "optimizer", type=click.Choice(["sgd"]))],
            "bad --optimizer: choices ['sgd'], model ['sgd', 'adam']",
        ),
        (
            [
                learner_settings(ReplayConfig),
                click.option("--report", type=click.Path(), default="report.json"),
            ],
            "bad --report: restates a setting by hand",
        ),
        (
            [setting(ServiceConfig, "http.port", "--http-port", type=click.INT)],
            "bad --http_port: range",
        ),
    ],
)
def test_a_flag_that_differs_from_its_model_fails(decorators: list[Any], problem: str) -> None:
    problems = mismatches("bad", bad_command(*decorators))
    assert any(problem in line for line in problems), problems


def test_help_shows_the_default_the_code_uses() -> None:
    assert LearnerConfig().threads == 1
    text = CliRunner().invoke(cli, ["replay", "--help"], terminal_width=200).output
    assert "[env var: STREAMCL_REPLAY_THREADS; default: 1; x>=1]" in text


class Captured(Exception):
    """Carries the config `serve` built out of the command, instead of running it."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config


def test_serve_lays_only_the_flags_given_over_its_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def capture(config: ServiceConfig) -> dict[str, Any]:
        raise Captured(config)

    monkeypatch.setattr("streamcl.deploy.runtime.serve.run_service", capture)
    config_file = tmp_path / "service.yaml"
    config_file.write_text(
        "kafka:\n  topic: from-file\nlearner:\n  memory: 50\n  lr: 0.5\n  ewc:\n    lambda: 5\n"
    )
    args = ["serve", "--config", str(config_file), "--lr", "0.05", "--ewc", "decay=0.5"]
    result = CliRunner().invoke(cli, args, env={"STREAMCL_SERVE_HTTP_PORT": "9000"})
    assert isinstance(result.exception, Captured), result.output
    config = result.exception.config
    assert config.kafka.topic == "from-file"  # not the flag's default
    assert config.learner.memory == 50 and config.learner.lr == 0.05
    assert config.learner.ewc.lambda_ == 5 and config.learner.ewc.decay == 0.5
    assert config.http.port == 9000 and config.learner.threads == 1
