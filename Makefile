# deflow-synth recipes. `make install` sets up .venv; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test test-all lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install opencv-python-headless scipy tqdm pyyaml
	$(PIP) install --no-build-isolation --no-deps "basicsr==1.4.2"
	$(PIP) install -e ".[test]"
	touch $@

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

# Recipes for the examples and for real data. Folders are passed as variables, e.g.
#   make pairs HR=photos/ OUT=pairs/ [MODEL=runs/camera/model.pt]
#   make train CLEAN=photos/ DEGRADED=camera/ RUN=runs/camera
#   make inspect GEN=pairs/lr REAL=camera/ [CLEAN=bicubic/] [REPORT=report/]
# div2k and flickr2k download several GB (not run in CI); the expected checksums are in
# scripts/datasets.txt and a mismatch stops the recipe.
DEFLOW := $(VENV)/bin/deflow-synth
DATA ?= data
REPORT ?= inspect-report
MODEL_OPT = $(if $(MODEL),--model "$(MODEL)")

.PHONY: demo pairs train inspect div2k flickr2k pretrained

demo: install
	$(DEFLOW) degrade examples/images demo-out $(MODEL_OPT)

pairs: install
	@test -n "$(HR)" -a -n "$(OUT)" || { echo "usage: make pairs HR=photos/ OUT=pairs/ [MODEL=model.pt]"; exit 2; }
	$(DEFLOW) degrade "$(HR)" "$(OUT)" $(MODEL_OPT)

train: install
	@test -n "$(CLEAN)" -a -n "$(DEGRADED)" -a -n "$(RUN)" || { echo "usage: make train CLEAN=photos/ DEGRADED=camera/ RUN=runs/camera"; exit 2; }
	$(DEFLOW) train --clean "$(CLEAN)" --degraded "$(DEGRADED)" --out "$(RUN)"

inspect: install
	@test -n "$(GEN)" -a -n "$(REAL)" || { echo "usage: make inspect GEN=pairs/lr REAL=camera/ [CLEAN=bicubic/] [REPORT=report/]"; exit 2; }
	$(DEFLOW) inspect "$(GEN)" "$(REAL)" --out "$(REPORT)" $(if $(CLEAN),--clean "$(CLEAN)")

div2k: install
	$(PY) scripts/download_dataset.py div2k-train $(DATA)
	$(PY) scripts/download_dataset.py div2k-valid $(DATA)
	$(DEFLOW) degrade $(DATA)/DIV2K_train_HR $(DATA)/DIV2K_train_pairs $(MODEL_OPT)
	$(DEFLOW) degrade $(DATA)/DIV2K_valid_HR $(DATA)/DIV2K_valid_pairs $(MODEL_OPT)

flickr2k: install
	$(PY) scripts/download_dataset.py flickr2k $(DATA)
	$(DEFLOW) degrade $(DATA)/Flickr2K/Flickr2K_HR $(DATA)/Flickr2K_pairs $(MODEL_OPT)

# The shipped default model: train the small preset on the shared photo set (about 40 min on 2
# CPU cores), check it against the held-out pairs and publish it in pretrained/.
PRETRAINED_DATA ?= ../shared/data
PRETRAINED_RUN ?= runs/pretrained-small-x4
pretrained: install
	OMP_NUM_THREADS=2 $(DEFLOW) train --clean $(PRETRAINED_DATA)/clean \
		--degraded $(PRETRAINED_DATA)/degraded --out $(PRETRAINED_RUN) --preset small \
		--steps 4500 --seed 0 --device cpu --resume
	$(PY) scripts/publish_pretrained.py $(PRETRAINED_RUN) --data $(PRETRAINED_DATA) \
		--out pretrained --command "make pretrained"
