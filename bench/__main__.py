"""Run the benchmarks, print a table and write bench/results.json."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--full", action="store_true", help="larger, slower measurements")
    parser.add_argument("--only", metavar="NAME", help="run only bench_NAME.py (NAME with or without the prefix)")
    args = parser.parse_args()
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    if args.only:
        wanted = args.only if args.only.startswith("bench_") else f"bench_{args.only}"
        if wanted not in names:
            parser.error(f"no benchmark {args.only!r}; known: {', '.join(n[6:] for n in names)}")
        names = [wanted]
    results = []
    for name in names:
        results += importlib.import_module(f"bench.{name}").run(args.full)
    path = HERE / "results.json"
    if args.only and path.exists():  # a partial run updates its own figures and keeps the others
        fresh = {r["name"] for r in results}
        results = [r for r in json.loads(path.read_text()) if r["name"] not in fresh] + results
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"{'name':40} {'value':>12} {'unit':12} {'ratio':>8} {'goal':>6}  met  baseline")
    for r in results:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        goal = "-" if r["goal"] is None else f"{r['goal']:g}"
        print(f"{r['name']:40} {r['value']:12.3f} {r['unit']:12} {ratio:>8} {goal:>6}  {str(r['met']):5} {r['baseline']}")


if __name__ == "__main__":
    main()
