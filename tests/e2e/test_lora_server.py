"""`llamaserve serve --merge-lora`: a PEFT adapter folded in at load serves what merge_and_unload gives;
an adapter that cannot be served stops the server at startup, saying why."""

import subprocess

import httpx
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM as ReferenceLlama

from tests.e2e.conftest import Server, free_port, server_command
from tests.integration.test_lora import make_adapter, rewrite_config

PROMPT = [5, 17, 99, 3, 250, 42, 8, 77]


def test_a_merged_adapter_serves_what_merge_and_unload_generates(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=3)
    merged = PeftModel.from_pretrained(ReferenceLlama.from_pretrained(tiny_model), adapter).merge_and_unload()
    with torch.no_grad():
        expected = merged.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(PROMPT):].tolist()
    server = Server(tmp_path, "--model", str(tiny_model), "--merge-lora", str(adapter))
    try:
        body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        # The tokens as logprobs name them: each one's own text, as /detokenize gives it.
        expected_texts = [httpx.post(f"{server.url}/detokenize", json={"tokens": [t]}).json()["prompt"]
                          for t in expected]
        assert response["choices"][0]["logprobs"]["tokens"] == expected_texts
    finally:
        server.stop()


def test_an_adapter_that_cannot_be_served_stops_the_server_at_startup(tmp_path, tiny_model):
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    rewrite_config(adapter, use_dora=True)
    command = server_command(free_port(), "--model", str(tiny_model), "--merge-lora", str(adapter))
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0 and "DoRA (use_dora) is not supported" in result.stdout + result.stderr
