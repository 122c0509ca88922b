"""The Falcon app: `create_app(source)`, as in falcon's tutorial.

`source` answers health(), models_status() (and models_status_json(), the same
already encoded), request_preload(refresh), gpu_info() and mps_allocation(); the
supervisor's Arbiter is the real one and tests may pass their own. Every answer,
errors included, is JSON (`/metrics` aside: Prometheus text).
"""

import hmac
import logging

import falcon
import msgspec

from gpu_orchestrator.http import resources
from gpu_orchestrator.http.metrics import Metrics, RequestCounter

log = logging.getLogger("http")


class BearerToken:
    """With a token configured, POST routes need `Authorization: Bearer <token>`; GETs stay open."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    def process_request(self, req, resp):
        if req.method != "POST":
            return
        given = (req.get_header("Authorization") or "").encode()
        if not hmac.compare_digest(given, self.expected):
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


def serialize_error(req, resp, exception: falcon.HTTPError) -> None:
    resp.content_type = falcon.MEDIA_JSON
    body = {"error": exception.title, "status": int(exception.status_code)}
    if exception.description:
        body["description"] = exception.description
    resp.data = msgspec.json.encode(body)


def unexpected_error(req, resp, exc, params):
    if isinstance(exc, falcon.HTTPError):
        raise exc
    log.exception("request failed: %s %s", req.method, req.path)
    raise falcon.HTTPInternalServerError(description=f"{type(exc).__name__}: {exc}")


def unavailable(req, resp, exc, params):
    raise falcon.HTTPServiceUnavailable(description="the orchestrator is shutting down")


def create_app(source, token: str | None = None, unavailable_errors: tuple = ()) -> falcon.App:
    """`unavailable_errors`: exception types the source raises when it cannot answer (503)."""
    requests = RequestCounter()
    app = falcon.App(middleware=[requests, JsonOptions(), *([BearerToken(token)] if token else [])])
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, unexpected_error)
    for error in unavailable_errors:
        app.add_error_handler(error, unavailable)
    app.add_route("/health", resources.Health(source))
    app.add_route("/ready", resources.Ready(source))
    app.add_route("/models/status", resources.ModelsStatus(source))
    app.add_route("/models/preload", resources.ModelsPreload(source))
    app.add_route("/gpu/info", resources.GpuInfo(source))
    app.add_route("/mps/allocation", resources.MpsAllocation(source))
    app.add_route("/metrics", Metrics(source, requests))
    return app
