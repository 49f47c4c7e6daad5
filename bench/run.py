"""One command for every benchmark of TARGETS.md: `make bench` (full, 3 repeats),
`make bench-smoke` (short, one repeat, for CI: it runs and prints its table; no
pass/fail), `make bench-aged` (P7 alone).

Each benchmark runs next to its baseline in the same run, on the same machine,
with the same load generator (a separate process). A repeat runs a module's
cases and their baselines one after the other (ours, baseline); `--repeats N`
runs each module N times back to back, so case and baseline alternate N times.
The table gives per row the median and the spread (min-max) of the measure and
of the ratio; a target is met when the medians meet it and every repeat was
sound (zero oversell, no errors, nothing lost). JSON under bench/results/ keeps
every repeat's rows with their details.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from bench.common import Database, Row, machine, print_table, summarize, write_json

# (module, what it measures); each module has run(db, duration, *, smoke) -> list[Row]:
# `smoke` (--smoke) asks for its short form, whatever the duration.
BENCHES = [
    ("bench.p1", "P1 read path"),
    ("bench.p2p3", "P2/P3 reservations vs pgbench and the bare ceiling"),
    ("bench.kits", "K1 kit reservations vs simple, statements per reservation"),
    ("bench.sync", "P4 SyncStock vs P4f (its floor) and psql \\copy"),
    ("bench.checkout", "P5 cart checkout"),
    ("bench.orders", "P5o SubmitOrderIntent 5 lines + reserve"),
    ("bench.watch", "P6 watch fan-out"),
    ("bench.aged", "P7 aged database vs fresh"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="short durations, one repeat, no pass/fail exit")
    p.add_argument("--only", help="comma-separated module names, e.g. bench.p1,bench.aged")
    p.add_argument("--repeats", type=int, help="runs of each module (default 3; 1 with --smoke)")
    p.add_argument("--aged", action="store_true", help="P7 only (= --only bench.aged)")
    p.add_argument("--duration", type=float, help="seconds per case (default 15; 3 with --smoke)")
    args = p.parse_args(argv)
    duration = args.duration or (3.0 if args.smoke else 15.0)
    repeats = args.repeats or (1 if args.smoke else 3)
    only = ["bench.aged"] if args.aged else (args.only.split(",") if args.only else None)
    print("machine:", machine())
    runs: list[list[Row]] = [[] for _ in range(repeats)]
    failed: list[str] = []
    started = time.perf_counter()
    for module, what in BENCHES:
        if only and module not in only:
            continue
        for k in range(repeats):
            print(f"running {module} ({what}), repeat {k + 1}/{repeats} ...", flush=True)
            # A fresh database per run: each seeds its own warehouses, items and channels.
            db = Database()
            try:
                runs[k] += importlib.import_module(module).run(db, duration, smoke=args.smoke)
            except Exception:
                traceback.print_exc()
                failed.append(f"{module} (repeat {k + 1})")
            finally:
                db.drop()
    summaries = summarize(runs)
    print()
    print_table(summaries)
    minutes = round((time.perf_counter() - started) / 60, 1)
    extra = {
        "smoke": args.smoke,
        "repeats": repeats,
        "duration": duration,
        "minutes": minutes,
        "failed": failed,
    }
    path = write_json(runs, summaries, "smoke" if args.smoke else "bench", extra)
    print(f"\n{repeats} repeat(s), {minutes} min; written {path}")
    if failed:
        print("benchmarks that did not run:", ", ".join(failed), file=sys.stderr)
        return 1
    if not args.smoke and any(s.passed is False for s in summaries):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
