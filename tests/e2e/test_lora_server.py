"""LoRA adapters on a real server: `--merge-lora` folds one in at load; `--lora-modules` and the runtime
routes serve several beside the base, chosen by `model`, each giving what PEFT gives; an adapter that
cannot be served is refused with the reason, and the server serves on."""

import subprocess

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM as ReferenceLlama

from tests.e2e.checks import assert_error_shape
from tests.e2e.conftest import Server, free_port, server_command
from tests.integration.test_lora import make_adapter, rewrite_config

PROMPT = [5, 17, 99, 3, 250, 42, 8, 77]


def peft_tokens(base, adapter) -> list[int]:
    model = ReferenceLlama.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        return model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(PROMPT):].tolist()


def served_tokens(server: Server, model: str | None = None) -> list[str]:
    """The greedy completion's tokens, as logprobs name them (each token's own text)."""
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    if model is not None:
        body["model"] = model
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["tokens"]


def texts(server: Server, tokens: list[int]) -> list[str]:
    return [httpx.post(f"{server.url}/detokenize", json={"tokens": [t]}).json()["prompt"] for t in tokens]


def test_a_merged_adapter_serves_what_merge_and_unload_generates(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=3)
    server = Server(tmp_path, "--model", str(tiny_model), "--merge-lora", str(adapter))
    try:
        assert served_tokens(server) == texts(server, peft_tokens(tiny_model, adapter))
    finally:
        server.stop()


def test_adapters_beside_the_base_chosen_by_model_and_loaded_at_runtime(tmp_path, tiny_model):
    a = make_adapter(tiny_model, tmp_path / "a", seed=4)
    b = make_adapter(tiny_model, tmp_path / "b", seed=5, r=8, lora_alpha=32, target_modules=["q_proj", "o_proj"])
    bad = make_adapter(tiny_model, tmp_path / "bad")
    rewrite_config(bad, use_dora=True)
    server = Server(tmp_path, "--model", str(tiny_model), "--lora-modules", f"a={a}", "--max-lora-rank", "8")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        [base_card, a_card] = client.models.list().data
        assert a_card.id == "a" and a_card.parent == base_card.id and base_card.parent is None
        assert served_tokens(server, "a") == texts(server, peft_tokens(tiny_model, a))
        assert served_tokens(server) == texts(server, peft_tokens(tiny_model, None))
        completion = client.completions.create(model="a", prompt=PROMPT, max_tokens=2, temperature=0)
        assert completion.model == "a"

        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(b)})
        assert loaded.status_code == 200 and "added" in loaded.text
        assert served_tokens(server, "b") == texts(server, peft_tokens(tiny_model, b))
        for body, param, reason in [({"lora_name": "c", "lora_path": str(bad)}, "lora_path", "DoRA"),
                                    ({"lora_name": "c", "lora_path": str(tmp_path / "nowhere")}, "lora_path",
                                     "adapter_config.json"),
                                    ({"lora_name": "a", "lora_path": str(b)}, "lora_name", "already")]:
            assert reason in assert_error_shape(http.post("/v1/load_lora_adapter", json=body), 400, param)["message"]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
        assert_error_shape(http.post("/v1/unload_lora_adapter", json={"lora_name": "b"}), 404, "lora_name")
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="b", prompt=PROMPT, max_tokens=2)
        assert served_tokens(server, "a") == texts(server, peft_tokens(tiny_model, a))  # serving on
    finally:
        server.stop()


def test_an_adapter_that_cannot_be_served_stops_the_server_at_startup(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    rewrite_config(adapter, use_dora=True)
    command = server_command(free_port(), "--model", str(tiny_model), "--merge-lora", str(adapter))
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0 and "DoRA (use_dora) is not supported" in result.stdout + result.stderr
