"""Turn a pytest-benchmark JSON file into the markdown tables of docs/benchmarks.md.

    pytest benchmarks/test_bench_decision.py --benchmark-enable --benchmark-json=bench.json
    python tools/bench_table.py bench.json

One table per benchmark group: min / median / mean in microseconds and each
row's median relative to the group's fastest median.
"""

import json
import sys
from collections import defaultdict


def main(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or "ungrouped"].append(b)
    info = data.get("machine_info", {})
    print(f"Machine: {info.get('cpu', {}).get('brand_raw', '?')}, "
          f"Python {info.get('python_version', '?')}; {data.get('datetime', '')}\n")
    for group, rows in groups.items():
        rows.sort(key=lambda b: b["stats"]["median"])
        best = rows[0]["stats"]["median"]
        print(f"**{group}**\n")
        print("| benchmark | min (us) | median (us) | mean (us) | median / fastest |")
        print("|---|---|---|---|---|")
        for b in rows:
            s = b["stats"]
            print(f"| {b['name']} | {s['min'] * 1e6:.2f} | {s['median'] * 1e6:.2f} | "
                  f"{s['mean'] * 1e6:.2f} | {s['median'] / best:.2f}x |")
        print()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/bench_table.py BENCH.json")
    main(sys.argv[1])
