"""OAuth2 settings of an upstream account (``[account.NAME.oauth]``), checked once here.

Also the one place that knows the providers' endpoints and which settings each grant
needs; the token sources and ``smtpbridge oauth-login`` take their values from here.
"""

from __future__ import annotations

import os
import pwd
from urllib.parse import urlsplit
from urllib.request import getproxies_environment, proxy_bypass

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

#: Settings only some grants use: giving one to another grant is an error, not ignored.
GRANT_KEYS: dict[str, tuple[str, ...]] = {
    "token_file": ("token_file",),
    "refresh_token_file": ("refresh_token",),
    "keepalive_interval": ("refresh_token",),
    **{key: ("refresh_token", "client_credentials") for key in (
        "client_id", "client_secret_file", "client_secret_env", "client_certificate",
        "client_key", "scope", "ca_certificates", "timeout", "proxy", "refresh_margin")},
}

DEFAULT_REFRESH_MARGIN = 300.0  # Microsoft's high-volume endpoint refuses tokens near expiry
DEFAULT_KEEPALIVE = 7 * 86400.0  # Microsoft drops refresh tokens unused for 90 days
MIN_KEEPALIVE = 3600.0  # a smaller value is a unit mistake (days for seconds)
STATE_DIRECTORY = "/var/lib/smtpbridge"  # where the packaged bridge keeps its own files

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
    try:
        parts = urlsplit(url)
        return url.startswith("https://") and bool(parts.hostname) and \
            (parts.port is None or parts.port > 0)
    except ValueError:  # (an IPv6 literal left open, a port that is no number)
        return False


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
    refresh_margin: float = DEFAULT_REFRESH_MARGIN  # seconds before expiry a token is renewed
    keepalive_interval: float = DEFAULT_KEEPALIVE  # refresh an idle account; 0: never
    # http://HOST:PORT of an HTTP proxy for the token endpoint (may carry credentials when
    # it comes from the environment: never shown), and where it was found.
    proxy: str | None = attr.field(default=None, repr=False)
    proxy_source: str = ""  # "proxy" (the key), or the environment variable's name


def oauth_table(t: Table) -> OAuthSettings:
    """``[account.NAME.oauth]``: where and how the account's access tokens are obtained."""
    grant = t.string("grant", choices=GRANTS)
    token_url, scope = _endpoint(t, grant)
    settings = OAuthSettings(
        grant=grant,
        token_url=token_url,
        client_id=t.string("client_id", None),
        client_secret=t.secret("client_secret"),
        client_certificate=t.path("client_certificate", None),
        client_key=t.secret_path("client_key", None),
        scope=scope,
        refresh_token_file=t.secret_path("refresh_token_file", None),
        token_file=t.secret_path("token_file", None),
        ca_certificates=t.path("ca_certificates", None),
        timeout=t.number("timeout", 30.0, minimum=1.0),
        refresh_margin=t.number("refresh_margin", DEFAULT_REFRESH_MARGIN),
        keepalive_interval=t.number("keepalive_interval", DEFAULT_KEEPALIVE),
    )
    for key in GRANT_NEEDS[grant]:
        if getattr(settings, key) is None:
            hint = " (or provider)" if key == "token_url" else ""
            raise t.error(key, f"required for grant = {grant!r}{hint}")
    _check_client_authentication(t, settings)
    if settings.token_url is not None and not is_https_url(settings.token_url):
        raise t.error("token_url", "must be an https:// URL")
    for key, grants in GRANT_KEYS.items():
        if key in t.data and grant not in grants:
            raise t.error(key, f"not used with grant = {grant!r}")
    if 0 < settings.keepalive_interval < MIN_KEEPALIVE:
        raise t.error("keepalive_interval", f"must be 0 (off) or at least {MIN_KEEPALIVE:.0f} "
                                            "seconds (a week is 604800)")
    if settings.refresh_token_file is not None:
        _check_refresh_token_file(t, settings.refresh_token_file)
    if settings.token_url is not None:
        proxy, source = _proxy(t, settings.token_url)
        settings = attr.evolve(settings, proxy=proxy, proxy_source=source)
    return settings


def _endpoint(t: Table, grant: str) -> tuple[str | None, str | None]:
    """The token URL (given, or the provider's) and the scope (given, or for a Microsoft
    refresh token the delegated SMTP scope, which its token endpoint wants each time)."""
    provider = t.string("provider", None, choices=tuple(PROVIDERS))
    tenant = t.string("tenant", None)
    token_url = t.string("token_url", None)
    scope = t.string("scope", None)
    if token_url is None and provider == "microsoft":
        if tenant is None:
            raise t.error("tenant", 'required for provider = "microsoft" (your tenant ID '
                                    "or domain, e.g. contoso.onmicrosoft.com)")
        token_url = PROVIDERS["microsoft"].for_tenant(tenant).token_url
    elif token_url is None and provider is not None:
        token_url = PROVIDERS[provider].token_url
    elif tenant is not None and provider != "microsoft":
        raise t.error("tenant", 'only used with provider = "microsoft"')
    if scope is None and provider == "microsoft" and grant == "refresh_token":
        scope = PROVIDERS["microsoft"].login_scope
    return token_url, scope


