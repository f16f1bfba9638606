"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

from typing import Any

import msgspec


class ApiError(Exception):
    """An error the caller sees, shaped exactly like OpenAI's."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def encode(self) -> bytes:
        return msgspec.json.encode(self.body())


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def invalid_api_key() -> ApiError:
    return ApiError(
        401,
        "Incorrect API key provided. You can find your API key in your tenant settings.",
        code="invalid_api_key",
    )


def missing_api_key() -> ApiError:
    return ApiError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        code="missing_api_key",
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def not_found(path: str) -> ApiError:
    return ApiError(404, f"Unknown request URL: {path}.", code="unknown_url")


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(405, f"Method {method} is not allowed for {path}.", code="method_not_allowed")


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large"
    )


def service_unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="service_unavailable", code="service_unavailable")


def server_error(request_id: str) -> ApiError:
    return ApiError(
        500,
        "The server had an error while processing your request. "
        f"Contact support with request id {request_id} if it persists.",
        type="server_error",
    )
