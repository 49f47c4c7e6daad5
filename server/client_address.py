"""The caller's IP address: the connection's peer, or, when that peer is a trusted proxy
(ENTREPOT_TRUSTED_PROXIES, e.g. Envoy), the client address the proxy forwarded.

Proxies append the address they received a request from to `x-forwarded-for`, so the list is
read from the right: trusted proxies are skipped and the first other address is the client.
Anything a client wrote into the header itself sits to the left of that and is never used. A
peer that is not a trusted proxy is the client, whatever headers it sent.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> tuple[Network, ...]:
    """'10.0.0.0/8, 172.28.0.10' -> networks; ValueError names the bad entry."""
    out: list[Network] = []
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"ENTREPOT_TRUSTED_PROXIES: {item!r} is not an address or network") from exc
    return tuple(out)


def peer_ip(context: Any) -> str:
    """'ipv4:127.0.0.1:5555' / 'ipv6:[::1]:5555' -> the address part."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return str(rest.rsplit(":", 1)[0])
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]")
        try:
            return str(ipaddress.ip_address(host.replace("%25", "%").split("%")[0]))
        except ValueError:
            return str(host)
    return str(peer)


def _trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_ip(context: Any, trusted: tuple[Network, ...]) -> str:
    peer = peer_ip(context)
    if not _trusted(peer, trusted):
        return peer
    hops: list[str] = []
    for key, value in context.invocation_metadata() or ():
        if key == "x-forwarded-for":
            text = value if isinstance(value, str) else value.decode("latin-1")
            hops.extend(h.strip() for h in text.split(","))
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a malformed hop: the proxy's own address is all we know
    return peer
