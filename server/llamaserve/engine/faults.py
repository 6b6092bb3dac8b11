"""Which faults the engine survives, and faults on demand for the tests that prove it.

A fault in one request's preparation fails that request; a fault in a step's forward pass or sampling
fails the step's requests; the engine serves on after both. What cannot be confined ends the engine:
a dead tensor-parallel worker, ranks that fell out of step, a broken device.
"""

import threading

import torch

from llamaserve.config import FaultConfig

MAX_MESSAGE_CHARS = 500  # of a fault's description in the error the client gets


class FatalEngineError(RuntimeError):
    """A fault that no request owns: the engine cannot run another step."""


class InjectedFault(RuntimeError):
    """Raised on purpose by a FaultInjector."""


def is_fatal(error: BaseException) -> bool:
    if isinstance(error, FatalEngineError | torch.AcceleratorError):  # AcceleratorError: a broken CUDA context
        return True
    return isinstance(error, RuntimeError) and "CUDA error" in str(error)  # torch builds without AcceleratorError


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


class FaultInjector:
    """Test-only: faults for requests whose prompt holds the configured marker token (see FaultConfig)."""

    def __init__(self, config: FaultConfig):
        self.kind = config.kind
        self.marker = config.marker

    def _marked(self, prompt_token_ids: list[int]) -> bool:
        return self.marker in prompt_token_ids

    def before_request(self, request_id: str, prompt_token_ids: list[int]) -> None:
        """While one request's inputs are prepared."""
        if self.kind == "request" and self._marked(prompt_token_ids):
            raise InjectedFault(f"injected fault in request {request_id}")

    def before_forward(self, prompts: list[list[int]]) -> None:
        """Before a step's forward pass, given the prompts of the step's requests."""
        if self.kind not in ("step", "hang") or not any(map(self._marked, prompts)):
            return
        if self.kind == "hang":
            threading.Event().wait()  # forever: a wedged engine for the watchdog to find
        raise torch.OutOfMemoryError("injected out-of-memory in the forward pass")
