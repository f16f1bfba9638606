"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`),
served by translation to Chat Completions through the relay's one pipeline.

The key comes in `x-api-key` (as Anthropic's SDK sends it) or as a bearer token; any
`anthropic-version` is accepted. `system`, content blocks (`text`, `image`, `tool_use`,
`tool_result`), `tools`, `tool_choice`, `stop_sequences` and `max_tokens` become a chat
body; the chat completion comes back as a `message`, or as Anthropic's event stream
(`message_start`, `ping`, `content_block_start`/`_delta`/`_stop`, `message_delta`,
`message_stop`). Usage is the ledger row's, split as Anthropic reports it: `input_tokens`
excludes `cache_read_input_tokens` (and `cache_creation_input_tokens`, when the upstream
reports cache writes). Errors are Anthropic's shape,
`{"type": "error", "error": {"type", "message"}}`, so its SDK raises its own exceptions.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from litestar import Request, Response, post
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler
from msgspec import Meta, Struct

from billing.usage import Usage
from gateway.dialects import bearer_of, sse_event, translated
from gateway.errors import (
    ApiError,
    body_too_large,
    invalid_request,
    model_not_found,
    server_error,
)
from gateway.relay import authenticate, new_request_id, record_usage
from gateway.relay_routes import relay_route
from gateway.routing import UnknownModel
from gateway.schemas import ChatRequest, ModelName, Probability, decode_object, validate
from gateway.steps import Admitted, Authenticated, Bill, Outcome, Routed, Step

if TYPE_CHECKING:
    from gateway.lifespan import Gateway

log = logging.getLogger("maas.messages")
_encode = msgspec.json.Encoder().encode

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class MessageParam(Struct):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_-]+$")]
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class CountTokensRequest(Struct):
    """The fields of a `count_tokens` request."""

    model: ModelName
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(Struct):
    """The fields of a Messages request the gateway reads (others are accepted)."""

    model: ModelName
    max_tokens: Annotated[int, Meta(ge=1)]
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


def anthropic_error_response(
    error: ApiError, request_id: str, limits: dict[str, str] | None = None
) -> Response[Any]:
    """An error in Anthropic's shape, with the rate-limit headers given."""
    status = error.status_code
    kind = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    body = {
        "type": "error",
        "error": {"type": kind, "message": error.message},
        "request_id": request_id,
    }
    return Response(
        _encode(body),
        status_code=status,
        media_type="application/json",
        headers={
            "request-id": request_id,
            "x-request-id": request_id,
            **(limits or {}),
            **error.headers,
        },
    )


