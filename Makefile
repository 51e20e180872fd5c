# Two commands do all set-up on a fresh machine:
#   make demo   venv + real scans + CT-GAN models (if absent) + MITS-GAN demo training + figures
#   make test   venv + real scans + dicom3tools + the default test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup data data-half dicom3tools ctgan ctgan-holdout ctgan-third demo demo-seeds test test-all clean \
	gpu-check

# SEED picks one independent training of the whole demo (both CT-GAN pairs and the MITS-GAN demo
# model; docs/results.md, "Figures a newcomer reproduces"). SEED=0 is the default `make demo`
# (models/, runs/demo); SEED=N writes models/seedN/ and runs/seedN/demo instead, so it never
# touches the default models. The seen pair trains with seed 2N, the unseen one with 2N + 1.
SEED    ?= 0
override SEED := $(strip $(SEED))
ifneq ($(shell echo '$(SEED)' | grep -Ex '[0-9]+'),$(SEED))
$(error SEED must be a non-negative integer, got '$(SEED)')
endif
ifeq ($(SEED),0)
SEED_MODELS := models
SEED_RUNS   := runs/demo
else
SEED_MODELS := models/seed$(SEED)
SEED_RUNS   := runs/seed$(SEED)/demo
endif
SEEN_SEED   := $(shell echo $$((2 * $(SEED))))
UNSEEN_SEED := $(shell echo $$((2 * $(SEED) + 1)))
# A fixed thread count: PyTorch and oneDNN may split a reduction differently with another count,
# which changes the last bits of a training (docs/results.md#what-cannot-be-deterministic).
THREADS ?= 2
DETERMINISM := OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) PYTHONHASHSEED=0 \
	CUBLAS_WORKSPACE_CONFIG=:4096:8

setup: $(STAMP)
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

data: setup
	$(PY) -m procedures.data.prepare

# The scans averaged 2 x 2 in-plane (256 x 256) for the CPU-sized experiments of docs/results.md
# (transfer by ensemble, TAFIM).
data-half: data
	$(PY) -m procedures.data.half --data data/z2.5 --out data/half

# dciodvfy (dicom3tools) validates every DICOM we write; tests use it when present.
dicom3tools:
	@command -v dciodvfy >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq dicom3tools) >/dev/null 2>&1 \
	    || echo "warning: could not install dicom3tools; DICOM validation tests will be skipped"; \
	  else echo "warning: dciodvfy missing (apt-get install dicom3tools); DICOM validation tests will be skipped"; fi; }

# Small CT-GAN injector/remover on the real scans, trained only when absent.
ctgan: data
	@test -f $(SEED_MODELS)/INJ/G_model.h5 || $(DETERMINISM) $(PY) -m procedures.ctgan.train \
	    --model inj --preset demo --seed $(SEEN_SEED) --csv data/z2.5/nodules.csv \
	    --out $(SEED_MODELS)/INJ
	@test -f $(SEED_MODELS)/REM/G_model.h5 || $(DETERMINISM) $(PY) -m procedures.ctgan.train \
	    --model rem --preset demo --seed $(SEEN_SEED) --csv data/z2.5/healthy.csv \
	    --out $(SEED_MODELS)/REM

# A second CT-GAN pair with another seed and width, never used by any MITS-GAN training: the
# unseen attacker of evaluate.py --holdout-models (docs/results.md). Smaller than the demo pair
# (gf 6, 7 epochs) so that `make demo` stays about 10 minutes on a CPU.
HOLDOUT := --preset demo --seed $(UNSEEN_SEED) --gf 6 --df 6 --epochs 7 --quiet
ctgan-holdout: data
	@test -f $(SEED_MODELS)/holdout/INJ/G_model.h5 || $(DETERMINISM) $(PY) -m procedures.ctgan.train \
	    --model inj $(HOLDOUT) --csv data/z2.5/nodules.csv --out $(SEED_MODELS)/holdout/INJ
	@test -f $(SEED_MODELS)/holdout/REM/G_model.h5 || $(DETERMINISM) $(PY) -m procedures.ctgan.train \
	    --model rem $(HOLDOUT) --csv data/z2.5/healthy.csv --out $(SEED_MODELS)/holdout/REM

