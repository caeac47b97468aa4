# Thin targets: each calls one stage of `python -m pipeline`; stages skip finished work and run
# their missing upstream stages, so `make ensemble` alone also works and an interrupted chain resumes.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
AG_VENV := .venv-autogluon
AG_INSTALLED := $(AG_VENV)/.installed

DIGITS := data/digits
DATA ?= $(DIGITS)
# The embedded collage competitions (make demo TASK=multi_label|regression): data/collages_<task>.
TASK ?=
COLLAGE_TASKS := multi_label regression
COLLAGE_TASK = $(patsubst data/collages_%,%,$(filter $(COLLAGE_TASKS:%=data/collages_%),$(patsubst %/,%,$(DATA))))
# The embedded competitions get their CPU-sized experiments; other folders start from the defaults.
CONFIG ?= $(if $(filter $(DIGITS) $(DIGITS)/,$(DATA)),configs/digits.yaml,$(if $(COLLAGE_TASK),configs/demo-$(subst _,-,$(COLLAGE_TASK)).yaml,))
WORK ?=
OVERRIDES ?=
SUBMISSIONS ?= submissions
BACKBONE ?=
EXP ?=
FOLD ?=
USE_TUNED ?= 1
JOBS ?= 1
CLUSTER ?=
STORAGE ?=
PYTEST_ARGS ?=
BUDGET ?=

PIPE = $(PY) -m pipeline
# JOBS given on the command line (or in the environment): that many runs at once for train, predict and rounds
# (runtime.parallel_runs); otherwise the config's value stands.
# CLUSTER=ray://head:10001: the runs as Ray tasks on that cluster (runtime.cluster).
PARALLEL = $(if $(filter command line environment,$(origin JOBS)),"runtime.parallel_runs=$(JOBS)") \
	$(if $(CLUSTER),"runtime.cluster=$(CLUSTER)")
ARGS = --data "$(DATA)" --submissions "$(SUBMISSIONS)" $(if $(CONFIG),--config "$(CONFIG)") $(if $(WORK),--work "$(WORK)") $(OVERRIDES) \
	$(if $(BACKBONE),"model.backbones=[$(BACKBONE)]") $(if $(EXP),"model.only=[$(EXP)]") $(if $(FOLD),"train.folds=[$(FOLD)]") $(if $(filter 0,$(USE_TUNED)),--no-tuned)
# The embedded competitions are built on demand; any other DATA must already exist.
DATA_DEP = $(if $(filter $(DIGITS) $(DIGITS)/,$(DATA)),$(DIGITS)/train.csv,$(if $(COLLAGE_TASK),data/collages_$(COLLAGE_TASK)/train.csv,))
# make demo TASK=x: the collage competition of task x, its config and the metric its hidden solution is scored by.
DEMO_METRIC_multi_label := f1_samples
DEMO_METRIC_regression := rmse

# The segmentation track defaults to its generated competition (make-masks, 240 train / 60 test) unless DATA is given.
MASKS := data/masks
SEGMENT_DATA := $(if $(filter command line environment,$(origin DATA)),$(DATA),$(MASKS))
SEGMENT_CONFIG := $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),$(if $(filter $(MASKS) $(MASKS)/,$(SEGMENT_DATA)),configs/demo-segmentation.yaml,))
SEGMENT_DEP = $(if $(filter $(MASKS) $(MASKS)/,$(SEGMENT_DATA)),$(MASKS)/train.csv,)
DEMO_DEP = $(if $(filter segmentation,$(TASK)),$(MASKS)/train.csv,$(if $(TASK),data/collages_$(TASK)/train.csv,$(DIGITS)/train.csv))

# The detection track defaults to its own embedded competition unless DATA is given.
BANANAS := data/bananas
DETECT_DATA := $(if $(filter command line environment,$(origin DATA)),$(DATA),$(BANANAS))
DETECT_CONFIG := $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),$(if $(filter $(BANANAS) $(BANANAS)/,$(DETECT_DATA)),configs/bananas.yaml,))
DETECT_DEP = $(if $(filter $(BANANAS) $(BANANAS)/,$(DETECT_DATA)),$(BANANAS)/train.csv,)

.PHONY: help install data demo auto clean-data folds train predict rounds ensemble labels bundle export distill tune autogluon detect-data detect detect-bundle detect-export masks-data segment docs test lint postgres-server

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'
	@echo "  variables: JOBS=N CLUSTER=ray://host:port DATA=folder CONFIG=configs/x.yaml TASK=multi_label|regression|segmentation (make demo) WORK=dir OVERRIDES=\"train.epochs=3 model.backbones=[resnet18]\" BACKBONE=x EXP=name FOLD=k"

