"""Who the client is: decided once per request, from the real peer and the proxies we trust.

Every per-client bound (shares, waiting requests, Compare) counts by the answer of `client_of`,
whatever the path: the page, the Gradio API, the SSE route, the shared-document routes. The
`ClientIdentity` middleware runs it first and writes the answer where every later reader looks
(the ASGI scope's `client`, which Gradio's `gr.Request` and Starlette's `request.client` read).

The rule: the peer that connected is the client, unless it is a trusted proxy
(`AppConfig.trusted_proxies`, WWT_TRUSTED_PROXIES; by default 127.0.0.1 and ::1). Then the
client is the right-most address of its `X-Forwarded-For` (or `Forwarded: for=`) chain that is
not itself a trusted proxy: each proxy appends the address it saw, so everything left of the
first untrusted entry could have been written by the client. A value that is not an IP address
is skipped; a chain of nothing but trusted proxies gives its left-most address; no usable
entry leaves the peer. So a forged header from an untrusted peer changes nothing, and an
identity is always a normalised IP address (never a caller's string in a Redis key).

uvicorn would rewrite the peer from `X-Forwarded-For` before any of our code runs (its
FORWARDED_ALLOW_IPS trusts 127.0.0.1 by default); `keep_the_real_peer` turns that off so this
module sees the real peer.

MCP tools: Gradio's MCP server runs a queued tool by calling the app again over loopback with
the MCP request's headers. So that the loopback call counts for the MCP caller and nobody else,
requests to the MCP routes carry the decided client in `x-wwt-client`, vouched for by a secret
made when the process starts (`x-wwt-client-proof`); a loopback request that shows the proof is
that client. Both headers are removed from every request that comes in, so nobody outside the
process can set them.

Hugging Face Spaces: a Space's app is reached only through the Spaces proxy, which connects
from the cluster's private network and appends the visitor's address to `X-Forwarded-For`. So
when SPACE_ID is set (Spaces sets it in every Space), the private ranges are trusted too
(`SPACES_PROXIES`), unless WWT_TRUSTED_PROXIES says otherwise.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
from typing import Iterable, Optional, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DEFAULT_PROXIES = "127.0.0.1,::1"
SPACES_PROXIES = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"
MAX_CHAIN = 32  # addresses of a forwarded chain looked at, from the right
_FORWARDED_FOR = re.compile(r'for=("?)(\[[^\]]*\]|[^";,\s]*)\1', re.IGNORECASE)


class TrustedProxies:
    """Addresses and CIDR ranges whose forwarding headers are believed."""

    def __init__(self, spec: str = DEFAULT_PROXIES):
        self.networks: list[Network] = []
        for item in (part.strip() for part in (spec or "").split(",")):
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"WWT_TRUSTED_PROXIES: {item!r} is not an IP address or CIDR range") from None
        self.spec = spec

    def __contains__(self, address) -> bool:
        return address is not None and any(address in net for net in self.networks
                                           if net.version == address.version)

    def __repr__(self) -> str:
        return f"TrustedProxies({self.spec!r})"


def default_proxies(on_spaces: bool) -> str:
    """What WWT_TRUSTED_PROXIES means when it is empty: loopback, and on Spaces its proxy's ranges."""
    return DEFAULT_PROXIES + ("," + SPACES_PROXIES if on_spaces else "")


def parse_address(value: str) -> Optional[ipaddress._BaseAddress]:
    """An IP address from a forwarded entry ("1.2.3.4", "1.2.3.4:5678", "[::1]:80", "::1"), else None."""
    value = value.strip().strip('"')
    if not value or len(value) > 64:
        return None
    if value.startswith("["):
        value = value[1:value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def forwarded_chain(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """The addresses the proxies appended, left to right: `Forwarded: for=` when present (RFC 7239),
    else `X-Forwarded-For`; several header lines join in order."""
    forwarded, x_forwarded = [], []
    for name, value in headers:
        if name == b"forwarded":
            forwarded += [m.group(2) for m in _FORWARDED_FOR.finditer(value.decode("latin-1"))]
        elif name == b"x-forwarded-for":
            x_forwarded += value.decode("latin-1").split(",")
    return forwarded or x_forwarded


def client_of(peer: Optional[str], headers: Iterable[tuple[bytes, bytes]], trusted: TrustedProxies) -> Optional[str]:
    """The client's address (normalised), by the rule in the module docstring; None without a peer."""
    address = parse_address(peer or "")
    if address is None:
        return peer or None
    if address not in trusted:
        return address.compressed
    chain = [a for a in (parse_address(v) for v in forwarded_chain(headers)[-MAX_CHAIN:]) if a is not None]
    for hop in reversed(chain):
        if hop not in trusted:
            return hop.compressed
    return (chain[0] if chain else address).compressed


CLIENT_HEADER = b"x-wwt-client"
PROOF_HEADER = b"x-wwt-client-proof"
MCP_PATH = "/gradio_api/mcp"
_PROOF = secrets.token_hex(16).encode()  # made at start, never sent outside this process's loopback


def _vouched(peer: Optional[str], headers: list) -> Optional[str]:
    """The client a loopback call from this process vouches for (the MCP server's), else None."""
    if peer not in ("127.0.0.1", "::1"):  # where this process's own calls come from
        return None
    values = dict((k.lower(), v) for k, v in headers if k.lower() in (CLIENT_HEADER, PROOF_HEADER))
    proof, client = values.get(PROOF_HEADER), values.get(CLIENT_HEADER)
    if proof is None or client is None or not hmac.compare_digest(proof, _PROOF):
        return None
    vouched = parse_address(client.decode("latin-1"))
    return vouched.compressed if vouched is not None else None


class ClientIdentity:
    """ASGI middleware: decide the client once (client_of) and write it into the scope, so every
    route, Gradio's included, reads the same answer from `request.client`."""

    def __init__(self, app, trusted: TrustedProxies):
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            peer = scope.get("client")
            host, port = (peer[0], peer[1]) if peer else (None, 0)
            headers = list(scope.get("headers") or ())
            client = _vouched(host, headers) or client_of(host, headers, self.trusted)
            headers = [(k, v) for k, v in headers if k.lower() not in (CLIENT_HEADER, PROOF_HEADER)]
            if client is not None:
                scope["client"] = (client, port)
                if scope.get("path", "").startswith(MCP_PATH):  # its tool calls come back over loopback
                    headers += [(CLIENT_HEADER, client.encode()), (PROOF_HEADER, _PROOF)]
            scope["headers"] = headers
        return await self.app(scope, receive, send)


def keep_the_real_peer() -> None:
    """Stop uvicorn from rewriting the peer from X-Forwarded-For before ClientIdentity sees it:
    its proxy-header middleware trusts the hosts in FORWARDED_ALLOW_IPS (uvicorn's own variable,
    read when Gradio starts its server); a value that no address can match trusts none."""
    os.environ["FORWARDED_ALLOW_IPS"] = "no-proxy-trusted-by-uvicorn"
