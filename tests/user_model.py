"""A user model factory, imported by path in tests (`tests.user_model:make`)."""

from torch import nn


def make(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    size = 1
    for dim in input_shape:
        size *= dim
    return nn.Sequential(nn.Flatten(), nn.Linear(size, num_classes))


def not_a_model(input_shape: tuple[int, ...], num_classes: int) -> int:
    return 3
