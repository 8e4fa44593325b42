"""What a run carries from step to step besides the modules: the loop position and running totals,
the clean set's cycling batches, and the per-sample records. All of it is checkpointed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .outputs import WEIGHT_BIN_EDGES

__all__ = ["LoopState", "CyclingBatches", "SampleRecords"]


@dataclass
class LoopState:
    """Where the loop stands and what it has counted; a checkpoint holds it as ``position`` (its fields as a dict).

    The first group lives for the whole run; the second for the current epoch, reset by :meth:`next_epoch`.
    """

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken: the schedule's clock
    train_seconds: float = 0.0  # training and evaluation of the finished epochs
    metrics: list[dict] = field(default_factory=list)  # one line per finished epoch, as in metrics.jsonl
    best_val: float = -1.0  # the best clean-validation accuracy so far (best.pt holds its model)
    meta_idx: Tensor | None = None  # meta_set=pseudo: the training samples of the current meta set
    # the current epoch
    batch: int = 0  # global batches done
    perm: Tensor | None = None  # its sample order, drawn at its start
    loss_sum: float = 0.0
    skipped: int = 0  # non-finite steps skipped (--on-nan skip)
    zero_weight_batches: int = 0  # meta steps whose weights were all zero
    epoch_seconds: float = 0.0  # time spent before a resume, added to the epoch's own
    # rows: alpha sum, beta sum, count; columns: clean, flipped samples (where the truth is known)
    weight_stats: Tensor = field(default_factory=lambda: torch.zeros(3, 2, dtype=torch.float64))
    # the real forward's predictions: l2b.train.outputs.accuracy_counts, summed over the epoch's steps
    train_counts: Tensor = field(default_factory=lambda: torch.zeros(7, dtype=torch.int64))
    # alpha and beta (rows) for TensorBoard: bucket counts (l2b.train.outputs.WEIGHT_BIN_EDGES) and
    # min, max, sum, sum of squares
    weight_hist: Tensor = field(default_factory=lambda: torch.zeros(2, len(WEIGHT_BIN_EDGES) + 1,
                                                                     dtype=torch.float64))
    weight_moments: Tensor = field(default_factory=lambda: torch.tensor([[math.inf, -math.inf, 0.0, 0.0]] * 2,
                                                                        dtype=torch.float64))
    # (3, N) per training sample, this epoch's meta steps only (SampleRecords sums over the run): rows
    # alpha sum, beta sum (each times the batch size), steps counted; None until the epoch's first meta step
    epoch_weights: Tensor | None = None

    def next_epoch(self) -> None:
        """Count the epoch as finished and reset the per-epoch fields."""
        fresh = LoopState()
        self.epoch += 1
        for name in ("batch", "perm", "loss_sum", "skipped", "zero_weight_batches", "epoch_seconds", "weight_stats",
                     "train_counts", "weight_hist", "weight_moments", "epoch_weights"):
            setattr(self, name, getattr(fresh, name))

    def add_epoch_weights(self, n: int, idx: Tensor, alpha: Tensor, beta: Tensor) -> None:
        """Add a step's weights to ``epoch_weights``: sample indices into the N training samples, and (b,) weights.

        ``index_add_`` counts an index that appears twice in one batch twice (class-balanced batches
        may repeat a sample), where ``t[idx] += w`` would keep only one of them.
        """
        if self.epoch_weights is None:
            self.epoch_weights = torch.zeros(3, n, dtype=torch.float64)
        idx = idx.cpu()
        rows = torch.stack([alpha.detach().double().cpu() * len(idx), beta.detach().double().cpu() * len(idx),
                            torch.ones(len(idx), dtype=torch.float64)])
        self.epoch_weights.index_add_(1, idx, rows)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, position: dict) -> LoopState:
        return cls(**position)


class CyclingBatches:
    """Index batches from a persistent source: walks a permutation, reshuffles when it runs out.

    Used for the clean set, so a meta step never builds a new iterator. Its state is checkpointed.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self.perm = torch.arange(n)
        self.pos = n  # exhausted: the first call reshuffles

    def next(self) -> Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])
        self.generator.set_state(state["generator"])


class SampleRecords:
    """Per training sample, accumulated over the steps after warm-up: alpha and beta sums, steps
    counted, pseudo-label disagreements, the last pseudo-label and its predicted probability."""

    def __init__(self, n: int, device: torch.device):
        z = lambda dtype: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
        self.alpha_sum, self.beta_sum = z(torch.float64), z(torch.float64)
        self.count, self.disagree = z(torch.int64), z(torch.int64)
        self.last_pseudo, self.last_prob = torch.full((n,), -1, dtype=torch.int64, device=device), z(torch.float32)

    def update(self, idx: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, pseudo: Tensor, prob: Tensor) -> None:
        """A step's samples: indices, observed labels, weights, pseudo-labels and their probabilities, each (n,)."""
        batch = len(idx)  # weights are stored times the batch size: 1 = an average sample's share
        self.alpha_sum[idx] += alpha.double() * batch
        self.beta_sum[idx] += beta.double() * batch
        self.count[idx] += 1
        self.disagree[idx] += (pseudo != y).long()
        self.last_pseudo[idx] = pseudo
        self.last_prob[idx] = prob

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
