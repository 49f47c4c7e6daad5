"""`entrepot` command line: serve, worker, migrate, token, channel create, orders verify, audit, dev."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NoReturn

from server.settings import Settings

NO_DATABASE_URL = "DATABASE_URL is not set (postgresql://user:password@host:port/database)"


class CommandError(Exception):
    """A failure the user can fix (missing secret, no database, port taken...): `main` prints it
    as one line and exits with code 1, never a traceback."""


def _settings() -> Settings:
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise CommandError(f"invalid configuration ({where}): {first['msg']}") from None


def _require_database(url: str | None) -> str:
    """The DATABASE_URL, once a connection to it succeeded; one line saying why otherwise."""
    if not url:
        raise CommandError(NO_DATABASE_URL)
    import asyncpg

    from domain.shared.db import driver_url

    try:
        plain = driver_url(url)
    except ValueError as err:
        raise CommandError(str(err)) from None

    async def probe() -> None:
        conn = await asyncpg.connect(plain, timeout=5)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        from urllib.parse import urlsplit

        where = urlsplit(plain)  # host, port and database only: never the password
        raise CommandError(
            f"cannot connect to the database {where.hostname}:{where.port or 5432}{where.path}: "
            f"{err or type(err).__name__}"
        ) from None
    return url


def _exit_now(code: int) -> NoReturn:
    """Ends the process without interpreter finalization, once everything is stopped and flushed.
    Temporal's Rust core keeps threads that may take the GIL while the interpreter finalizes,
    which aborts with `Fatal Python error: PyGILState_Release` (temporalio/sdk-python#300;
    seen here about once in five worker stops). There is no API to stop those threads."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The server's event loop (Settings.event_loop); None is asyncio's own."""
    if event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from server import logs
    from server.app import serve
    from server.metrics import serve_metrics

    s = _settings()
    if args.listen:
        s.listen = args.listen
    if args.metrics_port is not None:
        s.metrics_port = args.metrics_port
    from server.dev import require_free, split_address

    if s.metrics_port:
        require_free(s.metrics_host, s.metrics_port, "metrics", "--metrics-port or ENTREPOT_METRICS_PORT")
    if not s.listen.startswith("unix:"):
        host, port = split_address(s.listen, "--listen")
        require_free(host, port, "gRPC", "--listen or ENTREPOT_LISTEN")
    logs.configure(s.log_level)
    serve_metrics(s.metrics_port, s.metrics_host)
    # Everything imported so far lives as long as the process: move it out of
    # the collector's reach, so the full collections that batch-sized
    # allocations (SyncStock: thousands of objects per batch) keep triggering
    # do not walk every module, class and function each time.
    gc.freeze()
    with asyncio.Runner(loop_factory=_loop_factory(s.event_loop)) as runner:
        runner.run(serve(s))
    _exit_now(0)  # the servicers may have used the Temporal client
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from server import logs
    from server.worker import MetricsPortError, run_worker

    s = _settings()
    if not s.database_url:
        raise CommandError(NO_DATABASE_URL)
    if not s.temporal_address:
        raise CommandError("TEMPORAL_ADDRESS is not set (host:port of Temporal)")
    from server.dev import split_address
    from server.devservices import listening

    if not listening(*split_address(s.temporal_address, "TEMPORAL_ADDRESS")):
        raise CommandError(f"cannot reach Temporal at TEMPORAL_ADDRESS={s.temporal_address}")
    logs.configure(s.log_level)
    try:
        asyncio.run(run_worker(s))
    except MetricsPortError as exc:
        print(exc, file=sys.stderr)
        return 2
    _exit_now(0)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    import migrations

    s = _settings()
    migrations.upgrade(_require_database(s.database_url))
    print("migrations applied")
    return 0


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_token(args: argparse.Namespace) -> int:
    from server.auth import mint_token

    settings = _settings()
    key = None
    if args.private_key:
        try:
            key = open(args.private_key).read()
        except OSError as err:
            raise CommandError(f"cannot read --private-key {args.private_key}: {err.strerror}") from None
    elif settings.jwt_hs256_secret is None:
        from pydantic import SecretStr

        from server.dev import dev_dir, read_dev_secret

        secret = read_dev_secret()
        if secret is None:
            raise CommandError(
                "no signing key: set ENTREPOT_JWT_HS256_SECRET, pass --private-key, or start "
                f"`entrepot dev` once (it writes {dev_dir() / 'jwt-secret'})"
            )
        settings = settings.model_copy(update={"jwt_hs256_secret": SecretStr(secret)})
    print(
        mint_token(
            settings,
            sub=args.sub,
            permissions=_split(args.permissions),
            channels=_split(args.channels),
            status_namespaces=_split(args.status_namespaces),
            ttl_seconds=args.ttl,
            private_key_pem=key,
            kid=args.kid,
        )
    )
    return 0


