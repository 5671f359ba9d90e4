"""Total GPU time per kernel name from Nsight Compute's `--print-summary per-kernel --csv`.

    python3 scripts/ncu_summary.py ncu.csv [--runs N]

Prints one line per kernel, largest total first: launches, total ms (divided by --runs, the
number of times the profiled phase ran) and its share of all kernel time.
"""
import argparse
import csv
import io
import sys
from collections import defaultdict

UNIT_TO_MS = {"ns": 1e-6, "nsecond": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0,
              "ms": 1.0, "second": 1e3, "s": 1e3}


def rows(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    # The header is the first line naming the kernel column; the program's own output and the
    # profiler's messages come before it.
    start = text.find('"Kernel Name"')
    if start < 0:
        sys.exit(f"{path}: no CSV header from Nsight Compute")
    start = text.rfind("\n", 0, start) + 1
    return csv.DictReader(io.StringIO(text[start:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--runs", type=float, default=1.0)
    a = ap.parse_args()
    total = defaultdict(float)
    launches = defaultdict(int)
    for r in rows(a.csv):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r.get("Kernel Name") or r.get("Function Name") or "?"
        unit = (r.get("Metric Unit") or "ns").strip()
        count = int(float(r.get("Invocations") or r.get("Count") or 1))
        value = r.get("Sum") or r.get("Average") or r.get("Metric Value") or "0"
        value = float(value.replace(",", ""))
        if not r.get("Sum") and r.get("Average"):
            value *= count
        total[name] += value * UNIT_TO_MS.get(unit, 1e-6)
        launches[name] += count
    grand = sum(total.values()) or 1.0
    print(f"{'kernel':60s} {'launches':>9s} {'ms/run':>9s} {'share':>7s}")
    for name, ms in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"{name[:60]:60s} {launches[name] / a.runs:9.0f} {ms / a.runs:9.3f} {ms / grand:7.1%}")
    print(f"{'all kernels':60s} {sum(launches.values()) / a.runs:9.0f} {grand / a.runs:9.3f}")


if __name__ == "__main__":
    main()
