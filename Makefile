# Two commands do all set-up: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch on our machines; GPU users override, e.g. TORCH_SPEC="torch --index-url ...".
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
LF := $(VENV)/bin/loraforge
OUT ?= out

# `make test-min`: the same tests on the oldest versions pyproject.toml declares (its `>=` floors).
MIN_VENV ?= .venv-min

.PHONY: run test test-fast test-min bench install clean judge shapes-vae pretrain

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,ray]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m loraforge.demo --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

$(MIN_VENV)/.installed: pyproject.toml scripts/min_requirements.py
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(MIN_VENV)/bin/python scripts/min_requirements.py > $(MIN_VENV)/requirements-min.txt
	$(MIN_VENV)/bin/python -m pip install --quiet -r $(MIN_VENV)/requirements-min.txt
	$(MIN_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pip check
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow"

bench: $(VENV)/.installed
	$(PY) -m benchmarks

# Retrain the shapes-world judge from its seed (a few minutes on 2 cores); writes loraforge/world/judge.*
judge: $(VENV)/.installed
	$(PY) scripts/train_judge.py

# Retrain the shapes-world VAE from its seed (about 20 minutes on 2 idle cores); writes loraforge/world/vae/
shapes-vae: $(VENV)/.installed
	$(PY) scripts/train_shapes_vae.py

# Pretrain builtin:shapes (UNet + text encoder) from its seed on the committed VAE; writes
# loraforge/models/builtin/shapes_pipeline/ (wall time in its pretraining.json)
pretrain: $(VENV)/.installed
	$(PY) scripts/pretrain_shapes.py

clean:
	rm -rf $(VENV) $(MIN_VENV) $(OUT) build *.egg-info
