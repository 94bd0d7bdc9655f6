"""Plots of saved benchmark results (matplotlib, Agg backend; PNGs under bench/results/).

* Speed vs agreement as the exit threshold varies (:func:`plot_speed_vs_agreement`): from a
  threshold sweep's rows (``threshold``, ``speedup_vs_full``, ``agreement``, ``variant``, ``batch``,
  ...): speed-up over the full model (output tokens/s ratio, y) against greedy agreement with the
  full model (share of token positions equal to the full model's, x), one line per
  (variant, batch), each point labelled with its threshold. Non-numeric thresholds (e.g.
  ``"calibrated"``) are drawn as stars off the line.
* Exit-layer histogram (:func:`plot_exit_histogram`): for each variant, the fraction of generated
  tokens that left the model at each layer (``exit_layer_counts``, ``{"layer": count}``; layer
  ``num_layers`` = the full model), grouped bars.

    python -m bench.plots --sweep bench/results/offline-sweep.json --hist bench/results/serving.json

``--hist`` reads either a top-level ``exit_layer_counts`` (``{variant: {layer: count}}``, e.g. from
``bench.offline``) or rows carrying their own ``exit_layer_counts`` (``bench.serving``: one group per
``variant@rate``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common.plots import exit_counts_from_results, plot_exit_histogram, plot_speed_vs_agreement
from bench.common.results import results_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=Path, help="threshold-sweep JSON (rows with threshold, speedup_vs_full, ...)")
    ap.add_argument("--hist", type=Path, help="JSON with exit_layer_counts (top level or per row)")
    ap.add_argument("--agreement-key", default="agreement", help="x axis of the sweep plot")
    ap.add_argument("--hist-variants", nargs="+", default=None,
                    help="only the histogram groups whose name contains one of these strings")
    ap.add_argument("--out-dir", type=Path, default=results_dir())
    args = ap.parse_args(argv)
    if not (args.sweep or args.hist):
        ap.error("give --sweep and/or --hist")
    if args.sweep:
        data = json.loads(args.sweep.read_text())
        p = plot_speed_vs_agreement(data["rows"], args.out_dir / f"{args.sweep.stem}-speed-vs-agreement.png",
                                    agreement_key=args.agreement_key)
        print(f"wrote {p}")
    if args.hist:
        counts, num_layers = exit_counts_from_results(json.loads(args.hist.read_text()))
        if args.hist_variants:
            counts = {k: v for k, v in counts.items() if any(s in k for s in args.hist_variants)}
        p = plot_exit_histogram(counts, num_layers, args.out_dir / f"{args.hist.stem}-exit-hist.png")
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
