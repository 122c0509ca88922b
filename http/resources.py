"""One class per route. Each reads state from the source; none runs a subprocess or NVML. A source
that cannot get an answer in time raises TimeoutError: POST /models/preload answers 503 with its words."""

import falcon
import msgspec

MAX_BODY = 64 * 1024


class PreloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    refresh: bool = False


_preload_decoder = msgspec.json.Decoder(PreloadRequest)


def respond(resp: falcon.Response, body: dict | bytes, status: int = 200) -> None:
    """JSON, never cached by a proxy: every answer is the state now. Bytes are sent as they are."""
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.cache_control = ["no-store"]
    resp.data = body if isinstance(body, bytes) else msgspec.json.encode(body)


class EncodedOnce:
    """An answer's JSON, encoded once for as long as the source hands back that very object: a
    source answers an unchanged state with the same dict, so its bytes are sent again as they are.
    The last answer is kept referenced, so its identity cannot be taken by a new one."""

    def __init__(self, shape=lambda answer: answer):
        self.shape = shape  # what is sent, made from the answer
        self.last: tuple = (None, b"")

    def __call__(self, answer) -> bytes:
        last = self.last  # one read: another thread may replace it meanwhile, never change it
        if last[0] is not answer:
            last = self.last = (answer, msgspec.json.encode(self.shape(answer)))
        return last[1]


def read_body(req: falcon.Request) -> bytes:
    """The request body, refused with 413 past MAX_BODY whether or not it declared a length, and
    with 415 unless it is JSON: a web page can send a text/plain POST without asking first."""
    if req.content_length is not None and req.content_length > MAX_BODY:
        raise falcon.HTTPContentTooLarge(description=f"request body exceeds {MAX_BODY} bytes")
    media_type = (req.content_type or "").partition(";")[0].strip().lower()
    if req.content_length and media_type != falcon.MEDIA_JSON:
        raise falcon.HTTPUnsupportedMediaType(
            description=f"send the body as Content-Type: application/json (got {req.content_type or 'none'!r})")
    raw = req.bounded_stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise falcon.HTTPContentTooLarge(description=f"request body exceeds {MAX_BODY} bytes")
    return raw


def decode_preload(raw: bytes) -> PreloadRequest:
    if not raw.strip():
        return PreloadRequest()
    try:
        return _preload_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise falcon.HTTPBadRequest(title="Invalid request body",
                                    description=f"{exc}; expected {{\"refresh\": true|false}}") from None
    except msgspec.DecodeError as exc:
        raise falcon.HTTPBadRequest(title="Malformed JSON", description=str(exc)) from None


class Health:
    def __init__(self, source, warnings: tuple[str, ...] = ()):
        self.source = source
        self.warnings = list(warnings)

    def on_get(self, req, resp):
        health = self.source.health()  # its warnings (telemetry) after those of the start (the bind)
        respond(resp, {**health, "warnings": self.warnings + health.get("warnings", [])})


class Ready:
    """For probes: 200 only when every model of every client is ready."""

    def __init__(self, source):
        self.source = source
        self.encoded = EncodedOnce(lambda summary: {
            "ready": summary["all_ready"], "in_progress": summary["in_progress"],
            "summary": summary["summary"], "errors": summary["errors"]})

    def on_get(self, req, resp):
        summary = self.source.models_summary()
        respond(resp, self.encoded(summary), 200 if summary["all_ready"] else 503)


class ModelsStatus:
    def __init__(self, source):
        self.source = source

    def on_get(self, req, resp):
        respond(resp, self.source.models_status_json())


class ModelsPreload:
    def __init__(self, source):
        self.source = source

    def on_post(self, req, resp):
        request = decode_preload(read_body(req))
        try:
            code, body = self.source.request_preload(request.refresh)
        except TimeoutError as exc:  # the source's supervision loop did not answer in time
            raise falcon.HTTPServiceUnavailable(description=str(exc)) from None
        respond(resp, body, code)


class GpuInfo:
    """Encoded per request: its sample's age moves with the clock, so each answer is a new dict."""

    def __init__(self, source):
        self.source = source

    def on_get(self, req, resp):
        respond(resp, self.source.gpu_info())


class MpsAllocation:
    def __init__(self, source):
        self.source = source

    def on_get(self, req, resp):
        respond(resp, self.source.mps_allocation())


class ClientEnvironment:
    """What `gpu-orchestrator env` and `exec` hand a client's service: its loader's limits."""

    def __init__(self, source):
        self.source = source

    def on_get(self, req, resp, client):
        try:
            respond(resp, self.source.client_environment(client))
        except LookupError as exc:
            raise falcon.HTTPNotFound(description=str(exc)) from None
