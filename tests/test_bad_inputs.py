"""Bad input, everywhere a user types something: a clear error naming it, exit status 2, no Ray started,
and the MLflow store exactly as it was (no new run, nothing already recorded lost, no stray artifact)."""

from __future__ import annotations

import compileall
import contextlib
import io
import shutil
import socket
import subprocess
import sys

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from raygd.cli import EXIT_BAD_INPUT, main
from tests.idx import write_idx_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with good and broken data, configs and sweep files, and a store holding one finished run."""
    root = tmp_path_factory.mktemp("bad-inputs")
    good = write_idx_dataset(root / "good")
    (root / "empty").mkdir()
    corrupt = write_idx_dataset(root / "corrupt")
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes((corrupt / "train-images-idx3-ubyte.gz").read_bytes()[:200])
    mismatch = write_idx_dataset(root / "mismatch")
    other = write_idx_dataset(root / "other", n_train=300)
    shutil.copy(other / "train-labels-idx1-ubyte.gz", mismatch / "train-labels-idx1-ubyte.gz")
    garbage = write_idx_dataset(root / "garbage")
    (garbage / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    shape = write_idx_dataset(root / "shape", gz=False)
    header = bytearray((shape / "train-images-idx3-ubyte").read_bytes())
    header[3] = 2  # a 2-d array where images must be n x 28 x 28
    (shape / "train-images-idx3-ubyte").write_bytes(bytes(header))

    store_dir = root / "store"
    store_dir.mkdir()
    store = f"sqlite:///{store_dir / 'mlflow.db'}"
    client = MlflowClient(store)
    exp = client.create_experiment("kept", artifact_location=str(store_dir / "artifacts"))
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "train/loss", 0.5, step=1)
    client.set_terminated(run.info.run_id)

    (root / "run.yaml").write_text(
        f"data: {{data_dir: '{good}'}}\ntrain: {{model: logreg, num_workers: 1, global_batch_size: 32}}\n"
        f"tracking: {{tracking_uri: '{store}', experiment_name: kept}}\n"
    )
    (root / "userplug.py").write_text(USER_MODULE)
    (root / "broken_plug.py").write_text("import a_library_nobody_installed  # noqa\n")
    compileall.compile_dir(root, quiet=1)  # importing them must not add files the snapshot would see
    (root / "syntax.yaml").write_text("train: {model: [\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "unsafe.yaml").write_text("train: !!python/object/apply:os.system ['echo unsafe']\n")
    (root / "sweep.yaml").write_text(
        f"name: kept\nbase: {{data: {{data_dir: '{good}'}}, "
        f"tracking: {{tracking_uri: '{store}'}}}}\nspace: {{step_size: [-1]}}\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens here once the socket is closed
    return {
        "root": root,
        "store": store,
        "kept_run": run.info.run_id,
        "closed_port": closed_port,
        "dirs": {name: root / name for name in ("empty", "corrupt", "mismatch", "garbage", "shape")},
    }


USER_MODULE = """
import torch
from torch import nn

NOT_CALLABLE = 3


def build(input_shape, num_classes, width=16):
    d = 1
    for s in input_shape:
        d *= s
    layers = [nn.Flatten(), nn.Linear(d, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def build_raises(input_shape, num_classes):
    raise RuntimeError("this factory needs a GPU")


def build_not_module(input_shape, num_classes):
    return "a model"


def build_wrong_logits(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes + 1))


def build_batchnorm(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))


def load_not_a_pair():
    return [1, 2, 3]


def load_strings():
    return ["some", "text"], ["more", "text"]


class Labelled(torch.utils.data.TensorDataset):
    num_classes = 3


def load_labels_out_of_range():
    x = torch.randn(64, 1, 28, 28)
    y = torch.arange(64) % 5
    return Labelled(x, y), Labelled(x[:16], y[:16])


def load_raises(path="/data/corpus.txt"):
    raise FileNotFoundError(path)


def load_sequences():
    x = torch.randint(10, (64, 8))
    return (x.float(), x.roll(-1, 1)), (x[:16].float(), x[:16].roll(-1, 1))
