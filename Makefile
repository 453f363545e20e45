# The README's two commands: `make demo` and `make test`. Both create/reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a CPU-only machine this takes the CPU wheel; a torch already in the venv (e.g. CUDA) is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo

.PHONY: demo test install install-dev browser jpeg-headers lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# A stamp per extra set, so re-running is cheap and setup.py changes reinstall.
$(VENV)/.installed: setup.py $(VENV)/bin/python | jpeg-headers
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

# The loader's region JPEG decoder (an optional C extension, setup.py) builds when libjpeg-turbo's headers are
# there: Debian's libjpeg-dev (libjpeg62-turbo-dev; Ubuntu: libjpeg-turbo8-dev). Without them it is skipped.
jpeg-headers:
	@for d in /usr/include /usr/include/$$(gcc -print-multiarch 2>/dev/null) /usr/local/include; do \
	  [ -f "$$d/jpeglib.h" ] && exit 0; done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing libjpeg-dev for the region JPEG decoder"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libjpeg-dev >/dev/null \
	  || echo "libjpeg-dev not installable: the loader decodes whole images (simplejpeg)"; \
	else echo "libjpeg headers not found (needs root + apt-get): the loader decodes whole images (simplejpeg)"; fi

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
