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

.PHONY: install test test-all lint peers bench fuzz figures sweeps predict-cells clean
.DELETE_ON_ERROR:

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

# The long fuzz run of issue 15 (docs/reliability.md): hostile and damaged checkpoints of four models
# through info, spectrum, fit and gradcov, each in a child with resource limits (make test runs a
# bounded part of it: tests/test_fuzz.py). FUZZ_CASES byte-level mutations; the figures go to
# fuzz-report.json.
FUZZ_CASES ?= 2000
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz_runner.py --cases $(FUZZ_CASES) --report fuzz-report.json

lint: $(STAMP)
	$(BIN)/ruff check curvlab tests benchmarks analyses

# The peers (curvlinops, BackPACK, kronfluence): their own requirements pull torchvision, which neither's
# K-FAC uses and which would replace the CPU torch with a multi-GB build (pip's dry run shows it): install
# them without their dependencies, then the dependencies that need no torch. `make peers` is what the
# round-trip tests (tests/test_peers.py) and CI need; `make bench` uses it too.
$(VENV)/.bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps 'curvlinops-for-pytorch>=2.0' backpack-for-pytorch unfoldNd einconv \
		'kronfluence>=1.0'
	$(BIN)/python -m pip install --quiet einops linear_operator opt-einsum safetensors accelerate
	touch $@

peers: $(VENV)/.bench

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.run

# ---------------------------------------------------------------------------------------- figures
# Every appendix figure (Figs. 9-15) and figures/index.html. Make tracks the dependencies: a figure is
# rebuilt when its script or the library changes; the trained runs are reused, and a run interrupted
# mid-way is resumed (its .done stamp is written only at the end). Paper scale on a GPU machine:
#   make figures SCALE=paper DATA=cifar10:PATH DEVICE=cuda
SCALE  ?= small
DEVICE ?= auto
DATA   ?=
FIG    ?= $(if $(filter paper,$(SCALE)),figures/paper,figures)
export CURVLAB_SCALE   := $(SCALE)
export CURVLAB_DEVICE  := $(DEVICE)
export CURVLAB_DATA    := $(DATA)
export CURVLAB_FIGURES := $(FIG)
LIB    := $(wildcard curvlab/*.py curvlab/*/*.py curvlab/*/*/*.py) analyses/config.py
NQMLIB := $(wildcard curvlab/nqm/*.py) curvlab/plots/nqm.py curvlab/commands/__init__.py curvlab/commands/common.py curvlab/commands/nqm.py analyses/config.py analyses/nqm.py
RUNS   := $(FIG)/data/runs
FIGURE_PNGS := $(addprefix $(FIG)/,fig09.png fig10a.png fig10b.png fig11.png fig12.png fig13.png \
               fig14a.png fig14b.png fig14c.png fig15.png sweep_mlp.png \
               kfac_vs_ggn_resnet8.png kfac_vs_ggn_transformer.png predict_cells.png)
SWEEPLIB := $(wildcard curvlab/sweep/*.py curvlab/optim/*.py curvlab/models/*.py) curvlab/analysis/scaling.py \
            curvlab/plots/sweep.py curvlab/commands/sweep.py analyses/config.py analyses/sweep.py
# a reduced run of the same path (CI: make figures SCALE=paper DATA=cifar10:DIR STEPS=2 EXAMPLES=64 ...)
export CURVLAB_STEPS    := $(STEPS)
export CURVLAB_EXAMPLES := $(EXAMPLES)
export CURVLAB_NQM_ARGS := $(NQM_ARGS)

# One OpenMP thread per process unless OMP_NUM_THREADS says otherwise: on a shared 2-core machine two
# spinning threads per process made a ResNet8 step 30x slower (18 s instead of 0.6 s at a load of ~15).
figures: export OMP_NUM_THREADS := $(or $(OMP_NUM_THREADS),1)
figures: $(FIG)/index.html

$(RUNS)/%/.done: $(LIB) analyses/train.py | $(STAMP)
	@if [ -f $@ ]; then rm -rf $(RUNS)/$*; fi
	$(BIN)/python -m analyses.train $*
	touch $@

$(FIG)/fig09.png: $(RUNS)/resnet8/.done analyses/fig09.py $(LIB)
	$(BIN)/python -m analyses.fig09
$(FIG)/fig10a.png: $(RUNS)/resnet8/.done analyses/fig10.py $(LIB)
	$(BIN)/python -m analyses.fig10 a
$(FIG)/fig10b.png: $(RUNS)/transformer/.done analyses/fig10.py $(LIB)
	$(BIN)/python -m analyses.fig10 b
$(FIG)/fig12.png: $(RUNS)/resnet8/.done analyses/fig12.py $(LIB)
	$(BIN)/python -m analyses.fig12
$(FIG)/kfac_vs_ggn_%.png: $(RUNS)/%/.done analyses/kfac_vs_ggn.py
	$(BIN)/python -m analyses.kfac_vs_ggn $*
$(FIG)/fig11.png: $(NQMLIB) | $(STAMP)
	$(BIN)/python -m analyses.nqm 11
$(FIG)/fig13.png: $(NQMLIB) | $(STAMP)
	$(BIN)/python -m analyses.nqm 13
$(FIG)/fig14a.png $(FIG)/fig14b.png $(FIG)/fig14c.png &: $(NQMLIB) | $(STAMP)
	$(BIN)/python -m analyses.nqm 14
$(FIG)/fig15.png: $(NQMLIB) | $(STAMP)
	$(BIN)/python -m analyses.nqm 15

# The batch-size claims on a real network (analyses/sweep.py). The sweep's study database under
# $(FIG)/data/sweeps/ is resumed, never redone: finished trials are reused when the figure is rebuilt.
$(FIG)/sweep_%.png: $(SWEEPLIB) | $(STAMP)
	$(BIN)/python -m analyses.sweep $*

# curvlab predict against curvlab sweep on three small cells (analyses/predict_cells.py): the figure reads
# the committed predictions and sweep results (seconds); `make predict-cells` reruns the whole
# pre-registered validation (factors, predictions, sweeps: about an hour on 2 shared cores) into them.
PREDICTLIB := curvlab/analysis/predict_check.py curvlab/plots/predict.py analyses/predict_cells.py \
              $(wildcard analyses/predict_cells/*/*.json)
$(FIG)/predict_cells.png: $(PREDICTLIB) | $(STAMP)
	$(BIN)/python -m analyses.predict_cells figure
predict-cells: | $(STAMP)
	$(BIN)/python -m analyses.predict_cells predict
	$(BIN)/python -m analyses.predict_cells sweep
	$(BIN)/python -m analyses.predict_cells compare
	$(BIN)/python -m analyses.predict_cells figure

# `make sweeps`: the long sweeps of mlp and simple_cnn (batch sizes 4-1024, 16 trials, 3 seeds; hours on
# 2 cores), into figures/full/ with the small scale's other settings.
sweeps: | $(STAMP)
	$(MAKE) --no-print-directory figures/full/sweep_mlp.png figures/full/sweep_simple_cnn.png SCALE=full \
		FIG=figures/full

$(FIG)/index.html: $(FIGURE_PNGS) analyses/index.py analyses/registry.py analyses/criteria.py
	$(BIN)/python -m analyses.index
	@echo "open $(FIG)/index.html"

clean:
	rm -rf $(VENV) figures .pytest_cache
