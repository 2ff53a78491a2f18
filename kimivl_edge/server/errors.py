"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status. The
``type`` names follow llama-server's where it has one."""
from __future__ import annotations

from dataclasses import dataclass

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "unavailable_error"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    code: str | None = None
    param: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request", param)


def invalid_field(message: str, param: str | None = None) -> APIError:
    return APIError(422, message, "invalid_value", param)


INTERNAL = APIError(500, "internal server error (see the server log)", "internal_error")
LOADING = APIError(503, "the model is loading", "model_loading")
