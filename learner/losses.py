"""The training loss: cross entropy or a noise-robust loss, with imbalance and recency corrections.

One function of the step's logits, so every correction costs a few element-wise ops:

- robust losses against label noise: generalized cross entropy (Zhang & Sabuncu 2018,
  `(1 - p_y^q) / q`) and symmetric cross entropy (Wang et al. 2019, `alpha CE + beta RCE`
  with log 0 clipped to -4);
- imbalance: running class priors from the admitted arrivals; logit adjustment
  (Menon et al. 2021: train on `logits + tau log prior`, predict on plain logits;
  tau 1 is the balanced softmax of Ren et al. 2020) and optional re-weighting by the
  effective number of samples (Cui et al. 2019, `(1 - beta) / (1 - beta^n_c)`);
- recency bias: the asymmetric cross entropy of ER-ACE (Caccia et al. 2022): the new
  rows' loss sees only the classes present among them, so learning a new class does
  not push the old classes' logits down; replayed rows see every class. With
  `ace_recent_share` < 1, "present" also covers classes holding that share of the recent
  admitted arrivals: with the paper's per-batch rule a batch of one class has zero loss,
  and on a task whose two classes arrive 10:1 four batches in ten teach the frequent
  class nothing. It helps with the kNN filter on and hurt without it (README): the
  service's default (0.05) goes with its kNN filter; this class's is the paper's rule.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from streamcl.ingest.errors import ConfigError

RobustLoss = Literal["ce", "gce", "sce"]
Reweight = Literal["none", "effective-number"]
RCE_LOG_ZERO = -4.0
"""Symmetric CE's reverse term clips log 0 to this (the paper's A)."""
RECENT_ARRIVALS = 200
"""Arrivals over which `ClassPriors.recent` averages each class's share."""


