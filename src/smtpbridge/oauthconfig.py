"""OAuth2 settings of an upstream account (``[account.NAME.oauth]``), checked once here.

Also the one place that knows the providers' endpoints and which settings each grant
needs; the token sources and ``smtpbridge oauth-login`` take their values from here.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attr

from smtpbridge.secret import Secret
from smtpbridge.tomlreader import Table

GRANTS = ("refresh_token", "client_credentials", "token_file")

#: The settings each grant cannot do without.
GRANT_NEEDS: dict[str, tuple[str, ...]] = {
    "refresh_token": ("token_url", "client_id", "refresh_token_file"),
    "client_credentials": ("token_url", "client_id", "scope"),
    "token_file": ("token_file",),
}

_MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/"


@attr.frozen
class Provider:
    """A provider's OAuth2 endpoints ("{tenant}" filled in for Microsoft), the scope an
    administrator signs in for, and how ``oauth-login`` signs in."""

    token_url: str
    authorize_url: str
    device_url: str
    login_scope: str
    login_flow: str  # device | code
    login_extras: tuple[tuple[str, str], ...] = ()  # authorization request parameters

    def for_tenant(self, tenant: str) -> Provider:
        return attr.evolve(self, **{name: getattr(self, name).format(tenant=tenant) for name
                                    in ("token_url", "authorize_url", "device_url")})


PROVIDERS: dict[str, Provider] = {
    "microsoft": Provider(
        token_url=_MICROSOFT + "token", authorize_url=_MICROSOFT + "authorize",
        device_url=_MICROSOFT + "devicecode",
        login_scope="https://outlook.office.com/SMTP.Send offline_access",
        login_flow="device"),
    # Google's device flow does not allow the Gmail scope: the code flow is the default,
    # and a refresh token needs offline access and the consent screen.
    "google": Provider(
        token_url="https://oauth2.googleapis.com/token",  # noqa: S106 - a URL
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
        device_url="https://oauth2.googleapis.com/device/code",
        login_scope="https://mail.google.com/", login_flow="code",
        login_extras=(("access_type", "offline"), ("prompt", "consent"))),
}


def is_https_url(url: str) -> bool:
    """True for an ``https://`` URL with a host: endpoints are never asked in clear text."""
    return url.startswith("https://") and bool(urlsplit(url).hostname)


@attr.frozen
class OAuthSettings:
    """How one upstream account obtains its access tokens, complete and checked."""

    grant: str  # refresh_token | client_credentials | token_file
    token_url: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    client_certificate: str | None = None  # PEM certificate for a client assertion ...
    client_key: str | None = None  # ... and its RSA private key, instead of client_secret
    scope: str | None = None
    refresh_token_file: str | None = None  # rotated refresh tokens are written back here
    token_file: str | None = None  # an access token kept fresh by another tool
    ca_certificates: str | None = None  # PEM bundle for the token endpoint; None: system
    timeout: float = 30.0


def oauth_table(t: Table) -> OAuthSettings:
    """``[account.NAME.oauth]``: where and how the account's access tokens are obtained."""
    grant = t.string("grant", choices=GRANTS)
    provider = t.string("provider", None, choices=tuple(PROVIDERS))
    tenant = t.string("tenant", None)
    token_url = t.string("token_url", None)
    if token_url is None and provider == "microsoft":
        if tenant is None:
            raise t.error("tenant", 'required for provider = "microsoft" (your tenant ID '
                                    "or domain, e.g. contoso.onmicrosoft.com)")
        token_url = PROVIDERS["microsoft"].for_tenant(tenant).token_url
    elif token_url is None and provider is not None:
        token_url = PROVIDERS[provider].token_url
    elif tenant is not None and provider != "microsoft":
        raise t.error("tenant", 'only used with provider = "microsoft"')
    settings = OAuthSettings(
        grant=grant,
        token_url=token_url,
        client_id=t.string("client_id", None),
        client_secret=t.secret("client_secret"),
        client_certificate=t.path("client_certificate", None),
        client_key=t.path("client_key", None),
        scope=t.string("scope", None),
        refresh_token_file=t.path("refresh_token_file", None),
        token_file=t.path("token_file", None),
        ca_certificates=t.path("ca_certificates", None),
        timeout=t.number("timeout", 30.0, minimum=1.0),
    )
    for key in GRANT_NEEDS[grant]:
        if getattr(settings, key) is None:
            hint = " (or provider)" if key == "token_url" else ""
            raise t.error(key, f"required for grant = {grant!r}{hint}")
    if grant == "client_credentials":
        has_secret = settings.client_secret is not None
        has_certificate = settings.client_certificate is not None
        if has_secret == has_certificate:
            raise t.error("client_secret", "give client_secret_file/_env, or "
                                           "client_certificate and client_key, not both")
        if has_certificate and settings.client_key is None:
            raise t.error("client_key", "required with client_certificate")
    if settings.token_url is not None and not is_https_url(settings.token_url):
        raise t.error("token_url", "must be an https:// URL")
    return settings
