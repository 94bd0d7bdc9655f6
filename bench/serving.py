"""Online serving benchmark: early exit on vs off through the OpenAI-compatible HTTP API.

In the manner of vLLM's ``benchmarks/benchmark_serving.py`` / ``vllm bench serve``: ``--num-prompts``
chat requests (the shared prompt sets, :func:`bench.common.prompts.load_prompts`) are sent to
``/v1/chat/completions`` with Poisson arrivals (exponential inter-arrival times of mean
``1/rate`` s, fixed ``--seed``; ``inf`` sends them all at once) at each ``--request-rates`` value,
streamed (``stream=True``, ``stream_options={"include_usage": True}``). Two variants run at each
rate, one after the other, in alternating order from one rate to the next, with the same prompts
and the same arrival times: ``ee-off`` (request field ``early_exit: false``: the full model) and
``ee-on`` (the server's default exit threshold, or ``{"threshold": x}`` with ``--threshold``).

Metrics follow vLLM's definitions; times in milliseconds, p50 and p99 over the completed requests:

* TTFT, time to first token: from sending the request to the first chunk carrying non-empty
  content (vLLM also counts an empty first chunk; our server streams the ``role`` chunk first).
* ITL, inter-token latency: gaps between successive content chunks, pooled over all requests
  (a chunk may carry more than one token, as in vLLM).
* TPOT, time per output token: ``(e2e - ttft) / (output_tokens - 1)`` per request with more than
  one output token.
* E2E latency: from sending the request to the end of its stream.
* Request throughput (req/s) and output-token throughput (tok/s): completed requests and
  ``usage.completion_tokens`` summed, divided by the run's wall time (first send to last answer).
* ``tpot_speedup``: median TPOT of ``ee-off`` / median TPOT of the variant at the same rate.
* Mean exit layer (1-based, ``num_layers`` = full model) from the ``early_exit`` statistics our
  server adds to the final streamed chunk (token-weighted over all requests of the run).

Greedy decoding (``--temperature 0``) and a fixed ``--max-tokens``; the actual output token counts
are reported. ``--ignore-eos`` makes every request run to ``--max-tokens``: our server's (and
vLLM's) ``ignore_eos`` request field, for llama-cpp-python's server a ``logit_bias`` of -100 on each
end-of-generation token of its vocabulary. Each run's prompts begin with a short
run tag so that no run reuses the prefix-cached prompt blocks of an earlier run (cached prompt tokens
are reported anyway).

Against a running server (``serve run deployments:app``)::

    python -m bench.serving --base-url http://127.0.0.1:8000/v1 --request-rates 0.5 1 2 inf

or, with no ``--base-url``, a local Ray instance (``--ray-cpus`` CPUs) is started, the app deployed
in-process (``deployments.testing.deploy``), and both shut down at the end::

    python -m bench.serving --num-prompts 24 --request-rates 1 4 --max-tokens 48

Peers in the same run, as a third variant alternating with ours on the same prompts and arrival
times: ``--peer llama-cpp`` starts llama-cpp-python's OpenAI server on the same GGUF
(:func:`bench.common.peers.llama_cpp_server`, the machine's cores as threads; ``pip install -e ".[peers]"``);
``--peer llama-server`` starts llama.cpp's own ``llama-server`` with continuous batching on the
same GGUF (:func:`bench.common.peers.llama_server`: ``-np 16``, ``--peer-threads`` threads; build it
with ``make llama-server``); ``--peer-url URL`` targets any other OpenAI-compatible server.
``--concurrency 1 16 64`` replaces the request rates by closed-loop load points (C streams in
flight, ``C * --rounds`` requests); ``--variants ee-off`` runs only our full-model variant. llama-cpp-python's server sends no
``usage`` in streams: a request that ends with ``finish_reason="length"`` then counts ``--max-tokens``
output tokens, any other one its content chunks (one token each). 16 concurrent streams, int4 against
llama.cpp's Q4_1::

    python -m bench.serving --peer llama-cpp --quantization int4 --num-prompts 16 --request-rates inf \
        --max-tokens 64 --ignore-eos --name serving-peers
"""
from __future__ import annotations

from bench.common.serving import parse_args, report, run


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0])
    payload = run(args)
    report(args, payload)
    return payload


if __name__ == "__main__":
    main()
