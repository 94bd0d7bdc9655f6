"""Inductor's CPU GEMM templates against PyTorch's int4 / int8 kernels, by row count (issue 18).

A stack of random int4 decoder layers with SmolLM2-135M's shapes (qkv [960, 576], o [576, 576],
gate_up [3072, 576], down [576, 1536], group size 32) and its int8 LM head ([49152, 576]) are timed
at 1..32 rows, three ways side by side in one process, interleaved per row count (median of
``--iters``): ``eager`` (``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm``), ``compiled``
(Inductor, the same aten kernels) and ``templates`` (Inductor with the options of
:func:`cluster.model.compile.inductor_options`: max-autotune over the C++ GEMM templates, frozen
weights), with the relative difference of each compiled output from the eager one.

    python -m bench.gemm_templates --layers 30 --rows 1 4 16 32

Output: a table, ``bench/results/<name>.json``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common.results import print_table, save

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


class _Layer(torch.nn.Module):
    def __init__(self, method: str):
        super().__init__()
        from cluster.model.layers.quant import QuantizedWeight

        self.ws = torch.nn.ModuleList(QuantizedWeight.from_float(torch.randn(n, k) * 0.05, method, 32)
                                      for n, k in SHAPES)

    def forward(self, x):
        x = torch.nn.functional.rms_norm(x, (576,))
        x = x + self.ws[1](self.ws[0](x)[:, :576])
        g = self.ws[2](x)
        return x + self.ws[3](torch.nn.functional.silu(g[:, :1536]) * g[:, 1536:])


class _Decoder(torch.nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer("int4") for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from cluster.model.layers.quant import QuantizedWeight

        self.w = QuantizedWeight.from_float(torch.randn(49152, 576) * 0.05, "int8", 32)

    def forward(self, x):
        return self.w(torch.nn.functional.rms_norm(x, (576,))).float()


def _time(fn, x, iters: int) -> float:
    for _ in range(2):
        fn(x)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(argv=None):
    import torch._inductor.config as inductor_config

    from cluster.model.compile import inductor_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--name", default="gemm-templates")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for part, module in (("int4 decoder", _Decoder(args.layers).eval()), ("int8 LM head", _Head().eval())):
            options = inductor_options(torch.device("cpu"))
            variants = {"eager": module, "compiled": torch.compile(module, dynamic=True),
                        "templates": torch.compile(module, dynamic=True, options=options)}
            t = time.perf_counter()
            for name, fn in variants.items():
                for m in (1, 7):  # D == 1 and D >= 2, as the engine warms up
                    with inductor_config.patch(freezing=name == "templates"):
                        fn(torch.zeros(m, 576, dtype=torch.bfloat16))
            print(f"{part}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
            for m in args.rows:
                x = torch.randn(m, 576, dtype=torch.bfloat16) * 0.1
                row = {"part": part, "rows": m}
                for name, fn in variants.items():
                    with inductor_config.patch(freezing=name == "templates"):
                        row[f"{name}_ms"] = round(_time(fn, x, args.iters), 2)
                        if name != "eager":
                            ref = module(x).float()
                            row[f"{name}_rel_diff"] = float(f"{((fn(x).float() - ref).norm() / ref.norm()).item():.1e}")
                row["templates_vs_eager"] = round(row["eager_ms"] / row["templates_ms"], 2)
                rows.append(row)
                print(row, flush=True)
    print_table(rows, ["part", "rows", "eager_ms", "compiled_ms", "templates_ms", "templates_vs_eager",
                       "compiled_rel_diff", "templates_rel_diff"])
    print(f"saved {save(args.name, {'args': vars(args), 'threads': torch.get_num_threads(), 'rows': rows})}")


if __name__ == "__main__":
    main()
