"""Output: a text progress bar, the terminal table (TFLOP/s and pyflash/peer ratios), the JSON file
and the plot (TFLOP/s against seqlen, one panel per head dim and causal setting)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, TextIO


class Progress:
    """``[#####.....] 12/48 label (eta)`` on stderr: redrawn in place on a terminal, one line per step
    otherwise (logs stay readable)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30):
        self.total, self.stream, self.width = max(total, 1), stream, width
        self.done, self.started = 0, time.perf_counter()
        self.in_place = stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{label}  {elapsed:.0f}s, ~{eta:.0f}s left")
        if self.in_place:
            self.stream.write("\r" + line[:150].ljust(150))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


UNITS = {"TFLOP/s": 1.0, "GFLOP/s": 1e3}  # table unit -> multiplier of the tflops field


def _fmt_rate(row: Optional[dict], scale: float) -> str:
    if row is None or row.get("tflops") is None:
        return "-"
    value = row["tflops"] * scale
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _ratio(ours: Optional[dict], peer: Optional[dict]) -> Optional[float]:
    if not ours or not peer or ours.get("tflops") is None or peer.get("tflops") is None:
        return None
    return ours["tflops"] / peer["tflops"]


def _case_key(row: dict) -> tuple:
    return (row["dtype"], row["tag"], row["b"], row["s"], row["h"], row["hk"], row["d"], row["causal"],
            row["window_left"], row["dropout_p"], row["mode"])


def table(rows: List[dict], impls: Sequence[tuple], unit: str = "TFLOP/s") -> str:
    """One line per (case, mode): rates in ``unit``, then pyflash/peer. ``impls``: [(name, label)]."""
    scale = UNITS[unit]
    grouped: "OrderedDict[tuple, Dict[str, dict]]" = OrderedDict()
    for row in rows:
        grouped.setdefault(_case_key(row), {})[row["impl"]] = row
    peers = [(name, label) for name, label in impls if name != "pyflash"]
    header = ["dtype", "row", "b", "seqlen", "h/hk", "d", "causal", "mode", f"pyflash {unit}"]
    for _, label in peers:
        header += [label, f"pf/{label}"]
    lines = [header]
    for key, by_impl in grouped.items():
        dtype, tag, b, s, h, hk, d, causal, window, dropout, mode = key
        ours = by_impl.get("pyflash")
        line = [dtype, tag, str(b), str(s), f"{h}/{hk}", str(d), "yes" if causal else "no", mode,
                _fmt_rate(ours, scale)]
        for name, _ in peers:
            ratio = _ratio(ours, by_impl.get(name))
            line += [_fmt_rate(by_impl.get(name), scale), "-" if ratio is None else f"{ratio:.2f}x"]
        lines.append(line)
    widths = [max(len(line[col]) for line in lines) for col in range(len(header))]
    text = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def summary(rows: List[dict], impls: Sequence[tuple]) -> str:
    """Geometric mean and worst of pyflash/peer per peer and mode, over rows both ran."""
    lines = []
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        by_key.setdefault(_case_key(row), {})[row["impl"]] = row
    modes = list(OrderedDict.fromkeys(row["mode"] for row in rows))
    for name, label in impls:
        if name == "pyflash":
            continue
        for mode in modes:
            ratios = [r for key, by_impl in by_key.items() if key[-1] == mode
                      for r in [_ratio(by_impl.get("pyflash"), by_impl.get(name))] if r is not None]
            if ratios:
                geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
                lines.append(f"pyflash/{label} {mode}: geomean {geomean:.2f}x, worst {min(ratios):.2f}x "
                             f"over {len(ratios)} rows")
    return "\n".join(lines)


def write_json(path: str, meta: dict, rows: List[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def plot(out_dir: str, rows: List[dict], impls: Sequence[tuple], unit: str = "TFLOP/s") -> List[str]:
    """One PNG per (dtype, mode) of the main workload: panels head dim x causal, rate vs seqlen.
    Returns the files written; matplotlib is optional (a message and no PNG without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib for one)")
        return []
    main = [r for r in rows if r["tag"] == "main" and r.get("tflops") is not None]
    written = []
    for dtype in OrderedDict.fromkeys(r["dtype"] for r in main):
        for mode in OrderedDict.fromkeys(r["mode"] for r in main):
            subset = [r for r in main if r["dtype"] == dtype and r["mode"] == mode]
            head_dims = sorted({r["d"] for r in subset})
            causals = sorted({r["causal"] for r in subset})
            if not subset:
                continue
            fig, axes = plt.subplots(len(head_dims), len(causals), squeeze=False, sharex=True,
                                     figsize=(5 * len(causals), 3.5 * len(head_dims)))
            for i, d in enumerate(head_dims):
                for j, causal in enumerate(causals):
                    ax = axes[i][j]
                    for name, label in impls:
                        points = sorted((r["s"], r["tflops"] * UNITS[unit]) for r in subset
                                        if r["impl"] == name and r["d"] == d and r["causal"] == causal)
                        if points:
                            ax.plot(*zip(*points), marker="o", label=label,
                                    linewidth=2.5 if name == "pyflash" else 1.2)
                    ax.set_xscale("log", base=2)
                    seqlens = sorted({r["s"] for r in subset})
                    ax.set_xticks(seqlens, [str(n) for n in seqlens])
                    ax.minorticks_off()
                    ax.set_title(f"d={d}, causal={'yes' if causal else 'no'}")
                    ax.set_xlabel("seqlen")
                    ax.set_ylabel(unit)
                    ax.grid(True, alpha=0.3)
                    ax.legend(fontsize=8)
            fig.suptitle(f"{dtype} {mode}")
            fig.tight_layout()
            path = os.path.join(out_dir, f"bench_{dtype}_{mode.replace('+', '_')}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
