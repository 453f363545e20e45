# The README's two commands: `make demo` and `make test`. Both create/reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a CPU-only machine this takes the CPU wheel; a torch already in the venv (e.g. CUDA) is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo

.PHONY: demo test install install-dev browser lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# A stamp per extra set, so re-running is cheap and setup.py changes reinstall.
$(VENV)/.installed: setup.py $(VENV)/bin/python
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e ".[dev,deepspeed,onnx]"
	touch $@

# The serving page is tested in a real headless Chromium (Debian's package; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and not installable here (needs root + apt-get): the browser test will skip"; fi; }

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash launch/demo.sh

test: install-dev browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
