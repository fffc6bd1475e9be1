"""One rank's training state (``TrainState``): what ``raygd.loop`` builds and steps, ``raygd.evaluation`` measures
and ``raygd.checkpoint`` saves. Its own module so that those three import it from below instead of from each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raygd.batch_schedule import BatchController
from raygd.config import RunConfig
from raygd.data import Cursor, Dataset, GlobalBatchSampler
from raygd.diversity.online import OnlineDiversity
from raygd.mechanisms import Mechanism


@dataclass
class TrainState:
    """One rank's training state: the model (unwrapped) and ``net`` that runs steps (DDP when
    P > 1), the mechanism, optimizer, sampler, this rank's slice of the evaluation sample, and the
    online diversity estimator (None when off)."""

    cfg: RunConfig
    data: Dataset
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    net: torch.nn.Module
    mechanism: Mechanism
    optimizer: torch.optim.Optimizer
    sampler: GlobalBatchSampler
    controller: BatchController
    """This run's B and step size (``train.batch_schedule``; fixed: B0 and γ0 throughout)."""
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    estimator: OnlineDiversity | None = None
    x_test_eval: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    """This rank's slice of the fixed test sample (min(test size, data.eval_size) examples)."""
    y_test_eval: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    cursor: Cursor = field(default_factory=Cursor)
    """Where the sampler is: epoch, position in it, examples consumed (advanced by B each update)."""
