"""The Falcon app: `create_app(source)`, as in falcon's tutorial.

`source` answers health(), models_status() (and models_status_json(), the same
already encoded, and models_summary(), the same without its clients),
request_preload(refresh), gpu_info() and mps_allocation(); the supervisor's
Answers is the real one and tests may pass their own. Every answer, errors
included, is JSON (`/metrics` aside: Prometheus text).
"""

import hmac
import ipaddress
import logging
import secrets
import urllib.parse

import falcon
import msgspec

from gpu_orchestrator.http import resources
from gpu_orchestrator.http.metrics import Metrics, RequestCounter
from gpu_orchestrator.http.page import Page
from gpu_orchestrator.loaders.logs import kv

log = logging.getLogger("http")

KNOWN_HOSTS = 16  # accepted Host header values remembered by SameOrigin


def error_body(title: str, status: int, description: str | None = None, **extra) -> bytes:
    """Every error's JSON, whether Falcon or waitress answers it."""
    body = {"error": title, "status": status}
    if description:
        body["description"] = description
    return msgspec.json.encode({**body, **extra})


def is_loopback(name: str) -> bool:
    name = name.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class SameOrigin:
    """Web pages and DNS rebinding cannot use the API through an operator's browser.

    A browser sends `Origin` with every cross-site POST (and with cross-site fetches), and no page of
    ours exists to send it legitimately: any Origin other than this server's own is refused (403).
    A page on a rebinding name (evil.example resolving to 127.0.0.1) is same-origin to the browser,
    but its requests carry `Host: evil.example`: bound to loopback, only loopback names and the bound
    address are answered (421). Bound to a network address, the names clients use cannot be known,
    so Host is not checked there; that is why such a bind without a token is warned about.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host.strip("[]").lower(), port
        self.check_host = is_loopback(host)
        # Host values already found to be ours: clients send one or two, and parsing one costs more
        # than the rest of this check. Only accepted values are kept, and at most KNOWN_HOSTS of them
        # (threads adding at once may pass that by a few), so a flood of made-up names cannot grow it.
        self.known_hosts: set[str] = set()

    def served_name(self, name: str | None) -> bool:
        return name is not None and (name == self.host or is_loopback(name))

    def process_request(self, req, resp):
        host = req.env.get("HTTP_HOST")
        if self.check_host and host is not None and host not in self.known_hosts:
            if not self.served_name(split_url("//" + host)[1]):
                raise falcon.HTTPError(
                    falcon.HTTP_421, title="Misdirected Request",
                    description=f"this server answers for {self.host}:{self.port} and localhost, not for Host {host!r}")
            if len(self.known_hosts) < KNOWN_HOSTS:
                self.known_hosts.add(host)
        origin = req.env.get("HTTP_ORIGIN")
        if origin is not None and not self.own_origin(origin):
            raise falcon.HTTPForbidden(
                description=f"cross-site request refused (Origin {origin!r}); call the API directly, e.g. with curl")

    def own_origin(self, origin: str) -> bool:
        scheme, name, port = split_url(origin)
        return scheme == "http" and self.served_name(name) and (port or 80) == self.port


def split_url(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host name, port); a malformed one (bad brackets or port) names no host."""
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme, parts.hostname, parts.port
    except ValueError:
        return "", None, None


class BearerToken:
    """With a token configured, POST routes need `Authorization: Bearer <token>`; GETs stay open."""

    def __init__(self, token: str):
        self.expected = token.encode()

    def process_request(self, req, resp):
        if req.method != "POST":
            return
        scheme, _, given = (req.get_header("Authorization") or "").strip().partition(" ")
        # The scheme is case-insensitive (RFC 9110 11.1): "bearer" is as good as "Bearer".
        if not (hmac.compare_digest(given.strip().encode(), self.expected) and scheme.lower() == "bearer"):
            raise falcon.HTTPUnauthorized(
                title="Unauthorized",
                description="POST routes need 'Authorization: Bearer <GPU_ORCHESTRATOR_TOKEN>'",
                challenges=["Bearer"])


