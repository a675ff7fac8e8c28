#!/usr/bin/env python3
"""Warren's benchmark report: one table, results.json, table.md and a chart from raw JSON lines.

    report.py RAW.jsonl [...] --out-dir DIR [--broker "RabbitMQ 4.3.6"] [--run-info FILE]
    report.py --compare DIR_A DIR_B [--queue-types quorum,classic] [--out FILE]

Input: JSON lines, one object per measurement run, as written by target/release/warren-bench and
bench/peers (celery_bench.py, dramatiq_bench.py):

    {"system": "lapin"|"warren"|"celery"|"dramatiq", "version": ..., "measure": ..., "jobs": N,
     "seconds": s|null, "jobs_per_s": x|null, "queue_type": "quorum"|"classic", "pool": VARIANT,
     "peak_rss_bytes": n|null, "notes": ..., "finished_at": ..., ...extra keys}

lapin records also carry "ceiling": "primary" or "secondary".

Output: the table on stdout, and in DIR: results.json (the aggregates and every raw record,
the broker named by --broker and the "key: value" lines of --run-info, as bench/run writes them
in run-info.txt), table.md (the same table in Markdown) and throughput.png (bar chart, one panel
per measure).

--compare reads the results.json of two result folders (e.g. bench/results/rabbitmq-4.3 and
bench/results/rabbitmq-3.10, one bench/run on each broker) and prints one Markdown table with the
two side by side: per queue type a column for each run and their ratio, for every throughput
group (matched by measure, system and pool), then idle RSS, latency and retry delay. Columns are
named by each run's broker version (its results.json), else by the folder's name. --out also
writes it to FILE.

Throughput (measures enqueue, drain, e2e): runs are grouped by (measure, jobs, queue type, system,
pool); a group gives the median, min and max jobs/s over its runs and the median peak RSS where
the runs measured it. Runs whose jobs_per_s is null are left out. Ratios:

  - "vs lapin" = the group's median / the median of the lapin group with ceiling "primary" of the
    same measure, queue type and job count: bare lapin on the same broker doing the same work, the
    ceiling a client library can reach there. For drain the primary ceiling acks with one
    multiple ack per 64 deliveries.
  - "vs 2nd" = the same against the lapin group with ceiling "secondary", where there is one (for
    drain: awaiting each ack before the next).

Rows are ordered by measure (enqueue, drain, e2e), queue type (quorum, classic), system (lapin,
warren, celery, dramatiq) and pool in the order the pool first appears in the input.

Further sections: scaling (warren drain pools with "process" or "queues" in their name, also
in the throughput table), memory (peak RSS of every throughput run that measured it), idle RSS
(measure "idle-rss"), latency (measure "latency": start_ms and ack_ms percentiles) and retry delay
(measure "retry-delay": error_ms = actual minus asked delay). Records of any other measure are
listed raw at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

THROUGHPUT = ("enqueue", "drain", "e2e")
KNOWN = THROUGHPUT + ("idle-rss", "latency", "retry-delay")
QUEUE_TYPES = ("quorum", "classic")
SYSTEMS = ("lapin", "warren", "celery", "dramatiq")
COLOURS = {"lapin": "#8c8c8c", "warren": "#d1495b", "celery": "#4f9d69", "dramatiq": "#3d70b2"}
OTHER_COLOUR = "#c9a227"
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Reading and small helpers.

def read_records(paths):
    """Every JSON object of the files, in order; bad lines are reported on stderr and skipped."""
    records = []
    for path in paths:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    print(f"report: {path}:{number}: not JSON ({e}), skipped", file=sys.stderr)
                    continue
                if not isinstance(record, dict):
                    print(f"report: {path}:{number}: not a JSON object, skipped", file=sys.stderr)
                    continue
                records.append(record)
    return records


def number(value):
    """value if it is a number (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def rank(value, order):
    """Position of value in order; unknown values after the known ones, by name."""
    return (order.index(value), "") if value in order else (len(order), str(value))


def median(values):
    return statistics.median(values) if values else None


def fmt(value, digits=0, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def fmt_range(lo, hi, digits=0):
    return "-" if lo is None else f"{lo:.{digits}f}-{hi:.{digits}f}"


def mib(values):
    """Median, min and max of byte counts, in MiB (None when there are none)."""
    values = [v / MIB for v in values]
    if not values:
        return None, None, None
    return median(values), min(values), max(values)


class RawSection:
    """A titled list of preformatted lines (the records of unknown measures)."""

    def __init__(self, title, lines):
        self.title = title
        self.lines = lines

    def text(self):
        return "\n".join([self.title] + self.lines)

    def markdown(self):
        return "\n".join([f"### {self.title}", "", "```"] + self.lines + ["```"])


class Section:
    """One titled table of the report: headers, rows of strings, notes printed under it."""

    def __init__(self, title, headers, rows, notes=(), right=()):
        self.title = title
        self.headers = headers
        self.rows = rows
        self.notes = list(notes)
        self.right = set(right)  # indexes of right-aligned (numeric) columns

    def text(self):
        widths = [max([len(h)] + [len(r[i]) for r in self.rows])
                  for i, h in enumerate(self.headers)]

        def line(cells):
            return "  ".join(c.rjust(w) if i in self.right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        out = [self.title, line(self.headers), "-" * len(line(["-" * w for w in widths]))]
        out += [line(r) for r in self.rows]
        out += self.notes
        return "\n".join(out)

    def markdown(self):
        def esc(cell):
            return cell.replace("|", "\\|")

        out = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |",
               "|" + "|".join("---:" if i in self.right else "---"
                              for i in range(len(self.headers))) + "|"]
        out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in self.rows]
        if self.notes:
            out += [""] + [n + "  " for n in self.notes]
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Aggregation.

def pool_order(records):
    """(system, pool) -> index of its first appearance, for ordering pools within a system."""
    order = {}
    for r in records:
        order.setdefault((r.get("system"), r.get("pool")), len(order))
    return order


def throughput_groups(records, first_seen):
    """The throughput groups, ordered, each a dict; plus the count of runs left out (no rate)."""
    runs = defaultdict(list)
    skipped = 0
    for r in records:
        if r.get("measure") not in THROUGHPUT:
            continue
        if number(r.get("jobs_per_s")) is None:
            skipped += 1
            continue
        key = (r["measure"], r.get("jobs"), r.get("queue_type"), r.get("system"), r.get("pool"))
        runs[key].append(r)

    def order(key):
        measure, jobs, qtype, system, pool = key
        return (THROUGHPUT.index(measure), number(jobs) or 0, rank(qtype, QUEUE_TYPES),
                rank(system, SYSTEMS), first_seen[(system, pool)])

    groups = []
    for key in sorted(runs, key=order):
        measure, jobs, qtype, system, pool = key
        rs = runs[key]
        rates = [r["jobs_per_s"] for r in rs]
        rss_med, _, _ = mib([r["peak_rss_bytes"] for r in rs if number(r.get("peak_rss_bytes"))])
        ceilings = sorted({r["ceiling"] for r in rs if r.get("ceiling")})
        groups.append({
            "measure": measure, "jobs": jobs, "queue_type": qtype, "system": system, "pool": pool,
            "ceiling": ceilings[0] if len(ceilings) == 1 else (ceilings or None),
            "version": sorted({str(r.get("version")) for r in rs}),
            "runs": len(rs),
            "median_jobs_per_s": median(rates), "min_jobs_per_s": min(rates),
            "max_jobs_per_s": max(rates),
            "median_peak_rss_mib": rss_med,
        })

    # The lapin ceilings of each (measure, queue type, jobs), then the ratios against them.
    ceilings = {}
    for g in groups:
        if g["system"] == "lapin" and g["ceiling"] in ("primary", "secondary"):
            where = (g["measure"], g["queue_type"], g["jobs"], g["ceiling"])
            if where in ceilings:
                print(f"report: two lapin {g['ceiling']} ceilings for {where[:3]}: using "
                      f"'{ceilings[where]['pool']}', not '{g['pool']}'", file=sys.stderr)
                continue
            ceilings[where] = g
    for g in groups:
        for ceiling, field in (("primary", "vs_primary"), ("secondary", "vs_secondary")):
            base = ceilings.get((g["measure"], g["queue_type"], g["jobs"], ceiling))
            g[field] = (g["median_jobs_per_s"] / base["median_jobs_per_s"]
                        if base and base["median_jobs_per_s"] else None)
    return groups, skipped


def memory_groups(records, first_seen):
    """Peak RSS of the throughput runs that measured it, per (system, pool, measure, queue)."""
    runs = defaultdict(list)
    for r in records:
        if r.get("measure") in THROUGHPUT and number(r.get("peak_rss_bytes")):
            runs[(r.get("system"), r.get("pool"), r["measure"], r.get("queue_type"))].append(r)

    def order(key):
        system, pool, measure, qtype = key
        return (rank(system, SYSTEMS), first_seen[(system, pool)], THROUGHPUT.index(measure),
                rank(qtype, QUEUE_TYPES))

    groups = []
    for key in sorted(runs, key=order):
        system, pool, measure, qtype = key
        med, lo, hi = mib([r["peak_rss_bytes"] for r in runs[key]])
        groups.append({"system": system, "pool": pool, "measure": measure, "queue_type": qtype,
                       "runs": len(runs[key]), "median_mib": med, "min_mib": lo, "max_mib": hi})
    return groups


def idle_groups(records, first_seen):
    """Idle worker RSS per (system, pool), whatever the queue type."""
    runs = defaultdict(list)
    for r in records:
        if r.get("measure") == "idle-rss" and number(r.get("peak_rss_bytes")):
            runs[(r.get("system"), r.get("pool"))].append(r)
    groups = []
    for key in sorted(runs, key=lambda k: (rank(k[0], SYSTEMS), first_seen[k])):
        med, lo, hi = mib([r["peak_rss_bytes"] for r in runs[key]])
        qtypes = sorted({str(r.get("queue_type")) for r in runs[key]},
                        key=lambda q: rank(q, QUEUE_TYPES))
        groups.append({"system": key[0], "pool": key[1], "queue_types": qtypes,
                       "runs": len(runs[key]), "median_mib": med, "min_mib": lo, "max_mib": hi})
    return groups


def percentiles(rs, field, name):
    """The values of record[field][name] over the runs, numbers only."""
    values = []
    for r in rs:
        block = r.get(field)
        if isinstance(block, dict) and number(block.get(name)) is not None:
            values.append(block[name])
    return values


def latency_groups(records, first_seen):
    """Median over runs of each start/ack figure, per (system, queue, pool, rate)."""
    runs = defaultdict(list)
    for r in records:
        if r.get("measure") == "latency":
            key = (r.get("system"), r.get("queue_type"), r.get("pool"), number(r.get("rate_per_s")))
            runs[key].append(r)

    def order(key):
        system, qtype, pool, rate = key
        return (rank(qtype, QUEUE_TYPES), rank(system, SYSTEMS), first_seen[(system, pool)],
                rate or 0)

    groups = []
    for key in sorted(runs, key=order):
        system, qtype, pool, rate = key
        rs = runs[key]
        g = {"system": system, "queue_type": qtype, "pool": pool, "rate_per_s": rate,
             "runs": len(rs),
             "duration_s": median([r["duration_s"] for r in rs if number(r.get("duration_s"))])}
        for field in ("start_ms", "ack_ms"):
            for name in ("p50", "p99", "max"):
                g[f"{field}_{name}"] = median(percentiles(rs, field, name))
            p99 = percentiles(rs, field, "p99")
            g[f"{field}_p99_min"] = min(p99) if p99 else None
            g[f"{field}_p99_max"] = max(p99) if p99 else None
        groups.append(g)
    return groups


def retry_groups(records, first_seen):
    """Retry-delay error per (asked_s, system, queue, pool): lowest min, median of the run
    medians, highest max."""
    runs = defaultdict(list)
    for r in records:
        if r.get("measure") == "retry-delay":
            key = (number(r.get("asked_s")), r.get("system"), r.get("queue_type"), r.get("pool"))
            runs[key].append(r)

    def order(key):
        asked, system, qtype, pool = key
        return (asked or 0, rank(qtype, QUEUE_TYPES), rank(system, SYSTEMS),
                first_seen[(system, pool)])

    groups = []
    for key in sorted(runs, key=order):
        asked, system, qtype, pool = key
        rs = runs[key]
        lows = percentiles(rs, "error_ms", "min")
        highs = percentiles(rs, "error_ms", "max")
        groups.append({"asked_s": asked, "system": system, "queue_type": qtype, "pool": pool,
                       "runs": len(rs),
                       "error_ms_min": min(lows) if lows else None,
                       "error_ms_median": median(percentiles(rs, "error_ms", "median")),
                       "error_ms_max": max(highs) if highs else None})
    return groups


def scaling_rows(groups):
    """warren drain groups whose pool names processes or queues, per queue type, input order."""
    return [g for g in groups if g["system"] == "warren" and g["measure"] == "drain"
            and ("process" in str(g["pool"]) or "queues" in str(g["pool"]))]


# ---------------------------------------------------------------------------------------------
# The report's sections.

def cell(value):
    return "-" if value is None else str(value)


def ratio(value):
    return "-" if value is None else f"{value:.2f}"


def build_sections(groups, skipped, scaling, memory, idle, latency, retry, unknown, inputs):
    sections = []
    rows = [[g["measure"], cell(g["queue_type"]), cell(g["system"]), cell(g["pool"]),
             cell(g["jobs"]), cell(g["runs"]), fmt(g["median_jobs_per_s"]),
             fmt(g["min_jobs_per_s"]), fmt(g["max_jobs_per_s"]), ratio(g["vs_primary"]),
             ratio(g["vs_secondary"]), fmt(g["median_peak_rss_mib"], 1)]
            for g in groups]
    notes = [] if rows else ["No throughput runs."]
    if skipped:
        notes.append(f"{skipped} throughput run(s) without jobs_per_s left out.")
    sections.append(Section(
        "Throughput (jobs/s over runs; vs lapin = median / bare lapin's primary ceiling, "
        "vs 2nd = / its secondary ceiling)",
        ["measure", "queue", "system", "pool", "jobs", "runs", "median/s", "min/s", "max/s",
         "vs lapin", "vs 2nd", "RSS MiB"],
        rows, notes, right={4, 5, 6, 7, 8, 9, 10, 11}))

    if scaling:
        sections.append(Section(
            "Scaling (warren drain, pools with processes or queues)",
            ["queue", "pool", "jobs", "runs", "median/s", "min/s", "max/s", "vs lapin"],
            [[cell(g["queue_type"]), cell(g["pool"]), cell(g["jobs"]), cell(g["runs"]),
              fmt(g["median_jobs_per_s"]), fmt(g["min_jobs_per_s"]), fmt(g["max_jobs_per_s"]),
              ratio(g["vs_primary"])] for g in sorted(
                  scaling, key=lambda g: rank(g["queue_type"], QUEUE_TYPES))],
            right={2, 3, 4, 5, 6, 7}))

    if memory:
        sections.append(Section(
            "Memory (peak RSS while running, MiB; worker process tree for the peers)",
            ["system", "pool", "measure", "queue", "runs", "median", "min", "max"],
            [[cell(g["system"]), cell(g["pool"]), g["measure"], cell(g["queue_type"]),
              cell(g["runs"]),
              fmt(g["median_mib"], 1), fmt(g["min_mib"], 1), fmt(g["max_mib"], 1)]
             for g in memory],
            right={4, 5, 6, 7}))

    if idle:
        sections.append(Section(
            "Idle RSS (an idle worker, MiB)",
            ["system", "pool", "queue types", "runs", "median", "min", "max"],
            [[cell(g["system"]), cell(g["pool"]), ",".join(g["queue_types"]), cell(g["runs"]),
              fmt(g["median_mib"], 1), fmt(g["min_mib"], 1), fmt(g["max_mib"], 1)] for g in idle],
            right={3, 4, 5, 6}))

    if latency:
        sections.append(Section(
            "Latency (ms, median over runs; p99 range = min-max over runs)",
            ["system", "queue", "pool", "rate/s", "secs", "runs", "start p50", "start p99",
             "p99 range", "start max", "ack p50", "ack p99", "p99 range", "ack max"],
            [[cell(g["system"]), cell(g["queue_type"]), cell(g["pool"]), fmt(g["rate_per_s"]),
              fmt(g["duration_s"]), cell(g["runs"]),
              fmt(g["start_ms_p50"], 1), fmt(g["start_ms_p99"], 1),
              fmt_range(g["start_ms_p99_min"], g["start_ms_p99_max"], 1), fmt(g["start_ms_max"], 1),
              fmt(g["ack_ms_p50"], 1), fmt(g["ack_ms_p99"], 1),
              fmt_range(g["ack_ms_p99_min"], g["ack_ms_p99_max"], 1), fmt(g["ack_ms_max"], 1)]
             for g in latency],
            ["start: submit to handler start; ack: submit to ack (as the bench defines them)."],
            right=set(range(3, 14))))

    if retry:
        sections.append(Section(
            "Retry delay (error = actual minus asked delay, ms)",
            ["asked s", "system", "queue", "pool", "runs", "min", "median", "max"],
            [[fmt(g["asked_s"], 0 if float(g["asked_s"] or 0).is_integer() else 1),
              cell(g["system"]), cell(g["queue_type"]), cell(g["pool"]), cell(g["runs"]),
              fmt(g["error_ms_min"], 1), fmt(g["error_ms_median"], 1), fmt(g["error_ms_max"], 1)]
             for g in retry],
            ["min: lowest over runs; median: median of the runs' medians; max: highest over runs."],
            right={0, 4, 5, 6, 7}))

    if unknown:
        sections.append(RawSection("Other records (unknown measure, raw)",
                                   [json.dumps(r) for r in unknown]))

    versions = sorted({(str(r.get("system")), str(r["version"])) for r in inputs
                       if r.get("version") is not None}, key=lambda sv: rank(sv[0], SYSTEMS))
    footer = [
        f"machine: {os.cpu_count()} cores (os.cpu_count()); {len(inputs)} records.",
        "Ratios are vs bare lapin on the same broker and queue type (same measure and job count).",
        "drain: lapin's primary ceiling = one multiple ack per 64 deliveries, "
        "secondary = awaiting each ack.",
    ]
    if versions:
        footer.append("versions: " + "; ".join(f"{s}: {v}" for s, v in versions))
    return sections, footer


# ---------------------------------------------------------------------------------------------
# The chart.

def chart(groups, path, broker):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    measures = [m for m in THROUGHPUT if any(g["measure"] == m for g in groups)]
    if not measures:
        return False
    counts = [sum(g["measure"] == m for g in groups) for m in measures]
    height = max(9.0, 1.2 + 0.17 * sum(counts) + 0.6 * len(measures))  # 40 bars: ~1000 px
    fig, axes = plt.subplots(len(measures), 1, figsize=(14, height), dpi=100, squeeze=False,
                             gridspec_kw={"height_ratios": [c + 1.5 for c in counts]})

    for ax, measure in zip(axes[:, 0], measures):
        gs = [g for g in groups if g["measure"] == measure]
        ys = list(range(len(gs)))
        medians = [g["median_jobs_per_s"] for g in gs]
        lows = [g["median_jobs_per_s"] - g["min_jobs_per_s"] for g in gs]
        highs = [g["max_jobs_per_s"] - g["median_jobs_per_s"] for g in gs]
        colours = [COLOURS.get(g["system"], OTHER_COLOUR) for g in gs]
        ax.barh(ys, medians, xerr=[lows, highs], color=colours, height=0.72,
                error_kw={"ecolor": "#333333", "capsize": 3, "elinewidth": 1})
        several_sizes = len({g["jobs"] for g in gs}) > 1
        labels = [f"{g['system']} · {g['pool']} · {g['queue_type']}"
                  + (f" · {g['jobs']} jobs" if several_sizes else "") for g in gs]
        ax.set_yticks(ys, labels, fontsize=9)
        ax.invert_yaxis()
        top = max(g["max_jobs_per_s"] for g in gs)
        for y, g in zip(ys, gs):
            ax.text(g["max_jobs_per_s"] + top * 0.008, y, f"{g['median_jobs_per_s']:,.0f}",
                    va="center", fontsize=8.5)
        # The primary lapin ceiling, a dashed line across the bars of its queue type (and size).
        for block in dict.fromkeys((g["jobs"], g["queue_type"]) for g in gs):
            span = [y for y, g in zip(ys, gs) if (g["jobs"], g["queue_type"]) == block]
            base = [g for g in gs if (g["jobs"], g["queue_type"]) == block
                    and g["system"] == "lapin" and g["ceiling"] == "primary"]
            if base:
                ax.vlines(base[0]["median_jobs_per_s"], min(span) - 0.45, max(span) + 0.45,
                          colors="#555555", linestyles="dashed", linewidth=1)
            if span[0] > 0:  # a thin rule between the blocks
                ax.axhline(span[0] - 0.5, color="#bbbbbb", linewidth=0.8)
        ax.set_xlim(0, top * 1.12)
        ax.set_title(measure, loc="left", fontsize=12, fontweight="bold")
        ax.set_xlabel("jobs/s (median, whiskers min-max)", fontsize=9)
        ax.grid(axis="x", color="#e5e5e5")
        ax.set_axisbelow(True)
        ax.tick_params(axis="x", labelsize=9)

    jobs = sorted({g["jobs"] for g in groups}, key=lambda j: number(j) or 0)
    runs = sorted({g["runs"] for g in groups})
    jobs_text = ", ".join(f"{j:,}" if number(j) is not None else str(j) for j in jobs)
    runs_text = "-".join(str(r) for r in (runs[0], runs[-1])) if len(runs) > 1 else str(runs[0])
    fig.suptitle(f"Warren benchmark: {jobs_text} jobs per run, median of {runs_text} runs  "
                 f"({os.cpu_count()} cores, {broker}, same broker)", fontsize=13, y=0.995)
    systems = sorted({g["system"] for g in groups}, key=lambda s: rank(s, SYSTEMS))
    handles = [Patch(color=COLOURS.get(s, OTHER_COLOUR), label=s) for s in systems]
    handles.append(plt.Line2D([], [], color="#555555", linestyle="dashed",
                              label="bare lapin, primary ceiling"))
    top_inch = 0.6  # room above the panels for the title and the legend
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.38 / height),
               ncol=len(handles), fontsize=9.5, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - top_inch / height))
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Two runs side by side (--compare), e.g. the same benchmark on RabbitMQ 4.3 and 3.10.