def _check_client_authentication(t: Table, settings: OAuthSettings) -> None:
    """A client secret, or a certificate and its key (a signed client assertion, sent with
    either grant), or neither (a public client, refresh_token only); never both."""
    has_secret = settings.client_secret is not None
    has_certificate = settings.client_certificate is not None
    has_key = settings.client_key is not None
    if has_secret and (has_certificate or has_key) or \
            settings.grant == "client_credentials" and not (has_secret or has_certificate):
        raise t.error("client_secret", "give client_secret_file/_env, or "
                                       "client_certificate and client_key, not both")
    if has_certificate != has_key:
        raise t.error("client_key" if has_certificate else "client_certificate",
                      "required with " + ("client_certificate" if has_certificate
                                          else "client_key"))


def _check_refresh_token_file(t: Table, path: str) -> None:
    """The bridge must read the refresh token and, as the provider rotates it (Microsoft
    does on every refresh), replace it: a new file in the same directory, renamed over it.
    Checked now, so a wrong owner stops the start rather than the first refresh."""
    user = _user()
    directory = os.path.dirname(path)
    fix = (f"chown {user} {directory}, or keep the file in the state directory "
           f"{STATE_DIRECTORY}/ owned by {user}")
    if not os.path.isdir(directory):
        raise t.error("refresh_token_file", f"the directory {directory} does not exist: "
                                            f"create it, owned by {user}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise t.error("refresh_token_file", f"the directory {directory} is not writable by "
                                            f"{user}, who must replace the rotated refresh "
                                            f"token there: {fix}")
    login = f"run smtpbridge oauth-login as {user} (or with --owner {user})"
    if not os.path.exists(path):
        raise t.error("refresh_token_file", f"{path} does not exist: {login}")
    if os.path.isdir(path) or not os.access(path, os.R_OK):
        raise t.error("refresh_token_file", f"{path} is not a file {user} can read: "
                                            f"chown {user} {path}, or {login}")


def _user() -> str:
    """The name of the user the bridge runs as (the one file checks are made for)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _proxy(t: Table, token_url: str) -> tuple[str | None, str]:
    """The proxy for the token endpoint: the ``proxy`` key ("" for none), else HTTPS_PROXY
    (or https_proxy) unless NO_PROXY names the endpoint's host; and where it came from."""
    configured = t.string("proxy", None)
    if configured is not None:
        if configured and (problem := proxy_problem(configured, "in the config")) is not None:
            raise t.error("proxy", problem)
        return configured or None, "proxy" if configured else ""
    proxy, source = environment_proxy(token_url)
    if proxy is not None and (problem := proxy_problem(proxy)) is not None:
        raise t.error("proxy", f"{source} from the environment: {problem}")
    return proxy, source


def environment_proxy(url: str) -> tuple[str | None, str]:
    """HTTPS_PROXY (or https_proxy) for a request to C{url}, unless NO_PROXY exempts its
    host; and the variable's name."""
    proxy = getproxies_environment().get("https")
    if not proxy or proxy_bypass(urlsplit(url).hostname or ""):
        return None, ""
    name = "https_proxy" if os.environ.get("https_proxy") == proxy else "HTTPS_PROXY"
    return proxy, name


def proxy_problem(url: str, written: str | None = None) -> str | None:
    """Why C{url} is no usable HTTP proxy (the reason never shows the URL), or None.  A
    URL C{written} where others may read it ("in the config", "on the command line")
    must carry no credentials: those go in the environment only."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "must be http://HOST:PORT (the port is not a number from 1 to 65535)"
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        return "must be http://HOST:PORT (an HTTP proxy that tunnels HTTPS by CONNECT)"
    if not port:
        return "must be http://HOST:PORT: give the port, e.g. http://proxy:3128"
    if written and parts.username is not None:
        return (f"credentials are not written {written}, where others may read them; give "
                "the proxy URL with them in the HTTPS_PROXY environment variable instead")
    return None


def proxy_name(url: str) -> str:
    """HOST:PORT of a proxy URL: what logs and replies say, never its credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"


def describe(settings: OAuthSettings) -> list[tuple[str, str]]:
    """What ``smtpbridge check`` shows of an account's checked settings: (step, detail)."""
    if settings.grant == "token_file":
        return [("grant", f"token_file {settings.token_file}")]
    if settings.client_certificate is not None:
        client = f"with a client assertion (certificate {settings.client_certificate})"
    elif settings.client_secret is not None:
        client = "with a client secret"
    else:
        client = "as a public client (no client secret)"
    steps = [("grant", f"{settings.grant} {client}")]
    if settings.refresh_token_file is not None:
        steps.append(("token", f"refresh token file {settings.refresh_token_file} readable, "
                               f"its directory writable by {_user()}"))
    if settings.proxy is not None:
        origin = "the config" if settings.proxy_source == "proxy" else settings.proxy_source
        steps.append(("proxy", f"token endpoint through {proxy_name(settings.proxy)} "
                               f"(from {origin})"))
    return steps
