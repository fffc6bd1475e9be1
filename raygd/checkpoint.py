"""Checkpoints of one rank's training state: what to save, how to restore it, the files on disk.

A checkpoint holds everything a restarted rank needs to continue exactly where its step left
off. Model and optimizer are identical on every rank (rank 0 writes them once, ``model.pt``);
the RNG states (torch's, the mechanism's generators) differ per rank (``rank_<r>.pt``). The
sampler is a pure function of (seed, step) and its cursor (epoch, position, examples consumed), which
the checkpoint carries with the batch controller's state (its B, step size and step-time observations),
so a run whose B moves resumes exactly. Ray Train merges the ranks' folders into one checkpoint
(``raygd.train.train_loop_per_worker``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raygd import batch_schedule
from raygd.data import Cursor

if TYPE_CHECKING:
    from raygd.state import TrainState

MODEL_FILE = "model.pt"
SHARED_KEYS = ("model", "optimizer", "estimator_ema")


def checkpoint_state(state: TrainState, step: int, clock: float, eval_time: float) -> dict[str, Any]:
    """This rank's state after update ``step``, with the training clock and evaluation seconds so far."""
    out: dict[str, Any] = {
        "step": step,
        "clock": clock,
        "eval_time": eval_time,
        "rank": state.rank,
        "world_size": state.world_size,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "mechanism_rng": state.mechanism.state_dict(),
        "estimator_ema": state.estimator.ema.state_dict() if state.estimator else None,
        "cursor": dataclasses.asdict(state.cursor),
        "batch_schedule": state.controller.state_dict(),
    }
    if state.device.type == "cuda":
        out["cuda_rng"] = torch.cuda.get_rng_state(state.device)
    return out


def restore_state(state: TrainState, saved: dict[str, Any]) -> None:
    """Load a ``checkpoint_state`` into a freshly built state (same config, rank and world size)."""
    if (saved["rank"], saved["world_size"]) != (state.rank, state.world_size):
        raise ValueError(
            f"checkpoint of rank {saved['rank']}/{saved['world_size']} cannot restore "
            f"rank {state.rank}/{state.world_size}: train.num_workers must not change on resume"
        )
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    state.mechanism.load_state_dict(saved["mechanism_rng"])
    if state.estimator and saved["estimator_ema"]:
        state.estimator.ema.load_state_dict(saved["estimator_ema"])
    _restore_batch(state, saved)
    if "cuda_rng" in saved and state.device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"], state.device)


def _restore_batch(state: TrainState, saved: dict[str, Any]) -> None:
    """The cursor and the controller; a checkpoint from before them was taken at B0: its cursor follows from
    the step (``Cursor.at_step``)."""
    if "cursor" not in saved:
        tc = state.cfg.train
        state.cursor = Cursor.at_step(saved["step"], state.data.n, tc.global_batch_size, state.cfg.data.sampling)
        return
    state.cursor = Cursor(**saved["cursor"])
    controller = state.controller
    controller.load_state_dict(saved["batch_schedule"])
    decision = batch_schedule.Decision(controller.batch, controller.step_size, False, {})
    batch_schedule.apply(decision, state.optimizer, state.estimator, state.mechanism, state.world_size)


def save_checkpoint(folder: str | os.PathLike, saved: dict[str, Any]) -> None:
    """Write a ``checkpoint_state``: rank 0 the shared model/optimizer/estimator, every rank its own file."""
    if saved["rank"] == 0:
        torch.save({k: saved[k] for k in SHARED_KEYS}, Path(folder) / MODEL_FILE)
    own = {k: v for k, v in saved.items() if k not in SHARED_KEYS}
    torch.save(own, Path(folder) / f"rank_{saved['rank']}.pt")


def load_checkpoint(folder: str | os.PathLike, rank: int) -> dict[str, Any]:
    """This rank's ``checkpoint_state`` from a checkpoint folder (shared model + per-rank file)."""
    folder = Path(folder)
    saved = torch.load(folder / f"rank_{rank}.pt", map_location="cpu", weights_only=False)
    saved.update(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=False))
    return saved


def report_checkpoint(metrics: dict[str, float], saved: dict[str, Any], dir_name: str) -> None:
    """Inside Ray Train: write this rank's ``checkpoint_state`` to a temporary folder and report it with
    ``metrics`` (a barrier across the workers); Ray Train merges the ranks' folders under ``dir_name``."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory(prefix="raygd-ckpt-") as folder:
        save_checkpoint(folder, saved)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=dir_name)
