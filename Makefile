# Two commands set everything up: `make demo` and `make test`. Both build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

# torch goes first and pinned: an unpinned torch drags in several GB of CUDA packages.
# constraints.txt pins the rest to a tested set (and spares pip's resolver minutes of backtracking).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/carryover demo --workdir .carryover-demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Every hot path beside its physical floor, measured in one run; rewrites docs/benchmarks.md.
bench: venv
	$(BIN)/python jobs/benchmark.py --profile .carryover-bench-profile.json $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .carryover-demo .pytest_cache
