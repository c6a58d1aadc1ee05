# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch lies on disk on dev machines; GPU clusters take the CUDA build of the same release.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.copyscan-installed

.PHONY: demo test lint keys install clean browser device-carry

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so nothing later drags in a different (multi-GB) build through the resolver
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/copyscan demo

# The HTML report is tested in Debian's Chromium; installed here when missing and run as root (CI).
CHROMIUM ?= /usr/bin/chromium

browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "make test needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check copyscan jobs indexing search tests bench
	$(VENV)/bin/ruff format --check copyscan jobs indexing search tests bench

# The README's "Configuration keys" tables, from the config classes' key declarations (a unit test fails
# when the README differs)
keys: $(STAMP)
	$(PY) -c 'from copyscan.jobs.cli import write_readme_keys; write_readme_keys("README.md")'

# What bench/device_checks.sh reads on the GPU machine, which has no copyscan install: the packaged weights
# and bench.embed's shards of real 256-px JPEGs (6 of 256 images, under the device tool's 64 MiB with the
# repository), in .device/ (ignored; the device tool's `carry`)
device-carry: $(STAMP)
	rm -rf .device && mkdir -p .device
	cp "$$($(PY) -c 'from copyscan.indexing.models.effnet import package_weights_path as p; print(p())')" .device/effnet.pth
	$(PY) -c 'import pathlib; from bench.embed import corpus_shards; corpus_shards(pathlib.Path(".device"), 1536)'
	rm -rf .device/queries

clean:
	rm -rf $(VENV) demo-output