class MessagesDialect:
    """One Messages request's translation (see `gateway.dialects.Dialect`)."""

    name = "messages"

    def __init__(self) -> None:
        self.request: MessagesRequest | None = None
        self._matched: Any = None  # the stop sequence the upstream says it matched

    def authorization(self, request: Request[Any, Any, Any]) -> str | None:
        return bearer_of(request)

    def error_response(
        self, error: ApiError, request_id: str, limits: dict[str, str] | None = None
    ) -> Response[Any]:
        return anthropic_error_response(error, request_id, limits)

    async def decode(
        self, raw: bytes, who: Authenticated, max_json_depth: int
    ) -> tuple[dict[str, Any], Any]:
        req = self.request = validate(decode_object(raw, max_json_depth), MessagesRequest)
        chat = chat_body(req)
        chat["max_tokens"] = req.max_tokens
        chat["stream"] = req.stream
        if req.stream:
            chat["stream_options"] = {"include_usage": True}
        if req.stop_sequences:
            chat["stop"] = list(req.stop_sequences)
        for name in ("temperature", "top_p"):
            value = getattr(req, name)
            if value is not None:
                chat[name] = value
        user = (req.metadata or {}).get("user_id")
        if isinstance(user, str):
            chat["user"] = user
        typed = validate({**chat, "stop": (req.stop_sequences or [])[:4] or None}, ChatRequest)
        return chat, typed

    async def answer(
        self, result: dict[str, Any], admitted: Admitted, bill: Bill
    ) -> dict[str, Any]:
        choices = result.get("choices") or [{}]
        choice = choices[0]
        message = choice.get("message") or {}
        content: list[dict[str, Any]] = []
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            content.append(
                {
                    "type": "tool_use",
                    "id": _tool_id(call.get("id")),
                    "name": function.get("name") or "",
                    "input": _arguments(function.get("arguments")),
                }
            )
        stop_reason, stop_sequence = self._stop(choice, message.get("content") or "")
        return {
            "id": "msg_" + admitted.request_id[4:],
            "type": "message",
            "role": "assistant",
            "model": self._model(),
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": _usage(bill),
        }

    def stream(
        self, sse: AsyncIterator[bytes], admitted: Admitted, bill: Callable[[], Bill]
    ) -> AsyncIterator[bytes]:
        return translated(sse, lambda chunks: self._events(chunks, admitted, bill))

    async def _events(
        self, chunks: AsyncIterator[dict[str, Any]], admitted: Admitted, bill: Callable[[], Bill]
    ) -> AsyncGenerator[bytes, None]:
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_" + admitted.request_id[4:],
                "type": "message",
                "role": "assistant",
                "model": self._model(),
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": admitted.prompt_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": 0,
                },
            },
        }
        yield _event("message_start", start) + _event("ping", {"type": "ping"})
        block = -1  # the index of the open content block
        open_kind: str | None = None  # "text" or a chat tool-call index as "tool:<n>"
        texts: list[str] = []
        finish: str | None = None
        async for chunk in chunks:
            error = chunk.get("error")
            out: list[bytes] = []
            if error is not None:
                if open_kind is not None:
                    out.append(
                        _event("content_block_stop", {"type": "content_block_stop", "index": block})
                    )
                failure = ApiError(502, error.get("message") or "The upstream failed.")
                kind = "overloaded_error" if error.get("code") == "overloaded" else "api_error"
                body = {"type": "error", "error": {"type": kind, "message": failure.message}}
                out.append(_event("error", body))
                yield b"".join(out)
                return
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if text:
                    if open_kind != "text":
                        if open_kind is not None:
                            out.append(_stop_block(block))
                        block += 1
                        open_kind = "text"
                        out.append(
                            _event(
                                "content_block_start",
                                {
                                    "type": "content_block_start",
                                    "index": block,
                                    "content_block": {"type": "text", "text": ""},
                                },
                            )
                        )
                    texts.append(text)
                    out.append(
                        _event(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": block,
                                "delta": {"type": "text_delta", "text": text},
                            },
                        )
                    )
                for call in delta.get("tool_calls") or ():
                    function = call.get("function") or {}
                    kind = f"tool:{call.get('index', 0)}"
                    if open_kind != kind:
                        if open_kind is not None:
                            out.append(_stop_block(block))
                        block += 1
                        open_kind = kind
                        out.append(
                            _event(
                                "content_block_start",
                                {
                                    "type": "content_block_start",
                                    "index": block,
                                    "content_block": {
                                        "type": "tool_use",
                                        "id": _tool_id(call.get("id")),
                                        "name": function.get("name") or "",
                                        "input": {},
                                    },
                                },
                            )
                        )
                    arguments = function.get("arguments")
                    if arguments:
                        out.append(
                            _event(
                                "content_block_delta",
                                {
                                    "type": "content_block_delta",
                                    "index": block,
                                    "delta": {
                                        "type": "input_json_delta",
                                        "partial_json": arguments,
                                    },
                                },
                            )
                        )
                finish = choice.get("finish_reason") or finish
                if choice.get("stop_reason") is not None:
                    self._matched = choice["stop_reason"]
            if out:
                yield b"".join(out)
        # The relay wrote the ledger row before its usage chunk: the stream is complete.
        closing: list[bytes] = []
        if open_kind is not None:
            closing.append(_stop_block(block))
        stop_reason, stop_sequence = self._stop(
            {"finish_reason": finish, "stop_reason": self._matched},
            "".join(texts),
        )
        closing.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": _usage(bill()),
                },
            )
        )
        closing.append(_event("message_stop", {"type": "message_stop"}))
        yield b"".join(closing)

    def _model(self) -> str:
        return self.request.model if self.request is not None else ""

    def _stop(self, choice: dict[str, Any], text: str) -> tuple[str | None, str | None]:
        """Anthropic's stop reason; a stop sequence is named when the upstream says which
        one matched (vLLM's `stop_reason`)."""
        finish = choice.get("finish_reason")
        matched = choice.get("stop_reason")
        sequences = (self.request.stop_sequences if self.request else None) or []
        if finish == "stop" and isinstance(matched, str) and matched in sequences:
            return "stop_sequence", matched
        return _STOP_REASONS.get(finish or "stop", "end_turn"), None


def _event(name: str, data: dict[str, Any]) -> bytes:
    return sse_event(name, _encode(data))


def _stop_block(index: int) -> bytes:
    return _event("content_block_stop", {"type": "content_block_stop", "index": index})


def _usage(bill: Bill) -> dict[str, Any]:
    """Anthropic's usage object from the ledger row: the same tokens, split its way."""
    u = bill.record.usage
    reported = bill.reported
    written = min(reported.cache_written if reported is not None else 0, u.uncached_input)
    return {
        "input_tokens": u.uncached_input - written,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": u.cached_input,
        "output_tokens": u.output,
        "maas": bill.cost_object(),
    }


def _refusal(error: ApiError) -> Outcome:
    return Outcome(Usage(), error.status_code, error.code or error.type)


def _tool_id(call_id: Any) -> str:
    return call_id if isinstance(call_id, str) and call_id else "toolu_" + uuid.uuid4().hex[:24]


