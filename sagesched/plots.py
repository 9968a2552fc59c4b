"""Plots of one run: latency CDFs per request type, SLO attainment per class, instance timelines.

Written next to `requests.parquet` so a run folder explains itself; the report module draws the
cross-run figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(records: pd.DataFrame, timeline: pd.DataFrame | None, out_dir: str | Path) -> list[Path]:
    """Write the run's PNGs into `out_dir`; returns their paths."""
    plt = _pyplot()
    out = Path(out_dir)
    written: list[Path] = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for rtype, group in records.groupby("type", sort=True):
        for ax, col in zip(axes, ("ttft_ms", "e2e_ms"), strict=True):
            values = np.sort(group[col].dropna().to_numpy(dtype=float))
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=str(rtype))
    for ax, title in zip(axes, ("time to first token / result", "end-to-end latency"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_ylabel("CDF")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:  # no completed request, no curve: an empty legend only warns
            ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "latency_cdf.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    by_class = records.groupby(records["workload_class"].replace("", "(none)"))["slo_met"].mean().sort_index()
    if len(by_class):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(by_class.index.astype(str), by_class.to_numpy(dtype=float))
        ax.set_ylim(0, 1)
        ax.set_ylabel("SLO attainment")
        ax.set_title("SLO attainment per class")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        written.append(out / "slo_by_class.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    if timeline is not None and len(timeline):
        fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
        for instance, group in timeline.groupby("instance_id", sort=True):
            group = group.sort_values("time_s")
            axes[0].step(group["time_s"], group["busy"].astype(float).rolling(20, min_periods=1).mean(),
                         where="post", label=str(instance))  # fmt: skip
            axes[1].step(group["time_s"], group["running"] + group["waiting"], where="post", label=str(instance))
        axes[0].set_ylabel("utilisation (rolling)")
        axes[1].set_ylabel("requests at instance")
        axes[1].set_xlabel("simulated time (s)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        written.append(out / "instances.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
