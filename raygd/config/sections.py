"""The small sections of a run config: data, mechanism, the emulated network link, the batch policy and tracking,
each a dataclass validated in ``__post_init__`` (``raygd.config``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raygd.config.fields import (
    DATASETS,
    DROPCONNECT_GRANULARITY,
    MECHANISMS,
    SAMPLING,
    _builtin_or_import,
    _choice,
    _finite_number,
    _require,
)


@dataclass
class DataConfig:
    """Which examples the workers see and in which order."""

    name: str = "fashion_mnist"
    """Data set: fashion_mnist, mnist, cifar10, synthetic, or a user's factory ``module.path:load``,
    called as ``load(**data.args)`` and returning (train, test) map-style datasets (``raygd.plugins``)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of a user data factory (``data.name`` an import string); must be empty otherwise."""
    data_dir: str | None = None
    """Folder with the idx/CIFAR files; default $RAYGD_DATA_DIR, then the Debian path."""
    train_size: int | None = None
    """Use a seeded random subset of this many training examples (None: all)."""
    classes: list[int] | None = None
    """Keep only these class labels, relabelled 0..k-1 (e.g. [0, 1] for 2-class)."""
    replication: int = 1
    """r-replication: a random 1/r of the training set repeated r times (n unchanged)."""
    replication_control: bool = False
    """Control for r-replication (needs replication >= 2): train on exactly the ceil(n/r) distinct
    examples the r-replicated set of the same seed holds, each once (n' = n/r), instead of the
    replicated set. ``max_passes`` then counts passes over those n/r examples: r x max_passes gives
    the replicated run's number of updates (bench/paper/run.py fig3a compares at equal updates)."""
    sampling: str = "shuffle"
    """shuffle (epochs without replacement) or with_replacement (the paper's analysis)."""
    eval_size: int = 10000
    """Training examples in the fixed sample that measures train accuracy."""
    synthetic_features: int = 32
    """Synthetic data only: input dimension."""
    synthetic_size: int = 4096
    """Synthetic data only: number of training examples."""

    def __post_init__(self) -> None:
        _builtin_or_import("data.name", self.name, DATASETS)
        _require(
            isinstance(self.args, dict) and (not self.args or self.user_data),
            "data.args",
            self.args,
            "keyword arguments for a user data factory: a mapping, and only with data.name an import string",
        )
        if self.train_size is not None:
            _require(self.train_size >= 2, "data.train_size", self.train_size, "must be an integer >= 2 or null")
        if self.classes is not None:
            _require(
                len(self.classes) >= 2
                and len(set(self.classes)) == len(self.classes)
                and all(isinstance(c, int) and 0 <= c <= (10**9 if self.user_data else 9) for c in self.classes),
                "data.classes",
                self.classes,
                "a list of at least two distinct labels (in 0..9 for the built-in data sets), or null",
            )
        _require(self.replication >= 1, "data.replication", self.replication, "must be an integer >= 1")
        _require(
            isinstance(self.replication_control, bool) and (not self.replication_control or self.replication >= 2),
            "data.replication_control",
            self.replication_control,
            f"must be true or false, and true needs data.replication >= 2 (got {self.replication})",
        )
        _choice("data.sampling", self.sampling, SAMPLING)
        _require(self.eval_size >= 1, "data.eval_size", self.eval_size, "must be an integer >= 1")
        _require(self.synthetic_features >= 1, "data.synthetic_features", self.synthetic_features, "must be >= 1")
        _require(self.synthetic_size >= 2, "data.synthetic_size", self.synthetic_size, "must be >= 2")

    @property
    def user_data(self) -> bool:
        """Whether ``name`` is a user's data factory (an import string) rather than a built-in data set."""
        return self.name not in DATASETS

    @property
    def num_classes(self) -> int:
        """Classes of a built-in data set after ``classes``; a user's data set's comes from its labels
        (``raygd.data.Dataset.num_classes``)."""
        return len(self.classes) if self.classes else 10


@dataclass
class MechanismConfig:
    """The diversity-inducing mechanism that replaces each gradient by a surrogate."""

    name: str = "vanilla"
    """vanilla, dropconnect, sgld or quantize."""
    drop_prob: float = 0.5
    """DropConnect: probability p that a weight of a fully connected layer is dropped."""
    dropconnect_granularity: str = "per_example"
    """DropConnect: one mask per example (the paper), per group of examples, or per worker batch."""
    dropconnect_group_size: int = 8
    """DropConnect per_group: examples that share one mask."""
    dropconnect_layers: list[str] | None = None
    """DropConnect: the ``nn.Linear`` layers to mask, as glob patterns on their names in the model
    (``fnmatch``: ``["blocks.*.mlp.*", "head"]``); null: every ``nn.Linear``."""
    sgld_sigma: float = 0.01
    """SGLD: standard deviation of the N(0, sigma^2 I) noise added to each per-example gradient."""
    quant_levels: int = 16
    """Quantization: QSGD levels s (1..127); the per-worker gradient is sent as int8 levels."""
    quant_bucket_size: int = 512
    """Quantization: entries that share one norm (QSGD's bucket size d)."""

    def __post_init__(self) -> None:
        _choice("mechanism.name", self.name, MECHANISMS)
        _require(
            isinstance(self.drop_prob, (int, float)) and 0.0 <= self.drop_prob < 1.0,
            "mechanism.drop_prob",
            self.drop_prob,
            "must be a probability in [0, 1)",
        )
        _choice("mechanism.dropconnect_granularity", self.dropconnect_granularity, DROPCONNECT_GRANULARITY)
        _require(
            self.dropconnect_layers is None
            or (len(self.dropconnect_layers) >= 1 and all(isinstance(p, str) and p for p in self.dropconnect_layers)),
            "mechanism.dropconnect_layers",
            self.dropconnect_layers,
            "a non-empty list of glob patterns on nn.Linear layer names (e.g. ['blocks.*.mlp.*']), or null for all",
        )
        _require(
            self.dropconnect_group_size >= 1,
            "mechanism.dropconnect_group_size",
            self.dropconnect_group_size,
            "must be an integer >= 1",
        )
        _require(
            math.isfinite(self.sgld_sigma) and self.sgld_sigma >= 0,
            "mechanism.sgld_sigma",
            self.sgld_sigma,
            "must be a finite number >= 0",
        )
        _require(
            1 <= self.quant_levels <= 127,
            "mechanism.quant_levels",
            self.quant_levels,
            "must be an integer in 1..127 (levels are sent as int8)",
        )
        _require(
            self.quant_bucket_size >= 1,
            "mechanism.quant_bucket_size",
            self.quant_bucket_size,
            "must be an integer >= 1",
        )


NETWORK_TOPOLOGIES = ("ring", "parameter_server")


@dataclass
class NetworkConfig:
    """An emulated network (``raygd.network``): each DDP collective runs for real, then the rank waits out the
    time ``raygd.costmodel`` gives its bytes on this link. Time only: the weights are those of a run without it."""

    bandwidth_gbps: float = 10.0
    """Link bandwidth in gigabits per second (10^9 bit/s)."""
    latency_us: float = 50.0
    """One-way latency per message in microseconds."""
    topology: str = "ring"
    """ring (all-reduce: 2(P-1) latencies, 2(P-1)/P of the bytes per rank) or parameter_server (one server's link)."""
    overlap: float = 0.0
    """Fraction of the modelled transfer hidden behind the step's compute so far (0: none, 1: up to all of it)."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.bandwidth_gbps, (int, float))
            and math.isfinite(self.bandwidth_gbps)
            and self.bandwidth_gbps > 0,
            "train.network.bandwidth_gbps",
            self.bandwidth_gbps,
            "must be a finite number > 0 (gigabits per second)",
        )
        _require(
            isinstance(self.latency_us, (int, float)) and math.isfinite(self.latency_us) and self.latency_us >= 0,
            "train.network.latency_us",
            self.latency_us,
            "must be a finite number >= 0 (microseconds)",
        )
        _choice("train.network.topology", self.topology, NETWORK_TOPOLOGIES)
        _require(
            isinstance(self.overlap, (int, float)) and 0.0 <= self.overlap <= 1.0,
            "train.network.overlap",
            self.overlap,
            "must be a number in [0, 1]",
        )


BATCH_POLICIES = ("fixed", "diversity", "goodput")
STEP_SIZE_RULES = ("adascale", "linear", "sqrt")


@dataclass
class BatchScheduleConfig:
    """``train.batch_schedule``: the batch controller (``raygd.batch_schedule``), which sets B, and the step
    size with it, while the run trains. B starts at ``train.global_batch_size`` (B0), where the step size
    ``train.step_size`` (γ0) is tuned."""

    policy: str = "fixed"
    """fixed (B0 throughout), diversity (B = delta·B_D of the online estimate) or goodput (Pollux's rule: the
    B of highest throughput × statistical efficiency under raygd.costmodel's step time, never below B0)."""
    delta: float = 1.0
    """diversity: B_{k+1} = delta·B̂_D(w_k), the paper's B <= δ·B_D + 1 (its theorems lose at most (1 + δ/2)×)."""
    min_batch_size: int | None = None
    """Smallest B the controller sets (a multiple of train.num_workers); null: P. goodput also never goes
    below B0 (Pollux)."""
    max_batch_size: int | None = None
    """Largest B the controller sets (a multiple of train.num_workers); null: the largest one <= n."""
    hysteresis: float = 0.3
    """diversity: move only when the proposal differs from B by a factor >= 1 + hysteresis (either way)."""
    goodput_gain: float = 1.05
    """goodput: move only when the predicted goodput gain is >= this factor (Pollux's speedup_threshold)."""
    step_size_rule: str = "adascale"
    """γ = γ0·r at B: adascale r = (σ² + ‖μ‖²)/(σ²/S + ‖μ‖²), S = B/B0 (σ²: variance of a B0-example
    gradient); linear r = S; sqrt r = √S."""
    decide_every_steps: int | None = None
    """Decide every this many updates; null: at each evaluation (the same points at every B)."""
    warmup_measurements: int = 3
    """Keep B0 until the online estimator has folded in this many measured updates."""

    def __post_init__(self) -> None:
        _choice("train.batch_schedule.policy", self.policy, BATCH_POLICIES)
        _choice("train.batch_schedule.step_size_rule", self.step_size_rule, STEP_SIZE_RULES)
        _require(
            _finite_number(self.delta) and self.delta > 0,
            "train.batch_schedule.delta",
            self.delta,
            "must be a finite number > 0",
        )
        for name in ("min_batch_size", "max_batch_size"):
            value = getattr(self, name)
            _require(
                value is None or (type(value) is int and value >= 1),
                f"train.batch_schedule.{name}",
                value,
                "must be an integer >= 1, or null",
            )
        if self.min_batch_size is not None and self.max_batch_size is not None:
            _require(
                self.min_batch_size <= self.max_batch_size,
                "train.batch_schedule.min_batch_size",
                self.min_batch_size,
                f"must be <= train.batch_schedule.max_batch_size = {self.max_batch_size}",
            )
        _require(
            _finite_number(self.hysteresis) and self.hysteresis >= 0,
            "train.batch_schedule.hysteresis",
            self.hysteresis,
            "must be a finite number >= 0 (0.3: move when B would change by 30% or more)",
        )
        _require(
            _finite_number(self.goodput_gain) and self.goodput_gain >= 1,
            "train.batch_schedule.goodput_gain",
            self.goodput_gain,
            "must be a finite number >= 1 (1.05: move for a predicted gain of 5% or more)",
        )
        _require(
            self.decide_every_steps is None or (type(self.decide_every_steps) is int and self.decide_every_steps >= 1),
            "train.batch_schedule.decide_every_steps",
            self.decide_every_steps,
            "must be an integer >= 1, or null (decide at each evaluation)",
        )
        _require(
            type(self.warmup_measurements) is int and self.warmup_measurements >= 1,
            "train.batch_schedule.warmup_measurements",
            self.warmup_measurements,
            "must be an integer >= 1",
        )


@dataclass
class TrackingConfig:
    """Where the run is recorded."""

    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; relative sqlite paths are made absolute at load time."""
    experiment_name: str = "raygd"
    """MLflow experiment that holds the run."""
    run_name: str | None = None
    """MLflow run name (default: derived from model, mechanism, B and step size)."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.tracking_uri, str) and self.tracking_uri.strip() != "",
            "tracking.tracking_uri",
            self.tracking_uri,
            "must be a non-empty MLflow tracking URI",
        )
        _require(
            isinstance(self.experiment_name, str) and self.experiment_name.strip() != "",
            "tracking.experiment_name",
            self.experiment_name,
            "must be a non-empty name",
        )
