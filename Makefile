# Set-up on a fresh machine: `make demo` (runs the main job) and `make test` (runs the test suite).
PYTHON ?= python3
VENV ?= .venv
# The oldest transformers kvla is tested on: the version the GPU machines carry.
COMPAT_TRANSFORMERS ?= 5.17.0
COMPAT_VENV ?= .venv-tf517
# torch first, pinned: the local CPU wheel; an unpinned torch pulls several GB of CUDA packages.
TORCH ?= torch==2.13.0

.PHONY: install test test-compat demo bench clean
CHECKPOINT ?= checkpoints/reference-vla-v2
DEMO_TASKS ?= reach-v3,push-v3,drawer-close-v3,button-press-topdown-v3,window-close-v3
# full, vla_cache at the paper defaults, static reuse with K/V at most one step old (over MT10 the vla_cache
# setting closest to full's success for its speed-up; BENCHMARKS.md), and lac with its committed modules
DEMO_METHODS ?= full,vla_cache,vla_cache:schedule=none:max_age=2,lac

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

$(COMPAT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q $(TORCH)
	$(COMPAT_VENV)/bin/pip install -q -e ".[test]" "transformers==$(COMPAT_TRANSFORMERS)"
	touch $@

# The real openpi-client, as robots run it, in its own venv (it pins numpy < 2; typing_extensions and
# packaging are imported but not declared by it and gymnasium): tests/test_openpi_client.py drives kvla serve with it.
OPENPI_VENV ?= .venv-openpi
$(OPENPI_VENV)/.installed:
	$(PYTHON) -m venv $(OPENPI_VENV)
	$(OPENPI_VENV)/bin/pip install -q openpi-client==0.1.2 typing_extensions packaging metaworld==3.1.1
	touch $@

# The whole suite on the newest transformers, then the engine's tests on the oldest supported one.
test: $(VENV)/.installed $(COMPAT_VENV)/.installed $(OPENPI_VENV)/.installed
	$(VENV)/bin/python -m pytest
	$(COMPAT_VENV)/bin/python -m pytest tests/test_exactness.py tests/test_attention_stats.py tests/test_families.py tests/test_mask_modes.py tests/test_hosts.py tests/test_errors.py tests/test_flops.py tests/test_history.py tests/test_kv_efficient.py

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest tests/test_exactness.py tests/test_attention_stats.py tests/test_families.py tests/test_mask_modes.py tests/test_hosts.py tests/test_errors.py tests/test_flops.py tests/test_history.py tests/test_kv_efficient.py

# The main job: a short closed-loop comparison of full and vla_cache with the committed reference VLA v2.
demo: $(VENV)/.installed
	$(VENV)/bin/kvla eval --checkpoint $(CHECKPOINT) --methods $(DEMO_METHODS) --tasks $(DEMO_TASKS) \
		--episodes 5 --workers 2 --json runs/demo_eval.json --plot runs/demo_eval.png

# The latency comparison of the VLA-shaped presets on the bundled MetaWorld frames.
bench: $(VENV)/.installed
	$(VENV)/bin/kvla bench latency --preset small --steps 24 \
		--methods full,vla_cache,vla_cache:top_k=256:schedule=none:relevance_rule=top_k:task_top_k=40,static,fastv \
		--json runs/bench_latency.json

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(OPENPI_VENV) runs
