"""The Falcon app through falcon.testing, with a source that records what it was asked."""

import logging
import threading

import falcon.testing
import msgspec
import pytest

from gpu_orchestrator.http.app import create_app
from gpu_orchestrator.http.metrics import RequestCounter
from gpu_orchestrator.http.resources import MAX_BODY


class RecordingSource:
    def __init__(self):
        self.preloads = []
        self.all_ready = False

    def health(self):
        return {"status": "ok"}

    def models_status(self):
        return {"in_progress": False, "all_ready": self.all_ready,
                "summary": {"total": 1, "done": int(self.all_ready), "failed": 0}, "errors": []}

    def models_status_json(self):
        return msgspec.json.encode(self.models_status())

    def models_summary(self):
        return self.models_status()

    def request_preload(self, refresh):
        self.preloads.append(refresh)
        return 202, {"started": True}

    def gpu_info(self):
        return {"available": False, "gpus": [], "mps_enabled": False, "mps": {"enabled": False}}

    def mps_allocation(self):
        return {"mps_resource_allocation": {"agent_allocations": {}, "system_summary": {}}}


class Closed(Exception):
    pass


JSON = {"Content-Type": "application/json"}


@pytest.fixture
def source():
    return RecordingSource()


@pytest.fixture
def client(source):
    return falcon.testing.TestClient(create_app(source))


def test_routes_answer_json(client):
    for path in ("/health", "/models/status", "/gpu/info", "/mps/allocation"):
        result = client.simulate_get(path)
        assert result.status_code == 200, path
        assert result.headers["content-type"].startswith("application/json")
        assert isinstance(result.json, dict)


def test_ready_follows_all_ready(client, source):
    assert client.simulate_get("/ready").status_code == 503
    source.all_ready = True
    assert client.simulate_get("/ready").json["ready"] is True


def test_an_answer_handed_back_again_is_sent_as_the_bytes_encoded_for_it(client, source):
    """A source answers an unchanged state with the same object: /ready encodes it once; a new
    object, whatever it says, is encoded anew."""
    from gpu_orchestrator.http.resources import EncodedOnce

    shaped = []
    encoded = EncodedOnce(lambda answer: shaped.append(answer) or {"n": answer["n"]})
    same = {"n": 1}
    assert encoded(same) == b'{"n":1}' and encoded(same) is encoded(same) and len(shaped) == 1
    assert encoded({"n": 2}) == b'{"n":2}' and len(shaped) == 2
    status = source.models_summary()
    source.models_summary = lambda: status
    first = client.simulate_get("/ready")
    assert first.status_code == 503 and client.simulate_get("/ready").content == first.content
    source.models_summary = lambda: {**status, "all_ready": True}
    assert client.simulate_get("/ready").json["ready"] is True


@pytest.mark.parametrize("body,refresh", [(b'{"refresh": true}', True), (b'{"refresh": false}', False),
                                          (b"{}", False), (b"", False)])
def test_preload_bodies(client, source, body, refresh):
    result = client.simulate_post("/models/preload", body=body, headers={"Content-Type": "application/json"})
    assert result.status_code == 202
    assert source.preloads == [refresh]


@pytest.mark.parametrize("body,words", [
    (b'{"refresh": tru', "Malformed JSON"),
    (b'{"refresh": "yes"}', "Expected `bool`, got `str` - at `$.refresh`"),
    (b'{"refresh": true, "force": 1}', "unknown field `force`"),
    (b"[true]", "Expected `object`, got `array`"),
    (b"\xff\xfe", "Malformed JSON"),
])
def test_bad_preload_bodies_get_400_and_change_nothing(client, source, body, words):
    result = client.simulate_post("/models/preload", body=body, headers=JSON)
    assert result.status_code == 400
    assert words in result.json["error"] + result.json.get("description", "")
    assert source.preloads == []


def test_oversized_body_gets_413(client, source):
    result = client.simulate_post("/models/preload", body=b'{"refresh": true' + b" " * MAX_BODY + b"}", headers=JSON)
    assert result.status_code == 413
    assert result.json["status"] == 413
    assert source.preloads == []


def test_unknown_route_and_wrong_method_are_json(client):
    missing = client.simulate_get("/nope")
    assert missing.status_code == 404 and missing.json["status"] == 404
    assert missing.json["description"] == "GET /nope: 404 Not Found"  # every error has all three keys
    wrong = client.simulate_delete("/models/status")
    assert wrong.json["description"] == "DELETE /models/status: 405 Method Not Allowed"
    assert wrong.status_code == 405 and wrong.headers["content-type"].startswith("application/json")


