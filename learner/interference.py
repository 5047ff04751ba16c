"""Interference scores for maximally interfered retrieval (Aljundi et al. 2019, MIR).

For the incoming batch, a virtual SGD step on its cross-entropy moves the weights to
`θ' = θ - lr ∇L_batch(θ)`; a memory candidate's interference is how much its loss
rises under `θ'`: `loss(θ') - loss(θ)`. The memory picks candidates near the batch
through its index and replays those that would be forgotten most. Cost per update:
one forward and backward pass over the batch plus two forward passes over the
candidates, on top of the learner's own step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from streamcl.memory.retrieval import Interference, Scorer


def virtual_update(model: nn.Module, lr: float, dtype: str, device: torch.device) -> Interference:
    """`(batch features, labels) -> (candidate features, labels) -> [n] loss increases`."""
    scale = 1.0 / 255.0 if dtype == "uint8" else 1.0

    def inputs(features: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(features)).to(device).float() * scale

    def scorer(features: np.ndarray, labels: np.ndarray) -> Scorer:
        params: dict[str, torch.Tensor] = {
            name: p for name, p in model.named_parameters() if p.requires_grad
        }
        loss = nn.functional.cross_entropy(
            functional_call(model, params, (inputs(features),)),
            torch.from_numpy(labels).to(device),
        )
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        moved = {
            name: (p - lr * g if g is not None else p).detach()
            for (name, p), g in zip(params.items(), grads, strict=True)
        }

        def score(candidates: np.ndarray, candidate_labels: np.ndarray) -> np.ndarray:
            x, y = inputs(candidates), torch.from_numpy(candidate_labels).to(device)
            with torch.no_grad():
                before = nn.functional.cross_entropy(model(x), y, reduction="none")
                after = nn.functional.cross_entropy(
                    functional_call(model, moved, (x,)), y, reduction="none"
                )
            return (after - before).float().cpu().numpy()

        return score

    return scorer
