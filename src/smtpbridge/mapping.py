"""Built-in credential mappers: which upstream account serves which client or sender."""

from __future__ import annotations

from zope.interface import implementer

from smtpbridge.interfaces import ICredentialMapper
from smtpbridge.model import Assignment, ClientInfo


@implementer(ICredentialMapper)
class StaticMapper:
    """One route and one account for every transaction."""

    def __init__(self, assignment: Assignment) -> None:
        self._assignment = assignment

    def map(self, client: ClientInfo, sender: str) -> Assignment:
        return self._assignment