def test_token_guards_posts_only(source):
    client = falcon.testing.TestClient(create_app(source, token="s3cret"))
    assert client.simulate_post("/models/preload", body=b"{}", headers=JSON).status_code == 401
    bad = client.simulate_post("/models/preload", body=b"{}", headers={"Authorization": "Bearer wrong", **JSON})
    assert bad.status_code == 401 and "Bearer" in bad.headers["www-authenticate"]
    assert source.preloads == []
    for refused in ("s3cret", "Bearer", "Bearer s3cre", "Basic s3cret", "Bearers3cret", "Bearer s3cret x"):
        assert client.simulate_post("/models/preload", body=b"{}",
                                    headers={"Authorization": refused, **JSON}).status_code == 401, refused
    assert source.preloads == []
    good = client.simulate_post("/models/preload", body=b"{}", headers={"Authorization": "Bearer s3cret", **JSON})
    assert good.status_code == 202
    # The scheme is case-insensitive (RFC 9110 11.1).
    assert client.simulate_post("/models/preload", body=b"{}",
                                headers={"Authorization": "bearer s3cret", **JSON}).status_code == 202
    assert client.simulate_get("/models/status").status_code == 200


def test_source_failures_become_json_errors_that_keep_their_details_in_the_log(caplog):
    class Broken(RecordingSource):
        def models_status_json(self):
            raise Closed()

        def gpu_info(self):
            raise RuntimeError("boom at /srv/models/secret-path")

    client = falcon.testing.TestClient(create_app(Broken(), unavailable_errors=(Closed,)))
    assert client.simulate_get("/models/status").status_code == 503
    with caplog.at_level(logging.ERROR, logger="http"):
        failed = client.simulate_get("/gpu/info")
    assert failed.status_code == 500
    assert "boom" not in failed.text and "secret-path" not in failed.text and "RuntimeError" not in failed.text
    request_id = failed.json["request_id"]
    assert failed.headers["x-request-id"] == request_id and f"request_id={request_id}" in failed.json["description"]
    [logged] = caplog.records
    assert f"request_id={request_id}" in logged.getMessage() and "path=/gpu/info" in logged.getMessage()
    assert "boom at /srv/models/secret-path" in caplog.text  # the traceback, for the operator


def test_posts_need_a_json_body_or_none(client, source):
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        refused = client.simulate_post("/models/preload", body=b'{"refresh": true}',
                                       headers={"Content-Type": kind} if kind else {})
        assert refused.status_code == 415 and "Content-Type: application/json" in refused.json["description"], kind
    assert source.preloads == []
    assert client.simulate_post("/models/preload", headers={"Content-Type": "text/plain"}).status_code == 202
    charset = {"Content-Type": "Application/JSON; charset=utf-8"}
    assert client.simulate_post("/models/preload", body=b'{"refresh": true}', headers=charset).status_code == 202
    assert source.preloads == [False, True]


SERVED = ("127.0.0.1", 8014)


@pytest.mark.parametrize("host,code", [("127.0.0.1:8014", 202), ("localhost:8014", 202), ("[::1]:8014", 202),
                                       ("127.0.0.1", 202), ("evil.example:8014", 421), ("127.0.0.1.evil.example", 421),
                                       ("[::1", 421)])
def test_a_host_that_is_not_the_served_address_is_refused(source, host, code):
    client = falcon.testing.TestClient(create_app(source, served=SERVED))
    result = client.simulate_post("/models/preload", headers={"Host": host, **JSON}, body=b"{}")
    assert result.status_code == code, result.text
    if code == 421:
        assert result.json["status"] == 421 and host in result.json["description"]
        assert client.simulate_get("/models/status", headers={"Host": host}).status_code == 421
    assert source.preloads == ([False] if code == 202 else [])


@pytest.mark.parametrize("origin,code", [("http://127.0.0.1:8014", 202), ("http://localhost:8014", 202),
                                         ("http://evil.example", 403), ("null", 403), ("https://127.0.0.1:8014", 403),
                                         ("http://127.0.0.1:9999", 403), ("http://127.0.0.1:bad", 403)])