"""


def _snapshot(world) -> tuple:
    client = MlflowClient(world["store"])
    runs = {
        r.info.run_id: (r.info.status, tuple(sorted(r.data.metrics.items())))
        for e in client.search_experiments(view_type=ViewType.ALL)
        for r in client.search_runs([e.experiment_id], run_view_type=ViewType.ALL)
    }
    files = sorted(
        str(p.relative_to(world["root"])) for p in world["root"].rglob("*") if p.is_file() and p.name != "mlflow.db"
    )
    return runs, files


# (id, argv with {root}/{store}/{port} placeholders, environment, text the message must contain)
RUN = "{root}/run.yaml"
CASES = [
    ("unknown-section", ["train", RUN, "--set", "foo.bar=1"], {}, "foo"),
    ("unknown-field", ["train", RUN, "--set", "train.stepsize=0.1"], {}, "train.stepsize"),
    ("model", ["train", RUN, "--set", "train.model=vgg"], {}, "train.model"),
    ("type", ["train", RUN, "--set", "train.global_batch_size=abc"], {}, "train.global_batch_size"),
    ("step-size", ["train", RUN, "--set", "train.step_size=-1"], {}, "train.step_size"),
    (
        "indivisible-batch",
        ["train", RUN, "--set", "train.num_workers=2", "--set", "train.global_batch_size=33"],
        {},
        "train.global_batch_size",
    ),
    ("batch-too-large", ["train", RUN, "--set", "train.global_batch_size=4096"], {}, "train.global_batch_size"),
    ("target", ["train", RUN, "--set", "train.target_accuracy=1.5"], {}, "train.target_accuracy"),
    ("device", ["train", RUN, "--set", "train.device=tpu"], {}, "train.device"),
    ("max-failures", ["train", RUN, "--set", "train.max_failures=-2"], {}, "train.max_failures"),
    (
        "checkpoint-every",
        ["train", RUN, "--set", "train.checkpoint_every_steps=-5"],
        {},
        "train.checkpoint_every_steps",
    ),
    (
        "free-estimator-one-worker",
        ["train", RUN, "--set", "train.diversity_estimator=free"],
        {},
        "train.diversity_estimator",
    ),
    ("mechanism", ["train", RUN, "--set", "mechanism.name=dropout"], {}, "mechanism.name"),
    ("drop-prob", ["train", RUN, "--set", "mechanism.drop_prob=1.0"], {}, "mechanism.drop_prob"),
    ("data-name", ["train", RUN, "--set", "data.name=imagenet"], {}, "data.name"),
    ("replication", ["train", RUN, "--set", "data.replication=0"], {}, "data.replication"),
    ("classes", ["train", RUN, "--set", "data.classes=[0,42]"], {}, "data.classes"),
    ("malformed-set", ["train", RUN, "--set", "train.step_size"], {}, "train.step_size"),
    ("missing-config", ["train", "{root}/nope.yaml"], {}, "nope.yaml"),
    ("yaml-syntax", ["train", "{root}/syntax.yaml"], {}, "syntax.yaml"),
    ("yaml-not-mapping", ["train", "{root}/list.yaml"], {}, "list.yaml"),
    ("yaml-unsafe-tag", ["train", "{root}/unsafe.yaml"], {}, "unsafe.yaml"),
    ("data-dir-missing", ["train", RUN, "--set", "data.data_dir={root}/missing"], {}, "missing"),
    ("data-dir-empty", ["train", RUN, "--set", "data.data_dir={root}/empty"], {}, "empty"),
    ("idx-truncated", ["train", RUN, "--set", "data.data_dir={root}/corrupt"], {}, "train-images-idx3-ubyte"),
    ("idx-count-mismatch", ["train", RUN, "--set", "data.data_dir={root}/mismatch"], {}, "labels"),
    ("idx-not-gzip", ["train", RUN, "--set", "data.data_dir={root}/garbage"], {}, "t10k-labels-idx1-ubyte"),
    ("idx-wrong-shape", ["train", RUN, "--set", "data.data_dir={root}/shape"], {}, "shape"),
    (
        "store-folder-missing",
        ["train", RUN, "--set", "tracking.tracking_uri=sqlite:///{root}/no/such/mlflow.db"],
        {},
        "tracking.tracking_uri",
    ),
    (
        "store-server-down",
        ["train", RUN, "--set", "tracking.tracking_uri=http://127.0.0.1:{port}"],
        {},
        "tracking.tracking_uri",
    ),
    ("store-scheme", ["train", RUN, "--set", "tracking.tracking_uri=ftp://example.org/x"], {}, "tracking.tracking_uri"),
    ("ray-address-unreachable", ["train", RUN], {"RAY_ADDRESS": "127.0.0.1:{port}"}, "RAY_ADDRESS"),
    ("ray-address-malformed", ["train", RUN], {"RAY_ADDRESS": "http://head"}, "RAY_ADDRESS"),
    ("sweep-preset", ["sweep", "no-such-preset"], {}, "no-such-preset"),
    ("sweep-space", ["sweep", "{root}/sweep.yaml"], {}, "train.step_size"),
    ("sweep-search", ["sweep", "{root}/sweep.yaml", "--set", "sweep.search=bayes"], {}, "search"),
    (
        "sweep-store-down",
        ["sweep", "quickstart", "--set", "tracking.tracking_uri=http://127.0.0.1:{port}"],
        {},
        "tracking.tracking_uri",
    ),
    (
        "sweep-resume-nothing",
        ["sweep", "quickstart", "--resume", "--set", "tracking.tracking_uri={store}"],
        {},
        "--resume",
    ),
    ("diversity-replication", ["diversity", RUN, "--replication", "0,x"], {}, "--replication"),
    ("diversity-every", ["diversity", RUN, "--every", "0"], {}, "--every"),
    ("diversity-mechanism", ["diversity", RUN, "--mechanism", "foo"], {}, "--mechanism"),
    ("report-unknown-experiment", ["report", "nosuchsweep", "--tracking-uri", "{store}"], {}, "nosuchsweep"),
    # the user's own model and data, by import string (raygd.plugins), from the working directory
    ("model-import-form", ["train", RUN, "--set", "train.model=userplug.build"], {}, "train.model"),
    ("model-module-missing", ["train", RUN, "--set", "train.model=no_such_module:build"], {}, "no_such_module"),
    ("model-module-broken", ["train", RUN, "--set", "train.model=broken_plug:build"], {}, "a_library_nobody"),
    ("model-attribute-missing", ["train", RUN, "--set", "train.model=userplug:nope"], {}, "'nope'"),
    ("model-not-callable", ["train", RUN, "--set", "train.model=userplug:NOT_CALLABLE"], {}, "not callable"),
    ("model-factory-raises", ["train", RUN, "--set", "train.model=userplug:build_raises"], {}, "needs a GPU"),
    ("model-not-a-module", ["train", RUN, "--set", "train.model=userplug:build_not_module"], {}, "nn.Module"),
    ("model-wrong-logits", ["train", RUN, "--set", "train.model=userplug:build_wrong_logits"], {}, "(2, 10)"),
    ("model-args-builtin", ["train", RUN, "--set", "train.model_args={{width: 3}}"], {}, "train.model_args"),
    (
        "model-batchnorm-in-step",
        ["train", RUN, "--set", "train.model=userplug:build_batchnorm", "--set", "train.diversity_estimator=in_step"],
        {},
        "free",
    ),
    ("data-not-a-pair", ["train", RUN, "--set", "data.name=userplug:load_not_a_pair"], {}, "(train, test)"),
    ("data-wrong-types", ["train", RUN, "--set", "data.name=userplug:load_strings"], {}, "Dataset"),
    ("data-labels-out-of-range", ["train", RUN, "--set", "data.name=userplug:load_labels_out_of_range"], {}, "0..2"),
    ("data-factory-raises", ["train", RUN, "--set", "data.name=userplug:load_raises"], {}, "corpus.txt"),
    ("data-args-builtin", ["train", RUN, "--set", "data.args={{path: x}}"], {}, "data.args"),
    (
        "sequence-labels-flat-logits",
        ["train", RUN, "--set", "data.name=userplug:load_sequences", "--set", "train.model=userplug:build"],
        {},
        "(2, 8, 10)",
    ),
    (
        "both-targets",
        ["train", RUN, "--set", "train.target_accuracy=0.8", "--set", "train.target_loss=1.0"],
        {},
        "train.target_loss",
    ),
    ("neither-target", ["train", RUN, "--set", "train.target_accuracy=null"], {}, "exactly one"),
    ("target-loss-negative", ["train", RUN, "--set", "train.target_loss=-1"], {}, "train.target_loss"),
    (
        "dropconnect-layers-match-nothing",
        ["train", RUN, "--set", "mechanism.name=dropconnect", "--set", "mechanism.dropconnect_layers=[blocks.*]"],
        {},
        "mechanism.dropconnect_layers",
    ),
]


@pytest.mark.parametrize("argv, env, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_work(world, monkeypatch, argv, env, names):
    import ray

    fill = {"root": world["root"], "store": world["store"], "port": world["closed_port"]}
    monkeypatch.chdir(world["root"])  # a default ./mlflow.db would show up in the snapshot
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(**fill))
    ray_was_up = ray.is_initialized()
    before = _snapshot(world)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([a.format(**fill) for a in argv])
    message = err.getvalue()
    assert code == EXIT_BAD_INPUT, message
    assert f"raygd {argv[0]}: error: " in message and names.format(**fill) in message, message
    assert "Traceback" not in message
    assert ray_was_up or not ray.is_initialized(), "Ray was started for bad input"
    assert _snapshot(world) == before
    assert MlflowClient(world["store"]).get_run(world["kept_run"]).data.metrics == {"train/loss": 0.5}


def test_the_command_exits_with_status_2_and_one_paragraph(world):
    done = subprocess.run(
        [sys.executable, "-m", "raygd.cli", "train", str(world["root"] / "run.yaml"), "--set", "train.model=vgg"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_BAD_INPUT and done.stdout == ""
    assert done.stderr.strip().startswith("raygd train: error: train.model = 'vgg'")
    assert "logreg, logreg_binary, mnist_cnn" in done.stderr and "Traceback" not in done.stderr


def test_an_unknown_flag_exits_with_status_2():
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["train", "x.yaml", "--sett", "a=b"])
    assert exit_info.value.code == EXIT_BAD_INPUT and "--sett" in err.getvalue()
