"""One command for every benchmark of TARGETS.md: `make bench` (full) or
`make bench-smoke` (a ~30 s smoke for CI: it runs and prints its table; no thresholds).

Each benchmark runs next to its baseline in the same run, on the same machine,
with the same load generator (a separate process). Prints a table, writes JSON
under bench/results/.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from bench.common import Database, Row, machine, print_table, write_json

# (module, what it measures); each module has run(db, duration) -> list[Row].
BENCHES = [
    ("bench.p1", "P1 read path"),
    ("bench.p2p3", "P2/P3 reservations vs pgbench"),
    ("bench.sync", "P4 SyncStock vs psql \\copy"),
    ("bench.watch", "P6 watch fan-out"),
    ("bench.checkout", "P5 cart checkout"),
    ("bench.orders", "Orders: SubmitOrderIntent 5 lines + reserve"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="short durations, no pass/fail exit")
    p.add_argument("--only", help="comma-separated module names, e.g. bench.p1")
    args = p.parse_args(argv)
    duration = 3.0 if args.smoke else 15.0
    print("machine:", machine())
    rows: list[Row] = []
    failed: list[str] = []
    for module, what in BENCHES:
        if args.only and module not in args.only.split(","):
            continue
        print(f"running {module} ({what}) ...", flush=True)
        # A fresh database per benchmark: each seeds its own warehouses, items and channels.
        db = Database()
        try:
            rows += importlib.import_module(module).run(db, duration)
        except Exception:
            traceback.print_exc()
            failed.append(module)
        finally:
            db.drop()
    print()
    print_table(rows)
    path = write_json(rows, "smoke" if args.smoke else "bench", {"smoke": args.smoke, "failed": failed})
    print(f"\nwritten {path}")
    if failed:
        print("benchmarks that did not run:", ", ".join(failed), file=sys.stderr)
        return 1
    if not args.smoke and any(r.passed is False for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
