"""AUTH failure throttling per client address: growing reply delays, then a temporary block.

Like Postfix's anvil together with C{smtpd_error_sleep_time}: each failed AUTH from an
address is answered a little later than the one before, and an address that fails
C{failure_limit} times within C{window} seconds is refused AUTH for C{block_time} seconds.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from smtpbridge.networks import normalise_address

log = Logger()

#: Most addresses tracked at once (per table) before the least recently seen are dropped.
MAX_ADDRESSES = 100_000

_non_negative = attr.validators.ge(0)
_non_negative_time = attr.validators.ge(0.0)


@attr.frozen
class ThrottleSettings:
    """How AUTH failures are counted, delayed and blocked; zero limits switch a part off."""

    #: Failures within C{window} seconds that block the address; 0 never blocks.
    failure_limit: int = attr.field(default=10, validator=_non_negative)
    #: Seconds over which failures are counted.
    window: float = attr.field(default=600.0, validator=_non_negative_time)
    #: Seconds an address stays blocked after reaching the limit.
    block_time: float = attr.field(default=900.0, validator=_non_negative_time)
    #: Each failed AUTH reply waits C{delay_step} times the failures so far; 0 never waits.
    delay_step: float = attr.field(default=1.0, validator=_non_negative_time)
    #: Longest wait before answering a failed AUTH.
    max_delay: float = attr.field(default=10.0, validator=_non_negative_time)
    #: AUTH attempts per second for all clients together; 0 means no ceiling.
    rate: float = attr.field(default=20.0, validator=_non_negative_time)
    #: Seconds after an attempt refused (blocked, busy, rate) during which the address's
    #: new connections are closed before their TLS handshake (L{AuthThrottle.shedding});
    #: 0 never closes them.
    cool_down: float = attr.field(default=10.0, validator=_non_negative_time)


class AuthThrottle:
    """Counts AUTH failures per client address and decides delays and blocks.

    Memory stays bounded: an address is forgotten once its failures have left the window
    and its block has expired, and at most C{max_addresses} addresses are kept per table.
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: ThrottleSettings = ThrottleSettings(),
        *,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self._clock = clock
        self.settings = settings
        self._max_addresses = max(1, max_addresses)
        # Failure times per address; least recently failed first, so the expired ones
        # are always at the front.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # Block end per address; every block lasts block_time, so the first ends first.
        self._blocks: OrderedDict[str, float] = OrderedDict()
        # Failures beyond this many change neither the delay nor the block.
        needed = settings.failure_limit
        if settings.delay_step > 0:
            needed = max(needed, math.ceil(settings.max_delay / settings.delay_step))
        self._keep = max(1, needed)
        # Attempts being checked now, per address: they count against the limit before
        # their verdict, so parallel guesses cannot pass it.
        self._in_flight: dict[str, int] = {}
        # Until when each address (its peer host string) has its connections closed.
        self._cooling: OrderedDict[str, float] = OrderedDict()
        # The global ceiling: a token bucket of one second's attempts.
        # (At least one: a rate below one a second still lets an attempt through.)
        self._tokens = self._capacity = max(1.0, settings.rate)
        self._refilled = clock.seconds()

    def begin(self, address: str, costly: bool = True) -> str | None:
        """An AUTH attempt from C{address} is about to be checked: None when it may be (it
        is then counted until L{end}), else why not: "blocked" (too many failures),
        "busy" (its attempts under way would reach the limit) or "rate" (the bridge's
        ceiling of attempts per second, which only C{costly} checks count against: a
        login verified a short while ago costs no hash)."""
        refused = self._refusal(address, costly)
        if refused is not None:
            self._cool(address)
            return refused
        key = normalise_address(address)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return None

    def _refusal(self, address: str, costly: bool) -> str | None:
        if self.blocked(address):
            return "blocked"
        key = normalise_address(address)
        limit = self.settings.failure_limit
        times = self._failures.get(key)
        failures = len(self._in_window(times, self._clock.seconds())) if times else 0
        if limit and failures + self._in_flight.get(key, 0) >= limit:
            return "busy"
        if costly and not self._take_token():
            return "rate"
        return None

    def _cool(self, address: str) -> None:
        if not self.settings.cool_down:
            return
        self._cooling.pop(address, None)
        if len(self._cooling) >= self._max_addresses:
            self._cooling.popitem(last=False)
        self._cooling[address] = self._clock.seconds() + self.settings.cool_down

    def shedding(self, host: str) -> bool:
        """True while connections from C{host} (a peer host string) are to be closed at
        once: it was refused AUTH within the last C{cool_down} seconds.  A guessing storm
        that reconnects after each refusal then costs an accept, not a TLS handshake."""
        until = self._cooling.get(host)
        if until is None:
            return False
        if until > self._clock.seconds():
            return True
        del self._cooling[host]
        return False

    def end(self, address: str, ok: bool | None) -> float:
        """The attempt C{begin} allowed has its verdict (None: it could not be checked);
        the seconds to wait before answering it (0 unless it failed)."""
        key = normalise_address(address)
        left = self._in_flight.get(key, 1) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        if ok is None:
            return 0.0
        if ok:
            self.succeeded(address)
            return 0.0
        return self.failed(address)

    def _take_token(self) -> bool:
        rate = self.settings.rate
        if not rate:
            return True
        now = self._clock.seconds()
        self._tokens = min(self._capacity, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def blocked(self, address: str) -> float:
        """Seconds left of a block for this address, 0.0 if it is not blocked."""
        now = self._prune()
        until = self._blocks.get(normalise_address(address))
        if until is None:
            return 0.0
        return until - now

    def _in_window(self, times: deque[float], now: float) -> deque[float]:
        """C{times} (an address's failures, oldest first) without those older than the
        window."""
        horizon = now - self.settings.window
        while times and times[0] <= horizon:
            times.popleft()
        return times

    def failed(self, address: str) -> float:
        """Record one AUTH failure now; return the seconds to wait before answering it."""
        now = self._prune()
        settings = self.settings
        if settings.failure_limit == 0 and settings.delay_step == 0:
            return 0.0
        key = normalise_address(address)
        times = self._failures.pop(key, None)
        if times is not None:
            self._in_window(times, now)
        else:
            times = deque(maxlen=self._keep)
            if len(self._failures) >= self._max_addresses:
                self._failures.popitem(last=False)
        times.append(now)
        self._failures[key] = times
        count = len(times)
        if settings.failure_limit and count >= settings.failure_limit and key not in self._blocks:
            if len(self._blocks) >= self._max_addresses:
                self._blocks.popitem(last=False)
            self._blocks[key] = now + settings.block_time
            log.warn(
                "AUTH blocked for [{address}] for {block_time:g} s"
                " after {failures} failures in {window:g} s",
                address=key,
                block_time=settings.block_time,
                failures=count,
                window=settings.window,
            )
        return min(settings.delay_step * count, settings.max_delay)

    def succeeded(self, address: str) -> None:
        """Forget the address's failures after a successful login; an active block stays."""
        self._prune()
        self._failures.pop(normalise_address(address), None)

    def delay(self, seconds: float) -> Deferred[None]:
        """A Deferred that fires after C{seconds} on the clock; cancelling it stops the wait."""
        if seconds <= 0:
            return succeed(None)
        return deferLater(self._clock, seconds)

    def blocking(self) -> int:
        """How many addresses are blocked now."""
        self._prune()
        return len(self._blocks)

    def tracked(self) -> int:
        """How many addresses are held in memory, with failures or a block."""
        return len(self._failures.keys() | self._blocks.keys())

    def _prune(self) -> float:
        """Drop expired failures and blocks; return the current time."""
        now = self._clock.seconds()
        horizon = now - self.settings.window
        failures = self._failures
        while failures:
            key, times = next(iter(failures.items()))
            if times[-1] > horizon:
                break
            del failures[key]
        blocks = self._blocks
        while blocks:
            key, until = next(iter(blocks.items()))
            if until > now:
                break
            del blocks[key]
        return now
