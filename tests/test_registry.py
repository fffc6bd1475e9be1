"""The mechanism registry: every registered mechanism builds from its config, labels itself, logs its
params, declares the estimators it excludes, and checkpoints its random state exactly."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from raygd.config import DIVERSITY_ESTIMATORS, MECHANISMS, ConfigError, MechanismConfig, RunConfig, TrainConfig
from raygd.mechanisms import REGISTRY, build_mechanism, mechanism_label, parse_label, surrogate_label

NAMES = list(REGISTRY)


def test_config_names_are_the_registry_and_import_without_torch() -> None:
    assert MECHANISMS == tuple(REGISTRY) == ("vanilla", "dropconnect", "sgld", "quantize")
    code = "import sys, raygd.config, raygd.mechanisms; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", NAMES)
def test_builds_from_its_config_with_label_and_log_params(name: str) -> None:
    cfg = MechanismConfig(name=name)
    mech = build_mechanism(cfg)
    assert type(mech) is REGISTRY[name] and mech.name == name
    label = mechanism_label(cfg)
    assert label.startswith(name) and mechanism_label(parse_label(label)) == label
    assert mechanism_label({"name": name}) == label  # a sweep's partial entry takes the config defaults
    params = mech.log_params()
    assert "mechanism.granularity" in params and all(isinstance(v, (str, int, float)) for v in params.values())
    assert isinstance(type(mech).estimator, str) and type(mech).estimator


@pytest.mark.parametrize("name", NAMES)
def test_excluded_estimators_are_refused_by_the_config(name: str) -> None:
    for estimator, reason in REGISTRY[name].excluded_estimators.items():
        assert estimator in DIVERSITY_ESTIMATORS
        with pytest.raises(ConfigError, match=r"train.diversity_estimator") as err:
            RunConfig(mechanism=MechanismConfig(name=name), train=TrainConfig(diversity_estimator=estimator))
        assert reason in str(err.value)


@pytest.mark.parametrize(
    "mech,label,surrogate",
    [
        ({"name": "vanilla"}, "vanilla", "vanilla"),
        ({"name": "dropconnect", "drop_prob": 0.4}, "dropconnect(p=0.4)", "dropconnect(p=0.4)"),
        (
            {"name": "dropconnect", "drop_prob": 0.4, "dropconnect_granularity": "per_group"},
            "dropconnect(p=0.4, per_group)",
            "dropconnect(p=0.4)",
        ),
        ({"name": "sgld", "sgld_sigma": 0.001}, "sgld(sigma=0.001)", "sgld(sigma=0.001)"),
        ({"name": "quantize", "quant_levels": 4}, "quantize(s=4)", "quantize(s=4)"),
    ],
)
def test_labels_read_back_into_the_config_fields_they_show(mech: dict, label: str, surrogate: str) -> None:
    assert mechanism_label(mech) == label and parse_label(label) == mech
    assert surrogate_label(mech) == surrogate == surrogate_label(parse_label(label))
    assert mechanism_label(MechanismConfig(**mech)) == label


def test_unknown_names_and_fields_are_refused() -> None:
    assert mechanism_label({"name": "nope"}) == "nope"  # a sweep spec labels entries before checking them
    with pytest.raises(ValueError, match="allowed values are vanilla, dropconnect, sgld, quantize"):
        build_mechanism(_unchecked("nope"))
    with pytest.raises(ValueError, match="not a field"):
        parse_label("sgld(p=0.1)")


def _unchecked(name: str) -> MechanismConfig:
    cfg = MechanismConfig()
    cfg.name = name  # past __post_init__: what build_mechanism sees if a caller skips validation
    return cfg


# --------------------------------------------------------------------------- state_dict


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _step(mech, model: nn.Module, step: int) -> torch.Tensor:
    """One training step's gradients after the mechanism: its forward masks and after_backward draws."""
    model.zero_grad(set_to_none=True)
    x, y = torch.arange(48.0).reshape(8, 6).sin(), torch.arange(8) % 3
    nn.functional.cross_entropy(model(x), y).backward()
    mech.after_backward(model, step)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _set_up(name: str) -> tuple:
    mech = build_mechanism(MechanismConfig(name=name))
    model = mech.setup(_model(), seed=7, rank=1, world_size=1, global_batch_size=8, device=torch.device("cpu"))
    return mech, model


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_reproduces_the_next_draws(name: str) -> None:
    mech, model = _set_up(name)
    _step(mech, model, 0)  # advance the generators past their seed
    saved = copy.deepcopy(mech.state_dict())
    expected = _step(mech, model, 1)

    restored, restored_model = _set_up(name)
    unrestored = _step(restored, restored_model, 1)
    restored.load_state_dict(saved)
    assert torch.equal(_step(restored, restored_model, 1), expected)
    if saved:  # a mechanism with random state draws something else without it
        assert not torch.equal(unrestored, expected)
    assert torch.equal(_step(mech, model, 2), _step(restored, restored_model, 2))  # and stays in step


def test_paper_bound_settings_join_the_sweep_labels_to_the_measured_surrogates() -> None:
    # bench/paper/run.py bound: the best B of each paper-dropconnect setting sits beside the B_D measured
    # with per-example masks at the same p (its table names them vanilla, dropconnect(p=0.4), ...).
    import yaml

    from tuning.spec import PRESETS_DIR

    space = yaml.safe_load((PRESETS_DIR / "paper-dropconnect.yaml").read_text())["space"]["mechanism"]
    settings = [surrogate_label(parse_label(mechanism_label(m))) for m in space]
    measured = [surrogate_label(MechanismConfig(name="dropconnect", drop_prob=p)) for p in (0.4, 0.5)]
    # the per_worker arm (one mask per worker batch) joins the per-example measurement at its p, as the groups do
    assert measured == ["dropconnect(p=0.4)", "dropconnect(p=0.5)"]
    assert settings[:3] == ["vanilla", *measured] and set(settings) == {"vanilla", *measured}
