"""Rate limits: messages per minute and recipients per day, per client address and per
upstream account, answered with 450 4.7.1 (never a silent drop).

Providers block a mailbox that sends too much (Microsoft 365: 30 messages a minute,
10,000 recipients a day); the bridge slows the devices down before that happens.  A
delivery takes a L{Quota} for each transaction once the mapper named the account: MAIL
reserves a message, each RCPT a recipient, and what was not sent in the end (refused,
deferred, abandoned) is given back, so a failing upstream does not use the quota up.

Counting is by sliding windows cut in slices: a window counts every slice that overlaps
the last period, so it may count an event up to one slice too long but never forgets one
early; no period of time ever holds more than the limit.  Memory stays bounded: a key is
forgotten once its window is empty, and at most C{max_keys} keys are kept per window
(the least recently used go first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smtpbridge.model import ClientInfo, Reply
from smtpbridge.networks import normalise_address

log = Logger()

#: Most keys (addresses, accounts) one window keeps before the least recently used go.
MAX_KEYS = 100_000

MINUTE = 60.0
DAY = 86_400.0

_at_least_zero = attr.validators.ge(0)


@attr.frozen
class RateLimitSettings:
    """The limits; 0 switches one off."""

    client_messages_per_minute: int = attr.field(default=0, validator=_at_least_zero)
    client_recipients_per_day: int = attr.field(default=0, validator=_at_least_zero)
    account_messages_per_minute: int = attr.field(default=0, validator=_at_least_zero)
    account_recipients_per_day: int = attr.field(default=0, validator=_at_least_zero)


#: The reply and the log text of each limit, by its name (also the metrics' label).
REFUSALS = {
    "client_messages": (Reply(450, "4.7.1", "Too many messages from your address; try "
                                            "again later"), "messages a minute from [{key}]"),
    "client_recipients": (Reply(450, "4.7.1", "Too many recipients from your address "
                                              "today; try again later"),
                          "recipients a day from [{key}]"),
    "account_messages": (Reply(450, "4.7.1", "The sending account's limit of messages a "
                                             "minute is reached; try again later"),
                         "messages a minute for account {key}"),
    "account_recipients": (Reply(450, "4.7.1", "The sending account's limit of recipients "
                                               "a day is reached; try again later"),
                           "recipients a day for account {key}"),
}


class SlidingWindow:
    """Events per key within the last C{period} seconds, at most C{limit}."""

    def __init__(self, clock: IReactorTime, limit: int, period: float, slices: int,
                 max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self._clock = clock
        self._slice = period / slices
        self._span = slices  # a count covers the current slice and this many before it
        self._max_keys = max(1, max_keys)
        # Per key, [slice index, events] oldest first; keys least recently used first.
        self._keys: OrderedDict[str, deque[list[int]]] = OrderedDict()

    def __len__(self) -> int:
        self._prune()
        return len(self._keys)

    def _now(self) -> int:
        return int(self._clock.seconds() // self._slice)

    def _prune(self) -> int:
        now = self._now()
        keys = self._keys
        while keys:
            key, slices = next(iter(keys.items()))
            if slices and slices[-1][0] >= now - self._span:
                break
            del keys[key]
        return now

    def count(self, key: str) -> int:
        """Events of C{key} within the window."""
        now = self._prune()
        slices = self._keys.get(key)
        if slices is None:
            return 0
        while slices and slices[0][0] < now - self._span:
            slices.popleft()
        return sum(events for _, events in slices)

    def allows(self, key: str, count: int = 1) -> bool:
        """Whether C{count} more events of C{key} stay within the limit."""
        return self.count(key) + count <= self.limit

    def add(self, key: str, count: int = 1) -> int:
        """Count C{count} events of C{key} now; the stamp that L{remove} takes back."""
        now = self._prune()
        slices = self._keys.pop(key, None)
        if slices is None:
            slices = deque()
            while len(self._keys) >= self._max_keys:
                self._keys.popitem(last=False)
        if slices and slices[-1][0] == now:
            slices[-1][1] += count
        else:
            slices.append([now, count])
        self._keys[key] = slices
        return now

    def remove(self, key: str, stamp: int, count: int = 1) -> None:
        """Take back C{count} events added at C{stamp} (if the window still holds them)."""
        for entry in self._keys.get(key, ()):
            if entry[0] == stamp:
                entry[1] = max(entry[1] - count, 0)
                return


class RateLimits:
    """The bridge's four windows; L{quota} gives each transaction its reservations.
    C{observe(name)} hears of each refusal (for the metrics)."""

    def __init__(self, clock: IReactorTime, settings: RateLimitSettings,
                 max_keys: int = MAX_KEYS,
                 observe: Callable[[str], object] | None = None) -> None:
        self.settings = settings
        self.observe = observe
        limits = {
            "client_messages": (settings.client_messages_per_minute, MINUTE, 12),
            "client_recipients": (settings.client_recipients_per_day, DAY, 24),
            "account_messages": (settings.account_messages_per_minute, MINUTE, 12),
            "account_recipients": (settings.account_recipients_per_day, DAY, 24),
        }
        self.windows = {name: SlidingWindow(clock, limit, period, slices, max_keys)
                        for name, (limit, period, slices) in limits.items() if limit}

    def quota(self, client: ClientInfo, account: str | None) -> Quota:
        """The reservations of one transaction of C{client} through C{account}."""
        return Quota(self, client, account)

    def refused(self, name: str, key: str, session: str) -> Reply:
        reply, what = REFUSALS[name]
        window = self.windows[name]
        log.info("{session} rate limit: more than {limit} {what}; {code} {enhanced}",
                 session=session, limit=window.limit, what=what.format(key=key),
                 code=reply.code, enhanced=reply.enhanced)
        if self.observe is not None:
            self.observe(name)
        return reply


class Quota:
    """What one transaction reserved: its message and its recipients.  L{settle} keeps
    them (the message was sent) or gives them back."""

    def __init__(self, limits: RateLimits, client: ClientInfo, account: str | None) -> None:
        self._limits = limits
        self._session = client.session_id
        self._keys = {"client": normalise_address(client.peer_host), "account": account}
        self._taken: list[tuple[str, str, int]] = []  # (window, key, stamp)
        self._last: list[tuple[str, str, int]] = []  # what the last recipient took
        self._settled = False

    def _take(self, kind: str) -> Reply | None:
        wanted = []
        for scope in ("client", "account"):
            name, key = f"{scope}_{kind}", self._keys[scope]
            window = self._limits.windows.get(name)
            if window is None or key is None:
                continue
            if not window.allows(key):
                return self._limits.refused(name, key, self._session)
            wanted.append((name, key))
        for name, key in wanted:
            self._taken.append((name, key, self._limits.windows[name].add(key)))
        return None

    def message(self) -> Reply | None:
        """Reserve the transaction's message; the 450 when a limit is reached."""
        return self._take("messages")

    def recipient(self) -> Reply | None:
        """Reserve one more recipient; the 450 when a limit is reached."""
        mark = len(self._taken)
        refusal = self._take("recipients")
        self._last = self._taken[mark:]
        return refusal

    def recipient_refused(self) -> None:
        """The recipient just reserved was refused: it does not count."""
        for entry in self._last:
            self._give_back(entry)
            self._taken.remove(entry)
        self._last = []

    def settle(self, sent: bool) -> None:
        """The transaction is over: keep what it took if its message was sent, else give
        it back.  Only the first call counts."""
        if self._settled:
            return
        self._settled = True
        if not sent:
            for entry in self._taken:
                self._give_back(entry)
        self._taken = []

    def _give_back(self, entry: tuple[str, str, int]) -> None:
        name, key, stamp = entry
        self._limits.windows[name].remove(key, stamp)
