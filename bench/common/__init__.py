"""The benchmarks' shared library; the scripts under ``bench/`` import only from here.

* :mod:`bench.common.results`: JSON results under ``bench/results`` (or ``$EESERVE_BENCH_RESULTS``) and
  printed tables;
* :mod:`bench.common.prompts`: the shared prompt sets, the exit heads' held-out test split, chat prompts;
* :mod:`bench.common.exits`: exit configs of the variants (measures, policies, lossless modes), the
  shipped heads' workspace, speculative statistics;
* :mod:`bench.common.engines`: engine runs and their timing (offline ``LLM``, continuous batching,
  transformers ``generate``), interleaved best-of rounds, quantization variants and their rows;
* :mod:`bench.common.quality`: agreement with the full model (free-running and teacher-forced), NLL
  and text-quality columns;
* :mod:`bench.common.limits`: machine-limit figures: weight bytes a token reads, measured read
  bandwidth, the share of it a run reaches, the parts of a decode step;
* :mod:`bench.common.peers`: llama-cpp-python and transformers as peers;
* :mod:`bench.common.serving`: the OpenAI-API load of :mod:`bench.serving` (also run by :mod:`bench.speed`);
* :mod:`bench.common.plots`: plots of saved results.

(:mod:`bench.loadgen`, the HTTP load of the soak benchmark and the cluster tests, keeps its own path.)
"""
