"""The training objective for classifiers and sequence models: one definition every path shares.

An *example* is one input: an image, a feature vector, or a whole sequence. Its loss f_i is

    f_i = CE(logits_i, y_i)                         logits [N, C], labels [N]
    f_i = (1/T) Σ_t CE(logits_{i,t}, y_{i,t})        logits [N, T, C], labels [N, T]

(the mean cross entropy over the sequence's T positions), so per-example gradients, B, n and the
bound B_D = nΔ_D count sequences, and the batch loss (1/N) Σ_i f_i is the mean over every token
when all sequences have the same length (what ``F.cross_entropy`` gives on the flattened logits).
Accuracy is the fraction of correct positions (token accuracy); for classifiers, of examples.

Every consumer (the training step, evaluation, exact and online diversity, the bound) calls these
functions rather than ``F.cross_entropy`` so a sequence model is measured as it is trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(logits [M, C], labels [M], positions per example T) for either shape."""
    if logits.dim() == 2:
        return logits, y, 1
    if logits.dim() != 3 or y.shape != logits.shape[:2]:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} and labels of shape {tuple(y.shape)} do not match: "
            "use logits [N, C] with labels [N], or logits [N, T, C] with labels [N, T]."
        )
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1), int(logits.shape[1])


def example_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_i per example, shape [N]: cross entropy, averaged over positions for a sequence model."""
    flat_logits, flat_y, positions = _flat(logits, y)
    losses = F.cross_entropy(flat_logits, flat_y, reduction="none")
    return losses if positions == 1 else losses.view(logits.shape[0], positions).mean(1)


def summed_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_i f_i over the N examples (its gradient is Σ_i ∇f_i, what the diversity estimators read)."""
    flat_logits, flat_y, positions = _flat(logits, y)
    total = F.cross_entropy(flat_logits, flat_y, reduction="sum")
    return total if positions == 1 else total / positions


def mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_i f_i: the training step's loss (PyTorch's mean convention; DDP averages it over workers)."""
    flat_logits, flat_y, _ = _flat(logits, y)
    return F.cross_entropy(flat_logits, flat_y)


def correct_and_count(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(correct predictions, predictions): over examples, or over positions (token accuracy)."""
    flat_logits, flat_y, _ = _flat(logits, y)
    return float((flat_logits.argmax(1) == flat_y).sum()), float(flat_y.numel())
