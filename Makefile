# Entry points. Every target that runs code first runs scripts/setup.sh (idempotent, seconds
# when nothing changed), so a fresh clone needs only `make demo` or `make test`.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m dragon_demo

test: setup
	$(PY) -m pytest -q --durations=30

bench: setup
	$(PY) -m benchmarks