def test_a_foreign_origin_is_refused(source, origin, code):
    client = falcon.testing.TestClient(create_app(source, served=SERVED))
    headers = {"Host": "127.0.0.1:8014", "Origin": origin, "Content-Type": "text/plain"}
    result = client.simulate_post("/models/preload", headers=headers)
    assert result.status_code == code, result.text
    assert source.preloads == ([False] if code == 202 else [])


def test_bound_to_a_network_address_host_is_not_checked_but_origin_is(source):
    client = falcon.testing.TestClient(create_app(source, served=("0.0.0.0", 8014), token="t"))
    assert client.simulate_get("/health", headers={"Host": "gpu-host-7.example:8014"}).status_code == 200
    foreign = {"Host": "gpu-host-7.example:8014", "Origin": "http://evil.example", "Authorization": "Bearer t"}
    assert client.simulate_post("/models/preload", headers=foreign).status_code == 403


def test_health_carries_the_warnings_it_is_given(source):
    assert falcon.testing.TestClient(create_app(source)).simulate_get("/health").json["warnings"] == []
    warned = falcon.testing.TestClient(create_app(source, warnings=("listening on 0.0.0.0 without a token",)))
    assert warned.simulate_get("/health").json == {"status": "ok", "warnings": ["listening on 0.0.0.0 without a token"]}


@pytest.mark.parametrize("token,shown", [(None, "no"), ("s3cret", "yes")])
def test_the_page_is_self_contained_and_shows_a_token_field_when_one_is_needed(source, token, shown):
    page = falcon.testing.TestClient(create_app(source, token=token)).simulate_get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'data-token-required="{shown}"' in page.text and "s3cret" not in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "http://" not in page.text.replace("http://127.0.0.1", "") and "https://" not in page.text


def test_a_refused_host_stays_refused_after_accepted_ones_are_remembered(source):
    client = falcon.testing.TestClient(create_app(source, served=SERVED))
    for name in [f"127.0.0.{n}:8014" for n in range(1, 40)]:  # more than are remembered
        assert client.simulate_get("/health", headers={"Host": name}).status_code == 200
    for _ in range(2):
        assert client.simulate_get("/health", headers={"Host": "evil.example:8014"}).status_code == 421
        assert client.simulate_get("/health", headers={"Host": "127.0.0.1:8014"}).status_code == 200


def test_requests_counted_from_many_threads_are_all_counted(source):
    requests = RequestCounter()
    client = falcon.testing.TestClient(create_app(source, requests=requests))

    def ask(n):
        for _ in range(n):
            assert client.simulate_get("/ready").status_code == 503
            assert client.simulate_get("/nowhere").status_code == 404

    threads = [threading.Thread(target=ask, args=(250,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert requests.snapshot() == {("/ready", "GET", "503"): 2000, ("unmatched", "GET", "404"): 2000}


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/", "/models/status", "/gpu/info",
                                  "/mps/allocation", "/clients/a/environment"])
def test_head_answers_wherever_get_does_without_a_body(client, path):
    """RFC 9110 wants HEAD wherever GET works; `curl -I` got 405."""
    get, head = client.simulate_get(path), client.simulate_head(path)
    assert head.status_code == get.status_code and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # wsgiref's validator, in falcon.testing
def test_request_labels_come_from_fixed_sets_whatever_the_request_says(source):
    """waitress takes any upper-case token as a method: each one made a series of its own, so 20,000 of
    them made /metrics 21 MB, unauthenticated. Methods the app routes keep their name, any other is
    "other"; the route is the template (or "unmatched"), never the path the client sent."""
    requests = RequestCounter()
    client = falcon.testing.TestClient(create_app(source, requests=requests))
    for i in range(200):
        client.simulate_request(f"FLOOD{i}", "/health")
        client.simulate_get(f"/nowhere/{i}")
        client.simulate_get(f"/clients/client{i}/environment")
    for method in ("GET", "HEAD", "POST", "OPTIONS"):
        client.simulate_request(method, "/ready")
    counts = requests.snapshot()
    assert {method for _, method, _ in counts} == {"GET", "HEAD", "POST", "OPTIONS", "other"}
    assert {route for route, _, _ in counts} == {"/health", "unmatched", "/clients/{client}/environment", "/ready"}
    assert sum(count for (route, method, _), count in counts.items() if method == "other") == 200
    assert len(counts) < 12  # each key is one gpu_orchestrator_http_requests_total series
