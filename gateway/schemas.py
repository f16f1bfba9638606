"""Request validation for the OpenAI endpoints.

Bodies are decoded once into plain dicts (which are forwarded, unknown fields and all)
and checked against msgspec structs that describe the fields the gateway relies on.
Any problem becomes a 400 `ApiError` naming the offending parameter.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from gateway.errors import ApiError, invalid_request
from providers.base import Endpoint

T = TypeVar("T")
PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0, le=2)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
ChoiceCount = Annotated[int, Meta(ge=1, le=128)]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]


class StreamOptions(Struct):
    include_usage: bool = False


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Struct):
    type: Literal["function"]
    function: FunctionDefinition


class ChatRequest(Struct):
    model: ModelName
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    n: ChoiceCount = 1
    temperature: Temperature | None = None
    top_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    tools: list[Tool] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    seed: int | None = None
    user: str | None = None


class CompletionRequest(Struct):
    model: ModelName
    prompt: str | list[Any]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = 16
    n: ChoiceCount = 1
    temperature: Temperature | None = None
    top_p: Probability | None = None
    echo: bool = False
    seed: int | None = None
    user: str | None = None


class EmbeddingRequest(Struct):
    model: ModelName
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


_SCHEMAS: dict[str, type[Struct]] = {
    "chat.completions": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


#: Default of `server.max_json_depth`: arrays and objects nested deeper are refused.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_OPENING = frozenset(b"[{")


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in `raw` nest deeper than `limit` (unterminated ones count).

    Cheap where it matters: a body with no more than `limit` brackets in all cannot nest
    deeper, so only a body with many is scanned: strings removed, then the brackets walked
    in one pass that stops as soon as the limit is passed.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw))
    depth = 0
    for byte in brackets:
        if byte in _OPENING:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def decode_body(
    endpoint: Endpoint, raw: bytes, max_depth: int = MAX_JSON_DEPTH
) -> tuple[dict[str, Any], Any]:
    """Decode and validate a request body: returns the forwardable dict and its typed view."""
    body = decode_object(raw, max_depth)
    typed = validate(body, _SCHEMAS[endpoint])
    _check_inputs(endpoint, typed)
    return body, typed


def decode_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 saying what is wrong with it.

    Arrays and objects nested deeper than `max_depth` are refused before decoding (a decoder
    recursing a thousand levels would fail with RecursionError)."""
    if json_depth_exceeds(raw, max_depth):
        raise invalid_request(
            f"The JSON body of your request nests arrays and objects too deeply: at most "
            f"{max_depth} levels are allowed.",
            code="json_too_deep",
        )
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid_request(
            "We could not parse the JSON body of your request. "
            f"(HINT: This likely means you aren't using your HTTP library correctly. {exc})"
        ) from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    return body


def validate(body: dict[str, Any], schema: type[T]) -> T:
    """`body` checked against a msgspec struct; a 400 naming the offending parameter."""
    try:
        return msgspec.convert(body, schema)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from None


def _validation_error(text: str) -> ApiError:
    match = _PATH.search(text)
    param = match.group("path") if match else None
    message = _PATH.sub("", text)
    missing = _MISSING.match(message)
    if missing:  # name the missing field itself
        field = missing.group("field")
        param = f"{param}.{field}" if param else field
        return invalid_request(f"Missing required parameter: '{param}'.", param=param)
    if param:
        message = f"Invalid value for '{param}': {message}"
    return invalid_request(message, param=param, code="invalid_value" if param else None)


def _check_inputs(endpoint: Endpoint, typed: Any) -> None:
    if endpoint == "completions":
        _check_text_or_tokens(typed.prompt, "prompt", allow_empty_string=True)
    elif endpoint == "embeddings":
        _check_text_or_tokens(typed.input, "input", allow_empty_string=False)
    if endpoint != "embeddings" and typed.stream_options is not None and not typed.stream:
        raise invalid_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


def _check_text_or_tokens(value: Any, param: str, *, allow_empty_string: bool) -> None:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        if not value and not allow_empty_string:
            raise invalid_request(f"'{param}' must not be empty.", param=param)
        return
    if not value:
        raise invalid_request(f"'{param}' must not be an empty list.", param=param)
    if len(value) > 2048:
        raise invalid_request(f"'{param}' may hold at most 2048 items.", param=param)
    first = value[0]
    kind = str if isinstance(first, str) else int if _is_token(first) else list
    for item in value:
        ok = (
            isinstance(item, str)
            if kind is str
            else _is_token(item)
            if kind is int
            else isinstance(item, list) and bool(item) and all(_is_token(t) for t in item)
        )
        if not ok or (kind is str and not item and not allow_empty_string):
            raise invalid_request(
                f"Invalid value for '{param}': expected a string, a list of strings, "
                "a list of token ids or a list of token-id lists.",
                param=param,
                code="invalid_value",
            )


def _is_token(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**31
