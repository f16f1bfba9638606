"""OpenAI's Responses API (`POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`),
served by translation to Chat Completions through the relay's one pipeline.

A request's `instructions`, `input` items (messages, `function_call`,
`function_call_output`) and function `tools` become a chat body; the chat completion comes
back as a `response` object, or as the typed event stream (`response.created`,
`response.output_item.added`, `response.output_text.delta`, ..., `response.completed`).
Usage is the ledger row's: `input_tokens` (with `input_tokens_details.cached_tokens`),
`output_tokens` (with `output_tokens_details.reasoning_tokens`), `total_tokens`.

With `store` (the default) the response is kept for the tenant (`gateway.response_store`);
`previous_response_id` continues its conversation, and `GET`/`DELETE` reach it, for the
same tenant only.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from litestar import Request, Response, delete, get
from litestar.handlers import BaseRouteHandler
from msgspec import Meta, Struct

from gateway.dialects import sse_event, translated
from gateway.errors import ApiError, invalid_request
from gateway.relay import error_response, new_request_id
from gateway.relay_routes import relay_route
from gateway.response_store import ResponseStore
from gateway.schemas import (
    ChatRequest,
    ModelName,
    Probability,
    Temperature,
    decode_object,
    validate,
)
from gateway.steps import Admitted, Authenticated, Bill

if TYPE_CHECKING:
    from gateway.lifespan import Gateway

_encode = msgspec.json.Encoder().encode


class FunctionTool(Struct):
    type: Literal["function"]
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(Struct):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(Struct):
    format: TextFormat | None = None


class ResponsesRequest(Struct):
    """The fields of a Responses request the gateway reads (others are accepted)."""

    model: ModelName
    input: str | Annotated[list[dict[str, Any]], Meta(min_length=1)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Meta(ge=16)] | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: TextConfig | None = None


def _hex() -> str:
    return uuid.uuid4().hex


class ResponsesDialect:
    """One Responses request's translation (see `gateway.dialects.Dialect`)."""

    name = "responses"

    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self.request: ResponsesRequest | None = None
        self.history: list[dict[str, Any]] = []  # the conversation so far, without instructions

    def authorization(self, request: Request[Any, Any, Any]) -> str | None:
        return request.headers.get("authorization")

    def error_response(
        self, error: ApiError, request_id: str, limits: dict[str, str] | None = None
    ) -> Response[Any]:
        return error_response(error, request_id, limits)

    async def decode(
        self, raw: bytes, who: Authenticated, max_json_depth: int
    ) -> tuple[dict[str, Any], Any]:
        body = decode_object(raw, max_json_depth)
        req = self.request = validate(body, ResponsesRequest)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            previous = await self.store.get(who.tenant.id, req.previous_response_id, who.started)
            if previous is None:
                raise invalid_request(
                    f"Previous response with id '{req.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = list(previous.messages)
        input_messages(req.input, history)
        self.history = history
        messages = list(history)
        if req.instructions:
            messages.insert(0, {"role": "system", "content": req.instructions})
        chat: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
        if req.stream:
            chat["stream_options"] = {"include_usage": True}
        if req.max_output_tokens is not None:
            chat["max_tokens"] = req.max_output_tokens
        for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
            value = getattr(req, name)
            if value is not None:
                chat[name] = value
        if req.tools:
            chat["tools"] = [_chat_tool(tool) for tool in req.tools]
        if req.tool_choice is not None:
            chat["tool_choice"] = _chat_tool_choice(req.tool_choice)
        response_format = _response_format(req.text)
        if response_format is not None:
            chat["response_format"] = response_format
        return chat, validate(chat, ChatRequest)

    async def answer(
        self, result: dict[str, Any], admitted: Admitted, bill: Bill
    ) -> dict[str, Any]:
        choices = result.get("choices") or [{}]
        message = choices[0].get("message") or {}
        output: list[dict[str, Any]] = []
        text = message.get("content")
        if text or not message.get("tool_calls"):
            output.append(_message_item("msg_" + _hex(), text or "", "completed"))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            output.append(
                _function_item(
                    "fc_" + _hex(),
                    call.get("id") or "call_" + _hex(),
                    function.get("name") or "",
                    function.get("arguments") or "",
                    "completed",
                )
            )
        response = self._response(admitted, output, choices[0].get("finish_reason"), bill)
        await self._store(admitted, response, message)
        return response

    def stream(
        self, sse: AsyncIterator[bytes], admitted: Admitted, bill: Callable[[], Bill]
    ) -> AsyncIterator[bytes]:
        return translated(sse, lambda chunks: self._events(chunks, admitted, bill))

    async def _events(
        self, chunks: AsyncIterator[dict[str, Any]], admitted: Admitted, bill: Callable[[], Bill]
    ) -> AsyncGenerator[bytes, None]:
        numbered = _Events()
        started = self._response(admitted, [], None, None)
        yield numbered.emit("response.created", response=started)
        yield numbered.emit("response.in_progress", response=started)
        output: list[dict[str, Any]] = []
        text_item: dict[str, Any] | None = None
        calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> function_call item
        finish: str | None = None
        texts: list[str] = []

        def close_text() -> list[bytes]:
            nonlocal text_item
            if text_item is None:
                return []
            item, text_item = text_item, None
            index = output.index(item)
            text = "".join(texts)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item["content"], item["status"] = [part], "completed"
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            return [
                numbered.emit("response.output_text.done", **where, text=text, logprobs=[]),
                numbered.emit("response.content_part.done", **where, part=part),
                numbered.emit("response.output_item.done", output_index=index, item=item),
            ]

        def close_calls() -> list[bytes]:
            out = []
            for item in calls.values():
                index = output.index(item)
                item["status"] = "completed"
                out.append(
                    numbered.emit(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                )
                out.append(
                    numbered.emit("response.output_item.done", output_index=index, item=item)
                )
            calls.clear()
            return out

        async for chunk in chunks:
            error = chunk.get("error")
            if error is not None:
                yield b"".join([*close_text(), *close_calls()])
                failed = self._response(admitted, output, None, None)
                failed["status"] = "failed"
                failed["error"] = {
                    "code": error.get("code") or "server_error",
                    "message": error.get("message") or "The upstream failed.",
                }
                yield numbered.emit("response.failed", response=failed)
                yield numbered.emit(
                    "error",
                    code=error.get("code"),
                    message=error.get("message"),
                    param=error.get("param"),
                    error=error,
                )
                return
            out: list[bytes] = []
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                content = delta.get("content")
                if content:
                    if text_item is None:
                        out += close_calls()
                        text_item = _message_item("msg_" + _hex(), None, "in_progress")
                        output.append(text_item)
                        texts = []
                        index = len(output) - 1
                        out.append(
                            numbered.emit(
                                "response.output_item.added", output_index=index, item=text_item
                            )
                        )
                        out.append(
                            numbered.emit(
                                "response.content_part.added",
                                item_id=text_item["id"],
                                output_index=index,
                                content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []},
                            )
                        )
                    texts.append(content)
                    out.append(
                        numbered.emit(
                            "response.output_text.delta",
                            item_id=text_item["id"],
                            output_index=output.index(text_item),
                            content_index=0,
                            delta=content,
                            logprobs=[],
                        )
                    )
                for call in delta.get("tool_calls") or ():
                    function = call.get("function") or {}
                    item = calls.get(call.get("index", 0))
                    if item is None:
                        out += close_text()
                        item = _function_item(
                            "fc_" + _hex(),
                            call.get("id") or "call_" + _hex(),
                            function.get("name") or "",
                            "",
                            "in_progress",
                        )
                        calls[call.get("index", 0)] = item
                        output.append(item)
                        out.append(
                            numbered.emit(
                                "response.output_item.added",
                                output_index=len(output) - 1,
                                item={**item},
                            )
                        )
                    arguments = function.get("arguments")
                    if arguments:
                        item["arguments"] += arguments
                        out.append(
                            numbered.emit(
                                "response.function_call_arguments.delta",
                                item_id=item["id"],
                                output_index=output.index(item),
                                delta=arguments,
                            )
                        )
                finish = choice.get("finish_reason") or finish
            if out:
                yield b"".join(out)
        # The relay wrote the ledger row before its usage chunk: the stream is complete.
        closing = [*close_text(), *close_calls()]
        if not output:
            item = _message_item("msg_" + _hex(), "", "completed")
            output.append(item)
            closing.append(numbered.emit("response.output_item.added", output_index=0, item=item))
            closing.append(numbered.emit("response.output_item.done", output_index=0, item=item))
        response = self._response(admitted, output, finish, bill())
        message: dict[str, Any] = {"content": "".join(texts) or None}
        tool_calls = [i for i in output if i["type"] == "function_call"]
        if tool_calls:
            message["tool_calls"] = [_chat_call(i) for i in tool_calls]
        await self._store(admitted, response, message)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        closing.append(numbered.emit(kind, response=response))
        yield b"".join(closing)

    def _response(
        self,
        admitted: Admitted,
        output: list[dict[str, Any]],
        finish_reason: str | None,
        bill: Bill | None,
    ) -> dict[str, Any]:
        """The response object; `bill` is None while it is still in progress."""
        req = self.request
        assert req is not None
        status = "completed"
        incomplete = None
        if bill is None:
            status = "in_progress"
        elif finish_reason in ("length", "content_filter"):
            status = "incomplete"
            reason = "max_output_tokens" if finish_reason == "length" else "content_filter"
            incomplete = {"reason": reason}
        usage = None
        if bill is not None:
            u = bill.record.usage
            usage = {
                "input_tokens": u.input,
                "input_tokens_details": {"cached_tokens": u.cached_input},
                "output_tokens": u.output,
                "output_tokens_details": {"reasoning_tokens": u.reasoning},
                "total_tokens": u.total,
                "maas": bill.cost_object(),
            }
        return {
            "id": "resp_" + admitted.request_id[4:],
            "object": "response",
            "created_at": int(admitted.started.timestamp()),
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model,
            "output": [dict(item) for item in output],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": msgspec.to_builtins(req.text)
            if req.text is not None and req.text.format is not None
            else {"format": {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": [msgspec.to_builtins(t) for t in req.tools or ()],
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    async def _store(
        self, admitted: Admitted, response: dict[str, Any], message: dict[str, Any]
    ) -> None:
        req = self.request
        if req is None or not req.store:
            return
        reply: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            reply["tool_calls"] = [
                {"id": c.get("id"), "type": "function", "function": c.get("function")}
                for c in message["tool_calls"]
            ]
        await self.store.save(
            admitted.tenant.id, response, [*self.history, reply], admitted.started
        )


class _Events:
    """Numbered Responses stream events."""

    def __init__(self) -> None:
        self.sequence = 0

    def emit(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(kind, _encode(data))


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _function_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _chat_call(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": item["name"], "arguments": item["arguments"]},
    }


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """`text.format` as Chat Completions' `response_format` (plain text needs none)."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if not fmt.name or fmt.schema is None:
        raise invalid_request(
            "A json_schema text format needs a 'name' and a 'schema'.", param="text.format"
        )
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema}
    if fmt.description is not None:
        schema["description"] = fmt.description
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") in ("auto", "none", "required"):
        return str(choice["type"])
    raise invalid_request(
        "Invalid value for 'tool_choice': only 'auto', 'none', 'required' or a function.",
        param="tool_choice",
        code="invalid_value",
    )


_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def input_messages(
    value: str | list[dict[str, Any]], messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Append Responses `input` to `messages` as Chat Completions messages (a 400 names a
    bad item); a function call joins the assistant message before it."""
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        return messages
    for number, item in enumerate(value):
        param = f"input[{number}]"
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") in _ROLES:
            role = _ROLES[item["role"]]
            content = _content(item.get("content"), f"{param}.content")
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            arguments = item.get("arguments", "")
            if not (isinstance(call_id, str) and isinstance(name, str)) or not isinstance(
                arguments, str
            ):
                raise _bad_item(
                    param, "a function_call needs string 'call_id', 'name', 'arguments'"
                )
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last["tool_calls"] = [*(last.get("tool_calls") or ()), call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _bad_item(param, "a function_call_output needs a string 'call_id'")
            text = output if isinstance(output, str) else _content(output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            continue  # no chat upstream takes reasoning items back
        else:
            raise _bad_item(
                param,
                "expected a message (role user, assistant, system or developer), "
                "a function_call or a function_call_output",
            )
    return messages


def _content(value: Any, param: str) -> str | list[dict[str, Any]]:
    """Message content: a string, or parts (`input_text`, `output_text`, `input_image`)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad_item(param, "expected a string or a list of content parts")
    parts: list[dict[str, Any]] = []
    for number, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise _bad_item(
                f"{param}[{number}]",
                "expected an input_text, output_text or input_image (with image_url) part",
            )
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _bad_item(param: str, message: str) -> ApiError:
    return invalid_request(
        f"Invalid value for '{param}': {message}.", param=param, code="invalid_value"
    )


def _not_found(response_id: str) -> ApiError:
    return ApiError(
        404,
        f"Response with id '{response_id}' not found.",
        param="response_id",
        code="not_found",
    )


def responses_routes(gw: Gateway) -> list[BaseRouteHandler]:
    """`POST /v1/responses` and `GET`/`DELETE /v1/responses/{id}` of a gateway."""
    stores: list[ResponseStore] = []

    def store() -> ResponseStore:
        if not stores:
            stores.append(ResponseStore(gw.ledger.engine, gw.settings.responses))
        return stores[0]

    async def create_response(request: Request[Any, Any, Any]) -> Response[Any]:
        assert gw.relay is not None, "the gateway has not started"
        return await gw.relay.handle("chat.completions", request, ResponsesDialect(store()))

    @get("/v1/responses/{response_id:str}")
    async def retrieve_response(request: Request[Any, Any, Any]) -> Response[Any]:
        response_id = request.path_params["response_id"]
        _, tenant = gw.directory.authenticate(request.headers.get("authorization"), gw.clock())
        stored = await store().get(tenant.id, response_id, gw.clock())
        if stored is None:
            raise _not_found(response_id)
        return _json(stored.response)

    @delete("/v1/responses/{response_id:str}", status_code=200)
    async def delete_response(request: Request[Any, Any, Any]) -> Response[Any]:
        response_id = request.path_params["response_id"]
        _, tenant = gw.directory.authenticate(request.headers.get("authorization"), gw.clock())
        if not await store().delete(tenant.id, response_id, gw.clock()):
            raise _not_found(response_id)
        return _json({"id": response_id, "object": "response", "deleted": True})

    return [relay_route("/v1/responses", create_response), retrieve_response, delete_response]


def _json(body: Any) -> Response[Any]:
    return Response(
        _encode(body), media_type="application/json", headers={"x-request-id": new_request_id()}
    )