$(INSTALLED): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

install: $(INSTALLED) ## create .venv and install the pinned dependencies (constraints.txt)

# AutoGluon pins versions .venv cannot have, so it gets its own environment. PIP_FIND_LINKS points
# at an empty folder so that a machine-wide wheel folder (a CPU-only torch) cannot replace PyPI's
# torch, which must match PyPI's torchvision.
$(AG_INSTALLED): requirements-autogluon.txt
	@test -x $(AG_VENV)/bin/python || $(PYTHON) -m venv $(AG_VENV)
	@mkdir -p $(AG_VENV)/no-find-links
	PIP_FIND_LINKS=$(CURDIR)/$(AG_VENV)/no-find-links $(AG_VENV)/bin/python -m pip install --quiet -r requirements-autogluon.txt
	@touch $@

$(DIGITS)/train.csv: | $(INSTALLED)
	$(PIPE) make-digits --out $(DIGITS)

data: $(DIGITS)/train.csv ## build the embedded "digits" competition from scikit-learn's bundled images

data/collages_%/train.csv: | $(INSTALLED)
	$(PY) -m pipeline.data.collages --task $* --out data/collages_$*

demo: $(INSTALLED) $(DEMO_DEP) ## the whole chain on digits (TASK=multi_label|regression: on collages; TASK=segmentation: make segment on masks)
ifeq ($(TASK),)
	$(PIPE) ensemble --data $(DIGITS) --config configs/digits.yaml $(OVERRIDES)
	$(PIPE) score submissions/digits.csv $(DIGITS)_solution.csv
else ifeq ($(TASK),segmentation)
	$(PIPE) segment --data $(MASKS) --config configs/demo-segmentation.yaml $(OVERRIDES)
	$(PIPE) score-masks submissions/$(notdir $(MASKS)).csv $(MASKS)_solution.csv --data $(MASKS)
else
	$(PIPE) ensemble --data data/collages_$(TASK) --config configs/demo-$(subst _,-,$(TASK)).yaml $(OVERRIDES)
	$(PIPE) score submissions/collages_$(TASK).csv data/collages_$(TASK)_solution.csv --metric $(DEMO_METRIC_$(TASK))
endif

clean-data: $(INSTALLED) $(DATA_DEP) ## clean stage: unreadable files, exact duplicates, label conflicts
	$(PIPE) clean $(ARGS)

folds: $(INSTALLED) $(DATA_DEP) ## folds stage: StratifiedGroupKFold, duplicate groups kept in one fold
	$(PIPE) folds $(ARGS)

train: $(INSTALLED) $(DATA_DEP) ## train every experiment on every fold (JOBS=N runs at once, CLUSTER=ray://host:port; EXP=name, BACKBONE=x, FOLD=k: just one)
	$(PIPE) train $(ARGS) $(PARALLEL)

predict: $(INSTALLED) $(DATA_DEP) ## out-of-fold and test probabilities with TTA (JOBS=N at once; EXP=name: just one)
	$(PIPE) predict $(ARGS) $(PARALLEL)

rounds: $(INSTALLED) $(DATA_DEP) ## rounds 2, 3, ... of rounds.plan: pseudo-labels of the round before, leak-free
	$(PIPE) rounds $(ARGS) $(PARALLEL)

ensemble: $(INSTALLED) $(DATA_DEP) ## blend on OOF, print the CV score, write submissions/<competition>.csv
	$(PIPE) ensemble $(ARGS)

auto: $(INSTALLED) $(DATA_DEP) ## profile, plan and run the whole chain within BUDGET (90s, 25m, 2h; default auto.budget)
	$(PIPE) auto $(ARGS) $(if $(BUDGET),--budget "$(BUDGET)")

labels: $(INSTALLED) $(DATA_DEP) ## label issues: cleanlab on the chosen blend's OOF (runs ensemble when needed)
	$(PIPE) labels $(ARGS)

bundle: $(INSTALLED) $(DATA_DEP) ## offline bundle of the chosen submission: weights, spec, predict.py, Kaggle notebook
	$(PIPE) bundle $(ARGS)

export: $(INSTALLED) $(DATA_DEP) ## ONNX of one fold model (export.experiment, export.fold), checked with onnxruntime
	$(PIPE) export $(ARGS)

