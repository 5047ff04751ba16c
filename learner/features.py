"""The model's penultimate features as the replay memory's `embed` callable.

The memory indexes what the model sees: the input of the model's last `nn.Linear`
(the classifier), captured by a forward pre-hook, so any model, the built-in MLP/CNN
or a user's, has one without a trunk/head split. These features move as the model
learns; the memory re-embeds its items on a stated budget (memory/buffer.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from streamcl.ingest.errors import ConfigError
from streamcl.memory.buffer import Embed

MODAL = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
"""Modules that behave differently in train mode."""
EMBED_BATCH = 4096
"""Rows per forward pass when a whole memory is re-embedded (bounds activation memory)."""


def classifier(model: nn.Module) -> nn.Linear:
    """The model's last `nn.Linear` in module order: its input is the penultimate feature."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"memory_embedding penultimate needs a model whose classifier is an nn.Linear; "
            f"{type(model).__name__} has none (use memory_embedding input)"
        )
    return linears[-1]


def penultimate_embedding(model: nn.Module, dtype: str, device: torch.device) -> Embed:
    """Stream-dtype features `[n, *shape]` -> `[n, D]` unit rows of the classifier's input,
    computed without gradients; in eval mode (then restored) when the model has dropout
    or batch norm, whose train mode would change the features or the running statistics
    (toggling the mode of every module costs as much as the forward pass itself)."""
    head = classifier(model)
    modal = any(isinstance(m, MODAL) for m in model.modules())
    scale = 1.0 / 255.0 if dtype == "uint8" else 1.0
    captured: list[torch.Tensor] = []

    def keep_input(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach())

    def embed(features: np.ndarray) -> np.ndarray:
        was_training = model.training
        if modal:
            model.eval()
        out = []
        handle = head.register_forward_pre_hook(keep_input)
        try:
            with torch.no_grad():
                for start in range(0, len(features), EMBED_BATCH):
                    chunk = np.ascontiguousarray(features[start : start + EMBED_BATCH])
                    model(torch.from_numpy(chunk).to(device).float() * scale)
                    out.append(captured[-1].flatten(1).float())
                    captured.clear()
        finally:
            handle.remove()
            captured.clear()
            if modal:
                model.train(was_training)
        if not out:
            return np.zeros((0, head.in_features), dtype=np.float32)
        rows = torch.cat(out)
        return (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy()

    return embed
