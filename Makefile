# Set-up, main job and tests. `make run` and `make test` are the README's two commands.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# `make test` runs the browser test (tests/test_browser.py) for real: a missing chromium/playwright
# fails it instead of skipping it. `make test QUANTLAB_REQUIRE_BROWSER=0` lets it skip.
QUANTLAB_REQUIRE_BROWSER ?= 1
export QUANTLAB_REQUIRE_BROWSER

.PHONY: run test chromium

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test,cluster]"
	touch $(STAMP)

# Debian's chromium package, for the explorer's end-to-end test (Playwright drives it; we never
# run `playwright install`). Nothing to do when `chromium` is already on the PATH.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "chromium not found: install Chromium so that 'chromium' is on the PATH" >&2; exit 1; }; \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

run: $(STAMP)
	$(VENV)/bin/quantlab reproduce --quick --figures figures

test: $(STAMP) chromium
	$(VENV)/bin/python -m pytest
