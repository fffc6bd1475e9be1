"""Diversity-inducing mechanisms: each per-example gradient g_i is replaced by a random surrogate.

The paper (Yin et al., "Gradient Diversity", Section 3) shows that DropConnect, Langevin
noise (SGLD) and stochastic quantization do not lower the batch-size bound B_D. Each mechanism
is one ``Mechanism`` subclass, registered here under its ``mechanism.name``; it states its
granularity (whose randomness is independent of whose) in ``granularity`` and ``log_params()``:

- ``vanilla``: no surrogate; granularity ``none``.
- ``dropconnect``: Bernoulli(1-p) masks on the weights of every ``nn.Linear``, kept weights
  scaled by 1/(1-p). Granularity ``per_example`` (the paper: one mask per example),
  ``per_group`` (one mask per group of examples) or ``per_worker`` (one mask per worker batch).
- ``sgld``: N(0, sigma^2 I) per example. Granularity ``per_example`` *in distribution*: with
  the mean loss the applied update carries (1/B) sum_i xi_i ~ N(0, sigma^2/B I), so it is
  implemented as one such draw added after the all-reduce (identical on every rank).
- ``quantize``: QSGD's unbiased stochastic quantization with s levels and buckets of d entries.
  Granularity ``per_worker``: each worker's mean gradient is quantized, sent as int8 levels plus
  one float32 norm per bucket through a real DDP communication hook, and the P decoded
  gradients are averaged.

Why hand-written: no library provides per-example DropConnect (``torch.nn.functional.dropout``
drops activations, and per-example weight masks need a batched matmul), nor a QSGD hook for
DDP (torch ships fp16/bf16 compression and PowerSGD hooks only).

This package imports without torch (``raygd.config`` reads only ``names.py``); the torch kernels are
in ``dropconnect_linear.py`` and ``qsgd.py``. Adding a mechanism: docs/USER_GUIDE.md, "Adding a mechanism".

    mech = build_mechanism(cfg.mechanism)
    model = mech.setup(model, seed=0, rank=rank, world_size=P, global_batch_size=B, device=dev)
    ddp = DistributedDataParallel(model); mech.attach_ddp(ddp)    # when P > 1
    loss.backward(); mech.after_backward(model, step); optimizer.step()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from raygd.mechanisms.base import PAPER_GRANULARITY, Mechanism, Vanilla, derive_seed, make_generator
from raygd.mechanisms.dropconnect import DropConnect
from raygd.mechanisms.names import NAMES
from raygd.mechanisms.quantize import Quantize
from raygd.mechanisms.sgld import SGLD

if TYPE_CHECKING:
    from raygd.config import MechanismConfig

__all__ = [
    "REGISTRY",
    "SGLD",
    "DropConnect",
    "Mechanism",
    "Quantize",
    "Vanilla",
    "build_mechanism",
    "derive_seed",
    "make_generator",
    "mechanism_class",
    "mechanism_label",
    "parse_label",
    "surrogate_label",
]

REGISTRY: dict[str, type[Mechanism]] = {cls.name: cls for cls in (Vanilla, DropConnect, SGLD, Quantize)}
"""``mechanism.name`` -> class; its keys are ``raygd.mechanisms.names.NAMES`` (``raygd.config.MECHANISMS``)."""
if tuple(REGISTRY) != NAMES:  # each class reads its excluded estimators from names.py; the names must agree
    raise ImportError(f"raygd.mechanisms.names lists {NAMES}, the registry holds {tuple(REGISTRY)}: add both")


def mechanism_class(name: str) -> type[Mechanism]:
    """The registered class of ``name``; ValueError naming the allowed values otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"mechanism.name = {name!r} is invalid: allowed values are {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def build_mechanism(cfg: MechanismConfig) -> Mechanism:
    """The mechanism named by ``cfg.name``, configured from ``cfg``."""
    return mechanism_class(cfg.name).from_config(cfg)


def _full(mech: Mapping[str, Any] | MechanismConfig) -> dict[str, Any]:
    """A mechanism config (or a partial mapping, e.g. a sweep's space entry) with the defaults filled in.
    Not validated: a sweep spec labels its entries before checking them."""
    from raygd.config import MechanismConfig

    if isinstance(mech, MechanismConfig):
        return dataclasses.asdict(mech)
    return {**{f.name: f.default for f in dataclasses.fields(MechanismConfig)}, **mech}


def mechanism_label(mech: Mapping[str, Any] | MechanismConfig) -> str:
    """A short display label: ``vanilla``, ``dropconnect(p=0.4)``, ``dropconnect(p=0.5, per_worker)``,
    ``sgld(sigma=0.01)``, ``quantize(s=16)``; an unknown name is its own label."""
    full = _full(mech)
    cls = REGISTRY.get(full["name"])
    return cls.label(full) if cls else full["name"]


def surrogate_label(mech: Mapping[str, Any] | MechanismConfig) -> str:
    """The label of the paper's per-example surrogate of ``mech``, whose B_D ``surrogate_diversity``
    measures whatever granularity training uses: ``dropconnect(p=0.4, per_group)`` -> ``dropconnect(p=0.4)``."""
    full = _full(mech)
    cls = mechanism_class(full["name"])
    if cls.granularity_field:
        full[cls.granularity_field] = PAPER_GRANULARITY
    return cls.label(full)


def parse_label(label: str) -> dict[str, Any]:
    """The config fields a ``mechanism_label`` shows, read back: ``dropconnect(p=0.4, per_group)`` ->
    ``{"name": "dropconnect", "drop_prob": 0.4, "dropconnect_granularity": "per_group"}``."""
    name, _, inner = label.partition("(")
    cls = mechanism_class(name)
    defaults = _full({"name": name})
    shorts = {short: field for field, short in cls.label_fields}
    out: dict[str, Any] = {"name": name}
    for part in inner.removesuffix(")").split(", ") if inner else []:
        short, eq, value = part.partition("=")
        if eq and short in shorts:
            out[shorts[short]] = type(defaults[shorts[short]])(value)
        elif not eq and cls.granularity_field:
            out[cls.granularity_field] = part
        else:
            raise ValueError(f"mechanism label {label!r}: {part!r} is not a field of {name}'s label.")
    return out
