# Two entry points for a fresh machine: `make sweep` and `make test`.
# Both create (or reuse) the virtual environment in $(VENV) and install what they need.
VENV ?= .venv
PYTHON ?= python3
# A CPU build on machines that have one locally; set TORCH_SPEC=torch for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv sweep train report test test-fast test-extended bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

sweep: $(STAMP)
	$(PY) jobs/sweep.py $(ARGS)

train: $(STAMP)
	$(PY) jobs/train.py $(ARGS)

report: $(STAMP)
	$(PY) jobs/report.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check hlbd_ray jobs bench tests
	$(PY) -m mypy
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m ruff check hlbd_ray jobs bench tests
	$(PY) -m mypy
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# The longest sweeps, left out of `make test` (see pyproject.toml).
test-extended: $(STAMP)
	$(PY) -m pytest -q -m extended $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