def _arguments(arguments: Any) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def chat_body(req: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """The model, messages and tools of a Messages request as a Chat Completions body."""
    messages: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else _text_of(req.system, "system")
        messages.append({"role": "system", "content": system})
    for number, message in enumerate(req.messages):
        messages.extend(_chat_messages(message, f"messages[{number}].content"))
    chat: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    **({"description": tool.description} if tool.description else {}),
                    "parameters": tool.input_schema,
                },
            }
            for tool in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        kind = choice.get("type")
        if kind in ("auto", "any", "none"):
            chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        elif kind == "tool" and isinstance(choice.get("name"), str):
            chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            raise invalid_request(
                "tool_choice: expected type 'auto', 'any', 'tool' (with a name) or 'none'.",
                param="tool_choice",
            )
        if choice.get("disable_parallel_tool_use") is True:
            chat["parallel_tool_calls"] = False
    return chat


def _chat_messages(message: MessageParam, param: str) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for number, block in enumerate(message.content):
        kind = block.get("type")
        where = f"{param}.{number}"
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and message.role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, where)}})
        elif kind == "tool_use" and message.role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _bad_block(where, "a tool_use block needs a string id and name")
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }
            )
        elif kind == "tool_result" and message.role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise _bad_block(where, "a tool_result block needs a string tool_use_id")
            result = block.get("content", "")
            text = result if isinstance(result, str) else _text_of(result, where + ".content")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # no chat upstream takes thinking blocks back
        else:
            raise _bad_block(where, f"unsupported content block type {kind!r} for this role")
    out: list[dict[str, Any]] = list(results)  # tool results answer the previous turn's calls
    if parts or (not calls and not results):
        texts_only = all(p["type"] == "text" for p in parts)
        content: Any = "".join(p["text"] for p in parts) if texts_only else parts
        out.append({"role": message.role, "content": content})
    if calls:
        if out and out[-1]["role"] == "assistant":
            out[-1]["tool_calls"] = calls
        else:
            out.append({"role": "assistant", "content": None, "tool_calls": calls})
    return out


def _image_url(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            return f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return str(source["url"])
    raise _bad_block(where, "an image block needs a base64 or url source")


def _text_of(blocks: Any, where: str) -> str:
    if not isinstance(blocks, list):
        raise _bad_block(where, "expected a string or a list of text blocks")
    texts = []
    for number, block in enumerate(blocks):
        if not (
            isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        ):
            raise _bad_block(f"{where}.{number}", "expected a text block")
        texts.append(block["text"])
    return "\n".join(texts)


def _bad_block(where: str, message: str) -> ApiError:
    return invalid_request(f"{where}: {message}", param=where)


_COUNT_TOKENS = "messages.count_tokens"
"""What the ledger calls `count_tokens` requests."""


def messages_routes(gw: Gateway) -> list[BaseRouteHandler]:
    """`POST /v1/messages` and `POST /v1/messages/count_tokens` of a gateway."""

    async def create_message(request: Request[Any, Any, Any]) -> Response[Any]:
        assert gw.relay is not None, "the gateway has not started"
        return await gw.relay.handle("chat.completions", request, MessagesDialect())

    @post("/v1/messages/count_tokens", status_code=200)
    async def count_tokens(request: Request[Any, Any, Any]) -> Response[Any]:
        """Counted offline, free: recorded in the ledger at no cost, no quota taken."""
        services = gw.services
        assert services is not None, "the gateway has not started"
        request_id = new_request_id()
        try:
            who = authenticate(
                services, bearer_of(request), "chat.completions", _COUNT_TOKENS, request_id
            )
        except ApiError as refused:
            return anthropic_error_response(refused, request_id)
        step: Step = who
        try:
            try:
                raw = await request.body()
            except HTTPException as exc:
                size = request.app.request_max_body_size
                too_big = exc.status_code == 413
                raise (
                    body_too_large(size if isinstance(size, int) else 0)
                    if too_big
                    else invalid_request(str(exc.detail))
                ) from None
            req = validate(decode_object(raw, services.max_json_depth), CountTokensRequest)
            try:
                model = services.router.resolve(req.model)
            except UnknownModel:
                raise model_not_found(req.model) from None
            if not who.key.allows(model.name) or model.kind == "embedding":
                raise model_not_found(req.model)
            step = Routed(who, model.name)
            chat = chat_body(req)
            typed = validate(chat, ChatRequest)
            messages = [msgspec.structs.asdict(m) for m in typed.messages]
            tools = [msgspec.to_builtins(t) for t in typed.tools] if typed.tools else None
            tokens = services.counter.count_chat(model.name, messages, tools)
        except ApiError as refused:
            record_usage(services, step, _refusal(refused))
            return anthropic_error_response(refused, request_id)
        except Exception:
            log.exception("request %s failed", request_id)
            failed = server_error(request_id)
            record_usage(services, step, _refusal(failed))
            return anthropic_error_response(failed, request_id)
        record_usage(services, step, Outcome(Usage()))  # free: counting is not using
        return Response(
            _encode({"input_tokens": tokens}),
            media_type="application/json",
            headers={"request-id": request_id, "x-request-id": request_id},
        )

    return [relay_route("/v1/messages", create_message), count_tokens]
