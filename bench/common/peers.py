"""Peers of eeserve for side-by-side benchmarks: llama-cpp-python and llama.cpp's ``llama-server``
on the same GGUF, and Hugging Face transformers ``generate`` on the same float32 weights.

Every peer run has the interface of :func:`bench.common.engines.run_engine`:
``run(prompt_ids, batch, max_tokens) -> (outputs, tokens_per_s, mean_exit_layer, exit_layer_counts)``
with ``outputs`` a list of generated token-id lists, greedy, EOS ignored (every prompt gets
``max_tokens`` tokens), prefill included in the wall time, one warm-up call first; peers always run
the full model (``mean_exit_layer`` = the layer count, no counts).

llama-cpp-python is an optional extra (``pip install -e ".[peers]"``, it compiles llama.cpp);
:func:`llama_cpp_available` says whether it is installed. :func:`llama_cpp_server` starts its
OpenAI-compatible server (``python -m llama_cpp.server``) for the concurrent HTTP comparison in
:mod:`bench.serving` (``--peer llama-cpp``). :func:`llama_server` starts llama.cpp's own
``llama-server`` with continuous batching (``--peer llama-server``; the binary is found by
:func:`llama_server_binary`, built by ``bench/build_llama_server.sh``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from bench.common.engines import load_hf, run_hf, token_ids
from bench.common.limits import gguf_bytes_per_token, hf_bytes_per_token
from bench.common.quality import free_agreement


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python (module ``llama_cpp``) is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_path(model: Optional[str]) -> Optional[str]:
    """The GGUF file behind ``model`` (None: the default model's; a directory holding exactly one
    ``*.gguf``), or None when ``model`` is a safetensors directory without one."""
    from cluster.model.loader import default_model_path

    path = Path(model) if model else Path(default_model_path())
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        return str(ggufs[0]) if len(ggufs) == 1 else None
    return str(path) if path.suffix == ".gguf" else None


def default_threads() -> int:
    """Threads a peer uses: the machine's cores (``os.cpu_count()``)."""
    return os.cpu_count() or 1


def cpu_has_amx() -> bool:
    """Whether the CPU reports Intel AMX (``amx_int8`` in ``/proc/cpuinfo``; False where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


def llama_repack_default() -> bool:
    """Whether llama.cpp peers keep ggml's extra CPU buffer types (weight repacking, AMX). Off on AMX
    CPUs: there ggml 0.25 (llama-cpp-python 0.3.36) routes the Q4_1 matmuls to its AMX kernel, which
    crashed both llama-server and llama-cpp-python at the first decode on this project's Sapphire
    Rapids VM; ``--no-repack`` is what a user of such a machine runs. Q4_1 has no repacked layout on
    other CPUs, so the default model's speed is the same either way."""
    return not cpu_has_amx()