class JsonOptions:
    """Falcon answers OPTIONS itself with an empty body; say the same thing in JSON."""

    def process_response(self, req, resp, resource, req_succeeded):
        if req.method == "OPTIONS" and not resp.data and resp.status_code == 200:
            resp.content_type = falcon.MEDIA_JSON
            allowed = [m.strip() for m in (resp.get_header("Allow") or "").split(",") if m.strip()]
            resp.data = msgspec.json.encode({"allow": allowed})


class InternalError(falcon.HTTPInternalServerError):
    """A failure's details (paths, state) stay in the log; the client gets the id to find them."""

    def __init__(self, request_id: str):
        super().__init__(description=f"the request failed; the orchestrator's log has the details under "
                                     f"request_id={request_id}", headers={"X-Request-Id": request_id})
        self.request_id = request_id


def serialize_error(req, resp, exception: falcon.HTTPError) -> None:
    resp.content_type = falcon.MEDIA_JSON
    extra = {"request_id": exception.request_id} if isinstance(exception, InternalError) else {}
    # Falcon's own 404 and 405 carry no description; every error says what was asked, as README promises.
    description = exception.description or f"{req.method} {req.path}: {exception.title}"
    resp.data = error_body(exception.title, int(exception.status_code), description, **extra)


def unexpected_error(req, resp, exc, params):
    if isinstance(exc, falcon.HTTPError):
        raise exc
    request_id = secrets.token_hex(6)
    log.error(kv("request failed", request_id=request_id, method=req.method, path=req.path), exc_info=exc)
    raise InternalError(request_id)


def unavailable(req, resp, exc, params):
    raise falcon.HTTPServiceUnavailable(description="the orchestrator is shutting down")


def create_app(source, token: str | None = None, unavailable_errors: tuple = (),
               served: tuple[str, int] | None = None, warnings: tuple[str, ...] = (),
               scrape_only: bool = False, requests: RequestCounter | None = None) -> falcon.App:
    """`unavailable_errors`: exception types the source raises when it cannot answer (503).
    `served`: the (address, port) listened on, for the Host and Origin checks; None (an app not
    behind a socket of ours, as in falcon.testing) checks neither. `warnings`: shown in /health.
    `scrape_only`: only GET /metrics, /health and /ready (the metrics listener); every other route
    is 404 there. `requests`: a counter shared with another app, so one /metrics counts both."""
    requests = requests or RequestCounter()
    guards = [SameOrigin(*served)] if served is not None else []
    app = falcon.App(middleware=[requests, JsonOptions(), *guards, *([BearerToken(token)] if token else [])])
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, unexpected_error)
    for error in unavailable_errors:
        app.add_error_handler(error, unavailable)
    add_route(app, "/health", resources.Health(source, warnings))
    add_route(app, "/ready", resources.Ready(source))
    add_route(app, "/metrics", Metrics(source, requests))
    if scrape_only:
        return app
    add_route(app, "/", Page(token_required=bool(token)))
    add_route(app, "/models/status", resources.ModelsStatus(source))
    add_route(app, "/models/preload", resources.ModelsPreload(source))
    add_route(app, "/gpu/info", resources.GpuInfo(source))
    add_route(app, "/mps/allocation", resources.MpsAllocation(source))
    add_route(app, "/clients/{client}/environment", resources.ClientEnvironment(source))
    return app


def add_route(app: falcon.App, path: str, resource) -> None:
    """HEAD wherever GET answers (RFC 9110 9.3.2; `curl -I`): Falcon sends no body for it and
    keeps the Content-Length the GET would have."""
    if hasattr(resource, "on_get") and not hasattr(resource, "on_head"):
        resource.on_head = resource.on_get
    app.add_route(path, resource)


def url_host(host: str) -> str:
    """The host as a URL spells it: an IPv6 address needs its brackets ([::1])."""
    host = host.strip("[]")
    return f"[{host}]" if ":" in host else host


def base_url(host: str, port: str | int) -> str:
    """http://127.0.0.1:8014, http://[::1]:8014."""
    return f"http://{url_host(host)}:{port}"
