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
    [({"name": "vanilla"}, "vanilla"), ({"name": "dropconnect", "drop_prob": 0.4}, "dropconnect(p=0.4)"),
     ({"name": "dropconnect", "drop_prob": 0.5, "dropconnect_granularity": "per_worker"},
      "dropconnect(p=0.5, per_worker)"),
     ({"name": "sgld", "sgld_sigma": 0.001}, "sgld(sigma=0.001)"), ({"name": "quantize"}, "quantize(s=16)")],
)
def test_mechanism_labels(mech, label):
    assert mechanism_label(mech) == label


def test_relative_tracking_uri_is_fixed_at_load_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_sweep_spec("quickstart")
    monkeypatch.chdir("/")  # a Tune trial runs elsewhere: it must still see the driver's store
    assert spec.run_config(spec.trial_params()[0]).tracking.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
