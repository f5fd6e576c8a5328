# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pins for these build machines live in constraints.txt, not as caps in pyproject.toml.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

QS_DATA := data/quickstart

.PHONY: install quickstart test test-fast bench bench-accuracy clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1
	$(PIP_INSTALL) -e ".[cpu,dev,bench]"
	touch $(STAMP)

install: $(STAMP)

$(QS_DATA)/manifest.json: | $(STAMP)
	$(BIN)/python -m jobs.make_shards --layout synthetic --num-classes 200 --images-per-class 20 \
		--image-size 64 --holdout-fraction 0.5 --shard-size 500 --out $(QS_DATA)

quickstart: $(STAMP) $(QS_DATA)/manifest.json
	$(BIN)/python -m jobs.train --config configs/quickstart.yaml
	@echo
	@echo "Runs are in MLflow (sqlite:///$(CURDIR)/mlflow.db). To browse them:"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

# Every CPU figure of BENCHMARKS.md (about 12 minutes on 2 cores). bench/gpu.py needs a GPU;
# bench/loss_ordering.py trains 12 quickstart runs (about 30 minutes): `make bench-accuracy`.
bench: $(STAMP)
	$(BIN)/python bench/bench_planner.py
	$(BIN)/python bench/bench_index.py
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_trainer.py
	$(BIN)/python bench/bench_losses.py
	$(BIN)/python bench/bench_mining.py --threads 1 --max-classes 100000
	$(BIN)/python bench/bench_eval.py --n 100000

bench-accuracy: $(STAMP)
	$(BIN)/python bench/loss_ordering.py

clean:
	rm -rf runs mlruns mlartifacts mlflow.db data/quickstart

# A real two-node Ray cluster on this machine (loopback, token auth): see cluster/README.md.
.PHONY: cluster-up cluster-down cluster-status
cluster-up: $(STAMP)
	cluster/local.sh up

cluster-down:
	cluster/local.sh down

cluster-status:
	cluster/local.sh status
