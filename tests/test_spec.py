"""Sweep specs: presets load, every combination is validated up front, bad fields are named."""

from __future__ import annotations

import pytest

from raygd.config import ConfigError
from tuning.spec import PRESETS_DIR, load_sweep_spec, mechanism_label


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_presets_are_valid_sweeps(preset):
    spec = load_sweep_spec(preset)
    assert spec.name == preset and spec.trial_params()


def test_grid_is_the_product_of_the_space():
    spec = load_sweep_spec("quickstart")
    n = 1
    for values in spec.space.values():
        n *= len(values)
    params = spec.trial_params()
    assert len(params) == n and len({str(sorted(p.items())) for p in params}) == n
    cfg = spec.run_config(params[-1])
    assert cfg.train.step_size == params[-1]["step_size"] and cfg.mechanism.name == params[-1]["mechanism"]["name"]
    assert cfg.tracking.experiment_name == "quickstart" and cfg.tracking.tracking_uri.startswith("sqlite:////")


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["sweep.search=bayes"], "search"),
        (["sweep.scheduler=pbt"], "scheduler"),
        (["sweep.space.global_batch_size=[64, 65]"], "train.global_batch_size"),
        (["sweep.space.learning_rate=[0.1]"], "learning_rate"),
        (["sweep.space.step_size=[]"], "space.step_size"),
        (["train.target_accuracy=2"], "train.target_accuracy"),
        (["sweep.space.mechanism=[{name: dropout}]"], "mechanism.name"),
        (["sweep.space.step_size={low: 0.01, high: 1.0}"], "space.step_size"),  # a range needs random/optuna
        (["sweep.search=random", "sweep.space.step_size={low: 1.0, high: 0.1}"], "space.step_size"),
        (["sweep.search=random", "sweep.space.step_size={low: 0.1, high: .inf}"], "space.step_size"),
        (["sweep.search=random", "sweep.space.global_batch_size={low: 64, high: 256}"], "space.global_batch_size"),
        (["sweep.search=optuna", "sweep.num_samples=8"], "search"),  # lists only: a grid
        (["sweep.search=optuna", "sweep.space.step_size={low: 0.01, high: 1.0, log: true}"], "num_samples"),
        (
            [
                "sweep.search=optuna",
                "sweep.num_samples=8",
                "sweep.space.step_size={low: 0.01, high: 1.0}",
                "sweep.space.seed=[0, 1]",
            ],
            "space.seed",
        ),
        (["sweep.num_samples=0"], "num_samples"),
        (["sweep.search_seed=-1"], "search_seed"),
        (["sweep.scheduler=asha", "sweep.asha_time_attr=training_iteration"], "asha_time_attr"),
        (["sweep.scheduler=asha", "sweep.asha_grace_period=0"], "asha_grace_period"),
        (["sweep.scheduler=asha", "sweep.asha_reduction_factor=1"], "asha_reduction_factor"),
        (["sweep.space.mechanism=[{name: vanilla}, {name: vanilla}]"], "space.mechanism"),
        (["sweep.asha=1"], "asha"),
        (["sweep.extend_edges=maybe"], "extend_edges"),
        (["sweep.extend_edges_rounds=0"], "extend_edges_rounds"),
        (["sweep.extend_edges_scope=everywhere"], "extend_edges_scope"),
        (["sweep.trial_order=random"], "trial_order"),
        (["sweep.search=random", "sweep.trial_order=shuffled"], "trial_order"),
    ],
)
def test_bad_sweeps_name_the_field(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_sweep_spec("quickstart", overrides)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="quickstart"):
        load_sweep_spec("nope")


@pytest.mark.parametrize(
    "mech, label",
    [
        ({"name": "vanilla"}, "vanilla"),
        ({"name": "dropconnect", "drop_prob": 0.4}, "dropconnect(p=0.4)"),
        (
            {"name": "dropconnect", "drop_prob": 0.5, "dropconnect_granularity": "per_worker"},
            "dropconnect(p=0.5, per_worker)",
        ),
        ({"name": "sgld", "sgld_sigma": 0.001}, "sgld(sigma=0.001)"),
        ({"name": "quantize"}, "quantize(s=16)"),
    ],
)
def test_mechanism_labels(mech, label):
    assert mechanism_label(mech) == label


def test_relative_tracking_uri_is_fixed_at_load_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_sweep_spec("quickstart")
    monkeypatch.chdir("/")  # a Tune trial runs elsewhere: it must still see the driver's store
    assert spec.run_config(spec.trial_params()[0]).tracking.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


@pytest.mark.parametrize("search", ["grid", "random", "optuna"])
def test_optuna_grid_error_names_the_allowed_searches(search):
    """A list-only space under optuna is rejected with the field and what would be allowed instead;
    grid and random accept it."""
    overrides = [f"sweep.search={search}", "sweep.num_samples=4"]
    if search != "optuna":
        assert load_sweep_spec("quickstart", overrides).search == search
        return
    with pytest.raises(ConfigError) as err:
        load_sweep_spec("quickstart", overrides)
    assert "search = 'optuna'" in str(err.value) and "grid and random" in str(err.value)
    assert "space.step_size" in str(err.value)


def test_a_range_is_validated_at_both_ends_and_decoded_by_label():
    spec = load_sweep_spec(
        "quickstart",
        ["sweep.search=optuna", "sweep.num_samples=6", "sweep.space.step_size={low: 0.01, high: 1.0, log: true}"],
    )
    assert sorted({p["step_size"] for p in spec.trial_params()}) == [0.01, 1.0]
    params = spec.decode({"step_size": 0.3, "mechanism": "dropconnect(p=0.4)", "global_batch_size": 64})
    assert params["mechanism"] == {"name": "dropconnect", "drop_prob": 0.4}
    assert spec.run_config(params).mechanism.drop_prob == 0.4
    with pytest.raises(ConfigError, match=r"space.mechanism"):
        spec.decode({"mechanism": "sgld(sigma=0.1)"})