class LlamaCppRun:
    """llama-cpp-python (``llama_cpp.Llama``) on a GGUF file at batch 1.

    Greedy (``temp=0``, no repeat penalty), EOS ignored: :meth:`Llama.generate` yields tokens until
    the caller stops (the EOS stop lives in ``create_completion``), so each prompt gets exactly
    ``max_tokens`` tokens. The model state is reset before every prompt, so no prompt reuses an
    earlier prompt's KV cache (eeserve runs with prefix caching off in the same benchmarks).

    Raises:
        ImportError: llama-cpp-python is not installed (``pip install -e ".[peers]"``).
    """

    def __init__(self, path: str, n_threads: Optional[int] = None, n_ctx: int = 2048, repack: Optional[bool] = None):
        import llama_cpp
        from llama_cpp import Llama, llama_model_n_layer

        n = n_threads or default_threads()
        self.path = path
        defaults = llama_cpp.llama_cpp.llama_model_default_params
        repack = llama_repack_default() if repack is None else repack

        def model_params():  # Llama() exposes no use_extra_bufts: set it in the defaults it starts from
            params = defaults()
            params.use_extra_bufts = repack
            return params

        llama_cpp.llama_cpp.llama_model_default_params = model_params
        try:
            self.llm = Llama(model_path=path, n_threads=n, n_threads_batch=n, n_ctx=n_ctx, n_batch=512, seed=0,
                             verbose=False)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = defaults
        self.num_layers = int(llama_model_n_layer(self.llm.model))

    def generate(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """``max_tokens`` greedy token ids after ``prompt_ids``."""
        self.llm.reset()
        out: list[int] = []
        if max_tokens <= 0:
            return out
        for tok in self.llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(int(tok))
            if len(out) >= max_tokens:
                break
        return out

    def __call__(self, prompt_ids: list[list[int]], batch: int, max_tokens: int):
        """Time every prompt one after the other; ``batch`` must be 1 (llama-cpp-python's ``Llama``
        decodes one sequence).

        Raises:
            ValueError: ``batch != 1``.
        """
        if batch != 1:
            raise ValueError(f"llama-cpp-python runs batch 1 only, got batch {batch}")
        self.generate(prompt_ids[0], 2)  # warm-up
        t0 = time.perf_counter()
        outs = [self.generate(p, max_tokens) for p in prompt_ids]
        dt = time.perf_counter() - t0
        return outs, sum(map(len, outs)) / dt, float(self.num_layers), None

    def close(self) -> None:
        self.llm.close()


class HFGenerate:
    """Hugging Face transformers ``generate`` (greedy, left padding, ``min_new_tokens =
    max_new_tokens`` so EOS never ends a row early: transformers bans EOS until then, so past the
    point where the model would end, its tokens differ from an EOS-ignoring run's), any batch size,
    on ``model``: a GGUF file
    (None: the default model's), dequantized to ``dtype`` by transformers, or a safetensors directory."""

    def __init__(self, model: Optional[str], dtype: str = "float32"):
        gguf = gguf_path(model)
        if gguf is not None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(
                str(Path(gguf).parent), gguf_file=Path(gguf).name, dtype=getattr(torch, dtype)).eval()
        else:
            self.model = load_hf(model, dtype)
        self.num_layers = int(self.model.config.num_hidden_layers)

    def __call__(self, prompt_ids: list[list[int]], batch: int, max_tokens: int):
        outs, tps = run_hf(self.model, prompt_ids, batch, max_tokens)
        return outs, tps, float(self.num_layers), None


# ------------------------------------------------------------------------------------------- rows
def make_peers(model: Optional[str], no_peers: bool = False) -> tuple[dict, dict, list[str]]:
    """``(peer runs by name, weight bytes per token by name, notes on skipped peers)`` for ``model``
    (None: the default model): transformers on the float32 weights, llama-cpp-python on its GGUF
    when installed and the model has one; none with ``no_peers``."""
    runs, nbytes, notes = {}, {}, []
    if no_peers:
        return runs, nbytes, ["peers skipped (--no-peers)"]
    hf = HFGenerate(model, "float32")
    runs["transformers"], nbytes["transformers"] = hf, hf_bytes_per_token(hf.model)
    gguf = gguf_path(model)
    if not llama_cpp_available():
        notes.append('llama-cpp-python skipped: not installed (pip install -e ".[peers]")')
    elif gguf is None:
        notes.append("llama-cpp-python skipped: the model has no GGUF file")
    else:
        runs["llama-cpp"], nbytes["llama-cpp"] = LlamaCppRun(gguf), gguf_bytes_per_token(gguf)
    return runs, nbytes, notes


def peer_rows(best: dict, peers: list[str], batch: int, ref: list[list[int]]) -> list[dict]:
    """Rows of the ``peers`` keys of ``best`` (name -> a run's tuple): tokens/s, the ratio to the float32
    full model (key ``("none", "full")``) and free-running agreement with ``ref``."""
    rows = []
    full = best.get(("none", "full"))
    for name in peers:
        if name not in best:
            continue
        outs, tps, mean_layer, _ = best[name]
        row = {"engine": name, "quantization": "gguf" if name == "llama-cpp" else "none", "mode": "full",
               "batch": batch, "tokens_per_s": round(tps, 2), "mean_exit_layer": round(mean_layer, 2),
               "agreement_free": round(free_agreement(token_ids(outs), ref), 4)}
        if full is not None:
            row["speedup_vs_float_full"] = round(tps / full[1], 3)
        rows.append(row)
        print(f"  batch {batch:3d} {name:17s} {tps:8.2f} tok/s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ server
def eog_token_ids(path: str) -> list[int]:
    """Every token id that ends generation in llama.cpp for the GGUF at ``path`` (EOS, EOT, ...),
    read from its vocabulary (``llama_vocab_is_eog``); biased to -100 to make its server ignore EOS."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        llm.close()


@contextlib.contextmanager
def _server_process(cmd: list[str], port: int, name: str, timeout_s: float,
                    log_path: Optional[str]) -> Iterator[str]:
    """Run ``cmd`` (an OpenAI-compatible server listening on ``port``) for the ``with`` block; yields
    ``http://127.0.0.1:<port>/v1`` once ``/v1/models`` answers 200 and terminates the process (only
    this one) on exit. Its output goes to ``log_path`` (default: dropped).

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout_s`` seconds.
    """
    import httpx

    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} (command: {' '.join(cmd)})")
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()


def llama_cpp_server(path: str, n_threads: Optional[int] = None, n_ctx: int = 4096, timeout_s: float = 180.0,
                     log_path: Optional[str] = None):
    """Run ``python -m llama_cpp.server --model <path>`` on a free local port for the ``with`` block;
    yields its OpenAI base URL (``http://127.0.0.1:<port>/v1``) once ``/v1/models`` answers, and
    terminates the process (only this one) on exit. It serves one request at a time: concurrent ones
    wait for a lock (``--interrupt_requests False``), and each reuses the longest prompt prefix of
    the one before it. Its output goes to ``log_path`` (default: dropped).

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout_s`` seconds.
    """
    from deployments.testing import free_port

    n = n_threads or default_threads()
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(n), "--n_threads_batch", str(n), "--n_ctx", str(n_ctx),
           "--interrupt_requests", "False"]  # queue concurrent requests (the default cancels the running one)
    return _server_process(cmd, port, "llama_cpp.server", timeout_s, log_path)


LLAMA_SERVER_ENV = "EESERVE_LLAMA_SERVER"


def llama_server_binary() -> Optional[str]:
    """Path of llama.cpp's ``llama-server``: ``$EESERVE_LLAMA_SERVER``, else ``llama-server`` on
    ``PATH``, else the one ``bench/build_llama_server.sh`` builds (``$EESERVE_LLAMA_DIR/build/bin``,
    default ``~/.cache/eeserve/llama/build/bin``; ``bin/`` of older builds); None when none of them is an
    executable file."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.environ.get("EESERVE_LLAMA_DIR") or os.path.join(cache, "eeserve", "llama")
    built = [os.path.join(root, *sub, "llama-server") for sub in (("build", "bin"), ("bin",))]
    for cand in (os.environ.get(LLAMA_SERVER_ENV), shutil.which("llama-server"), *built):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def llama_server(path: str, n_threads: Optional[int] = None, parallel: int = 16, ctx_per_slot: int = 2048,
                 timeout_s: float = 180.0, log_path: Optional[str] = None, binary: Optional[str] = None):
    """Run llama.cpp's own ``llama-server`` on the GGUF at ``path`` with continuous batching for the
    ``with`` block: ``parallel`` slots (``-np``) sharing a KV cache of ``parallel * ctx_per_slot``
    tokens (``-c``), ``n_threads`` threads for decode and prompt (default: the cores); yields its
    OpenAI base URL (``http://127.0.0.1:<port>/v1``). Requests take ``ignore_eos`` as ours do.

    Raises:
        FileNotFoundError: no ``llama-server`` (:func:`llama_server_binary`; build it with
            ``bash bench/build_llama_server.sh`` or ``make llama-server``).
        RuntimeError: the server exited or did not answer within ``timeout_s`` seconds.
    """
    from deployments.testing import free_port

    exe = binary or llama_server_binary()
    if exe is None:
        raise FileNotFoundError(f"llama-server not found (${LLAMA_SERVER_ENV}, PATH, or build it: "
                                "bash bench/build_llama_server.sh)")
    n = n_threads or default_threads()
    port = free_port()
    cmd = [exe, "-m", path, "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-c", str(parallel * ctx_per_slot), "--cont-batching", "-t", str(n), "-tb", str(n)]
    cmd += [] if llama_repack_default() else ["--no-repack"]
    return _server_process(cmd, port, "llama-server", timeout_s, log_path)
