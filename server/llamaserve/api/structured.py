"""A request's output constraint: OpenAI's response_format, or vLLM's structured_outputs (and its older
guided_* fields), turned into the one StructuredOutput the engine compiles.

What the API can check without a grammar engine (shapes, one constraint at most) is checked here; the
engine compiles the grammar and refuses one it cannot (an impossible schema, a bad regex) before the
request runs, which the API still answers with a 400.
"""

import json
from typing import Any

from llamaserve.api.errors import bad_request
from llamaserve.api.protocol import SamplingRequest
from llamaserve.sampling_params import StructuredOutput

ANY_JSON_OBJECT = {"type": "object"}


def structured_output(request: SamplingRequest) -> StructuredOutput | None:
    """The request's constraint; None for free text. At most one may be given."""
    found = [(param, c) for param, c in _constraints(request) if c is not None]
    if len(found) > 1:
        raise bad_request(f"give one output constraint, not several ({', '.join(p for p, _ in found)})",
                          found[1][0])
    return found[0][1] if found else None


def _constraints(request: SamplingRequest) -> list[tuple[str, StructuredOutput | None]]:
    """(param, constraint or None) for every field that may carry one."""
    found = [("response_format", _response_format(request))]
    so = request.structured_outputs
    if so is not None:
        found += [
            ("structured_outputs.json", _json(so.json_, "structured_outputs.json")),
            ("structured_outputs.regex", _text("regex", so.regex, "structured_outputs.regex")),
            ("structured_outputs.choice", _choice(so.choice)),
            ("structured_outputs.grammar", _text("grammar", so.grammar, "structured_outputs.grammar")),
            ("structured_outputs.json_object", _json(ANY_JSON_OBJECT, "") if so.json_object else None),
            ("structured_outputs.structural_tag",
             _text("structural_tag", so.structural_tag, "structured_outputs.structural_tag")),
        ]
    return found + [
        ("guided_json", _json(request.guided_json, "guided_json")),
        ("guided_regex", _text("regex", request.guided_regex, "guided_regex")),
        ("guided_choice", _choice(request.guided_choice)),
        ("guided_grammar", _text("grammar", request.guided_grammar, "guided_grammar")),
    ]


def _response_format(request: SamplingRequest) -> StructuredOutput | None:
    format = request.response_format
    if format is None or format.type == "text":
        return None
    if format.type == "json_object":
        return _json(ANY_JSON_OBJECT, "response_format")
    if format.json_schema is None:
        raise bad_request("response_format of type json_schema needs a 'json_schema' object",
                          "response_format.json_schema")
    return _json(format.json_schema.schema_ or ANY_JSON_OBJECT, "response_format.json_schema.schema")


def _json(schema: dict[str, Any] | str | None, param: str) -> StructuredOutput | None:
    if schema is None:
        return None
    if isinstance(schema, str):  # vLLM takes the schema as JSON text too
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise bad_request(f"the JSON schema is not valid JSON: {e}", param) from None
        if not isinstance(schema, dict):
            raise bad_request("a JSON schema must be a JSON object", param)
    # Compact, key order kept: properties are generated in the order the schema gives them.
    return StructuredOutput("json", json.dumps(schema, ensure_ascii=False, separators=(",", ":")))


def _text(kind: str, spec: str | None, param: str) -> StructuredOutput | None:
    if spec is None:
        return None
    if not spec.strip():
        raise bad_request(f"the {kind} must not be empty", param)
    return StructuredOutput(kind, spec)


def _choice(choices: list[str] | None) -> StructuredOutput | None:
    return None if choices is None else StructuredOutput("choice", json.dumps(choices, ensure_ascii=False))
