"""Draws one PNG per op, and one for end-to-end s/img, from a results table.

    python -m benchmarks.plot [benchmarks/results/<device>.csv ...]

Per op: time (p50, with the p20-p80 band) against the shape for each provider and mode, one panel
per mode. End-to-end (op ``e2e``): s/img per mode as bars, one group per batch size. Each PNG is
written beside its CSV as ``<device>_<op>.png`` and names the device in its title.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from .common import RESULTS_DIR


def read_rows(path: Path) -> List[Dict[str, str]]:
    """The rows with a time to draw (an ``OOM`` row has none)."""
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if _is_number(row.get("ms_p50"))]


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def latest(rows: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """Keeps the last row for each (op, provider, mode, shape): reruns replace earlier figures."""
    keyed = {}
    for row in rows:
        keyed[(row["op"], row["provider"], row["mode"], row["shape"])] = row
    return list(keyed.values())


def plot_op(op: str, rows: List[Dict[str, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        shapes = list(dict.fromkeys(r["shape"] for r in rows if r["mode"] == mode))
        by_provider = defaultdict(dict)
        for r in rows:
            if r["mode"] == mode:
                by_provider[r["provider"]][r["shape"]] = r
        for provider, cells in sorted(by_provider.items()):
            xs = [i for i, s in enumerate(shapes) if s in cells]
            p50 = [float(cells[shapes[i]]["ms_p50"]) for i in xs]
            lo = [float(cells[shapes[i]]["ms_p20"] or cells[shapes[i]]["ms_p50"]) for i in xs]
            hi = [float(cells[shapes[i]]["ms_p80"] or cells[shapes[i]]["ms_p50"]) for i in xs]
            ax.plot(xs, p50, marker="o", label=provider)
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (p50, p20-p80 band)")
        ax.set_title(f"{op} {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{op} on {rows[0]['gpu']} (torch {rows[0]['torch']}, triton {rows[0]['triton']}, {rows[0]['commit']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_e2e(rows: List[Dict[str, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    modes = list(dict.fromkeys(r["provider"] + ("" if r["mode"] in ("", "sample") else f" {r['mode']}") for r in rows))
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(shapes)), 4.5))
    for j, mode in enumerate(modes):
        vals = []
        for s in shapes:
            match = [r for r in rows if r["shape"] == s and (r["provider"] + ("" if r["mode"] in ("", "sample") else f" {r['mode']}")) == mode]
            vals.append(float(match[-1]["ms_p50"]) / 1e3 / _batch(s) if match else 0.0)
        bars = ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=mode)
        ax.bar_label(bars, fmt="%.4f", fontsize=6, rotation=90)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(shapes))])
    ax.set_xticklabels(shapes, fontsize=8)
    ax.set_ylabel("s / image")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"end-to-end sampling on {rows[0]['gpu']} ({rows[0]['commit']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _batch(shape: str) -> int:
    """The batch size in an e2e shape string such as ``B=50,T=40``."""
    for part in shape.split(","):
        key, _, value = part.partition("=")
        if key.strip() == "B":
            return int(value)
    return 1


def plot_file(path: Path) -> List[Path]:
    rows = latest(read_rows(path))
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    written = []
    for op, op_rows in sorted(by_op.items()):
        out = path.with_name(f"{path.stem}_{op}.png")
        if op == "e2e":
            plot_e2e(op_rows, out)
        else:
            plot_op(op, op_rows, out)
        written.append(out)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="*", type=Path, help="results tables (default: all under benchmarks/results/)")
    args = parser.parse_args(argv)
    paths = args.csv or sorted(RESULTS_DIR.glob("*.csv"))
    if not paths:
        raise SystemExit(f"no results table under {RESULTS_DIR}; run a benchmark first")
    for path in paths:
        for out in plot_file(path):
            print(out)


if __name__ == "__main__":
    main()
