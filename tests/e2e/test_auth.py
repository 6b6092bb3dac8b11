"""API keys and CORS on a real server process: keys from the flag, the file and the environment; 401 in
OpenAI's shape (TGI's on its routes), counted; the probes open; /metrics behind a key only when asked."""

import httpx
import openai
import pytest

from tests.e2e.checks import assert_error_shape
from tests.e2e.conftest import Server
from tests.e2e.scrape import scrape

ORIGIN = "https://chat.example.com"
PROTECTED = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"messages": []}),
             ("POST", "/v1/chat", {"messages": []}), ("POST", "/v1/completions", {"prompt": "Hi"}),
             ("POST", "/tokenize", {"prompt": "Hi"}), ("POST", "/detokenize", {"tokens": [1]}),
             ("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/nonexistent"}),
             ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"}), ("GET", "/v1/no-such-route", None)]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("auth")
    (tmp / "keys").write_text("# one key a line\nkey-from-file\n\n")
    server = Server(tmp, "--model", str(tiny_model), "--api-key", "key-one", "--api-key", "key-two",
                    "--api-key-file", str(tmp / "keys"), "--protect-metrics", "--allowed-origins", ORIGIN,
                    env={"LLAMASERVE_API_KEY": "key-from-env"})
    yield server
    server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("method,path,body", PROTECTED)
def test_every_api_route_needs_a_key(keyed, method, path, body):
    for headers in ({}, bearer("wrong"), {"Authorization": "key-one"}, {"Authorization": "Basic key-one"},
                    bearer("key-one" + "x"), bearer("key-on")):
        response = httpx.request(method, f"{keyed.url}{path}", json=body, headers=headers, timeout=30)
        error = assert_error_shape(response, 401)
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert response.headers["www-authenticate"] == "Bearer"


def test_keys_from_the_flag_the_file_and_the_environment_are_all_accepted(keyed):
    for key in ("key-one", "key-two", "key-from-file", "key-from-env"):
        client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=key, max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=2)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert httpx.post(f"{keyed.url}/tokenize", json={"prompt": "Hi"}, headers=bearer(key)).status_code == 200

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0).models.list()


def test_probes_stay_open_and_metrics_need_a_key_when_protected(keyed):
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    assert httpx.get(f"{keyed.url}/ready").status_code == 200
    assert_error_shape(httpx.get(f"{keyed.url}/metrics"), 401)
    before = scrape(httpx.Client(base_url=keyed.url, headers=bearer("key-one")))
    httpx.get(f"{keyed.url}/v1/models")
    after = scrape(httpx.Client(base_url=keyed.url, headers=bearer("key-one")))
    labels = {"reason": "unauthorized"}
    assert after.value("llamaserve_requests_rejected_total", **labels) == \
        before.value("llamaserve_requests_rejected_total", **labels) + 1


TGI_ROUTES = [("POST", "/generate", {"inputs": "Hi"}), ("POST", "/generate_stream", {"inputs": "Hi"}),
              ("POST", "/", {"inputs": "Hi"}), ("GET", "/info", None)]


@pytest.mark.parametrize("method,path,body", TGI_ROUTES)
def test_tgi_routes_need_a_key_and_refuse_in_tgi_shape(keyed, method, path, body):
    """Denied by default, as any new route. The 401 is in TGI's shape, as every error on those routes: TGI's
    clients read `error` as the message (text-generation's parse_error, huggingface_hub's), and would show
    OpenAI's object as a dict's repr."""
    response = httpx.request(method, f"{keyed.url}{path}", json=body, headers=bearer("wrong"), timeout=30)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"error": response.json()["error"], "error_type": "invalid_api_key"}
    assert httpx.request(method, f"{keyed.url}{path}", json=body, headers=bearer("key-two"), timeout=60).is_success


def test_huggingface_hub_sends_its_api_key_to_the_tgi_routes(keyed):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import UnknownError

    answer = InferenceClient(base_url=keyed.url, api_key="key-one").text_generation("Hi", max_new_tokens=2,
                                                                                   details=True)
    assert answer.details.generated_tokens >= 1
    # An error_type it does not know becomes its UnknownError, with the server's message.
    with pytest.raises(UnknownError, match="API key"):
        InferenceClient(base_url=keyed.url, api_key="nope").text_generation("Hi", max_new_tokens=2)


def test_cors_answers_the_allowed_origin_only(keyed, http):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx.options(f"{keyed.url}/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{keyed.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    served = httpx.get(f"{keyed.url}/v1/models", headers={"Origin": ORIGIN, **bearer("key-one")})
    assert served.headers["access-control-allow-origin"] == ORIGIN
    # without --allowed-origins (the shared server) there is no CORS at all, and no key is needed
    plain = http.get("/v1/models", headers={"Origin": ORIGIN})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    assert http.options("/v1/chat/completions", headers=preflight).status_code == 405


def test_a_key_with_whitespace_or_an_empty_key_file_is_refused_at_start(tmp_path):
    from llamaserve.config import load_config

    with pytest.raises(ValueError, match="API key"):
        load_config(None, api_keys=["has space"])
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_config(None, api_key_file=str(tmp_path / "empty"))
