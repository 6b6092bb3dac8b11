"""`llamaserve playground`: a Gradio chat app for any llamaserve server, over its OpenAI API.

Answers stream in as they are generated; the conversation is sent whole each turn (the server's prefix
cache makes the repeated history cheap), with the system prompt first. The advanced options set the
sampling: temperature, top-p, max new tokens and repetition penalty (a vLLM extension llamaserve honours,
sent only when not 1). The stop button cancels the request: the stream's connection closes, which makes the
server abort the generation at once and free its KV cache.

An optional extra (`pip install 'llamaserve[playground]'`): the server image stays lean, and this module is
the only one that imports Gradio. It talks HTTP only, so it may run anywhere that reaches the URL.
"""

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    repetition_penalty: float = 1.0


class ChatClient:
    """Streaming chat completions from one server."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.model = model or self.served_model()

    def served_model(self) -> str:
        response = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]

    async def stream(self, messages: list[dict], sampling: Sampling) -> AsyncIterator[str]:
        """The answer's text as it arrives. Leaving early (a cancelled task) closes the connection, and so
        aborts the generation in the server."""
        body = {"model": self.model, "messages": messages, "stream": True, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}
        if sampling.repetition_penalty != 1.0:
            body["repetition_penalty"] = sampling.repetition_penalty
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=30)) as client:
            async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                                     headers=self.headers) as response:
                if response.status_code != 200:
                    raise ServerError(_message(await response.aread()))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ServerError(_message(data.encode()))
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content"):
                            yield choice["delta"]["content"]


class ServerError(RuntimeError):
    """The server refused or failed the request; the message is its own."""


def _message(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]


def _text(content) -> str:
    """A history message's content as text: Gradio gives a string, or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    return "".join(_text(part) for part in content or ())


def conversation(system_prompt: str, history: list[dict], message: str) -> list[dict]:
    """The messages sent for one turn: the system prompt (when not blank), the history, the new message."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    messages += [{"role": m["role"], "content": _text(m["content"])} for m in history
                 if m.get("role") in ("user", "assistant")]
    return messages + [{"role": "user", "content": message}]


def build_app(client: ChatClient):
    """The Gradio app (a Blocks) chatting with `client`'s server."""
    import gradio as gr

    async def respond(message: str, history: list[dict], system_prompt: str, temperature: float, top_p: float,
                      max_tokens: float, repetition_penalty: float):
        sampling = Sampling(temperature, top_p, int(max_tokens), repetition_penalty)
        answer = ""
        try:
            async for text in client.stream(conversation(system_prompt, history, message), sampling):
                answer += text
                yield answer
        except (ServerError, httpx.HTTPError) as e:
            raise gr.Error(f"the server answered: {e}") from None

    advanced = [
        gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=2),
        gr.Slider(0, 2, value=Sampling.temperature, step=0.05, label="Temperature"),
        gr.Slider(0.05, 1, value=Sampling.top_p, step=0.05, label="Top-p"),
        gr.Slider(1, 2048, value=Sampling.max_tokens, step=1, label="Max new tokens"),
        gr.Slider(0.5, 2, value=Sampling.repetition_penalty, step=0.05, label="Repetition penalty"),
    ]
    return gr.ChatInterface(
        respond,
        chatbot=gr.Chatbot(label=client.model, height=480),
        textbox=gr.Textbox(placeholder=f"Message {client.model}", show_label=False, submit_btn=True, stop_btn=True,
                           elem_id="message"),
        additional_inputs=advanced,
        additional_inputs_accordion=gr.Accordion("Advanced options", open=False),
        title="llamaserve playground",
        description=f"Chatting with **{client.model}** at {client.url}",
        analytics_enabled=False,
        autofocus=True,
    )


def serve_playground(url: str, api_key: str | None, model: str | None, host: str, port: int) -> None:
    """Starts the app and blocks until interrupted."""
    import gradio as gr

    app = build_app(ChatClient(url, api_key, model))
    # System fonts: the default theme's web fonts would be fetched from the internet by each browser.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue().launch(server_name=host, server_port=port, theme=theme, footer_links=[], quiet=False)