# A third CT-GAN pair (seed 7, gf 7, 7 epochs: another seed and width than both pairs above),
# only ever trained against beside the seen pair (`train.py --ensemble_models models/third`),
# never used by an evaluation: the ensemble lever of docs/training.md, measured on the unseen pair
# in docs/results.md ("Transfer by ensemble").
THIRD := --preset demo --seed 7 --gf 7 --df 7 --epochs 7 --quiet
ctgan-third: data
	@test -f models/third/INJ/G_model.h5 || $(DETERMINISM) $(PY) -m procedures.ctgan.train \
	    --model inj $(THIRD) --csv data/z2.5/nodules.csv --out models/third/INJ
	@test -f models/third/REM/G_model.h5 || $(DETERMINISM) $(PY) -m procedures.ctgan.train \
	    --model rem $(THIRD) --csv data/z2.5/healthy.csv --out models/third/REM

# The main job: CT-GAN before/after figure, MITS-GAN demo training (protected scans, samples),
# the unseen CT-GAN pair, then the evaluation on the two real scans: 12 held-out locations per
# scan, both actions, both attackers; results.md ends with the held-out table.
demo: ctgan ctgan-holdout
	$(DETERMINISM) $(PY) -m procedures.ctgan.demo --data data/z2.5 --models $(SEED_MODELS) \
	    --out $(SEED_RUNS)
	$(DETERMINISM) $(PY) train.py --preset demo --seed $(SEED) --out_dir $(SEED_RUNS)
	$(DETERMINISM) $(PY) evaluate.py --data data/z2.5 --checkpoint $(SEED_RUNS)/checkpoint.pt \
	    --models $(SEED_MODELS) --holdout-models $(SEED_MODELS)/holdout --out $(SEED_RUNS)/eval \
	    --no-progress
	@cat $(SEED_RUNS)/eval/results.md

# The demo from independent trainings (SEEDS), then the mean and range of every figure of the
# held-out table (docs/results.md, "Figures a newcomer reproduces"). Each seed is skipped where
# its results already exist; seed 0 is the default `make demo`.
SEEDS ?= 0 1 2
seed_runs = $(if $(filter 0,$(1)),runs/demo,runs/seed$(1)/demo)
demo-seeds: setup
	@for s in $(SEEDS); do \
	  if [ "$$s" = 0 ]; then d=runs/demo; else d=runs/seed$$s/demo; fi; \
	  test -f $$d/eval/results.json || $(MAKE) --no-print-directory demo SEED=$$s || exit 1; done
	$(PY) -m procedures.evaluation.aggregate --out runs/demo-seeds \
	    $(foreach s,$(SEEDS),$(call seed_runs,$(s))/eval/results.json)
	@cat runs/demo-seeds/aggregate.md

# A long untargeted (white-box, `whitebox` preset) run on one GPU: run length was the lever that
# helped in the CPU measurements (docs/training.md, "Untargeted protection: what each lever does").
.PHONY: train-gpu
train-gpu: ctgan
	$(PY) train.py --preset whitebox --device cuda --epochs 200 --out_dir runs/gpu-untargeted

test: data dicom3tools
	$(PY) -m pytest -q -m "not slow"

test-all: data dicom3tools
	$(PY) -m pytest -q

clean:
	rm -rf runs out .pytest_cache

# On a CUDA machine (PyTorch, no TensorFlow needed): bench, a short whitebox training, evaluate,
# protect and tamper, each timed with a limit; stops at the first failure (docs/performance.md).
# No install step: the venv's python when there is one, else the machine's (GPU_PY=... to choose).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) -m procedures.benchmarking.gpu_check --data data/z2.5 --models models --out runs/gpu_check