def cmd_channel_create(args: argparse.Namespace) -> int:
    from domain.platform import channels
    from domain.shared.errors import AlreadyExists
    from server.runtime import Runtime

    settings = _settings()
    _require_database(settings.database_url)

    async def run() -> int:
        rt = Runtime(settings)
        try:
            async with rt.uow() as uow:
                c = await channels.create_channel(
                    uow.session,
                    slug=args.slug,
                    name=args.name,
                    currency=args.currency,
                    timezone=args.timezone,
                )
                await uow.commit()
            print(f"channel {c.slug} created ({c.currency}, {c.timezone})")
            return 0
        except AlreadyExists:
            print(f"channel {args.slug} already exists")
            return 0 if args.if_missing else 1
        finally:
            await rt.close()

    return asyncio.run(run())


def _since(value: str | None) -> datetime | None:
    """--since as an aware datetime (ISO 8601; a time without offset is UTC)."""
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--since {value!r} is not an ISO 8601 time (e.g. 2026-12-01T00:00:00Z)") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def cmd_orders_verify(args: argparse.Namespace) -> int:
    """Re-derives every order's canonical content from its stored intent: one line
    per difference on stdout, a summary on stderr; exit code 1 when any."""
    import uuid
    from functools import partial

    import domain.order as orders
    from server.runtime import Runtime

    since = _since(args.since)
    settings = _settings()
    _require_database(settings.database_url)

    async def run() -> tuple[int, int]:
        rt = Runtime(settings)
        checked = differing = 0
        after: tuple[datetime, uuid.UUID] | None = None
        try:
            while True:
                page = await rt.read(
                    partial(orders.audit_page, channel=args.channel, since=since, after=after)
                )
                checked += page.checked
                for d in page.differences:
                    print(d)
                differing += len(page.differences)
                if page.after is None:
                    return checked, differing
                after = page.after
        finally:
            await rt.close()

    checked, differing = asyncio.run(run())
    where = f" of channel {args.channel}" if args.channel else ""
    print(f"verified {checked} orders{where}: {differing} differences", file=sys.stderr)
    return 1 if differing else 0


DRIFT_FOUND = 2  # `entrepot audit`'s exit code when a drift remains (1: the command failed)
_DRIFT_LINE = {
    "on_hand": "on_hand {counter} but the ledger sums to {derived}",
    "reserved": "reserved {counter} but active reservations hold {derived}",
    "lots": "lots hold {counter} units but on_hand is {derived}",
}


def cmd_audit(args: argparse.Namespace) -> int:
    from domain import inventory
    from domain.shared.errors import DomainError
    from server.runtime import Runtime

    settings = _settings()
    _require_database(settings.database_url)
    if args.repair and not args.reason.strip():
        raise CommandError("--repair needs --reason (kept on each audit movement)")
    actor = f"cli:{os.environ.get('USER', 'operator')}"

    async def run() -> int:
        rt = Runtime(settings)
        drifts = repaired = levels = 0
        try:
            async for page in inventory.audit_all(
                rt.read,
                skus=args.sku,
                warehouse_codes=args.warehouse,
                kinds=args.kind,
                whole_ledger=args.whole_ledger,
            ):
                levels += page.levels_checked
                for d in page.drifts:
                    drifts += 1
                    line = _DRIFT_LINE[d.kind].format(counter=d.counter, derived=d.derived)
                    print(f"drift {d.kind}: {d.sku} in {d.warehouse_code}: {line} ({d.difference:+d})")
                    if args.repair:
                        async with rt.uow() as uow:
                            r = await inventory.repair_stock(
                                uow.session,
                                sku=d.sku,
                                warehouse_code=d.warehouse_code,
                                kind=d.kind,
                                expected_counter=d.counter,
                                expected_derived=d.derived,
                                reason=args.reason,
                                actor=actor,
                            )
                            await uow.commit()
                        if r.movement is not None:
                            repaired += 1
                            print(f"  repaired: audit movement {r.movement.id}")
        except DomainError as err:
            details = "; ".join(
                [f"{v.field} {v.description}" for v in err.field_violations]
                + [v.description for v in err.precondition_violations]
            )
            raise CommandError(f"{err.message}: {details}" if details else err.message) from None
        finally:
            await rt.close()
        print(
            f"{levels} stock levels checked, {drifts} drifts"
            + (f", {repaired} repaired" if args.repair else "")
        )
        return DRIFT_FOUND if drifts > repaired else 0

    return asyncio.run(run())