class ClassPriors:
    """Running class counts of admitted arrivals (`log_prior` for logit adjustment) and each
    class's share of the recent ones (`recent`, an exponential average over about
    `RECENT_ARRIVALS` arrivals, for ER-ACE's present classes).

    `update` only queues the batch's labels; they are folded in when `counts` or `recent`
    is read (every step when a loss correction reads them, one batch at a time, the
    arithmetic of a per-batch update) or when `FOLD_AFTER` batches wait (one vectorised
    fold): plain cross entropy never reads them, and counting ten labels cost 2-3 % of
    its step.
    """

    FOLD_AFTER = 64

    def __init__(self, num_classes: int):
        self._counts = torch.zeros(num_classes, dtype=torch.float64)
        self._recent = torch.zeros(num_classes, dtype=torch.float64)
        self._pending: list[np.ndarray] = []

    @property
    def counts(self) -> torch.Tensor:
        self._fold()
        return self._counts

    @property
    def recent(self) -> torch.Tensor:
        self._fold()
        return self._recent

    def update(self, labels: np.ndarray | torch.Tensor) -> None:
        """Count admitted arrivals' labels `[n]` (numpy: no tensor op for ten integers)."""
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        self._pending.append(np.array(labels, dtype=np.int64))  # a copy: callers reuse
        if len(self._pending) >= self.FOLD_AFTER:
            self._fold()

    def _fold(self) -> None:
        """Fold the queued batches into the tensors' memory (what state_dict saves)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        classes = len(self._counts)
        counts, recent = self._counts.numpy(), self._recent.numpy()
        if len(pending) == 1:
            batch = np.bincount(pending[0], minlength=classes)
            counts += batch
            recent *= max(0.0, 1.0 - len(pending[0]) / RECENT_ARRIVALS)
            recent += batch / RECENT_ARRIVALS
            return
        # Batch i decays `recent` by f_i, then adds its counts / RECENT_ARRIVALS: after
        # all of them, what batch i added is decayed by the f_j of every later batch j.
        labels = np.concatenate(pending)
        if len(labels) and labels.max() >= classes:  # it would count in the next batch's row
            raise ValueError(f"class label {labels.max()} out of range for {classes} classes")
        sizes = np.array([len(batch) for batch in pending])
        rows = np.repeat(np.arange(len(pending)), sizes)
        per_batch = np.bincount(rows * classes + labels, minlength=len(pending) * classes)
        per_batch = per_batch.reshape(len(pending), classes)
        decay = np.maximum(0.0, 1.0 - sizes / RECENT_ARRIVALS)
        after = np.append(np.cumprod(decay[::-1])[::-1], 1.0)  # after[i]: batches i.. on
        counts += per_batch.sum(axis=0)
        recent *= after[0]
        recent += after[1:] @ per_batch / RECENT_ARRIVALS

    def log_prior(self) -> torch.Tensor:
        """`[C]` log of the smoothed frequencies (one pseudo-count per class)."""
        smoothed = self.counts.numpy() + 1.0
        return torch.from_numpy(np.log(smoothed / smoothed.sum()).astype(np.float32))

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "recent": self.recent.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = []
        self._counts = state["counts"].double().clone()
        # Checkpoints from before the recent shares start them at zero: the batch rule.
        self._recent = state.get("recent", torch.zeros_like(self._counts)).double().clone()


class TrainingLoss:
    """Mean loss over the rows of one step; the first `num_new` rows are arrivals."""

    def __init__(
        self,
        num_classes: int,
        robust: RobustLoss = "ce",
        gce_q: float = 0.7,
        sce_alpha: float = 0.1,
        sce_beta: float = 1.0,
        ace: bool = True,
        ace_recent_share: float = 1.0,
        logit_adjust_tau: float = 1.0,
        reweight: Reweight = "none",
        reweight_beta: float = 0.999,
    ):
        if robust not in ("ce", "gce", "sce"):
            raise ConfigError(f"robust loss must be ce, gce or sce, got {robust!r}")
        if not 0.0 < gce_q <= 1.0:
            raise ConfigError(f"gce q must be in (0, 1], got {gce_q}")
        if not 0.0 < ace_recent_share <= 1.0:
            raise ConfigError(f"ace recent share must be in (0, 1], got {ace_recent_share}")
        if logit_adjust_tau < 0:
            raise ConfigError(f"logit adjustment tau must be >= 0, got {logit_adjust_tau}")
        if reweight not in ("none", "effective-number"):
            raise ConfigError(f"reweight must be none or effective-number, got {reweight!r}")
        if not 0.0 < reweight_beta < 1.0:
            raise ConfigError(f"reweight beta must be in (0, 1), got {reweight_beta}")
        self.num_classes = num_classes
        self.robust = robust
        self.gce_q = gce_q
        self.sce_alpha = sce_alpha
        self.sce_beta = sce_beta
        self.ace = ace
        self.ace_recent_share = ace_recent_share
        self.logit_adjust_tau = logit_adjust_tau
        self.reweight = reweight
        self.reweight_beta = reweight_beta
        self.priors = ClassPriors(num_classes)

    @property
    def plain(self) -> bool:
        """True when the loss is exactly the mean cross entropy (the loop's fast path)."""
        return (
            self.robust == "ce"
            and not self.ace
            and self.logit_adjust_tau == 0
            and self.reweight == "none"
        )

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        num_new: int,
        new_labels: np.ndarray | None = None,
    ) -> torch.Tensor:
        """logits `[N, C]`, labels `[N]`; rows past `num_new` are replayed from memory.

        new_labels: the first `num_new` labels on the host, when the caller has them (the
        corrections are built there: on a GPU, reading them back would wait for it).
        """
        if self.plain:
            return nn.functional.cross_entropy(logits, labels)
        if num_new and (self.logit_adjust_tau or self.ace):
            if new_labels is None:
                new_labels = labels[:num_new].cpu().numpy()
            offsets = self._new_row_offsets(len(labels), new_labels)
            logits = logits + offsets.to(logits.device, logits.dtype, non_blocking=True)
        if self.robust == "ce" and self.reweight == "none":
            return nn.functional.cross_entropy(logits, labels)  # the mean of the rows' CE
        losses = self._per_row(logits, labels)
        if self.reweight == "effective-number" and num_new:
            weights = torch.ones(len(labels), device=logits.device, dtype=losses.dtype)
            weights[:num_new] = self._class_weights().to(logits.device)[labels[:num_new]]
            return (losses * weights).sum() / weights.sum()
        return losses.mean()

    def ace_masked(self, logits: torch.Tensor, new_labels: np.ndarray) -> torch.Tensor:
        """Arrivals' logits `[B, C]`, labelled `new_labels` `[B]`, with the classes ER-ACE
        leaves out of their loss masked: what the model predicts for them among the
        classes their loss compares. Without the logit adjustment: its priors favour the
        frequent classes, and a tail class's arrivals would seldom be predicted."""
        if not self.ace or not len(new_labels):
            return logits
        offsets = self._new_row_offsets(len(new_labels), new_labels, adjust=False)
        return logits + offsets.to(logits.device, logits.dtype, non_blocking=True)

    def _new_row_offsets(
        self, rows: int, new_labels: np.ndarray, adjust: bool = True
    ) -> torch.Tensor:
        """`[rows, C]` float32 added to the logits: zero on replayed rows; on the
        `len(new_labels)` new rows the logit adjustment and, for ACE, the float minimum on
        the classes absent from them and from the recent arrivals (adding it gives the
        minimum: the row's softmax ignores those classes).

        Arrivals follow the stream's class frequencies; the (class-balanced) memory does
        not, so only the new rows are adjusted. Built on the host and added once: one
        node in the graph instead of a slice, mask and join per correction.
        """
        offsets = np.zeros((rows, self.num_classes), dtype=np.float32)
        new = offsets[: len(new_labels)]
        if self.logit_adjust_tau and adjust:
            new += self.logit_adjust_tau * self.priors.log_prior().numpy()
        if self.ace:
            absent = self.priors.recent.numpy() < self.ace_recent_share
            absent[new_labels] = False
            new[:, absent] = np.finfo(np.float32).min
        return torch.from_numpy(offsets)

    def _per_row(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not len(labels):
            return logits.new_zeros(0)
        ce = nn.functional.cross_entropy(logits, labels, reduction="none")
        if self.robust == "ce":
            return ce
        p_true = torch.exp(-ce)
        if self.robust == "gce":
            return (1.0 - p_true.clamp_min(1e-12) ** self.gce_q) / self.gce_q
        # Reverse CE: -sum_k p_k log onehot_k = -A (1 - p_y) with log 0 clipped to A.
        return self.sce_alpha * ce + self.sce_beta * (-RCE_LOG_ZERO) * (1.0 - p_true)

    def _class_weights(self) -> torch.Tensor:
        """`[C]` effective-number weights, mean 1 over the classes seen so far."""
        counts = self.priors.counts.clamp_min(1.0)
        weights = (1.0 - self.reweight_beta) / (1.0 - self.reweight_beta**counts)
        seen = self.priors.counts > 0
        if seen.any():
            weights = weights / weights[seen].mean()
        return weights.float()

    def state_dict(self) -> dict[str, Any]:
        return {"priors": self.priors.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.priors.load_state_dict(state["priors"])
