"""Flags generated from the config models, so a setting is declared once.

A setting's name, type, default, range and help live in its pydantic field
(deploy/runtime/config.py); `setting` turns a field into a click option with exactly
those, and `learner_settings` gives `replay` and `serve` the same learner flags. Options
that are not settings (output paths of a run, `--json`, `--progress`) stay plain click
options. tests/test_cli_schema.py holds every command's options to their fields.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import click
from click.core import ParameterSource
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from streamcl.deploy.runtime.config import LearnerConfig

F = TypeVar("F", bound=Callable[..., Any])
FLAG_NAMES = {"use_task_ids": "--task-ids/--no-task-ids"}
"""Flags not spelled after their field (kept for users' scripts)."""


class IntList(click.ParamType):
    """Comma-separated integers on the command line, or a list in a config file.

    `checked=False` leaves the parts as text for the model to check, so that the error
    names the setting (`record --feature-shape`, as before the flags were generated).
    """

    name = "INTS"

    def __init__(self, checked: bool = True) -> None:
        self.checked = checked

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        parts = tuple(str(item).strip() for item in items if str(item).strip())
        if not self.checked:
            return parts
        try:
            return tuple(int(part) for part in parts)
        except ValueError:
            self.fail(f"expected comma-separated integers, got {value!r}", param, ctx)


class Settings(click.ParamType):
    """Nested settings: a mapping in a config file, or `key=value,key=value` on the line."""

    name = "KEY=VALUE,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, dict):
            return {str(k).replace("-", "_"): v for k, v in value.items()}
        settings = {}
        for item in str(value).split(","):
            key, sep, setting = item.partition("=")
            if not sep or not key.strip():
                self.fail(
                    f"expected key=value pairs separated by commas, got {value!r}", param, ctx
                )
            settings[key.strip().replace("-", "_")] = setting.strip()
        return settings


class SettingOption(click.Option):
    """A flag made from a config field; `path` is where its value lands in `model`."""

    def __init__(
        self, decls: list[str], model: type[BaseModel], path: tuple[str, ...], **attrs: Any
    ) -> None:
        super().__init__(decls, **attrs)
        self.model = model
        self.path = path


def field_at(model: type[BaseModel], path: tuple[str, ...]) -> FieldInfo:
    """The field `path` names, following sections (`("learner", "memory")`)."""
    for name in path[:-1]:
        section = section_model(model.model_fields[name].annotation)
        if section is None:
            raise KeyError(f"{'.'.join(path)}: {name} is not a section of {model.__name__}")
        model = section
    return model.model_fields[path[-1]]


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a nested section, or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def model_default(field: FieldInfo) -> Any:
    """The field's default; None for a section (its own fields carry theirs)."""
    return None if field.default is PydanticUndefined else field.default


def bounds(field: FieldInfo) -> dict[str, Any]:
    """The field's range as click's Int/FloatRange arguments (min, max, min_open, max_open)."""
    found: dict[str, Any] = {}
    for meta in field.metadata:
        if isinstance(meta, annotated_types.Ge):
            found.update(min=meta.ge, min_open=False)
        elif isinstance(meta, annotated_types.Gt):
            found.update(min=meta.gt, min_open=True)
        elif isinstance(meta, annotated_types.Le):
            found.update(max=meta.le, max_open=False)
        elif isinstance(meta, annotated_types.Lt):
            found.update(max=meta.lt, max_open=True)
    return found


def value_type(annotation: Any) -> Any:
    """The annotation without `| None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def param_type(field: FieldInfo) -> click.ParamType:
    """The click type that accepts exactly the field's values (pydantic checks the rest)."""
    kind = value_type(field.annotation)
    if get_origin(kind) is Literal:
        return click.Choice([str(choice) for choice in get_args(kind)])
    if section_model(kind) is not None:
        return Settings()
    if get_origin(kind) is tuple:
        return IntList()
    if kind is Path:
        return click.Path()
    if kind in (int, float):
        limits = bounds(field)
        if not limits:
            return click.INT if kind is int else click.FLOAT
        return click.IntRange(**limits) if kind is int else click.FloatRange(**limits)
    return click.STRING


def help_text(field: FieldInfo, path: tuple[str, ...]) -> str | None:
    """The field's description as help; a section lists its keys and their defaults.

    A nested setting names its place in a config file (`serve --config`).
    """
    parts = [field.description] if field.description else []
    section = section_model(value_type(field.annotation))
    if section is not None:
        keys = ", ".join(
            f"{sub.alias or name}={model_default(sub)}"
            for name, sub in section.model_fields.items()
        )
        parts.append(f"keys and defaults: {keys}")
    text = "; ".join(parts)
    if text:
        text = text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")
    if len(path) > 1:
        text = f"{text}  [config: {'.'.join(path)}]".lstrip()
    return text or None


def setting(
    model: type[BaseModel],
    path: str,
    flag: str | None = None,
    *,
    type: click.ParamType | None = None,
    default: Any = PydanticUndefined,
) -> Callable[[F], F]:
    """Add the flag for `model`'s field at dotted `path`: its default, range and help.

    `flag` defaults to the field's name with hyphens; `type` narrows a path's click type
    (`click.Path(exists=True)`), and must accept the same values otherwise. `default`
    is for a command that deliberately differs from the model (tests/test_cli_schema.py
    lists each).
    """
    keys = tuple(path.split("."))
    field = field_at(model, keys)
    decls = [flag or FLAG_NAMES.get(keys[-1]) or "--" + keys[-1].replace("_", "-")]
    kind = value_type(field.annotation)
    attrs: dict[str, Any] = {"show_envvar": True, "help": help_text(field, keys)}
    if kind is bool:
        if "/" not in decls[0] and field.default is not False:
            decls[0] += f"/--no-{decls[0][2:]}"
        attrs.update(is_flag=True, default=field.default)
    else:
        attrs.update(type=type or param_type(field))
        if field.is_required():
            attrs["required"] = True
        else:
            attrs["default"] = model_default(field)
    if default is not PydanticUndefined:
        attrs["default"] = default
    # A top-level field keeps its name (the command builds `model` from the parameters);
    # a nested or renamed one is named after its flag, since its path says where it lands.
    named = len(keys) == 1 and flag is None
    decls.append(keys[0] if named else decls[0].split("/")[0][2:].replace("-", "_"))
    return click.option(*decls, cls=SettingOption, model=model, path=keys, **attrs)


def learner_settings(model: type[BaseModel], section: str = "") -> Callable[[F], F]:
    """Every learner setting as a flag, at `section` of `model` ('' = the top level)."""

    def decorate(func: F) -> F:
        for name in reversed(LearnerConfig.model_fields):
            func = setting(model, f"{section}.{name}" if section else name)(func)
        return func

    return decorate


def given(ctx: click.Context, values: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The values the user set (flag, environment, config file), not click's defaults."""
    for name, value in values.items():
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
            yield name, value
