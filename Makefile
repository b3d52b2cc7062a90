# Everything a fresh machine needs: `make test` and `make figures` create the environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch: a CPU build where there is no NVIDIA GPU (the 2.13.0 wheel lies on the project's machines);
# on a GPU machine any release in pyproject.toml's range. Override with `make install TORCH=...`.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH ?= torch>=2.2,<3
else
TORCH ?= torch==2.13.0
endif

.PHONY: install test test-all lint bench figures clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check curvlab tests benchmarks analyses

# curvlinops' own requirements pull torchvision (through BackPACK), which its KFAC does not use and
# which would replace the CPU torch with a multi-GB build: install the peer without it.
$(VENV)/.bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps 'curvlinops-for-pytorch>=2.0' backpack-for-pytorch unfoldNd einconv
	$(BIN)/python -m pip install --quiet einops linear_operator opt-einsum
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.run

figures: $(STAMP)
	$(BIN)/python -m analyses.run_all

clean:
	rm -rf $(VENV) figures .pytest_cache
