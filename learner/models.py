"""Build the network: an MLP, a small CNN, or a user model named `module:function`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from streamcl.ingest.errors import ConfigError
from streamcl.ingest.registry import load_factory


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: Sequence[int] = (256, 256),
) -> nn.Module:
    """Return a classifier mapping `[B, *input_shape]` float inputs to `[B, num_classes]` logits.

    A user model is `package.module:function`, called as
    `function(input_shape=..., num_classes=...)` and expected to return an `nn.Module`.
    """
    if name == "mlp":
        return mlp(input_shape, num_classes, hidden)
    if name == "cnn":
        return small_cnn(input_shape, num_classes)
    if ":" in name:
        return _user_model(name, input_shape, num_classes)
    raise ConfigError(f"model must be 'mlp', 'cnn' or 'module:function', got {name!r}")


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(torch.tensor(input_shape).prod())
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Two conv blocks and a linear head; inputs `[B, H, W]` or `[B, C, H, W]`."""
    if len(input_shape) not in (2, 3):
        raise ConfigError(
            f"the cnn model needs image inputs (H, W) or (C, H, W), got {input_shape}"
        )
    channels = 1 if len(input_shape) == 2 else input_shape[0]
    height, width = input_shape[-2:]
    layers: list[nn.Module] = [] if len(input_shape) == 3 else [nn.Unflatten(1, (1, height))]
    layers += [
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), num_classes),
    ]
    return nn.Sequential(*layers)


def _user_model(path: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    factory = load_factory(path, "model")
    try:
        model = factory(input_shape=input_shape, num_classes=num_classes)
    except Exception as err:  # the user's code: any failure is a configuration error
        raise ConfigError(
            f"model factory {path!r} failed when called with input_shape={input_shape}, "
            f"num_classes={num_classes}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {path!r} returned {type(model).__name__}, not nn.Module")
    return model
