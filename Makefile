# raygd: `make train` runs a small real job, `make test` passes the tests.
# Both create .venv and install the pinned requirements on first use.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
# pip prints a warning per package for the machine's local indexes; keep the real errors.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: install data train sweep lint test test-fast bench clean paper

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import raygd, ray, torch, torchvision, mlflow"
	touch $@

install: $(STAMP)

# Fashion-MNIST from Debian's package where we are root on Debian and nothing is set.
data:
	@if [ -z "$$RAYGD_DATA_DIR" ] && [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing dataset-fashion-mnist (Debian package) ..."; \
		apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

train: $(STAMP) data
	$(BIN)/raygd train configs/quickstart.yaml $(ARGS)

# ruff (lint rules and format check) on every package; pyright (basic, see pyproject.toml) on raygd and tuning.
lint: $(STAMP)
	$(BIN)/ruff check raygd tuning tests bench examples
	$(BIN)/ruff format --check raygd tuning tests bench examples
	$(BIN)/pyright raygd tuning

test: lint
	$(BIN)/python -m pytest -q tests

# The maths and loop-body tests without starting Ray (a few minutes); tests/conftest.py marks the others `ray`.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray" tests

# The benches whose figures docs/BENCHMARKS.md quotes, interleaved A/B with their spread, into bench/out/bench.md
# (commit, date, load average): about 45 min on an idle 2-core machine, each bench stopped at its limit.
bench: $(STAMP) data
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) mlflow.db build *.egg-info

sweep: $(STAMP) data
	$(BIN)/raygd sweep quickstart $(ARGS)

# The paper's experiments (issue #7): make paper EXP=fig3a|dropconnect|batch-scaling|bound|dropconnect-link [ARGS=...]
paper: $(STAMP) data
	$(BIN)/python -m bench.paper.run $(EXP) $(ARGS)
