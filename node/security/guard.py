"""Safe exposure: who may reach which endpoint, as pure decisions plus one aiohttp middleware.

- A node bound to loopback is private. Bound to anything else it is *exposed*, and then every
  non-loopback caller must sign its requests (``require_pairing``, default true when exposed)
  unless the operator sets ``allow_anonymous_lan = true``.
- The ``Host`` header must name this node (loopback names, any IP literal, the bind host,
  ``allowed_hosts``), which defeats DNS rebinding: a web page on ``evil.example`` whose name
  was re-pointed at this node still sends ``Host: evil.example``.
- Loopback-only paths (admin endpoints) answer loopback callers that are not browsers, or a
  signed request from a paired device whose pairing is marked ``admin``.
- A node bound to one LAN/VPN address also listens on loopback (``node.runtime``), so its
  owner's CLI and local apps keep a trusted way in; a local program that connects to the LAN
  address instead is treated like any LAN caller (its source address is not loopback).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..common.clock import unix_ms
from ..common.errors import AuthenticationError, DVAIError, PayloadTooLargeError, PermissionDeniedError
from ..config import NodeConfig, SecurityConfig
from ..constants import LINK_PEER_HEADER, MESH_PATH
from ..hub.keys import KEY_PREFIX, ApiKeyStore, bearer_token, check_scopes
from .signing import (
    ANONYMOUS,
    ANONYMOUS_ATTRIBUTION,
    SIGNED_HEADERS,
    Attribution,
    NonceCache,
    verify_signed_request,
)

if TYPE_CHECKING:  # the store is passed in; security never loads the pairing package
    from ..pairing.store import PairingStore

_HAS_REQUEST_KEY = hasattr(web, "RequestKey")  # aiohttp >= 3.13; plain strings before
ATTRIBUTION_KEY: Any = web.RequestKey("dvai_attribution", Attribution) if _HAS_REQUEST_KEY else "dvai_attribution"
"""``request[ATTRIBUTION_KEY]``: the request's ``Attribution`` (set by the middleware)."""
LOOPBACK_KEY: Any = web.RequestKey("dvai_loopback", bool) if _HAS_REQUEST_KEY else "dvai_loopback"
"""``request[LOOPBACK_KEY]``: True when the caller is a trusted loopback caller."""

DEFAULT_PUBLIC_PATHS = frozenset({f"{MESH_PATH}/health", "/health", "/healthz", f"{MESH_PATH}/handshake"})
"""Reachable unsigned from the LAN even when pairing is required: you cannot pair without them."""

_HOSTNAME_RE = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_LOOPBACK_NAMES = frozenset({"localhost"})

