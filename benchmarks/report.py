"""Results out: medians, one table on stdout, a JSON file, a PNG chart, a Markdown fragment."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from benchmarks.context import median

#: The JSON the phases write: nested dicts and lists of numbers and strings.
Results = dict[str, Any]

# Columns of the one table, in order: (key in the results, short header, legend).
COLUMNS = [
    ("raw", "raw", "the raw file itself (the limit)"),
    ("fde", "fde", "fuse-disk-export -dp, its defaults (writeback, aio threads, write guard)"),
    ("qsd", "qsd", "qemu-storage-daemon --export type=fuse written by hand, default options"),
    (
        "qsd-safe",
        "qsd safe",
        "qsd by hand, as safe: fuse-disk-export's graph and guard (start-up rows only)",
    ),
    ("nbdfuse", "nbdfuse", "qemu-nbd + nbdfuse"),
    ("fde-io_uring", "f uring", "fuse-disk-export --aio io_uring"),
    ("fde-ro", "f -r", "fuse-disk-export -r (read-only: io_uring by default)"),
    ("fde-ro-io_uring", "f -r uring", "fuse-disk-export -r --aio io_uring"),
    ("fde-none", "f none", "fuse-disk-export --cache none (O_DIRECT, aio threads)"),
    ("fde-native", "f native", "fuse-disk-export --cache none --aio native"),
    ("fde-unsafe", "f unsafe", "fuse-disk-export --cache unsafe (flushes ignored)"),
    ("fde-writethrough", "f wthru", "fuse-disk-export --cache writethrough"),
    ("iothread", "q iothr", "qsd by hand + --object iothread, export iothread=io0"),
    ("io_uring", "q uring", "qsd by hand, file aio=io_uring"),
    ("direct", "q direct", "qsd by hand, file cache.direct=on"),
    ("native", "q native", "qsd by hand, file aio=native,cache.direct=on"),
    ("io_uring-direct", "q uring/d", "qsd by hand, file aio=io_uring,cache.direct=on"),
    ("no-flush", "q noflush", "qsd by hand, cache.no-flush=on"),
    ("writethrough", "q wthru", "qsd by hand, export writethrough=on"),
]

#: What the chart's last panel compares each candidate with.
BASELINE = {"fde-ro-io_uring": "fde-ro"}


def baseline(key: str) -> str:
    if key in BASELINE:
        return BASELINE[key]
    return "fde" if key.startswith("fde") else "qsd"


START_KINDS = ("fde", "qsd", "qsd-safe")
START_ROWS = [
    ("live_ms", "start to live, {n} image{s} (ms)"),
    ("clean_ms", "SIGINT to unmounted + pid file gone, {n} image{s} (ms)"),
    ("exit_ms", "SIGINT to process exit, {n} image{s} (ms)"),
    ("settled_ms", "unmounted + pid file gone, SIGINT 1 s after live, {n} image{s} (ms)"),
    ("watched_ms", "unmounted + pid file gone, mountinfo watched (rounds 1-4), {n} image{s} (ms)"),
]


def _med(values: Sequence[float] | None) -> float | None:
    return median(values) if values else None


def summarize(results: Results) -> Results:
    """Medians of everything, keyed like the raw results."""
    summary: Results = {}
    io = results.get("io")
    if io:
        summary["io"] = {
            key: {cell: _med(v) for cell, v in t["values"].items()}
            for key, t in io["targets"].items()
        }
    start = results.get("startup")
    if start:
        summary["startup"] = {
            n: {kind: {k: _med(v) for k, v in vals.items()} for kind, vals in row.items()}
            for n, row in start["rows"].items()
        }
    breakdown = results.get("breakdown")
    if breakdown:
        summary["breakdown"] = {
            n: {k: _med(v) for k, v in phases.items()} for n, phases in breakdown.items()
        }
    return summary


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table_rows(results: Results, summary: Results) -> tuple[list[str], list[list[str]]]:
    """The one table: a row per measurement, a column per system (blank: not measured)."""
    io = results.get("io") or {}
    started = bool(summary.get("startup"))
    present = [
        c for c in COLUMNS if c[0] in (io.get("targets") or {}) or (started and c[0] in START_KINDS)
    ]
    headers = ["measurement", *(c[1] for c in present)]
    rows: list[list[str]] = []
    for cell, spec in (io.get("cells") or {}).items():
        row = [f"{spec['title']} ({spec['unit']})"]
        for key, _, _ in present:
            row.append(_fmt((summary.get("io", {}).get(key) or {}).get(cell)))
        if any(row[1:]):
            rows.append(row)
    start = summary.get("startup") or {}
    for field, title in START_ROWS:
        for n, kinds in start.items():
            label = title.format(n=n, s="" if n == "1" else "s")
            if not any(kinds.get(k, {}).get(field) for k in START_KINDS):
                continue
            rows.append(
                [
                    label,
                    *(
                        _fmt(kinds.get(k, {}).get(field)) if k in START_KINDS else ""
                        for k, _, _ in present
                    ),
                ]
            )
    for n, kinds in start.items():
        if n not in ("1", "128"):
            continue
        label = f"peak RSS, {n} image{'' if n == '1' else 's'} (MiB, tool + daemon)"
        rows.append(
            [
                label,
                *(
                    _fmt((kinds.get(k, {}).get("rss_kib") or 0) / 1024 or None)
                    if k in START_KINDS
                    else ""
                    for k, _, _ in present
                ),
            ]
        )
        if n in start and start[n].get("fde", {}).get("rss_tool_kib"):
            tool = start[n]["fde"]["rss_tool_kib"] / 1024
            plural = "" if n == "1" else "s"
            rows.append(
                [
                    f"  of which fuse-disk-export's Python, {n} image{plural} (MiB)",
                    *(_fmt(tool) if k == "fde" else "" for k, _, _ in present),
                ]
            )
    return headers, rows


def render_text(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for j, row in enumerate([headers, *rows]):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(headers: list[str], rows: list[list[str]]) -> str:
    out = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def legend(results: Results) -> str:
    present = set((results.get("io") or {}).get("targets") or {}) | {"fde", "qsd"}
    if results.get("startup"):
        present |= set(START_KINDS)
    return "\n".join(f"  {short:>10}: {text}" for key, short, text in COLUMNS if key in present)


def qemu_text(results: Results) -> str:
    q = results.get("qemu")
    if not q:
        return ""
    lines = [
        f"QEMU {q['qemu']}: FUSE export options: {', '.join(q['fuse_export'])}; "
        f"common: {', '.join(q['export_common'])}; file aio: {q['file_aio']}"
    ]
    if q["missing"]:
        lines.append("  lacks: " + "; ".join(f"{k} ({v})" for k, v in q["missing"].items()))
    return "\n".join(lines)


def breakdown_text(summary: Results) -> str:
    lines = []
    for n, phases in (summary.get("breakdown") or {}).items():
        lines.append(f"fuse-disk-export phases, {n} image(s), foreground (median ms):")
        lines += [f"  {k:<40} {_fmt(v):>8}" for k, v in phases.items()]
    return "\n".join(lines)


def files_text(results: Results) -> str:
    files = results.get("files")
    if not files:
        return ""
    lines = [
        f"the files inside: ext4 with {files['files']} small files, medians "
        "(ms to a working ls; s to read every file with find | xargs cat):"
    ]
    for name, m in files["medians"].items():
        lines.append(f"  {name:<40} {_fmt(m.get('ls_ms')):>8} ms {_fmt(m.get('cat_s')):>8} s")
    lines += [f"  ({note})" for note in files.get("notes", [])]
    return "\n".join(lines)


def scale_text(results: Results) -> str:
    scale = results.get("scale")
    if not scale:
        return ""
    lines = [
        f"many images (daemons of at most {scale['shard_size']}; medians: ms, KiB per export):",
        f"  {'images':>7} {'':<16} {'live':>8} {'revert':>8} {'RSS/export':>10} {'--list':>8}",
    ]
    for n, kinds in scale["rows"].items():
        for kind, label in (("fde", "fuse-disk-export"), ("qsd", "by hand")):
            m = kinds[kind]
            lines.append(
                f"  {n:>7} {label:<16} {_fmt(m.get('live_ms')):>8} {_fmt(m.get('revert_ms')):>8} "
                f"{_fmt(m.get('rss_per_export_kib')):>10} {_fmt(m.get('list_ms')):>8}"
            )
    return "\n".join(lines)


def imports_text(results: Results) -> str:
    imp = results.get("imports")
    if not imp:
        return ""
    lines = [
        f"python -c pass: {_fmt(_med(imp['python -c pass, ms']))} ms; "
        f"fuse-disk-export --version: {_fmt(_med(imp['fuse-disk-export --version, ms']))} ms",
    ]
    for key in ("version", "full"):
        part = imp[key]
        lines.append(
            f"{part['command']}: wall {_fmt(_med(part['wall_ms']))} ms, "
            f"imports {part['total_import_ms']} ms; by package (own time, ms): "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in part["by_package_self_ms"][:8])
        )
    return "\n".join(lines)


def _legend(ax, size: int, ncol: int = 1) -> None:  # type: ignore[no-untyped-def]
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size, ncol=ncol)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def chart(results: Results, summary: Results, path: str) -> None:
    """Four panels: time to live, time to stop, I/O against the raw file, candidates against the
    hand-written default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    start = summary.get("startup") or {}
    counts = list(start)

    def bars(ax, series: dict[str, list[float | None]], labels: list[str], width: float = 0.8):  # type: ignore[no-untyped-def]
        k = max(len(series), 1)
        w = width / k
        for i, (name, values) in enumerate(series.items()):
            pos = [j - width / 2 + w * (i + 0.5) for j in range(len(labels))]
            ax.bar(pos, [v if v is not None else 0 for v in values], w, label=name)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")

    ax = axes[0][0]
    if counts:
        bars(
            ax,
            {
                "fuse-disk-export -dp": [start[n]["fde"].get("live_ms") for n in counts],
                "qemu-storage-daemon --daemonize (by hand)": [
                    start[n]["qsd"].get("live_ms") for n in counts
                ],
                "by hand, as safe (same graph, guard applied)": [
                    start[n].get("qsd-safe", {}).get("live_ms") for n in counts
                ],
            },
            [f"{n} image(s)" for n in counts],
        )
        ax.set_yscale("log")
    ax.set_title("start to live (median ms, log)")
    _legend(ax, 8)

    ax = axes[0][1]
    if counts:
        bars(
            ax,
            {
                "fde: unmounted + pid file gone": [start[n]["fde"].get("clean_ms") for n in counts],
                "fde: process exit": [start[n]["fde"].get("exit_ms") for n in counts],
                "qsd: unmounted + pid file gone": [start[n]["qsd"].get("clean_ms") for n in counts],
                "qsd: process exit": [start[n]["qsd"].get("exit_ms") for n in counts],
            },
            [f"{n} image(s)" for n in counts],
        )
        ax.set_yscale("log")
    ax.set_title("SIGINT to clean (median ms, log)")
    _legend(ax, 8)

    io = results.get("io") or {}
    med = summary.get("io") or {}
    cells = io.get("cells") or {}
    ax = axes[1][0]
    main = [k for k in ("raw", "fde", "qsd", "nbdfuse") if k in med]
    used = [c for c in cells if "raw" in med and med["raw"].get(c)]
    if used:
        bars(
            ax,
            {
                io["targets"][k]["label"]: [
                    100 * (med[k].get(c) or 0) / med["raw"][c] for c in used
                ]
                for k in main
            },
            [f"{cells[c]['title']}" for c in used],
        )
        ax.axhline(100, color="grey", linewidth=0.8)
    ax.set_title("I/O through the export, % of the raw file (median)")
    _legend(ax, 8)

    ax = axes[1][1]
    cand = [k for k, _, _ in COLUMNS[4:] if k in med]
    used = [
        c for c in cells if any(med[k].get(c) and med.get(baseline(k), {}).get(c) for k in cand)
    ]
    if used:
        series: dict[str, list[float | None]] = {}
        for k in cand:
            base = med.get(baseline(k)) or {}
            label = f"{io['targets'][k]['label']} (vs {baseline(k)})"
            series[label] = [
                100 * med[k][c] / base[c] if med[k].get(c) and base.get(c) else None for c in used
            ]
        bars(ax, series, [cells[c]["title"] for c in used])
        ax.axhline(100, color="grey", linewidth=0.8)
    ax.set_title("candidate defaults, % of their baseline (median)")
    _legend(ax, 6, ncol=2)

    meta = results.get("meta", {})
    fig.suptitle(
        f"fuse-disk-export benchmarks — {meta.get('qemu', '')}, "
        f"{meta.get('cpus', '?')} CPUs, {meta.get('date', '')}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results: Results, out_dir: str) -> dict[str, str]:
    """Write bench.json, bench.png and bench.md into ``out_dir``; print the table."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results)
    results["medians"] = summary
    headers, rows = table_rows(results, summary)
    files = {
        "json": os.path.join(out_dir, "bench.json"),
        "png": os.path.join(out_dir, "bench.png"),
        "md": os.path.join(out_dir, "bench.md"),
    }
    with open(files["json"], "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")
    try:
        chart(results, summary, files["png"])
    except ImportError as e:
        print(f"bench: no chart ({e}); install the bench extra", flush=True)
        del files["png"]
    with open(files["md"], "w") as f:
        f.write(render_markdown(headers, rows) + "\n")
    print(render_text(headers, rows))
    print()
    print(legend(results))
    extra = [
        t
        for t in (
            qemu_text(results),
            breakdown_text(summary),
            imports_text(results),
            files_text(results),
            scale_text(results),
        )
        if t
    ]
    if extra:
        print()
        print("\n\n".join(extra))
    return files
