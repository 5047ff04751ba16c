"""Named factories, open to `package.module:function`: the mechanism behind every pluggable
part (strategies and noise filters in `learner`, memory selectors and replay retrieval in
`memory`, the network in `learner.models`).

Each layer keeps a `Registry` of its own interface; the built-in parts are registered in it
like any other, and a name holding a colon is imported instead of looked up. It lives at
the bottom layer so that every layer above can use it. Errors are one-line `ConfigError`s
naming the kind of part, the name asked for and what went wrong.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from streamcl.ingest.errors import ConfigError

PLUGIN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
"""A factory named by import path: `package.module:function`."""

F = TypeVar("F", bound=Callable[..., Any])


def is_plugin(name: str) -> bool:
    """True for a `package.module:function` path (syntax only; nothing is imported)."""
    return PLUGIN.fullmatch(name) is not None


def load_factory(path: str, kind: str) -> Callable[..., Any]:
    """Import the callable `package.module:function`; `kind` names it in errors."""
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import {kind} factory {path!r}: {err}") from err
    if not callable(factory):
        raise ConfigError(f"{kind} factory {path!r} is a {type(factory).__name__}, not callable")
    return factory


class Registry(Generic[F]):
    """Factories of one kind by name, in registration order; `package.module:function`
    names a factory outside it.

    required: attributes every built part must have (its interface's methods): `create`
    checks them, so a plug-in missing one fails at start-up, not mid-stream.
    """

    def __init__(self, kind: str, builtins: Mapping[str, F], required: tuple[str, ...] = ()):
        self.kind = kind
        self.required = required
        self._factories: dict[str, F] = {}
        for name, factory in builtins.items():
            self.register(name, factory)

    def register(self, name: str, factory: F) -> F:
        """Add `factory` under `name` (lower case, no colon); returns it, for decorator use."""
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            raise ConfigError(
                f"{self.kind} name must be lower case letters, digits, '-' or '_', got {name!r}"
            )
        if name in self._factories:
            raise ConfigError(f"a {self.kind} named {name!r} is registered already")
        self._factories[name] = factory
        return factory

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._factories)

    def known(self, name: str) -> bool:
        """A registered name or a plug-in path (not imported: that waits for `resolve`)."""
        return name in self._factories or is_plugin(name)

    def describe(self) -> str:
        """The accepted names, for error messages: `a, b, c or 'package.module:function'`."""
        return f"{', '.join(self._factories)} or 'package.module:function'"

    def resolve(self, name: str) -> F:
        """The factory registered as `name`, or imported from a `package.module:function`."""
        if name in self._factories:
            return self._factories[name]
        if is_plugin(name):
            factory: F = load_factory(name, self.kind)  # type: ignore[assignment]
            return factory
        raise ConfigError(f"{self.kind} must be {self.describe()}, got {name!r}")

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory `name` resolves to and check the part it returns.

        A plug-in's failure is a configuration error naming it; a built-in's errors pass
        through (they are ours, already one line).
        """
        factory = self.resolve(name)
        if name in self._factories:
            part = factory(*args, **kwargs)
        else:
            try:
                part = factory(*args, **kwargs)
            except Exception as err:  # the user's code: any failure is a configuration error
                raise ConfigError(
                    f"{self.kind} factory {name!r} failed: {type(err).__name__}: {err}"
                ) from err
        missing = [attr for attr in self.required if not hasattr(part, attr)]
        if missing:
            raise ConfigError(
                f"{self.kind} factory {name!r} returned {type(part).__name__}, which lacks "
                f"{', '.join(missing)}"
            )
        return part
