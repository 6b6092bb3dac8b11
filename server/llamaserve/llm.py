"""Offline generation over the same engine the server runs, for scripts and benchmarks.

    from llamaserve import LLM, SamplingParams
    llm = LLM()  # the embedded default model; or LLM(model="path/or.gguf", dtype="bfloat16")
    for result in llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8)):
        print(result.text)

All prompts are submitted at once so they batch; results come back in prompt order.
"""

import itertools
from dataclasses import dataclass, field

from llamaserve.config import EngineConfig
from llamaserve.engine.core import EngineCore
from llamaserve.engine.messages import AddRequest, RequestOutput
from llamaserve.sampling_params import SamplingParams
from llamaserve.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    prompt: str | None = None
    text: str = ""  # generated text, up to (not including) a matched stop string
    token_ids: list[int] = field(default_factory=list)  # generated token ids
    finish_reason: str | None = None  # "stop" | "length"
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class _Pending:
    """A request being generated: its result so far, its detokenizer and stop strings."""

    def __init__(self, result: GenerationResult, params: SamplingParams, tokenizer: Tokenizer):
        self.result = result
        self.detokenizer = IncrementalDetokenizer(tokenizer, result.prompt_token_ids, params.skip_special_tokens)
        self.stop = StopStringMatcher(params.stop)

    def add(self, output: RequestOutput) -> bool:
        """Take one step's output; True when the result is complete (a stop string counts)."""
        self.result.token_ids += output.new_token_ids
        self.result.num_cached_tokens = output.num_cached_tokens
        self.result.text += self.stop.push(self.detokenizer.push(output.new_token_ids))
        if self.stop.stopped:
            self.result.finish_reason = "stop"
            return True
        if output.finished:
            self.result.text += self.stop.flush()
            self.result.finish_reason = output.finish_reason
        return output.finished


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "float32", **options):
        """Options are the engine's configuration fields (see llamaserve.config), e.g. kv_cache_gib,
        max_num_seqs, max_num_batched_tokens, max_model_len, block_size, enable_prefix_caching."""
        self.config = EngineConfig.from_options(model=model, dtype=dtype, **options)
        self.engine = EngineCore(self.config)
        self.tokenizer = Tokenizer.from_checkpoint(self.engine.runner.checkpoint, self.config.model.chat_template)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (also on leaving a `with LLM(...)` block)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Prompts are strings or lists of token ids; one SamplingParams for all, or one each."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams for all prompts or one per prompt")
        pending: dict[str, _Pending] = {}
        results = []
        for prompt, p in zip(prompts, params):
            p = p or SamplingParams()
            text = prompt if isinstance(prompt, str) else None
            ids = self.tokenizer.encode(prompt) if text is not None else list(prompt)
            result = GenerationResult(prompt_token_ids=ids, prompt=text)
            request_id = str(next(self._ids))
            error = self.engine.add_request(AddRequest(request_id, ids, p))
            if error is not None:
                self.engine.abort(list(pending))
                raise ValueError(f"prompt {len(results)}: {error.error}")
            pending[request_id] = _Pending(result, p, self.tokenizer)
            results.append(result)
        while pending:
            if not self.engine.has_work():  # only structured-output requests whose grammars compile
                self.engine.wait_for_grammars()
            for output in self.engine.step():
                if output.error_type == "invalid_request":  # a constraint that cannot be used
                    prompt_index = results.index(pending[output.request_id].result)
                    self.engine.abort([i for i in pending if i != output.request_id])
                    raise ValueError(f"prompt {prompt_index}: {output.error}")
                state = pending.get(output.request_id)
                if state is not None and state.add(output):
                    del pending[output.request_id]
                    if not output.finished:  # a stop string ended it: the engine may stop too
                        self.engine.abort([output.request_id])
        return results

    def chat(
        self, conversations: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        """One conversation (a list of messages) or several; each is rendered with the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.tokenizer.apply_chat_template(c) for c in conversations], sampling_params)
