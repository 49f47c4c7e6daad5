"""A small grpcurl-like command line over the typed client:

    python -m entrepot_client.cli --token $ENTREPOT_TOKEN --channel default \\
        call inventory.get_stock_level '{"sku": "SKU-1"}'
    python -m entrepot_client.cli --token $ENTREPOT_TOKEN methods

The target is --target, else ENTREPOT_TARGET, else 127.0.0.1:50051. Responses are
printed as canonical proto3 JSON (lowerCamelCase names, enum names, every field
including zero values), as grpcurl and `buf curl` print them. A server error is one
line of JSON on stderr (exit 1); a usage mistake (unknown method, bad JSON) one line
of text (exit 2); a closed output pipe (`methods | head`) ends quietly with 141.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import typing

import grpc
from google.protobuf import json_format

from entrepot_client import EntrepotError, EntrepotSync

PROG = "entrepot-client"


class UsageError(Exception):
    """A mistake in the command line: printed as one line, exit code 2."""


def _clients(ep: EntrepotSync) -> dict[str, object]:
    return {k: v for k, v in vars(ep).items() if k != "grpc_channel"}


def _methods(clients: dict[str, object]) -> list[str]:
    return [
        f"{name}.{m}"
        for name, client in sorted(clients.items())
        for m, _ in inspect.getmembers(type(client), inspect.isfunction)
        if not m.startswith("_")
    ]


def _call(clients: dict[str, object], method: str, body: str) -> None:
    service, _, name = method.partition(".")
    fn = getattr(clients.get(service), name, None)
    if fn is None:
        raise UsageError(f"unknown method {method!r}; see `methods`")
    request_type = typing.get_type_hints(fn)["request"]
    try:
        request = json_format.Parse(body, request_type())
    except json_format.ParseError as err:
        said = " ".join(str(err).split())  # the parser's message names the position or the field
        raise UsageError(f"bad JSON for {request_type.DESCRIPTOR.full_name}: {said}") from None
    result = fn(request)
    for r in result if inspect.isgenerator(result) else [result]:
        print(json_format.MessageToJson(r, always_print_fields_with_no_presence=True), flush=True)


def _error_line(err: EntrepotError, target: str) -> str:
    if err.code == grpc.StatusCode.UNAVAILABLE and not err.reason:
        return f"{PROG}: no server answered at {target} ({err.message}); check --target / ENTREPOT_TARGET"
    return json.dumps(
        {
            "error": err.code.name,
            "reason": err.reason,
            "message": err.message,
            "field_violations": [vars(v) for v in err.field_violations],
            "precondition_violations": [vars(v) for v in err.precondition_violations],
        }
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG)
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

    try:
        with EntrepotSync(args.target, args.token, args.channel, timeout=args.timeout) as ep:
            clients = _clients(ep)
            if args.cmd == "methods":
                for line in _methods(clients):
                    print(line)
                sys.stdout.flush()
            else:
                _call(clients, args.method, args.json)
        return 0
    except UsageError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    except EntrepotError as err:
        print(_error_line(err, args.target), file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): like any Unix filter, stop quietly. stdout points at
        # /dev/null from here on, so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:  # Ctrl-C, e.g. to end a watch stream
        return 130


if __name__ == "__main__":
    sys.exit(main())
