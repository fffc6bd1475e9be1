"""``raygd schema``: the JSON Schema of run configs and sweep files (raygd/schema.py, tuning/schema.py).

The committed schemas are what the code generates; every YAML file in the repository passes them and names
them on its first line; a bad value fails on its field; the schema's choices are the config's own checks."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from raygd.cli import main
from raygd.config import ConfigError, RunConfig, load_run_config
from raygd.schema import CHOICES, dataclasses_under, run_config_schema
from tuning.commands import SCHEMA_FILES, schema_text
from tuning.schema import SWEEP_CHOICES, sweep_schema
from tuning.spec import SweepSpec, load_sweep_spec

REPO = Path(__file__).resolve().parents[1]
SECTION = {
    "DataConfig": "data",
    "MechanismConfig": "mechanism",
    "TrainConfig": "train",
    "NetworkConfig": "train.network",
    "BatchScheduleConfig": "train.batch_schedule",
    "TrackingConfig": "tracking",
}
RUN_FILES = [REPO / "configs" / "quickstart.yaml", REPO / "examples" / "charlm" / "train.yaml"]
SWEEP_FILES = [*sorted((REPO / "tuning" / "presets").glob("*.yaml")), REPO / "examples" / "charlm" / "sweep.yaml"]


def _validator(schema: dict) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("kind", sorted(SCHEMA_FILES))
def test_the_committed_schema_is_what_the_code_generates(kind):
    committed = (REPO / SCHEMA_FILES[kind]).read_text()
    assert committed == schema_text(kind), f"{SCHEMA_FILES[kind]} is stale: raygd schema {kind} --out it"


@pytest.mark.parametrize("path", RUN_FILES + SWEEP_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_names_its_schema_and_passes_it(path):
    first = path.read_text().splitlines()[0]
    kind = "run" if path in RUN_FILES else "sweep"
    assert first.startswith("# yaml-language-server: $schema=")
    named = (path.parent / first.split("$schema=", 1)[1]).resolve()
    assert named == (REPO / SCHEMA_FILES[kind]).resolve() and named.exists()
    schema = json.loads(named.read_text())
    errors = [e.message for e in _validator(schema).iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


def test_every_run_config_field_is_in_the_schema_with_a_description():
    schema = run_config_schema()
    for cls in dataclasses_under(RunConfig):
        props = schema["$defs"][cls.__name__]["properties"] if cls is not RunConfig else schema["properties"]
        for name in cls.__dataclass_fields__:
            assert name in props, f"{cls.__name__}.{name} missing"
            if cls is not RunConfig:
                assert props[name].get("description"), f"{cls.__name__}.{name} has no description"


@pytest.mark.parametrize(
    "config, path, fragment",
    [
        ({"mechanism": {"name": "dropout"}}, ["mechanism", "name"], "'dropout' is not one of"),
        ({"train": {"model": "not an import"}}, ["train", "model"], "is not valid under any of the given schemas"),
        ({"train": {"stepsize": 0.1}}, ["train"], "'stepsize' was unexpected"),
        ({"train": {"batch_schedule": {"policy": "auto"}}}, ["train", "batch_schedule", "policy"], "is not one of"),
        ({"train": {"global_batch_size": "big"}}, ["train", "global_batch_size"], "is not of type 'integer'"),
    ],
)
def test_a_bad_run_config_fails_on_its_field_in_the_schema_and_in_the_loader(tmp_path, config, path, fragment):
    errors = list(_validator(run_config_schema()).iter_errors(config))
    assert [list(e.absolute_path) for e in errors] == [path] and fragment in errors[0].message
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=path[-1]):  # the loader refuses it too, naming the field
        load_run_config(tmp_path / "bad.yaml")


def test_the_import_string_form_is_allowed_where_the_config_allows_it():
    validator = _validator(run_config_schema())
    good = {"train": {"model": "examples.charlm.model:build"}, "data": {"name": "examples.charlm.data:load"}}
    assert list(validator.iter_errors(good)) == []
    assert list(validator.iter_errors({"mechanism": {"name": "mypkg.mech:Mine"}}))  # no plug-in mechanism


def test_a_bad_sweep_fails_on_its_field():
    validator = _validator(sweep_schema())
    spec = yaml.safe_load((REPO / "tuning" / "presets" / "quickstart.yaml").read_text())
    for change, where in (
        ({"search": "bayes"}, ["search"]),
        ({"space": {**spec["space"], "batch": [64]}}, ["space"]),
        ({"space": {**spec["space"], "mechanism": [{"name": "vanilla", "drop": 1}]}}, ["space", "mechanism", 0]),
        ({"base": {**spec["base"], "train": {"model": 3}}}, ["base", "train", "model"]),
    ):
        errors = list(validator.iter_errors({**spec, **change}))
        assert [list(e.absolute_path) for e in errors] == [where], (change, [e.message for e in errors])
    assert [e.message for e in validator.iter_errors({"name": "x"})] == ["'space' is a required property"]


def _checked_choices() -> set[str]:
    """The dotted field names the config checks with ``_choice`` or ``_builtin_or_import`` (from the source)."""
    found = set()
    for path in (REPO / "raygd" / "config").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or getattr(node.func, "id", "") not in ("_choice", "_builtin_or_import"):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant):
                found.add(first.value)
    return found


def test_the_schemas_choices_are_exactly_the_fields_the_config_checks_against_a_list():
    assert {f"{SECTION[cls]}.{name}" for cls, name in CHOICES} == _checked_choices()
    schema = run_config_schema()
    for (cls, name), (allowed, imports) in CHOICES.items():  # the loader refuses a value outside them
        with pytest.raises(ConfigError, match=f"{SECTION[cls]}.{name}"):
            load_run_config(None, [f"{SECTION[cls]}.{name}=not-a-{name}"])
        prop = schema["$defs"][cls]["properties"][name]
        enums = [o["enum"] for o in prop.get("anyOf", [prop]) if "enum" in o]
        patterns = [o for o in prop.get("anyOf", []) if "pattern" in o]
        assert enums == [list(allowed)] and len(patterns) == int(imports)
    for (_, name), (allowed, _) in SWEEP_CHOICES.items():
        assert name in SweepSpec.__dataclass_fields__ and allowed


def test_raygd_schema_prints_and_writes_it(tmp_path, capsys):
    assert main(["schema", "sweep"]) == 0
    assert json.loads(capsys.readouterr().out) == sweep_schema()
    assert main(["schema", "run", "--out", str(tmp_path / "run.json")]) == 0
    assert json.loads((tmp_path / "run.json").read_text()) == run_config_schema()
    with pytest.raises(SystemExit) as exit_info:
        main(["schema", "train"])
    assert exit_info.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err


def test_every_preset_the_schema_passes_also_loads():
    for path in SWEEP_FILES:  # the schema is no stricter than the loader on the files raygd ships
        assert load_sweep_spec(str(path), []).name
