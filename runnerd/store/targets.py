"""Where a pull may connect: for a caller over TCP, public addresses only (and the hosts the operator
allows), checked on the addresses a host name resolves to, for every connection, redirects included.

A host name is never trusted for what it spells: `PublicResolver` resolves it and keeps only the
public addresses, and the connection is made to those (so a name that resolves to a private address
a moment later, DNS rebinding, gains nothing). An address written into the URL skips resolution, so
`check_literal` judges it before each request. The owner on the unix socket may pull from anywhere.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(OSError):
    """The pull's host is, or resolves only to, addresses a TCP caller may not reach."""


REFUSED_MESSAGE = ("over TCP, runnerd does not pull from loopback, private, link-local, unspecified or multicast "
                   "addresses (the source's host is or resolves to one); an operator can allow a mirror in "
                   "store.pull_allowed_hosts")


@dataclass(frozen=True)
class PullPolicy:
    public_only: bool = False
    allowed_names: frozenset[str] = frozenset()
    allowed_networks: tuple[Network, ...] = ()

    @classmethod
    def build(cls, public_only: bool, allowed: Iterable[str], trusted_hosts: Iterable[str | None] = ()) -> PullPolicy:
        """`allowed`: host names or CIDRs (the setting); `trusted_hosts`: hosts the operator configured
        (the hub's), allowed by name."""
        names, networks = set(), []
        for entry in allowed:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry.lower())
        names |= {h.lower() for h in trusted_hosts if h}
        return cls(public_only, frozenset(names), tuple(networks))

    def name_allowed(self, host: str) -> bool:
        return not self.public_only or host.lower().strip("[]") in self.allowed_names

    def address_allowed(self, address: str) -> bool:
        if not self.public_only:
            return True
        try:
            ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed_networks):
            return True
        return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback
                                     or ip.is_link_local or ip.is_private)

    def check_literal(self, host: str) -> None:
        """TargetRefused for a URL host that is an address this caller may not reach (names: the resolver)."""
        bare = host.strip("[]")
        try:
            ipaddress.ip_address(bare.split("%", 1)[0])
        except ValueError:
            return
        if not self.name_allowed(bare) and not self.address_allowed(bare):
            raise TargetRefused(REFUSED_MESSAGE)


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the policy allows (TargetRefused when none is)."""

    def __init__(self, policy: PullPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._policy.name_allowed(host):
            return results
        kept = [r for r in results if self._policy.address_allowed(r["host"])]
        if not kept:
            raise TargetRefused(REFUSED_MESSAGE)
        return kept

    async def close(self) -> None:
        await self._inner.close()


def refused_cause(exc: BaseException) -> bool:
    """Whether an aiohttp connection error came from the policy (not from the network)."""
    cause: Any = getattr(exc, "os_error", None) or exc.__cause__
    return isinstance(cause, TargetRefused) or isinstance(exc, TargetRefused)
