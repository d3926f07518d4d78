# Two commands do all set-up: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch on our machines; GPU users override, e.g. TORCH_SPEC="torch --index-url ...".
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
LF := $(VENV)/bin/loraforge
OUT ?= out

.PHONY: run test test-fast bench install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m loraforge.demo --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
