"""An smtpbridge mapper plugin: the client's HELO name picks the upstream account."""

from twisted.internet.defer import succeed
from twisted.plugin import IPlugin
from zope.interface import implementer

from smtpbridge.errors import SMTPReplyError
from smtpbridge.interfaces import ICredentialMapper, ICredentialMapperFactory
from smtpbridge.model import Reply


@implementer(ICredentialMapper)
class HeloMapper:
    def __init__(self, devices, accounts):
        self.devices, self.accounts = devices, accounts

    def map(self, client, sender):
        name = self.devices.get(client.helo or "")
        if name is None:
            raise SMTPReplyError(Reply(550, "5.7.1", "Unknown device"))
        return succeed(self.accounts[name])  # a Deferred, as an LDAP lookup would give


@implementer(IPlugin, ICredentialMapperFactory)
class HeloMapperFactory:
    name = "helo"

    def make(self, options, accounts, reactor):
        devices = options.get("devices", {})
        unknown = sorted(set(devices.values()) - set(accounts))
        if unknown:
            raise ValueError(f"devices name unknown accounts: {', '.join(unknown)}")
        return HeloMapper(devices, accounts)


helo_mapper = HeloMapperFactory()
