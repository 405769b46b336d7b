"""Which network addresses a webhook may reach, decided the way the connection will use them.

A webhook URL is chosen by a project, and the API sends to it from inside the deployment's network, so
an unchecked URL reaches services no project should: the cloud metadata service (169.254.169.254),
databases and admin ports on private networks, the API itself on loopback (SSRF). The rule:

- every address the host resolves to must be a **global unicast** address (``ipaddress``'s IANA
  special-purpose registry: not loopback, private, link-local, shared/CGNAT, unspecified, reserved,
  documentation or multicast);
- except loopback addresses when ``IPO_WEBHOOK_ALLOW_LOOPBACK`` is set (tests, a laptop), and any
  address inside ``IPO_WEBHOOK_ALLOWED_NETWORKS`` (an operator's explicit list of CIDRs, e.g. a
  private network where the receivers live);
- IPv6 spellings of IPv4 addresses are judged as the IPv4 address they reach: IPv4-mapped
  (``::ffff:127.0.0.1``, ``::ffff:7f00:1``), IPv4-compatible (``::127.0.0.1``), NAT64 (``64:ff9b::/96``,
  RFC 6052) and 6to4 (``2002::/16``, RFC 3056).

The same check runs when an endpoint is created (a clear 400) and again at every delivery, on the
addresses the delivery then connects to (``app.services.webhook_delivery`` pins the connection to a
checked address), so a name that is later re-pointed at a private address (DNS rebinding) is refused
at send time too.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from app.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
"""RFC 6052: the last 32 bits are the IPv4 address a NAT64 gateway connects to."""


class TargetRefused(Exception):
    """The URL's host resolves to no address, or to one the policy does not allow. The message says why
    in one line and names the kind of address, never the address a name resolved to."""


def effective_address(ip: IPAddress) -> IPAddress:
    """The address a connection to ``ip`` really reaches: the embedded IPv4 address of an IPv4-mapped,
    IPv4-compatible, NAT64 (well-known prefix) or 6to4 IPv6 address; ``ip`` itself otherwise."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    value = int(ip)
    if value >> 32 == 0 and value > 1:  # ::a.b.c.d (deprecated IPv4-compatible); :: and ::1 stay IPv6
        return ipaddress.IPv4Address(value)
    if ip in NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip


def kind_of(ip: IPAddress) -> str:
    """``global``, ``loopback``, ``unspecified``, ``link-local``, ``multicast`` or ``private`` (every
    other non-global range: RFC 1918, unique-local, CGNAT, reserved, documentation...), judged on
    ``effective_address(ip)``."""
    real = effective_address(ip)
    if real.is_loopback:
        return "loopback"
    if real.is_unspecified or (isinstance(real, ipaddress.IPv4Address) and real in _THIS_NETWORK):
        return "unspecified"
    if real.is_link_local:
        return "link-local"
    if real.is_multicast:
        return "multicast"
    if real.is_global and not real.is_reserved:
        return "global"
    return "private"


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
"""RFC 1122 "this network": Linux connects 0.x.x.x to the local host."""


@dataclass(frozen=True)
class TargetPolicy:
    """Which addresses a webhook may connect to: global unicast, plus loopback when ``allow_loopback``,
    plus any address inside ``allowed_networks`` (the operator's CIDRs)."""

    allow_loopback: bool = False
    allowed_networks: tuple[IPNetwork, ...] = field(default=())

    @classmethod
    def from_settings(cls, settings: Settings) -> TargetPolicy:
        """``IPO_WEBHOOK_ALLOW_LOOPBACK`` and ``IPO_WEBHOOK_ALLOWED_NETWORKS``."""
        return cls(settings.webhook_allow_loopback, tuple(settings.webhook_allowed_networks))

    def refusal(self, ip: IPAddress) -> str | None:
        """None when a connection to ``ip`` is allowed, else the one-line reason."""
        kind = kind_of(ip)
        if kind == "global" or (kind == "loopback" and self.allow_loopback):
            return None
        real = effective_address(ip)
        if any(addr in net for net in self.allowed_networks for addr in {ip, real} if addr.version == net.version):
            return None
        knob = "IPO_WEBHOOK_ALLOW_LOOPBACK" if kind == "loopback" else "IPO_WEBHOOK_ALLOWED_NETWORKS"
        # The address itself is not named: it would tell a project what internal names resolve to.
        return f"its host resolves to a {kind} address (refused unless {knob} allows it)"

    def checked_addresses(self, host: str, port: int) -> list[IPAddress]:
        """Resolve ``host`` once and return its addresses, in resolver order, when every one is allowed.

        Raises ``TargetRefused`` when the name does not resolve or any address is refused: one refused
        address among several is how a rebinding name hedges, so the name is refused as a whole.
        """
        addresses = resolve(host, port)
        if not addresses:
            raise TargetRefused(f"cannot resolve host {host!r}")
        for ip in addresses:
            if (reason := self.refusal(ip)) is not None:
                raise TargetRefused(reason)
        return addresses


def resolve(host: str, port: int) -> list[IPAddress]:
    """The TCP addresses of ``host`` (an IP literal is its own answer), de-duplicated, resolver order."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    seen: dict[IPAddress, None] = {}
    for info in infos:
        try:
            seen.setdefault(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]), None)
        except ValueError:
            continue
    return list(seen)
