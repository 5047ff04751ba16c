"""One naming rule for environment variables: `STREAMCL_<COMMAND>_<FLAG>`.

Click derives a flag's variable from its Python parameter name, which differs from the
flag for a few options (`--config` of serve was `STREAMCL_SERVE_CONFIG_FILE`); `apply_rule`
names each variable after the flag instead, and keeps the old name working with a
deprecation warning. A `STREAMCL_*` variable that no flag reads is warned about, with the
closest known name, rather than silently ignored.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from streamcl.ingest.datasets import DATA_DIR_ENV

log = logging.getLogger(__name__)
PREFIX = "STREAMCL"
OTHER_VARIABLES = frozenset({DATA_DIR_ENV})
"""Read outside the CLI's flags."""
TOOLING_PREFIXES = (
    "STREAMCL_REQUIRE_",
    "STREAMCL_EXTRAS",
    "STREAMCL_TORCH_",
    "STREAMCL_AVALANCHE_",
)
"""Read by tests/run.sh, deploy/setup.sh and the Dockerfile, not by `streamcl`."""


@dataclass(frozen=True)
class Renamed:
    """An old variable name still read: where its value goes and what replaced it."""

    path: tuple[str, ...]
    param: str
    new: str


@dataclass
class EnvRule:
    """Every flag's variable, and the old names that still work."""

    known: set[str] = field(default_factory=set)
    renamed: dict[str, Renamed] = field(default_factory=dict)


def apply_rule(group: click.Group) -> EnvRule:
    """Name every option's variable after its flag, under `group`'s command tree."""
    rule = EnvRule(known=set(OTHER_VARIABLES))
    _walk(group, (), rule)
    return rule


def _walk(command: click.Command, path: tuple[str, ...], rule: EnvRule) -> None:
    for param in command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        flags = [opt for opt in param.opts if opt.startswith("--")]
        if not flags or param.envvar:
            continue
        name = _variable(path, flags[0][2:])
        automatic = _variable(path, param.name)
        if name != automatic:
            param.envvar = name
            rule.renamed[automatic] = Renamed(path, param.name, name)
        rule.known.add(name)
    if isinstance(command, click.Group):
        for sub_name, sub in command.commands.items():
            _walk(sub, (*path, sub_name), rule)


def _variable(path: tuple[str, ...], name: str) -> str:
    return "_".join((PREFIX, *path, name)).upper().replace("-", "_")


def check_environment(ctx: click.Context, rule: EnvRule, env: Mapping[str, str]) -> None:
    """Warn about unknown and renamed `STREAMCL_*` variables; pass renamed ones on."""
    for name in sorted(env):
        if not name.startswith(f"{PREFIX}_") or name in rule.known:
            continue
        if name.startswith(TOOLING_PREFIXES):
            continue
        renamed = rule.renamed.get(name)
        if renamed is not None:
            log.warning("%s is deprecated: use %s", name, renamed.new)
            if renamed.new not in env:
                _set_default(ctx, renamed, env[name])
            continue
        close = difflib.get_close_matches(name, sorted(rule.known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        log.warning("unknown environment variable %s ignored%s", name, hint)


def _set_default(ctx: click.Context, renamed: Renamed, value: str) -> None:
    """Hand the old variable's value to its option as a default (flags still win)."""
    defaults: dict[str, Any] = dict(ctx.default_map or {})
    node = defaults
    for part in renamed.path:
        child = dict(node.get(part) or {})
        node[part] = child
        node = child
    node[renamed.param] = value
    ctx.default_map = defaults
