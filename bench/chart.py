"""Draw bench/run.py's side-by-side figures as one picture (PNG or SVG, by
the file's extension): added latency, CPU per request, requests per second,
CPU per 1,000 stream chunks and stream jitter, one bar per target, in the
order of the run (direct, nginx, the empty app, the bare proxies, edgegate,
LiteLLM: whichever the run had). run.py draws it after each run; this draws
it again from a saved results file:

    python bench/chart.py                                  # bench/results.json -> bench/results.png
    python bench/chart.py saved.json --out docs/bench-chart.svg

matplotlib is a benchmark-only dependency: ``pip install -e '.[bench]'``.
"""

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDGEGATE_COLOUR, LITELLM_COLOUR, OTHER_COLOUR, FLOOR_COLOUR = "#d95f02", "#7570b3", "#9e9e9e", "#1b9e77"

# (title, how to read one value from a target's summary, unit); None when the run did not measure it
PANELS = (
    ("added latency, small POST, p50 (ms)", lambda row: row.get("added_p50_ms"), "ms"),
    ("CPU per small POST (ms)", lambda row: row.get("cpu_ms_per_request"), "ms"),
    ("requests per second, concurrency 8", lambda row: (row.get("rps") or {}).get("8"), "req/s"),
    ("CPU per 1,000 stream chunks (ms)", lambda row: row.get("cpu_ms_per_1000_chunks"), "ms"),
    ("stream jitter p99, 8 paced streams (ms)", lambda row: row.get("jitter_p99_ms"), "ms"),
)


def colour(name):
    if name.startswith("edgegate"):
        return EDGEGATE_COLOUR
    if name == "LiteLLM":
        return LITELLM_COLOUR
    return FLOOR_COLOUR if name == "empty app" else OTHER_COLOUR


def draw(results, out):
    """Draw ``results`` (bench/run.py's results document) into the file ``out``."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a bench box
    import matplotlib.pyplot as plt

    names = results["targets"]
    summary = results["summary"]
    figure, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (title, value_of, unit) in zip(axes.flat, PANELS):
        shown = [(n, value_of(summary.get(n, {}))) for n in names]
        shown = [(n, v) for n, v in shown if v is not None]
        ax.set_title(title, fontsize=10)
        if not shown:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        labels, values = [n for n, _ in shown], [v for _, v in shown]
        bars = ax.barh(range(len(values)), values, color=[colour(n) for n in labels])
        ax.set_yticks(range(len(values)), labels, fontsize=9)
        ax.invert_yaxis()
        positive = [v for v in values if v > 0]
        if len(positive) == len(values) and max(values) / min(values) > 30:
            ax.set_xscale("log")  # LiteLLM's figures would flatten every other bar
        ax.bar_label(bars, labels=[_figure(v) for v in values], fontsize=8, padding=2)
        ax.margins(x=0.25)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    notes = axes.flat[len(PANELS)]
    notes.set_axis_off()
    notes.text(0, 1, _caption(results), va="top", fontsize=9, transform=notes.transAxes)
    figure.suptitle("edgegate benchmark: the same requests through each target (lower is better, but req/s)",
                    fontsize=12)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def _figure(value):
    return "%d" % round(value) if abs(value) >= 100 else "%.3g" % value


def _caption(results):
    lines = ["machine: %s" % results.get("machine", "?"), "edgegate at %s" % results.get("edgegate", "?"),
             "CPU: the target's own processes (direct: the stub upstream alone); added latency: minus direct's"]
    if results.get("quick"):
        lines.append("--quick run: fewer rounds")
    if "seconds" in results:
        lines.append("run took %s s" % results["seconds"])
    lines += ["note: " + n.splitlines()[0] for n in results.get("notes", [])]
    return "\n".join(_wrapped(line) for line in lines)


def _wrapped(line, width=48):
    words, out, current = line.split(), [], ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = word
        else:
            current = (current + " " + word).strip()
    out.append(current)
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description="draw bench/run.py's results")
    parser.add_argument("results", nargs="?", default=os.path.join(ROOT, "bench", "results.json"))
    parser.add_argument("--out", help="the picture (.png or .svg); default: beside the results, .png")
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    print("drawn to %s" % draw(results, out))


if __name__ == "__main__":
    main()
