"""`entrepot` command line: serve, worker, migrate, token, channel create, dev."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys

from server.settings import Settings


def _settings() -> Settings:
    return Settings()


def cmd_serve(args: argparse.Namespace) -> int:
    from server import logs
    from server.app import serve
    from server.metrics import serve_metrics

    s = _settings()
    if args.listen:
        s.listen = args.listen
    if args.metrics_port is not None:
        s.metrics_port = args.metrics_port
    logs.configure(s.log_level)
    serve_metrics(s.metrics_port, s.metrics_host)
    # Everything imported so far lives as long as the process: move it out of
    # the collector's reach, so the full collections that batch-sized
    # allocations (SyncStock: thousands of objects per batch) keep triggering
    # do not walk every module, class and function each time.
    gc.freeze()
    asyncio.run(serve(s))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from server import logs
    from server.worker import run_worker

    s = _settings()
    logs.configure(s.log_level)
    asyncio.run(run_worker(s))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    import migrations

    s = _settings()
    if not s.database_url:
        print("DATABASE_URL is not set", file=sys.stderr)
        return 2
    migrations.upgrade(s.database_url)
    print("migrations applied")
    return 0


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_token(args: argparse.Namespace) -> int:
    from server.auth import mint_token

    key = open(args.private_key).read() if args.private_key else None
    print(
        mint_token(
            _settings(),
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

    async def run() -> int:
        rt = Runtime(_settings())
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

    d = sub.add_parser(
        "dev", help="start everything locally (embedded PostgreSQL and Temporal unless configured)"
    )
    d.add_argument("--listen", default="127.0.0.1:50051")
    d.add_argument("--metrics-port", type=int, default=9464)
    d.add_argument("--temporal-port", type=int, default=7233)
    d.add_argument("--no-worker", action="store_true", help="do not start the Temporal worker")
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
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
