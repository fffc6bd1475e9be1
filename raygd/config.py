"""Typed, validated configuration for one data-parallel SGD run.

A run config is four small dataclasses, one per concern (data, mechanism, train,
tracking), each validated in ``__post_init__`` so a bad value fails before any Ray
work starts. Configs load from YAML (safe loader) with ``--set section.field=value`` (or nested,
``--set train.network.bandwidth_gbps=1``) overrides, and flatten to ``{"train.step_size": 0.05, ...}``
for MLflow params.

    cfg = load_run_config("configs/quickstart.yaml", ["train.step_size=0.1"])

One module (over 400 lines once formatted) because it is one schema: the four sections, their
checks and the YAML/override parsing that fills them are read and changed together.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from raygd.errors import ConfigError
from raygd.errors import ResumeError as ResumeError  # re-exported: raygd.config is where callers look
from raygd.mechanisms.names import EXCLUDED_ESTIMATORS, NAMES

DATASETS = ("fashion_mnist", "mnist", "cifar10", "synthetic")
MODELS = ("logreg", "logreg_binary", "mnist_cnn", "convnet", "resnet")
IMPORT_STRING = "an import string module.path:callable (e.g. mypkg.nets:build)"
"""How the errors name the plug-in form of ``train.model`` and ``data.name`` (``raygd.plugins``)."""
MECHANISMS = NAMES
"""Registered mechanism names (``raygd.mechanisms.names``; ``raygd.mechanisms.REGISTRY`` holds their classes)."""
SAMPLING = ("shuffle", "with_replacement")
DROPCONNECT_GRANULARITY = ("per_example", "per_group", "per_worker")
DEVICES = ("auto", "cpu", "cuda")
DIVERSITY_ESTIMATORS = ("auto", "none", "in_step", "free")


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name} = {value!r} is invalid: {allowed}.")


def _choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    _require(value in choices, field_name, value, "allowed values are " + ", ".join(choices))


def is_import_string(value: Any) -> bool:
    """Whether ``value`` has the form of Ray's ``import_attr`` strings: ``module.path:attr`` (one colon)."""
    if not isinstance(value, str) or value.count(":") != 1:
        return False
    module, attr = value.split(":")
    return all(part.isidentifier() for part in module.split(".")) and all(a.isidentifier() for a in attr.split("."))


