"""A small grpcurl-like command line over the typed client:

    python -m entrepot_client.cli --token $ENTREPOT_TOKEN --channel default \\
        call inventory.get_stock_level '{"sku": "SKU-1"}'
    python -m entrepot_client.cli --token $ENTREPOT_TOKEN methods
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import typing

from google.protobuf import json_format

from entrepot_client import EntrepotError, EntrepotSync


def _clients(ep: EntrepotSync) -> dict[str, object]:
    return {k: v for k, v in vars(ep).items() if k != "grpc_channel"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="entrepot-client")
    p.add_argument("--target", default=os.environ.get("ENTREPOT_TARGET", "127.0.0.1:50051"))
    p.add_argument("--token", default=os.environ.get("ENTREPOT_TOKEN"))
    p.add_argument("--channel", default=os.environ.get("ENTREPOT_CHANNEL"))
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("methods", help="list callable methods")
    c = sub.add_parser("call", help="call a unary or server-streaming method with a JSON request")
    c.add_argument("method", help="service.method, e.g. inventory.get_stock_level")
    c.add_argument("json", nargs="?", default="{}")
    args = p.parse_args(argv)

    with EntrepotSync(args.target, args.token, args.channel, timeout=args.timeout) as ep:
        clients = _clients(ep)
        if args.cmd == "methods":
            for name, client in sorted(clients.items()):
                for m, _ in inspect.getmembers(type(client), inspect.isfunction):
                    if not m.startswith("_"):
                        print(f"{name}.{m}")
            return 0
        service, _, method = args.method.partition(".")
        fn = getattr(clients.get(service), method, None)
        if fn is None:
            print(f"unknown method {args.method!r}; see `methods`", file=sys.stderr)
            return 2
        request_type = typing.get_type_hints(fn)["request"]
        request = json_format.Parse(args.json, request_type())
        try:
            result = fn(request)
            results = result if inspect.isgenerator(result) else [result]
            for r in results:
                print(json_format.MessageToJson(r, preserving_proto_field_name=True))
        except EntrepotError as err:
            print(
                json.dumps(
                    {
                        "error": err.code.name,
                        "reason": err.reason,
                        "message": err.message,
                        "field_violations": [vars(v) for v in err.field_violations],
                        "precondition_violations": [vars(v) for v in err.precondition_violations],
                    },
                    indent=2,
                ),
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