def read_run_info(path):
    """The "key: value" lines of bench/run's run-info.txt, as a dict."""
    info = {}
    with open(path) as f:
        for line in f:
            key, sep, value = line.partition(":")
            if sep and key.strip():
                info[key.strip()] = value.strip()
    return info


def load_run(folder):
    """A result folder's results.json, with "label" (the broker's version, else the folder)."""
    path = os.path.join(folder, "results.json")
    with open(path) as f:
        run = json.load(f)
    info = run.get("run_info") or {}
    if not info and os.path.exists(os.path.join(folder, "run-info.txt")):
        info = read_run_info(os.path.join(folder, "run-info.txt"))
        run["run_info"] = info
    if info.get("rabbitmq"):
        run["label"] = f"RabbitMQ {info['rabbitmq']}"
    elif run.get("broker"):
        run["label"] = run["broker"]
    else:
        run["label"] = os.path.basename(os.path.normpath(folder))
    run["folder"] = folder
    return run


def compare_rows(runs, items, key, order):
    """The keys of items(run) over both runs, ordered, each with the matching item per run."""
    found = {}
    for i, run in enumerate(runs):
        for n, item in enumerate(items(run)):
            k = key(item)
            entry = found.setdefault(k, {"order": (order(item), i, n), "items": [None, None]})
            if entry["items"][i] is None:
                entry["items"][i] = item
    return [(k, e["items"]) for k, e in sorted(found.items(), key=lambda ke: ke[1]["order"])]


