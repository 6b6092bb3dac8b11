"""The small endpoints: models, tokenize/detokenize, health, readiness, docs; the HTTP connection."""

import http.client
import time
from urllib.parse import urlsplit

from tests.e2e.checks import assert_error_shape


def test_models_lists_the_served_name(client):
    [card] = client.models.list().data
    assert card.id == "SmolLM2-135M-Instruct" and card.object == "model" and card.owned_by == "llamaserve"


def test_tokenize_detokenize_round_trip(http):
    text = "Hello, world! 你好，世界 😀"
    tokens = http.post("/tokenize", json={"prompt": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 2048
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": text}

    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    rendered = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert "Hi" in rendered and rendered.endswith("assistant\n")  # the template's generation prompt
    assert_error_shape(http.post("/tokenize", json={}), 400, "prompt")


def test_health_and_readiness(http):
    health = http.get("/health")
    assert health.status_code == 200
    assert set(health.json()) == {"status", "num_running", "num_waiting", "kv_cache_usage"}
    assert health.json()["status"] == "ok"
    assert http.get("/ready").status_code == 200


def test_openapi_docs(http):
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"} <= set(paths)


def test_an_idle_connection_outlives_uvicorns_five_second_default(server):
    """A pooled client (or a balancer) reuses a connection after a pause: the server must not be the one
    closing it then, or the request sent as it closes is reset (uvicorn closes idle ones after 5 s)."""
    url = urlsplit(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        sockets = []
        for pause in (0, 6):
            time.sleep(pause)
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
            sockets.append(connection.sock)
        assert sockets[0] is sockets[1] is not None  # the second request went on the first one's connection
    finally:
        connection.close()
