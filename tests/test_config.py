"""Config validation: every bad value names its field and what is allowed."""

from __future__ import annotations

import pytest

from raygd.config import ConfigError, RunConfig, absolute_tracking_uri, apply_overrides, load_run_config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.global_batch_size=65", "train.num_workers=2"], "train.global_batch_size"),
        (["mechanism.drop_prob=1.0"], "mechanism.drop_prob"),
        (["mechanism.drop_prob=-0.1"], "mechanism.drop_prob"),
        (["train.step_size=-0.1"], "train.step_size"),
        (["train.step_size=.nan"], "train.step_size"),
        (["train.model=vgg"], "train.model"),
        (["mechanism.name=dropout"], "mechanism.name"),
        (["data.sampling=random"], "data.sampling"),
        (["data.name=imagenet"], "data.name"),
        (["data.replication=0"], "data.replication"),
        (["data.classes=[3]"], "data.classes"),
        (["data.classes=[1, 1]"], "data.classes"),
        (["train.target_accuracy=1.5"], "train.target_accuracy"),
        (["train.num_workers=0"], "train.num_workers"),
        (["train.eval_every_steps=0"], "train.eval_every_steps"),
        (["train.test_every_evals=0"], "train.test_every_evals"),
        (["train.test_every_evals=2.5"], "train.test_every_evals"),
        (["train.eval_every_passes=0"], "train.eval_every_passes"),
        (["train.eval_every_passes=1.5"], "train.eval_every_passes"),
        (["train.eval_every_passes=.nan"], "train.eval_every_passes"),
        (["mechanism.quant_levels=200"], "mechanism.quant_levels"),
        (["mechanism.sgld_sigma=-1"], "mechanism.sgld_sigma"),
        (["train.model=logreg_binary"], "train.model"),
        (["train.step_size=fast"], "train.step_size"),
        (["train.max_passes=0"], "train.max_passes"),
        (["train.device=tpu"], "train.device"),
        (["train.learning_rate=0.1"], "train.learning_rate"),
        (["optimizer.name=adam"], "optimizer"),
        (["train.step_size"], "train.step_size"),
        (["tracking.tracking_uri=mlruns"], "tracking.tracking_uri"),
        (["train.diversity_estimator=exact"], "train.diversity_estimator"),
        (["train.diversity_estimator=free", "train.num_workers=1"], "train.diversity_estimator"),
        (["train.diversity_estimator=in_step", "mechanism.name=dropconnect"], "train.diversity_estimator"),
        (["train.diversity_estimator=free", "mechanism.name=quantize"], "train.diversity_estimator"),
        (["train.diversity_every_steps=0"], "train.diversity_every_steps"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, overrides)
    assert field in str(err.value)


def test_choice_errors_list_allowed_values():
    with pytest.raises(ConfigError, match="logreg, logreg_binary, mnist_cnn"):
        load_run_config(None, ["train.model=vgg"])


def test_yaml_and_overrides_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {name: synthetic, classes: [0, 1]}\ntrain: {model: logreg_binary, step_size: 1}\n")
    cfg = load_run_config(path, ["train.global_batch_size=32", "data.replication=4"])
    assert cfg.train.step_size == 1.0 and isinstance(cfg.train.step_size, float)
    assert cfg.train.global_batch_size == 32 and cfg.data.replication == 4
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    flat = cfg.flat()
    assert flat["train.global_batch_size"] == 32 and flat["data.classes"] == [0, 1]


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml"):
        load_run_config(bad)


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(path)


def test_relative_sqlite_uri_becomes_absolute(tmp_path):
    assert absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_overrides_do_not_mutate_the_input():
    raw = {"train": {"step_size": 0.1}}
    apply_overrides(raw, ["train.step_size=0.2"])
    assert raw == {"train": {"step_size": 0.1}}


def test_evaluation_is_pass_based_unless_eval_every_steps_is_given():
    cfg = load_run_config(None)
    assert cfg.train.eval_every_steps is None and cfg.train.eval_every_passes == 0.05
    assert load_run_config(None, ["train.eval_every_steps=7"]).train.eval_every_steps == 7
    assert load_run_config(None, ["train.eval_every_steps=null"]).train.eval_every_steps is None
    with pytest.raises(
        ConfigError, match=r"train.eval_every_passes = 2.0 is invalid: must be a fraction of a pass in \(0, 1\]"
    ):
        load_run_config(None, ["train.eval_every_passes=2"])


def test_set_reaches_nested_fields():
    cfg = load_run_config(
        None,
        [
            "train.batch_schedule.policy=diversity",
            "train.batch_schedule.delta=2",
            "train.network.bandwidth_gbps=1",  # train.network is null by default: the link starts from its defaults
        ],
    )
    assert cfg.train.batch_schedule.policy == "diversity" and cfg.train.batch_schedule.delta == 2.0
    assert cfg.train.network is not None and cfg.train.network.bandwidth_gbps == 1.0
    assert cfg.train.network.latency_us == 50.0
    flat = cfg.flat()
    assert flat["train.batch_schedule.policy"] == "diversity" and flat["train.network.bandwidth_gbps"] == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.network.bandwidth_gbps=0"], "train.network.bandwidth_gbps"),
        (["train.batch_schedule.speed=2"], "train.batch_schedule.speed"),
        (["train.step_size.x=1"], "train.step_size"),
        (["train.network=5", "train.network.latency_us=1"], "train.network must be a mapping of fields"),
        (["train"], "section.field=value"),
        (["train=1"], "the key must be section.field"),
        (["train..x=1"], "the key must be section.field"),
    ],
)
def test_nested_set_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_run_config(None, overrides)


def test_nested_overrides_do_not_mutate_the_input():
    raw = {"train": {"network": {"bandwidth_gbps": 2.0}}}
    merged = apply_overrides(raw, ["train.network.bandwidth_gbps=1"])
    assert raw == {"train": {"network": {"bandwidth_gbps": 2.0}}}
    assert merged["train"]["network"]["bandwidth_gbps"] == 1
