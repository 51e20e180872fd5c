# Two commands do all set-up on a fresh machine:
#   make demo   venv + real scans + CT-GAN models (if absent) + MITS-GAN demo training + figures
#   make test   venv + real scans + dicom3tools + the default test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup data dicom3tools ctgan ctgan-holdout demo test test-all clean gpu-check

setup: $(STAMP)
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

data: setup
	$(PY) -m procedures.data.prepare

# dciodvfy (dicom3tools) validates every DICOM we write; tests use it when present.
dicom3tools:
	@command -v dciodvfy >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq dicom3tools) >/dev/null 2>&1 \
	    || echo "warning: could not install dicom3tools; DICOM validation tests will be skipped"; \
	  else echo "warning: dciodvfy missing (apt-get install dicom3tools); DICOM validation tests will be skipped"; fi; }

# Small CT-GAN injector/remover on the real scans, trained only when absent.
ctgan: data
	@test -f models/INJ/G_model.h5 || $(PY) -m procedures.ctgan.train --model inj --preset demo \
	    --csv data/z2.5/nodules.csv --out models/INJ
	@test -f models/REM/G_model.h5 || $(PY) -m procedures.ctgan.train --model rem --preset demo \
	    --csv data/z2.5/healthy.csv --out models/REM

# A second CT-GAN pair with another seed and width, never used by any MITS-GAN training: the
# unseen attacker of evaluate.py --holdout-models (docs/results.md). Smaller than the demo pair
# (gf 6, 7 epochs) so that `make demo` stays about 10 minutes on a CPU.
HOLDOUT := --preset demo --seed 1 --gf 6 --df 6 --epochs 7 --quiet
ctgan-holdout: data
	@test -f models/holdout/INJ/G_model.h5 || $(PY) -m procedures.ctgan.train --model inj $(HOLDOUT) \
	    --csv data/z2.5/nodules.csv --out models/holdout/INJ
	@test -f models/holdout/REM/G_model.h5 || $(PY) -m procedures.ctgan.train --model rem $(HOLDOUT) \
	    --csv data/z2.5/healthy.csv --out models/holdout/REM

# The main job: CT-GAN before/after figure, MITS-GAN demo training (protected scans, samples),
# the unseen CT-GAN pair, then the evaluation on the two real scans: 12 held-out locations per
# scan, both actions, both attackers; results.md ends with the held-out table.
demo: ctgan ctgan-holdout
	$(PY) -m procedures.ctgan.demo --data data/z2.5 --models models --out runs/demo
	$(PY) train.py --preset demo
	$(PY) evaluate.py --data data/z2.5 --checkpoint runs/demo/checkpoint.pt --models models \
	    --holdout-models models/holdout --out runs/demo/eval --no-progress
	@cat runs/demo/eval/results.md

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
