# dlmodels — every target installs into .venv first; a second run skips what is installed.
# .venv gets `.[dev]`: the full library (TensorFlow), the server's web stack and the test tools.
# A serving image needs only `pip install 'dlmodels[serving]'` (no TensorFlow).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install demo test test-fast lint bench serve clean serving-install-check

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/dlmodels demo

# Two pytest-xdist workers, each file on one worker (its module fixtures built once): the suite
# is mostly single-threaded Python (tracing, subprocesses, servers), so 2 cores run it in
# about three quarters of the serial time. TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: install
	$(BIN)/ruff check dlmodels serving tests
	$(BIN)/ruff format --check dlmodels serving tests

bench: install
	$(BIN)/dlmodels bench

# Serve what `make demo` exported (or MODEL_REPOSITORY=DIR) on 127.0.0.1:8000.
serve: install
	$(BIN)/dlmodels serve --model-repository $(or $(MODEL_REPOSITORY),artifacts)

# A serving-only install in a scratch venv: `.[serving]` must bring no TensorFlow or Keras, yet
# `python -m serving` runs (with MODEL_REPOSITORY=DIR it also loads and warms up every model).
SERVING_VENV ?= /tmp/dlmodels-serving-venv
serving-install-check:
	rm -rf $(SERVING_VENV)
	$(PYTHON) -m venv $(SERVING_VENV)
	$(SERVING_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVING_VENV)/bin/python -m pip install -q ".[serving]"
	$(SERVING_VENV)/bin/python -c "import importlib.util as u, sys; \
		bad = [m for m in ('tensorflow', 'keras', 'tf2onnx') if u.find_spec(m)]; \
		sys.exit(f'a serving install pulled {bad}' if bad else 0)"
	cd /tmp && $(SERVING_VENV)/bin/python -c "import dlmodels, dlmodels.runtime, serving.__main__"
	cd /tmp && ! $(SERVING_VENV)/bin/dlmodels train
	$(if $(MODEL_REPOSITORY),$(SERVING_VENV)/bin/python -m serving --model-repository $(MODEL_REPOSITORY) --check)
	@echo "serving install OK: $$(du -sh $(SERVING_VENV) | cut -f1) in $(SERVING_VENV)"

clean:
	rm -rf artifacts .pytest_cache build
