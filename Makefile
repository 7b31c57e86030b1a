# Two entry points for a newcomer on a fresh machine (Python >= 3.11 and a C compiler):
#   make demo   - create .venv, install the runtime, run the demo end to end
#   make test   - create .venv, install everything (train, export, explain, dicom-out, openvino, dicomsdl, imagecodecs, report, dev; chromium via `make browser`), lint (ruff, mypy, import contracts), run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export HNSWLIB_NO_NATIVE := 1

.PHONY: demo test lint bench bench-full venv install-runtime install-all browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The runtime plus OpenVINO (the default fast CPU engine), dicomsdl (the fast header scan) and
# imagecodecs (libjpeg-turbo for JPEG Lossless slices), README, Performance.
install-runtime: $(BIN)/python
	$(PIP) install -q -e ".[openvino,dicomsdl,imagecodecs]"

# torch is pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
install-all: $(BIN)/python
	$(PIP) install -q -e ".[train,export,explain,dicom-out,openvino,dicomsdl,imagecodecs,report,dev]"

# Debian's Chromium for the browser test of the evaluation report (tests/runtime/test_report_html.py,
# driven by playwright from the dev extra; `playwright install` would download a browser build
# instead). Needs root and apt-get; elsewhere it says so and that test skips with the reason.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -q && apt-get install -y -q --no-install-recommends chromium) \
			|| echo "make browser: installing chromium failed; the report's browser test will skip"; \
	else \
		echo "make browser: /usr/bin/chromium is missing and this is not root with apt-get; the report's browser test will skip"; \
	fi

demo: install-runtime
	$(BIN)/nodule-edge demo

# Lint, formatting, types and the import contracts (pyproject.toml: runtime/ and index/ never
# import train/, export/ or torch; no import cycles), before the tests.
lint: install-all
	$(BIN)/ruff check nodule_edge tests benches
	$(BIN)/ruff format --check nodule_edge tests benches
	$(BIN)/python -m mypy
	$(BIN)/lint-imports

test: install-all browser lint
	$(BIN)/python -m pytest tests -q

bench: install-all
	$(BIN)/python -m pytest benches -q --benchmark-json=.benchmarks/latest.json
	$(BIN)/python benches/ratios.py .benchmarks/latest.json --baseline benches/baseline_ratios.json

bench-full: install-all
	NODULE_EDGE_BENCH_FULL=1 $(BIN)/python -m pytest benches -q --benchmark-json=.benchmarks/full.json
	$(BIN)/python benches/ratios.py .benchmarks/full.json --table
