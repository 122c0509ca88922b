"""The Falcon app through falcon.testing, with a source that records what it was asked."""

import falcon.testing
import msgspec
import pytest

from gpu_orchestrator.http.app import create_app
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

    def request_preload(self, refresh):
        self.preloads.append(refresh)
        return 202, {"started": True}

    def gpu_info(self):
        return {"available": False, "gpus": [], "mps_enabled": False, "mps": {"enabled": False}}

    def mps_allocation(self):
        return {"mps_resource_allocation": {"agent_allocations": {}, "system_summary": {}}}


class Closed(Exception):
    pass


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
    result = client.simulate_post("/models/preload", body=body)
    assert result.status_code == 400
    assert words in result.json["error"] + result.json.get("description", "")
    assert source.preloads == []


def test_oversized_body_gets_413(client, source):
    result = client.simulate_post("/models/preload", body=b'{"refresh": true' + b" " * MAX_BODY + b"}")
    assert result.status_code == 413
    assert result.json["status"] == 413
    assert source.preloads == []


def test_unknown_route_and_wrong_method_are_json(client):
    missing = client.simulate_get("/nope")
    assert missing.status_code == 404 and missing.json["status"] == 404
    wrong = client.simulate_delete("/models/status")
    assert wrong.status_code == 405 and wrong.headers["content-type"].startswith("application/json")


def test_token_guards_posts_only(source):
    client = falcon.testing.TestClient(create_app(source, token="s3cret"))
    assert client.simulate_post("/models/preload", body=b"{}").status_code == 401
    bad = client.simulate_post("/models/preload", body=b"{}", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and "Bearer" in bad.headers["www-authenticate"]
    assert source.preloads == []
    good = client.simulate_post("/models/preload", body=b"{}", headers={"Authorization": "Bearer s3cret"})
    assert good.status_code == 202
    assert client.simulate_get("/models/status").status_code == 200


def test_source_failures_become_json_errors():
    class Broken(RecordingSource):
        def models_status_json(self):
            raise Closed()

        def gpu_info(self):
            raise RuntimeError("boom")

    client = falcon.testing.TestClient(create_app(Broken(), unavailable_errors=(Closed,)))
    assert client.simulate_get("/models/status").status_code == 503
    failed = client.simulate_get("/gpu/info")
    assert failed.status_code == 500 and "boom" in failed.json["description"]