SIGNATURE_REQUIRED_MESSAGE = (
    "this node requires signed requests or an API key from non-loopback callers. From a program on "
    "the node's own machine, use its loopback URL (http://127.0.0.1:<port>/v1, printed at start and written to "
    "endpoint.json in the state dir; the node listens there too). From another device, sign the "
    "requests with a pairing key (pair first: `dvai-node pair <this node's URL>` run on that device, "
    "then sign as docs/security.md shows), or send an API key its operator made (`dvai-node keys "
    "create`, then `Authorization: Bearer dvai-…`), or let unsigned LAN callers in with "
    "`allow_anonymous_lan = true` under [security] on this node"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RemoteAddr = Callable[[web.Request], str | None]


# --------------------------------------------------------------------------
# Pure decisions


def is_loopback(remote_addr: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything unparsable."""
    if not remote_addr:
        return False
    text = remote_addr.strip().removeprefix("[").removesuffix("]").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_exposed(bind_host: str) -> bool:
    """A bind host other than a loopback address or ``localhost`` exposes the node."""
    host = bind_host.strip().lower()
    return not (host in _LOOPBACK_NAMES or is_loopback(host))


def pairing_required(security: SecurityConfig, bind_host: str) -> bool:
    """Explicit ``require_pairing`` wins; otherwise required when exposed, unless anonymous LAN is allowed."""
    if security.require_pairing is not None:
        return security.require_pairing
    return is_exposed(bind_host) and not security.allow_anonymous_lan


def exposure_warnings(config: NodeConfig) -> list[str]:
    """What the node must log loudly at start about its exposure (empty when safe)."""
    warnings = []
    if is_exposed(config.http_bind_host) and not pairing_required(config.security, config.http_bind_host):
        warnings.append(
            f"SECURITY: the API is bound to {config.http_bind_host} and unsigned requests from the network "
            "are allowed (allow_anonymous_lan / require_pairing = false): anyone on the LAN can use "
            "this node's models"
        )
    if "*" in config.security.allowed_hosts:
        warnings.append("SECURITY: allowed_hosts contains '*': DNS-rebinding protection is off")
    return warnings


def split_host(host_header: str) -> str | None:
    """The host part of a ``Host`` header, lower case, without port or brackets; None if malformed."""
    text = host_header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return host if _is_ip(host) else None
    if text.count(":") > 1:
        return text if _is_ip(text) else None  # bare IPv6 literal (not RFC-conformant, but harmless)
    host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()):
        return None
    host = host.rstrip(".")
    return host if _HOSTNAME_RE.fullmatch(host) else None


def host_allowed(host_header: str | None, *, bind_host: str, allowed_hosts: Collection[str]) -> bool:
    """Is the ``Host`` header one of ours? IP literals always are: rebinding needs a name."""
    if host_header is None:
        return True  # no browser omits Host, so a missing one is not a rebinding attempt
    host = split_host(host_header)
    if host is None:
        return False
    if host in _LOOPBACK_NAMES or _is_ip(host):
        return True
    if host == bind_host.strip().lower().rstrip("."):
        return True
    for entry in allowed_hosts:
        pattern = entry.strip().lower().rstrip(".")
        if pattern == "*" or host == (split_host(pattern) or pattern):
            return True
        if pattern.startswith(".") and (host.endswith(pattern) or host == pattern[1:]):
            return True
    return False


def is_browser_request(headers: Mapping[str, str]) -> bool:
    """Browsers mark fetches with ``Origin`` / ``Sec-Fetch-Site``; the CLI and SDKs do not."""
    site = headers.get("Sec-Fetch-Site")
    return "Origin" in headers or (site is not None and site != "none")


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    require_pairing: bool
    trust_loopback: bool = True
    public_paths: frozenset[str] = DEFAULT_PUBLIC_PATHS
    loopback_only_paths: frozenset[str] = frozenset()
    """exact route paths, or prefixes when they end with ``/``."""

    @classmethod
    def from_config(cls, config: NodeConfig, *, public_paths: Collection[str] = DEFAULT_PUBLIC_PATHS,
                    loopback_only_paths: Collection[str] = ()) -> AccessPolicy:
        return cls(require_pairing=pairing_required(config.security, config.http_bind_host),
                   trust_loopback=config.security.trust_loopback,
                   public_paths=frozenset(public_paths), loopback_only_paths=frozenset(loopback_only_paths))


def decide_access(
    policy: AccessPolicy,
    *,
    paths: Collection[str],
    loopback: bool,
    attribution: Attribution,
    admin_peer: bool,
    browser: bool,
) -> None:
    """Raise the error a caller gets for ``paths`` (route pattern and raw path), or return."""
    if _matches(policy.loopback_only_paths, paths):
        if loopback and not browser:
            return
        if attribution.signed and admin_peer:
            return
        if loopback:
            raise PermissionDeniedError("admin endpoints refuse browser requests (Origin/Sec-Fetch-Site "
                                        "present)", code="browser_request_refused")
        raise PermissionDeniedError("this endpoint answers only loopback callers and paired admin devices",
                                    code="loopback_only")
    if paths and all(_matches(policy.public_paths, (path,)) for path in paths):
        return
    if policy.require_pairing and not loopback and not attribution.authenticated:
        raise AuthenticationError(SIGNATURE_REQUIRED_MESSAGE, code="signature_required")


# --------------------------------------------------------------------------
# The middleware


def make_security_middleware(
    config: NodeConfig,
    store: PairingStore,
    nonces: NonceCache,
    *,
    now_ms: Callable[[], int] = unix_ms,
    public_paths: Collection[str] = DEFAULT_PUBLIC_PATHS,
    loopback_only_paths: Collection[str] = (),
    remote_addr: RemoteAddr = lambda request: request.remote,
    render_errors: bool = True,
    api_keys: ApiKeyStore | None = None,
) -> Middleware:
    """Host allowlist → signature check → access policy, then ``request[ATTRIBUTION_KEY]``.

    Signed requests have their body read (once, cached by aiohttp, within the app's
    ``client_max_size``). Errors are rendered as OpenAI-shaped JSON unless
    ``render_errors=False``, in which case the ``DVAIError`` propagates to an outer middleware.
    """
    policy = AccessPolicy.from_config(config, public_paths=public_paths,
                                      loopback_only_paths=loopback_only_paths)
    bind_host = config.http_bind_host
    allowed_hosts = tuple(config.security.allowed_hosts)

    async def admit(request: web.Request) -> None:
        if not host_allowed(request.headers.get("Host"), bind_host=bind_host, allowed_hosts=allowed_hosts):
            raise PermissionDeniedError("the Host header does not name this node (DNS rebinding?); add it "
                                        "to security.allowed_hosts if it is yours", code="host_not_allowed")
        loopback = policy.trust_loopback and is_loopback(remote_addr(request))
        attribution = ANONYMOUS_ATTRIBUTION
        if any(name in request.headers for name in SIGNED_HEADERS):
            body = await _read_body(request)
            attribution = verify_signed_request(request.headers, request.method, request.raw_path, body,
                                                lookup_key=store.credential_for, nonces=nonces,
                                                now_ms=now_ms(), device_known=store.knows_device)
        elif api_keys is not None and (token := bearer_token(request.headers.get("Authorization"))):
            attribution = authenticate_key(api_keys, token, request.path)
        link_peer = arrived_over_link(request)
        if link_peer is not None:
            # Replayed from a WebRTC link (node/transport/inbound.py): never loopback, and only
            # the device at the other end of the link may sign, whatever the path.
            loopback = False
            if not attribution.signed or attribution.peer_device_id != link_peer:
                raise AuthenticationError("requests over a link must be signed by the linked device",
                                          code="signature_required")
        pairing = store.credential_for(attribution.peer_device_id, attribution.app_id) \
            if attribution.signed else None
        decide_access(policy, paths=_route_paths(request), loopback=loopback, attribution=attribution,
                      admin_peer=pairing is not None and pairing.admin,
                      browser=is_browser_request(request.headers))
        request[ATTRIBUTION_KEY] = attribution
        request[LOOPBACK_KEY] = loopback

    @web.middleware
    async def security_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            await admit(request)
        except DVAIError as exc:
            if not render_errors:
                raise
            return web.json_response(exc.to_body(), status=exc.status, headers=exc.headers)
        return await handler(request)

    return security_middleware


def arrived_over_link(request: web.Request) -> str | None:
    """The linked peer's device id when ``request`` was replayed from a WebRTC link, else None.

    Link requests arrive on the node's internal Unix-socket site only (its socket sits in a
    0700 directory of the node's own user); there, and only there, ``X-DVAI-Link-Peer`` is
    set by the replayer. On a TCP site the header means nothing."""
    transport = request.transport
    if transport is None or not isinstance(transport.get_extra_info("sockname"), str):
        return None
    return request.headers.get(LINK_PEER_HEADER, "")


def attribution_of(request: web.Request) -> Attribution:
    value = request.get(ATTRIBUTION_KEY)
    return value if isinstance(value, Attribution) else ANONYMOUS_ATTRIBUTION


def authenticate_key(keys: ApiKeyStore, token: str, path: str) -> Attribution:
    """The attribution of a request made with API key ``token``. Tokens that are not ours
    (an SDK's placeholder such as ``unused``) are ignored, as if absent; one of ours that is
    wrong, expired, revoked or out of scope for ``path`` is refused."""
    if not token.startswith(KEY_PREFIX + "-"):
        return ANONYMOUS_ATTRIBUTION
    key = keys.authenticate(token)
    check_scopes(key, path=path)
    return Attribution(peer_device_id=f"apikey:{key.id}", app_id=key.app_id, api_key=key.id)


def audit_peer_of(request: web.Request) -> str:
    """The audit log's ``peer_device_id``: the signing device, ``apikey:<id>``, ``self`` (loopback)
    or ``anonymous``."""
    attribution = attribution_of(request)
    if attribution.signed or attribution.api_key is not None:
        return attribution.peer_device_id
    return "self" if request.get(LOOPBACK_KEY) else ANONYMOUS


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLargeError(f"request body is larger than {request.client_max_size} bytes") from exc


def _route_paths(request: web.Request) -> tuple[str, ...]:
    """The matched route's pattern (``/v1/dvai/pairings/{id}``) and the raw path, so a policy
    cannot be dodged with an alternative spelling of a path the router still matches."""
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else None
    return (canonical, request.path) if canonical else (request.path,)


def _matches(patterns: Collection[str], paths: Collection[str]) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in patterns for path in paths)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