distill: $(INSTALLED) $(DATA_DEP) ## one fast student on the ensemble's soft targets, leak-free; table vs ensemble and hard labels
	$(PIPE) distill $(ARGS)

tune: $(INSTALLED) $(DATA_DEP) ## Optuna study (JOBS=2 processes, STORAGE=url); best params feed later stages
	$(PIPE) folds $(ARGS)
	@pids=; for i in $$(seq $(JOBS)); do \
		$(PIPE) tune $(ARGS) $(if $(STORAGE),"tune.storage=$(STORAGE)") & pids="$$pids $$!"; \
	done; status=0; for p in $$pids; do wait $$p || status=1; done; exit $$status

autogluon: $(INSTALLED) $(AG_INSTALLED) $(DATA_DEP) ## AutoGluon baseline on the same folds -> WORK/autogluon/{oof,test}.parquet
	$(PIPE) autogluon $(ARGS)

$(BANANAS)/train.csv: | $(INSTALLED)
	$(PIPE) make-bananas --out $(BANANAS)

detect-data: $(BANANAS)/train.csv ## build the embedded detection competition (1,000 train / 100 val / 100 test, 256x256)

detect: $(INSTALLED) $(DETECT_DEP) ## detection track: TinySSD train -> evaluate -> predict -> gallery + submission
	$(PIPE) detect --data "$(DETECT_DATA)" --submissions "$(SUBMISSIONS)" $(if $(DETECT_CONFIG),--config "$(DETECT_CONFIG)") $(if $(WORK),--work "$(WORK)") $(OVERRIDES)
	@if [ -f "$(DETECT_DATA)/test_solution.csv" ]; then \
		$(PIPE) score-detection "$(SUBMISSIONS)/$$(basename "$(DETECT_DATA)").csv" "$(DETECT_DATA)/test_solution.csv"; fi

detect-bundle: $(INSTALLED) $(DETECT_DEP) ## offline bundle of the detection submission (runs make detect when needed)
	$(PIPE) bundle --data "$(DETECT_DATA)" --submissions "$(SUBMISSIONS)" $(if $(DETECT_CONFIG),--config "$(DETECT_CONFIG)") $(if $(WORK),--work "$(WORK)") $(OVERRIDES)

detect-export: $(INSTALLED) $(DETECT_DEP) ## ONNX of one detection fold model's network part (export.fold), checked with onnxruntime
	$(PIPE) export --data "$(DETECT_DATA)" --submissions "$(SUBMISSIONS)" $(if $(DETECT_CONFIG),--config "$(DETECT_CONFIG)") $(if $(WORK),--work "$(WORK)") $(OVERRIDES)

$(MASKS)/train.csv: | $(INSTALLED)
	$(PIPE) make-masks --out $(MASKS) --train 240 --test 60

masks-data: $(MASKS)/train.csv ## build the generated segmentation competition (240 train / 60 test, 128x128, 3 classes)

segment: $(INSTALLED) $(SEGMENT_DEP) ## segmentation track: smp U-Net per fold -> OOF Dice, thresholds nested -> RLE submission
	$(PIPE) segment --data "$(SEGMENT_DATA)" --submissions "$(SUBMISSIONS)" $(if $(SEGMENT_CONFIG),--config "$(SEGMENT_CONFIG)") $(if $(WORK),--work "$(WORK)") $(OVERRIDES)
	@if [ -f "$(patsubst %/,%,$(SEGMENT_DATA))_solution.csv" ]; then \
		$(PIPE) score-masks "$(SUBMISSIONS)/$$(basename "$(SEGMENT_DATA)").csv" "$(patsubst %/,%,$(SEGMENT_DATA))_solution.csv" --data "$(SEGMENT_DATA)"; fi

# The Optuna-on-PostgreSQL test starts its own server (initdb + pg_ctl): Debian's postgresql package when missing.
postgres-server:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null; then \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq postgresql >/dev/null; \
	else echo "postgres-server: no initdb and no apt-get; install PostgreSQL (the tuning test needs its server)"; fi

docs: $(INSTALLED) ## build the documentation site (docs/, mkdocs.yml) into site/; strict: a broken link fails
	$(PY) -m mkdocs build --strict --site-dir site

test: $(INSTALLED) $(AG_INSTALLED) postgres-server ## the test suite (what .ci/run calls)
	$(PY) -m pytest -q --timeout=900 $(PYTEST_ARGS)

lint: $(INSTALLED) ## ruff
	$(PY) -m ruff check pipeline tests benchmarks
