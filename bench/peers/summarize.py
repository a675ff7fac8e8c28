#!/usr/bin/env python3
"""Prints the peers' table from the JSON lines of celery_bench.py / dramatiq_bench.py:
median, min and max jobs/s per (system, queue type, pool, measure), and median peak RSS.

    summarize.py RESULTS.jsonl [...]
"""

import json
import statistics
import sys
from collections import defaultdict

ORDER = {"enqueue": 0, "drain": 1, "e2e": 2, "idle-rss": 3}


def main(paths):
    groups = defaultdict(list)
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                r = json.loads(line)
                if r.get("system") not in ("celery", "dramatiq"):
                    continue
                groups[(r["system"], r["queue_type"], r["pool"], r["measure"])].append(r)
    if not groups:
        print("no peer results")
        return 1
    head = f"{'system':9} {'queue':8} {'pool':28} {'measure':8} {'jobs':>7} {'runs':>4} " \
           f"{'median/s':>9} {'min/s':>9} {'max/s':>9} {'peak RSS MiB':>12} {'max gap ms':>10}"
    print(head)
    print("-" * len(head))
    best = {}
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], ORDER.get(k[3], 9))):
        rs = groups[key]
        system, qtype, pool, measure = key
        rates = [r["jobs_per_s"] for r in rs if r.get("jobs_per_s")]
        rss = [r["peak_rss_bytes"] for r in rs if r.get("peak_rss_bytes")]
        jobs = sorted({r["jobs"] for r in rs})
        med = f"{statistics.median(rates):9.0f}" if rates else f"{'-':>9}"
        lo = f"{min(rates):9.0f}" if rates else f"{'-':>9}"
        hi = f"{max(rates):9.0f}" if rates else f"{'-':>9}"
        mem = f"{statistics.median(rss) / 2**20:12.1f}" if rss else f"{'-':>12}"
        gaps = [r["max_handler_gap_s"] for r in rs if r.get("max_handler_gap_s") is not None]
        gap = f"{max(gaps) * 1000:10.0f}" if gaps else f"{'-':>10}"
        print(f"{system:9} {qtype:8} {pool[:28]:28} {measure:8} "
              f"{','.join(map(str, jobs)):>7} {len(rs):4} {med} {lo} {hi} {mem} {gap}")
        if measure == "drain" and rates:
            m = statistics.median(rates)
            if m > best.get((system, qtype), ("", 0))[1]:
                best[(system, qtype)] = (pool, m)
    print("peak RSS: summed over the worker's process tree (median of runs); max gap: the longest "
          "pause between two handler runs in any run (a stall shows here)")
    for (system, qtype), (pool, m) in sorted(best.items()):
        print(f"best {system} drain on {qtype}: {pool} ({m:.0f} jobs/s median)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