def side_ratio(a, b):
    return "-" if a is None or b is None or not b else f"{a / b:.2f}"


def compare(folders, queue_types, out_path):
    runs = [load_run(folder) for folder in folders]
    labels = [run["label"] for run in runs]
    if labels[0] == labels[1]:
        labels = [f"{label} ({os.path.basename(os.path.normpath(run['folder']))})"
                  for label, run in zip(labels, runs)]
    short = [label.replace("RabbitMQ ", "") for label in labels]

    def throughput_cell(g):
        if g is None:
            return "-"
        text = f"{g['median_jobs_per_s']:,.0f} /s"
        if not (g["system"] == "lapin" and g.get("ceiling") == "primary") \
                and g.get("vs_primary") is not None:
            text += f" ({g['vs_primary']:.2f}×)"
        return text

    rows = compare_rows(
        runs, lambda run: run.get("throughput", []),
        key=lambda g: (g["measure"], g["system"], g["pool"], g["queue_type"]),
        order=lambda g: (THROUGHPUT.index(g["measure"]) if g["measure"] in THROUGHPUT else 9,
                         rank(g["system"], SYSTEMS)))
    by_row = {}
    for (measure, system, pool, qtype), items in rows:
        by_row.setdefault((measure, system, pool), {})[qtype] = items
    headers = ["measure", "system", "pool"]
    for qtype in queue_types:
        headers += [f"{qtype}, {short[0]}", f"{qtype}, {short[1]}", f"{short[0]} / {short[1]}"]
    lines = [f"| {' | '.join(headers)} |",
             "|---|---|---|" + "---:|---:|---:|" * len(queue_types)]
    for (measure, system, pool), per_qtype in by_row.items():
        if not any(q in per_qtype for q in queue_types):
            continue
        cells = [measure, str(system), str(pool)]
        for qtype in queue_types:
            a, b = per_qtype.get(qtype, [None, None])
            cells += [throughput_cell(a), throughput_cell(b),
                      side_ratio(a and a["median_jobs_per_s"], b and b["median_jobs_per_s"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")

    # The other measures: one row each, a column per run.
    other = [f"| measure | system | pool | {short[0]} | {short[1]} |", "|---|---|---|---:|---:|"]
    for _, (a, b) in compare_rows(
            runs, lambda run: run.get("idle_rss", []), key=lambda g: (g["system"], g["pool"]),
            order=lambda g: rank(g["system"], SYSTEMS)):
        g = a or b
        other.append(f"| idle RSS | {g['system']} | {g['pool']} | "
                     f"{fmt(a and a['median_mib'], 1, ' MiB')} | "
                     f"{fmt(b and b['median_mib'], 1, ' MiB')} |")
    for _, (a, b) in compare_rows(
            runs, lambda run: run.get("latency", []),
            key=lambda g: (g["system"], g["queue_type"], g["pool"], g["rate_per_s"]),
            order=lambda g: (rank(g["queue_type"], QUEUE_TYPES), rank(g["system"], SYSTEMS))):
        g = a or b
        what = f"latency, {g['queue_type']}, {fmt(g['rate_per_s'])}/s"
        for field, name in (("start_ms", "submit → start"), ("ack_ms", "submit → ack")):
            def lat(x):
                if x is None:
                    return "-"
                return (f"p50 {fmt(x[field + '_p50'], 1)}, p99 {fmt(x[field + '_p99'], 1)}, "
                        f"max {fmt(x[field + '_max'], 1)} ms")
            other.append(f"| {what}, {name} | {g['system']} | {g['pool']} | {lat(a)} | {lat(b)} |")
    for _, (a, b) in compare_rows(
            runs, lambda run: run.get("retry_delay", []),
            key=lambda g: (g["asked_s"], g["system"], g["queue_type"], g["pool"]),
            order=lambda g: (g["asked_s"] or 0, rank(g["queue_type"], QUEUE_TYPES))):
        g = a or b
        def err(x):
            if x is None:
                return "-"
            return (f"{fmt(x['error_ms_median'], 1)} ms ({fmt(x['error_ms_min'], 1)}–"
                    f"{fmt(x['error_ms_max'], 1)})")
        other.append(f"| retry delay {fmt(g['asked_s'], 0)} s, {g['queue_type']}, error | "
                     f"{g['system']} | {g['pool']} | {err(a)} | {err(b)} |")

    notes = []
    for label, run in zip(labels, runs):
        info = run.get("run_info") or {}
        jobs = sorted({g["jobs"] for g in run.get("throughput", [])}, key=lambda j: number(j) or 0)
        runs_n = sorted({g["runs"] for g in run.get("throughput", [])})
        parts = [f"**{label}**" + (f" (Erlang/OTP {info['erlang']})" if info.get("erlang") else "")]
        parts.append(f"{', '.join(f'{j:,}' for j in jobs) or '?'} jobs per measurement")
        parts.append(f"{'-'.join(str(r) for r in sorted({runs_n[0], runs_n[-1]})) if runs_n else '?'}"
                     " run(s)")
        if info.get("commit"):
            parts.append(f"commit {info['commit']}")
        if info.get("started"):
            parts.append(f"{info['started']} to {info.get('finished', '?')}")
        parts.append(f"{info.get('cores') or run.get('cpu_count', '?')} cores")
        parts.append(f"`{run['folder']}`")
        notes.append("; ".join(parts))
    jobs_sets = [{g["jobs"] for g in run.get("throughput", [])} for run in runs]
    if jobs_sets[0] != jobs_sets[1]:
        notes.append("Warning: the two runs measured different job counts; rows are matched by "
                     "measure, system and pool only.")
    text = "\n".join(
        [f"Throughput, median of the runs (× = vs bare lapin's primary ceiling on the same broker "
         f"and queue type; {short[0]} / {short[1]} = ratio of the medians):", ""] + lines
        + (["", "Idle RSS, latency and retry delay (medians over the runs):", ""] + other
           if len(other) > 2 else [])
        + [""] + [n + "  " for n in notes]) + "\n"
    sys.stdout.write(text)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
        print(f"report: wrote {out_path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", nargs="*", help="JSON lines files (RAW.jsonl)")
    parser.add_argument("--out-dir", help="where results.json, table.md and throughput.png go")
    parser.add_argument("--broker", help="the broker and its version, e.g. 'RabbitMQ 4.3.6', "
                        "for the chart's title and results.json")
    parser.add_argument("--run-info", help="run-info.txt of bench/run: its 'key: value' lines "
                        "go into results.json")
    parser.add_argument("--compare", nargs=2, metavar="DIR",
                        help="two result folders (with results.json): print the side-by-side "
                        "Markdown table instead")
    parser.add_argument("--queue-types", default=",".join(QUEUE_TYPES),
                        help="with --compare: the queue types, in column order "
                        "(default quorum,classic)")
    parser.add_argument("--out", help="with --compare: also write the table to this file")
    args = parser.parse_args(argv)
    if args.compare:
        if args.raw or args.out_dir:
            parser.error("--compare takes two result folders, no RAW files or --out-dir")
        return compare(args.compare, [q for q in args.queue_types.split(",") if q], args.out)
    if not args.raw or not args.out_dir:
        parser.error("RAW files and --out-dir are required (or --compare DIR_A DIR_B)")
    run_info = read_run_info(args.run_info) if args.run_info else {}
    broker = args.broker or run_info.get("broker") or "RabbitMQ (version not given)"

    records = read_records(args.raw)
    if not records:
        print("report: no records in " + ", ".join(args.raw), file=sys.stderr)
        return 1
    first_seen = pool_order(records)
    groups, skipped = throughput_groups(records, first_seen)
    scaling = scaling_rows(groups)
    memory = memory_groups(records, first_seen)
    idle = idle_groups(records, first_seen)
    latency = latency_groups(records, first_seen)
    retry = retry_groups(records, first_seen)
    unknown = [r for r in records if r.get("measure") not in KNOWN]
    sections, footer = build_sections(groups, skipped, scaling, memory, idle, latency, retry,
                                      unknown, records)
    footer.insert(0, f"broker: {broker}" + (f" (Erlang/OTP {run_info['erlang']})"
                                            if run_info.get("erlang") else ""))

    print("\n\n".join(s.text() for s in sections))
    print()
    print("\n".join(footer))

    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(f"## Warren benchmark, {broker} ({', '.join(args.raw)})\n\n")
        f.write("\n\n".join(s.markdown() for s in sections))
        f.write("\n\n" + "\n".join(line + "  " for line in footer) + "\n")
    results = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": args.raw,
        "broker": broker,
        "run_info": run_info,
        "cpu_count": os.cpu_count(),
        "ratio_rule": "vs_primary / vs_secondary = group median jobs/s / median of the lapin "
                      "group with ceiling primary / secondary, same measure, queue type and jobs",
        "throughput": groups,
        "throughput_runs_skipped": skipped,
        "scaling": scaling,
        "memory": memory,
        "idle_rss": idle,
        "latency": latency,
        "retry_delay": retry,
        "unknown": unknown,
        "records": records,
    }
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    png = os.path.join(args.out_dir, "throughput.png")
    wrote_png = chart(groups, png, broker)
    print(f"\nreport: wrote {os.path.join(args.out_dir, 'results.json')}, "
          f"{os.path.join(args.out_dir, 'table.md')}" + (f", {png}" if wrote_png else
                                                         " (no throughput runs: no chart)"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
