"""Upstream host names, resolved once a minute instead of once per connection.

Twisted resolves a host name for every connection with C{getaddrinfo} in the reactor's
thread pool: a thread hop and a lookup per upstream session.  L{CachingResolver} keeps
each answer for C{ttl} seconds (the system resolver does not tell the real TTL), shares
one lookup among the connections that wait for it, never keeps a failed lookup, and
answers IP literals at once.  L{with_resolver} hands it to C{HostnameEndpoint}, which
still connects to every address in turn and leaves certificate checks to TLS: they
verify the configured host name, whatever address it resolved to.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
)
from zope.interface import implementer

#: Seconds an answer is used.  Short, so a provider's DNS change is seen within a minute.
NAME_TTL = 60.0
#: Seconds a lookup may take; then those waiting for it get no address (and the next
#: connection asks again), even if the resolver never answers.
LOOKUP_TIMEOUT = 30.0

#: (host, port, address types, transport semantics): what a lookup depends on.
_Key = tuple[str, int, frozenset[type[IAddress]] | None, str]


@implementer(IHostResolution)
class _Resolution:
    """The handle C{resolveHostName} returns; a lookup cannot be cancelled."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Nothing to stop: the answer is cheap and shared."""


@implementer(IResolutionReceiver)
class _Collector:
    """Receives the inner resolver's answer and hands it to the cache."""

    def __init__(self, resolver: CachingResolver, key: _Key) -> None:
        self._resolver = resolver
        self.key = key
        self._addresses: list[IAddress] = []

    def resolutionBegan(self, resolution: IHostResolution) -> None:  # noqa: N802
        pass

    def addressResolved(self, address: IAddress) -> None:  # noqa: N802
        self._addresses.append(address)

    def resolutionComplete(self) -> None:  # noqa: N802
        self._resolver._answered(self, tuple(self._addresses))


def _literal(host: str, port: int) -> IAddress | None:
    """The address of an IP literal, None for a name."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if address.version == 6:
        return IPv6Address("TCP", str(address), port)
    return IPv4Address("TCP", str(address), port)


@implementer(IHostnameResolver)
class CachingResolver:
    """An L{IHostnameResolver} that remembers the answers of another one for C{ttl} s."""

    def __init__(self, resolver: IHostnameResolver, clock: IReactorTime,
                 ttl: float = NAME_TTL) -> None:
        self._resolver = resolver
        self._clock = clock
        self._ttl = ttl
        self._answers: dict[_Key, tuple[float, tuple[IAddress, ...]]] = {}
        self._waiting: dict[_Key, list[IResolutionReceiver]] = {}
        self._lookups: dict[_Key, tuple[_Collector, IDelayedCall]] = {}  # under way
        self.lookups = 0  # lookups passed on to the inner resolver

    def resolveHostName(  # noqa: N802
            self, resolutionReceiver: IResolutionReceiver, hostName: str,
            portNumber: int = 0, addressTypes: Sequence[type[IAddress]] | None = None,
            transportSemantics: str = "TCP") -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        literal = _literal(hostName, portNumber)
        if literal is not None:
            _deliver(resolutionReceiver, (literal,), addressTypes)
            return resolution
        key = (hostName.lower(), portNumber,
               frozenset(addressTypes) if addressTypes is not None else None,
               transportSemantics)
        cached = self._answers.get(key)
        if cached is not None and cached[0] > self._clock.seconds():
            _deliver(resolutionReceiver, cached[1], None)
            return resolution
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(resolutionReceiver)
            return resolution
        self._waiting[key] = [resolutionReceiver]
        self.lookups += 1
        collector = _Collector(self, key)
        self._lookups[key] = collector, self._clock.callLater(LOOKUP_TIMEOUT, self._answered,
                                                              collector, ())
        self._resolver.resolveHostName(collector, hostName, portNumber, addressTypes,
                                       transportSemantics)
        return resolution

    def _answered(self, collector: _Collector, addresses: tuple[IAddress, ...]) -> None:
        key = collector.key
        current = self._lookups.get(key)
        if current is None or current[0] is not collector:
            return  # a lookup given up on, answering late: a newer one is under way
        del self._lookups[key]
        if current[1].active():
            current[1].cancel()
        if addresses:
            self._answers[key] = (self._clock.seconds() + self._ttl, addresses)
        else:
            self._answers.pop(key, None)  # a failed lookup is asked again next time
        for receiver in self._waiting.pop(key, []):
            _deliver(receiver, addresses, None)

    def forget(self, host: str) -> None:
        """Drop the answers for C{host} (its addresses did not answer): look it up anew."""
        host = host.lower()
        for key in [key for key in self._answers if key[0] == host]:
            del self._answers[key]


def _deliver(receiver: IResolutionReceiver, addresses: tuple[IAddress, ...],
             types: Sequence[type[IAddress]] | None) -> None:
    for address in addresses:
        if types is None or type(address) in types:
            receiver.addressResolved(address)
    receiver.resolutionComplete()


@implementer(IReactorPluggableNameResolver)
class _ReactorWithResolver:
    """The reactor as C{HostnameEndpoint} sees it: every call goes to the real reactor,
    except that its name resolver is ours."""

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:  # noqa: N802
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def with_resolver(reactor: Any, resolver: IHostnameResolver | None) -> Any:
    """C{reactor}, but resolving host names with C{resolver} (None: the reactor's own)."""
    return reactor if resolver is None else _ReactorWithResolver(reactor, resolver)
