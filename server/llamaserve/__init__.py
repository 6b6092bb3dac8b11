"""llamaserve: an inference server for Llama-family models.

`LLM` and `SamplingParams` are importable from here; `LLM` (which imports torch) loads lazily so
that the API process, which never touches torch, can import the package.
"""

from llamaserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from llamaserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'llamaserve' has no attribute {name!r}")