def _builtin_or_import(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    """A built-in name, or a ``module.path:callable`` import string (checked for form only; importing it
    is ``raygd.plugins.check_workload``'s job, which the CLI calls before Ray starts)."""
    if value in choices or is_import_string(value):
        return
    _require(False, field_name, value, "allowed values are " + ", ".join(choices) + ", or " + IMPORT_STRING)


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


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    """Model, parallelism and the SGD schedule."""

    model: str = "logreg"
    """logreg, logreg_binary (needs 2 classes), mnist_cnn, convnet, resnet, or a user's factory
    ``module.path:build``, called as ``build(input_shape, num_classes, **train.model_args)`` and returning
    an ``nn.Module`` whose forward gives logits [N, C] (or [N, T, C] for a sequence model)."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of a user model factory (``train.model`` an import string); must be empty otherwise."""
    num_workers: int = 2
    """P: data-parallel workers (one Ray Train worker each)."""
    global_batch_size: int = 64
    """B: examples per update over all workers; each worker takes B/P."""
    step_size: float = 0.05
    """Constant step size for w <- w - step_size * mean of the B gradients."""
    target_accuracy: float | None = 0.8
    """Stop when training accuracy (on the fixed eval sample; token accuracy for a sequence model) reaches
    this. Exactly one of target_accuracy and target_loss is set; setting target_loss alone clears this."""
    target_loss: float | None = None
    """Stop when the training loss on the fixed eval sample (mean cross entropy per example; per position
    for a sequence model) is at or below this; null: the target is target_accuracy."""
    max_passes: float = 5.0
    """Stop after this many passes over the training set if the target is not reached."""
    eval_every_passes: float = 0.05
    """Measure training and test accuracy every this fraction of a pass over the training set, the
    same number of examples N at every B: after each update that crosses a multiple of N (every
    update when N <= B), so passes-to-target are resolved alike at every B. In (0, 1]; paused out
    of the clock."""
    eval_every_steps: int | None = None
    """Explicit override: evaluate every this many updates instead (a resolution of k*B/n passes,
    coarser at larger B). null: the pass-based schedule of ``eval_every_passes``."""
    test_every_evals: int = 1
    """Measure test accuracy (and the generalization gap) at every this many evaluations, and always at
    the one that ends the run (target reached, diverged, last update), so the gap at the target is
    exact. 1: at every evaluation. A test evaluation costs as much as the training-accuracy one; with a
    fine schedule (the CNN paper presets evaluate every ~0.03-0.06 passes) they are most of a trial's
    wall time, so those presets take 8."""
    seed: int = 0
    """Seed for data order, subsets, replication, initialisation and mechanisms."""
    device: str = "auto"
    """auto (CUDA + NCCL when Ray sees GPUs, else CPU + gloo), cpu or cuda."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves for each worker; also the worker's torch threads."""
    diversity_estimator: str = "auto"
    """Online B_D estimate logged at each evaluation: auto (free at P > 1, in_step at P = 1, none where
    the mechanism excludes that one; ``RunConfig.online_estimator``), none, in_step (per-example norms of
    the batch) or free (local B/P vs all-reduced B gradient norms, needs P > 1)."""
    diversity_every_steps: int = 10
    """The online estimator measures one update in this many (the first, then every k-th), smoothed
    over measurements (EMA, decay 0.9). 1 measures every update: lowest variance, but a measured
    update costs ~1.05x (CNN) to ~1.3x (logistic regression) a plain one (bench/diversity_overhead.py)."""
    bound_sample: int = 512
    """B_D = nΔ_D at the initial weights (``raygd.bound``) is measured on the first this many examples of
    the evaluation sample (all of it when smaller), before training; 0 = not measured. Costs about one
    forward+backward of these examples per rank share (CNN: ~1% of a trial), times bound_draws under DropConnect."""
    bound_draws: int = 4
    """Monte Carlo mask draws of that B_D under DropConnect (its standard error shrinks as 1/sqrt(draws))."""
    max_failures: int = 0
    """Restarts of the worker group after a worker dies (Ray Train FailureConfig); -1 = unlimited.
    A restart resumes from the last checkpoint."""
    checkpoint_every_steps: int = 0
    """Checkpoint (model, optimizer, RNG, step, training clock) every this many updates through Ray
    Train. 0: at every evaluation when max_failures != 0, otherwise never. Paused out of the clock."""
    network: NetworkConfig | None = None
    """An emulated network link (``NetworkConfig``); None: the machine's own. Needs train.num_workers > 1
    to change anything; such runs are tagged ``raygd.network = emulated``."""
    batch_schedule: BatchScheduleConfig = field(default_factory=BatchScheduleConfig)
    """The batch controller (``BatchScheduleConfig``): fixed B (default), or B set along training."""

    def __post_init__(self) -> None:
        _builtin_or_import("train.model", self.model, MODELS)
        _require(
            isinstance(self.model_args, dict) and (not self.model_args or self.model not in MODELS),
            "train.model_args",
            self.model_args,
            "keyword arguments for a user model factory: a mapping, and only with train.model an import string",
        )
        _require(self.num_workers >= 1, "train.num_workers", self.num_workers, "must be an integer >= 1")
        _require(
            self.global_batch_size >= 1, "train.global_batch_size", self.global_batch_size, "must be an integer >= 1"
        )
        _require(
            self.global_batch_size % self.num_workers == 0,
            "train.global_batch_size",
            self.global_batch_size,
            f"must be divisible by train.num_workers = {self.num_workers} (each worker takes B/P examples)",
        )
        _require(
            math.isfinite(self.step_size) and self.step_size > 0,
            "train.step_size",
            self.step_size,
            "must be a finite number > 0",
        )
        _require(
            (self.target_accuracy is None) != (self.target_loss is None),
            "train.target_accuracy",
            self.target_accuracy,
            f"exactly one of train.target_accuracy and train.target_loss must be set (train.target_loss = "
            f"{self.target_loss!r}): set the other to null",
        )
        if self.target_accuracy is not None:
            _require(
                0.0 < self.target_accuracy <= 1.0, "train.target_accuracy", self.target_accuracy, "must be in (0, 1]"
            )
        if self.target_loss is not None:
            _require(
                math.isfinite(self.target_loss) and self.target_loss > 0,
                "train.target_loss",
                self.target_loss,
                "must be a finite number > 0 (mean cross entropy), or null",
            )
        _require(
            math.isfinite(self.max_passes) and self.max_passes > 0,
            "train.max_passes",
            self.max_passes,
            "must be a finite number > 0",
        )
        _require(
            math.isfinite(self.eval_every_passes) and 0 < self.eval_every_passes <= 1,
            "train.eval_every_passes",
            self.eval_every_passes,
            "must be a fraction of a pass in (0, 1]",
        )
        _require(
            self.eval_every_steps is None or self.eval_every_steps >= 1,
            "train.eval_every_steps",
            self.eval_every_steps,
            "must be an integer >= 1, or null (evaluate every train.eval_every_passes)",
        )
        _require(
            type(self.test_every_evals) is int and self.test_every_evals >= 1,
            "train.test_every_evals",
            self.test_every_evals,
            "must be an integer >= 1 (1 = test accuracy at every evaluation)",
        )
        _require(self.seed >= 0, "train.seed", self.seed, "must be an integer >= 0")
        _choice("train.device", self.device, DEVICES)
        _require(self.cpus_per_worker >= 1, "train.cpus_per_worker", self.cpus_per_worker, "must be an integer >= 1")
        _choice("train.diversity_estimator", self.diversity_estimator, DIVERSITY_ESTIMATORS)
        _require(
            self.diversity_estimator != "free" or self.num_workers > 1,
            "train.diversity_estimator",
            self.diversity_estimator,
            "free compares per-worker and all-reduced gradients: it needs "
            "train.num_workers > 1 (use in_step with one worker)",
        )
        _require(
            self.diversity_every_steps >= 1,
            "train.diversity_every_steps",
            self.diversity_every_steps,
            "must be an integer >= 1 (1 = measure every update)",
        )
        _require(self.bound_sample >= 0, "train.bound_sample", self.bound_sample, "must be an integer >= 0 (0 = off)")
        _require(self.bound_draws >= 2, "train.bound_draws", self.bound_draws, "must be an integer >= 2")
        _require(
            self.max_failures >= -1,
            "train.max_failures",
            self.max_failures,
            "must be an integer >= 0, or -1 for unlimited restarts",
        )
        _require(
            self.checkpoint_every_steps >= 0,
            "train.checkpoint_every_steps",
            self.checkpoint_every_steps,
            "must be an integer >= 1, or 0 (at every evaluation when train.max_failures != 0, else never)",
        )

        self._check_batch_schedule()

    def _check_batch_schedule(self) -> None:
        """The controller's bounds are multiples of P and hold B0 (the first batch)."""
        bs, P, B0 = self.batch_schedule, self.num_workers, self.global_batch_size
        for name in ("min_batch_size", "max_batch_size"):
            value = getattr(bs, name)
            _require(
                value is None or value % P == 0,
                f"train.batch_schedule.{name}",
                value,
                f"must be divisible by train.num_workers = {P} (each worker takes B/P examples)",
            )
        _require(
            bs.min_batch_size is None or bs.min_batch_size <= B0,
            "train.batch_schedule.min_batch_size",
            bs.min_batch_size,
            f"must be <= train.global_batch_size = {B0}, where the controller starts",
        )
        _require(
            bs.max_batch_size is None or bs.max_batch_size >= B0,
            "train.batch_schedule.max_batch_size",
            bs.max_batch_size,
            f"must be >= train.global_batch_size = {B0}, where the controller starts",
        )

    @property
    def checkpoint_interval(self) -> int:
        """Updates between checkpoints after resolving the default; 0 = never. The default with
        max_failures != 0 checkpoints at every evaluation: eval_every_steps, or
        ``CHECKPOINT_AT_EVALUATIONS`` on the pass-based schedule (its interval in updates depends on n)."""
        if self.checkpoint_every_steps:
            return self.checkpoint_every_steps
        if self.max_failures == 0:
            return 0
        return self.eval_every_steps or CHECKPOINT_AT_EVALUATIONS

    @property
    def batch_size_per_worker(self) -> int:
        return self.global_batch_size // self.num_workers

    @property
    def target_metric(self) -> str:
        """The evaluation metric the target is on: ``train/accuracy`` (>=) or ``train/loss`` (<=)."""
        return "train/loss" if self.target_loss is not None else "train/accuracy"

    @property
    def target_label(self) -> str:
        """The target as tables print it: ``train accuracy >= 0.8`` or ``train loss <= 1.5``."""
        from raygd.records import target_label

        return target_label(self.target_accuracy, self.target_loss) or "the target"

    def reached(self, accuracy: float, loss: float) -> bool:
        """Whether an evaluation's training accuracy and loss meet the run's target."""
        if self.target_loss is not None:
            return math.isfinite(loss) and loss <= self.target_loss
        assert self.target_accuracy is not None
        return accuracy >= self.target_accuracy


CHECKPOINT_AT_EVALUATIONS = -1
"""``TrainConfig.checkpoint_interval`` when checkpoints fall at the pass-based schedule's evaluations."""


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


@dataclass
class RunConfig:
    """One data-parallel SGD run: data, mechanism, training schedule and tracking."""

    data: DataConfig = field(default_factory=DataConfig)
    mechanism: MechanismConfig = field(default_factory=MechanismConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.train.model == "logreg_binary":
            _require(
                self.data.num_classes == 2,
                "train.model",
                self.train.model,
                "logreg_binary needs exactly two classes: set data.classes, e.g. [0, 1]",
            )
        est = self.train.diversity_estimator
        excluded = EXCLUDED_ESTIMATORS[self.mechanism.name].get(est)
        _require(excluded is None, "train.diversity_estimator", est, excluded or "")
        _require(
            self.train.batch_schedule.policy == "fixed" or self.online_estimator != "none",
            "train.batch_schedule.policy",
            self.train.batch_schedule.policy,
            "an adaptive policy reads the online B_D estimate: it needs train.diversity_estimator != none "
            f"(and one the mechanism allows; {self.mechanism.name} with {self.train.num_workers} worker(s) has none)",
        )
        if self.data.name == "synthetic":
            _require(
                self.train.model in ("logreg", "logreg_binary"),
                "train.model",
                self.train.model,
                "synthetic data is a flat feature vector: use logreg or logreg_binary",
            )

    @property
    def online_estimator(self) -> str:
        """``train.diversity_estimator`` with auto resolved: free at P > 1 (no extra backward), else
        in_step, skipping an estimator the mechanism excludes (quantize at P > 1: in_step); none when
        both are excluded (dropconnect at P = 1)."""
        est = self.train.diversity_estimator
        if est != "auto":
            return est
        excluded = EXCLUDED_ESTIMATORS[self.mechanism.name]
        preferred = ("free", "in_step") if self.train.num_workers > 1 else ("in_step",)
        return next((e for e in preferred if e not in excluded), "none")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flatten to ``{"section.field": value}`` (MLflow params, Tune search keys)."""
        flat = {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}
        for nested in (
            "train.network",
            "train.batch_schedule",
            "train.model_args",
            "data.args",
        ):  # mappings flatten one level further
            if isinstance(flat.get(nested), dict):
                flat.update({f"{nested}.{k}": v for k, v in flat.pop(nested).items()})
        return flat

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> RunConfig:
        raw = dict(raw or {})
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}: allowed sections are {', '.join(sections)}.")
        train = raw.get("train")
        if isinstance(train, dict) and train.get("target_loss") is not None and "target_accuracy" not in train:
            raw["train"] = {**train, "target_accuracy": None}  # a loss target alone replaces the default one
        built = {}
        for name in sections:
            sub_cls = get_type_hints(cls)[name]
            value = raw.get(name) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping of fields, got {value!r}.")
            built[name] = _build_section(name, sub_cls, value)
        return cls(**built)


def _build_section(section: str, sub_cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(sub_cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(f'{section}.{u}' for u in unknown)}: "
            f"allowed fields are {', '.join(f'{section}.{h}' for h in hints)}."
        )
    kwargs = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()}
    return sub_cls(**kwargs)


def _coerce(field_name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type hint; ints are accepted for floats."""
    args = get_args(hint)
    if get_origin(hint) is Union or type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):  # a nested section, e.g. train.network
        if not isinstance(value, dict):
            raise ConfigError(f"{field_name} = {value!r} is invalid: must be a mapping of fields or null.")
        return _build_section(field_name, hint, value)
    origin = get_origin(hint)
    if origin is dict or hint is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{field_name} = {value!r} is invalid: must be a mapping of names to values.")
        return dict(value)
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{field_name} = {value!r} is invalid: must be a list of {item.__name__}.")
        return [_coerce(f"{field_name}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{field_name} = {value!r} is invalid: must be of type {hint.__name__}.")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.field=value`` or a nested ``section.field.key=value`` (``train.network.bandwidth_gbps=1``,
    ``train.batch_schedule.policy=diversity``); the value is read as YAML (``0.1``, ``[0, 1]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} is invalid: write it as section.field=value, e.g. train.step_size=0.1.")
    key, _, raw_value = text.partition("=")
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(
            f"--set {text!r} is invalid: the key must be section.field (or section.field.key for a nested "
            "field), e.g. train.step_size or train.network.bandwidth_gbps."
        )
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r} is invalid: the value is not valid YAML ({err}).") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested ``raw`` dict with ``section.field[.key...]=value`` overrides applied.

    A nested key walks into the mapping at each level, starting one where it is missing or null
    (``train.network: null`` then ``--set train.network.bandwidth_gbps=1`` gives the link's defaults but that).
    """
    merged = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        target = merged
        for depth, part in enumerate(path[:-1]):
            sub = target.get(part)
            if sub is None:
                sub = target[part] = {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{'.'.join(path[: depth + 1])} must be a mapping of fields, got {sub!r}.")
            target = sub
        target[path[-1]] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass the path of a YAML file.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping with sections data/mechanism/train/tracking.")
    return raw


def absolute_tracking_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///file.db`` or plain path absolute (Ray workers run elsewhere)."""
    base = base or Path.cwd()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if not path.startswith("/"):
            return "sqlite:///" + str((base / path).resolve())
        return uri
    if "://" not in uri:
        raise ConfigError(
            f"tracking.tracking_uri = {uri!r} is invalid: use sqlite:///path/to/mlflow.db or http://host:port "
            "(plain file stores are not supported by MLflow 3 without opting in)."
        )
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"tracking.tracking_uri = {uri!r} is invalid: the scheme {scheme!r} is not an MLflow tracking store; "
            f"allowed schemes are {', '.join(TRACKING_SCHEMES)} (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)."
        )
    return uri


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load, override and validate a run config; the tracking URI comes back absolute."""
    raw = read_yaml(path) if path is not None else {}
    cfg = RunConfig.from_dict(apply_overrides(raw, overrides or []))
    cfg.tracking.tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri)
    return cfg
