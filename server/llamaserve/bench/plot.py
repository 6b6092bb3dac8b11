"""PNG plots of `llamaserve bench` results: throughput and latency percentiles against the concurrency or the
request rate, one line per result file, so several servers (or settings) compare on one figure."""

from pathlib import Path

PANELS = [  # (summary key, percentiles drawn, axis label)
    ("output_throughput", None, "output tokens/s"),
    ("ttft_ms", ("p50", "p99"), "time to first token (ms)"),
    ("itl_ms", ("p50", "p99"), "inter-token latency (ms)"),
    ("e2e_ms", ("p50", "p99"), "end-to-end latency (ms)"),
]
STYLES = {"p50": "-", "p99": "--"}


def plot_results(results: list[dict], path: Path, title: str | None = None) -> None:
    """Draws the results (each as `llamaserve bench` writes it) into a PNG at `path`; all must sweep the same
    kind (concurrency or request rate)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install 'llamaserve[bench]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    kinds = {r["sweep"]["kind"] for r in results}
    if len(kinds) != 1:
        raise ValueError("results sweeping the concurrency and results sweeping the request rate cannot share a plot")
    kind = kinds.pop()
    x_key = "concurrency" if kind == "concurrency" else "request_rate"
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, percentiles, label) in zip(axes.flat, PANELS):
        for n, result in enumerate(results):
            points = [p for p in result["points"] if p[x_key] not in (None, "inf")]  # "inf": no place on an axis
            xs = [p[x_key] for p in points]
            color = f"C{n}"
            if percentiles is None:
                ax.plot(xs, [p["summary"][key] for p in points], "o-", color=color, label=result["label"])
                continue
            for q in percentiles:
                ys = [p["summary"][key][q] for p in points]
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", linestyle=STYLES[q],
                        color=color, label=f"{result['label']} {q}")
        values = sorted({p[x_key] for r in results for p in r["points"] if p[x_key] not in (None, "inf")})
        if values and values[-1] >= 4 * values[0] > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
        ax.set_xlabel("concurrency" if kind == "concurrency" else "request rate (req/s)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "llamaserve bench")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=72, pil_kwargs={"optimize": True})  # small enough to commit
    plt.close(fig)