def cmd_dev(args: argparse.Namespace) -> int:
    from server.dev import run_dev

    return run_dev(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import main

    return main(args.target, args.token, args.approver_token, args.csv, args.run_id)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entrepot", description="Entrepot commerce platform")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server")
    s.add_argument("--listen", help="host:port (default 127.0.0.1:50051, env ENTREPOT_LISTEN)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port (0 disables; env ENTREPOT_METRICS_PORT)")
    s.set_defaults(fn=cmd_serve)

    sub.add_parser("worker", help="run the Temporal worker").set_defaults(fn=cmd_worker)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(fn=cmd_migrate)

    t = sub.add_parser("token", help="mint a development JWT")
    t.add_argument("--sub", default="dev")
    t.add_argument("--permissions", default="*", help="comma-separated, * for all")
    t.add_argument("--channels", default="*", help="comma-separated slugs, * for all")
    t.add_argument("--status-namespaces", default="", help="comma-separated order-status namespaces")
    t.add_argument("--ttl", type=int, default=3600, help="seconds")
    t.add_argument("--private-key", help="RS256 private key PEM file (default: HS256 dev secret)")
    t.add_argument("--kid", help="key id for RS256")
    t.set_defaults(fn=cmd_token)

    from server import keys

    keys.add_parser(sub)

    c = sub.add_parser("channel", help="manage channels").add_subparsers(
        dest="channel_command", required=True
    )
    cc = c.add_parser("create", help="create a channel")
    cc.add_argument("slug")
    cc.add_argument("--name", required=True)
    cc.add_argument("--currency", default="EUR")
    cc.add_argument("--timezone", default="UTC")
    cc.add_argument("--if-missing", action="store_true", help="succeed when it already exists")
    cc.set_defaults(fn=cmd_channel_create)

    o = sub.add_parser("orders", help="audit orders").add_subparsers(dest="orders_command", required=True)
    ov = o.add_parser(
        "verify",
        help="re-derive each order's canonical content from its stored intent and report every difference "
        "(exit code 1 when any)",
    )
    ov.add_argument("--channel", help="only this channel's orders (slug)")
    ov.add_argument("--since", help="only orders created at or after this ISO 8601 time")
    ov.set_defaults(fn=cmd_orders_verify)
    a = sub.add_parser(
        "audit",
        help="check every stock level against its ledger, reservations and lots",
        description="Prints one line per drift and exits 2 when any remains (1 when the command "
        "fails). --repair fixes each through the ledger (docs/operations.md, Stock audit).",
    )
    a.add_argument("--sku", action="append", default=[], help="only this SKU (repeatable)")
    a.add_argument("--warehouse", action="append", default=[], help="only this warehouse (repeatable)")
    a.add_argument(
        "--kind", action="append", default=[], choices=["on_hand", "reserved", "lots"], help="only this kind"
    )
    a.add_argument(
        "--whole-ledger",
        action="store_true",
        help="sum each level's whole ledger, not from the audit job's checkpoints "
        "(also finds edited old ledger rows; reads the whole ledger)",
    )
    a.add_argument("--repair", action="store_true", help="repair each drift found (an audit movement each)")
    a.add_argument("--reason", default="", help="why, kept on the audit movements (with --repair)")
    a.set_defaults(fn=cmd_audit)

    d = sub.add_parser(
        "dev", help="start everything locally (embedded PostgreSQL and Temporal unless configured)"
    )
    d.add_argument("--listen", default="127.0.0.1:50051", help="gRPC host:port (default %(default)s)")
    d.add_argument(
        "--metrics-port", type=int, default=9464, help="Prometheus port, 0 disables (default %(default)s)"
    )
    d.add_argument(
        "--temporal-port", type=int, default=7233, help="Temporal dev server port (default %(default)s)"
    )
    d.add_argument(
        "--temporal-ui-port",
        type=int,
        help="Temporal web UI port (default: Temporal port + 1000; 0 disables)",
    )
    d.add_argument("--no-worker", action="store_true", help="do not start the Temporal worker")
    d.add_argument(
        "--events",
        action="store_true",
        help="publish every event to NATS JetStream (embedded nats-server unless NATS_URL is set)",
    )
    d.add_argument("--nats-port", type=int, default=4222, help="embedded NATS port (default %(default)s)")
    d.set_defaults(fn=cmd_dev)

    dm = sub.add_parser("demo", help="guided tour of every service against a running instance, as a timeline")
    dm.add_argument("--target", default=os.environ.get("ENTREPOT_TARGET", "127.0.0.1:50051"))
    dm.add_argument(
        "--token", default=os.environ.get("ENTREPOT_TOKEN"), help="operator token (env ENTREPOT_TOKEN)"
    )
    dm.add_argument(
        "--approver-token",
        default=os.environ.get("ENTREPOT_APPROVER_TOKEN"),
        help="a second identity for approvals (default: minted with the dev secret)",
    )
    dm.add_argument("--csv", help="WMS feed: event_id,sku,warehouse,kind,quantity,reason ({run} = run id)")
    dm.add_argument("--run-id", help="suffix for the names the demo creates (default: random)")
    dm.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except CommandError as err:
        print(f"entrepot {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C in a short command (migrate, demo...): nothing to report
        return 130


if __name__ == "__main__":
    # `python -m server.cli` runs this file as __main__; run it as server.cli instead, so the
    # CommandError that server.dev and server.demo raise is the class main() catches.
    from server.cli import main as cli_main

    sys.exit(cli_main())
