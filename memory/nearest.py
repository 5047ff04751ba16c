"""Nearest-neighbour prediction over the memory's embeddings: class means or kNN votes.

Neither head has weights to drift towards the newest classes: a class is predicted
from the stored exemplars alone, which resists the recency bias of an online softmax.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Head = Literal["softmax", "ncm", "knn"]
NCM_TEMPERATURE = 0.1
"""Cosine similarities lie in [-1, 1]; dividing by 0.1 before the softmax gives
probabilities that are not all near 1/C."""


def class_means(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """`[C, D]` unit mean embedding per class; rows of classes with no item are NaN."""
    sums = np.zeros((num_classes, embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, embeddings)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / norms
    means[norms[:, 0] == 0] = np.nan
    return means.astype(np.float32)


def ncm_scores(queries: np.ndarray, means: np.ndarray) -> np.ndarray:
    """`[B, C]` softmax over cosine similarity to each present class mean (0 for absent)."""
    present = ~np.isnan(means).any(axis=1)
    logits = np.full((len(queries), len(means)), -np.inf, dtype=np.float64)
    logits[:, present] = queries @ means[present].T / NCM_TEMPERATURE
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def knn_scores(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """`[B, C]` share of the neighbours' votes per class; votes weigh by similarity
    (clipped at 0), so a tie goes to the class whose neighbours are nearer."""
    valid = labels >= 0
    weights = np.where(valid, np.clip(scores, 0.0, None) + 1e-6, 0.0)
    votes = np.zeros((len(labels), num_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(labels)), labels.shape[1])
    np.add.at(votes, (rows, labels.clip(0).ravel()), weights.ravel())
    total = votes.sum(axis=1, keepdims=True)
    return (votes / np.where(total > 0, total, 1.0)).astype(np.float32)
