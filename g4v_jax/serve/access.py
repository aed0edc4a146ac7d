"""Who may call the server, and one log line per request: an ASGI middleware around the app.

- ``--api-key`` (or ``G4V_API_KEY``): every ``/v1/*`` route needs ``Authorization: Bearer <key>`` (vLLM's rule),
  compared in constant time; a missing or wrong key is a 401 in OpenAI's error shape. ``/health``, ``/metrics`` and
  the page itself stay open (the page asks for the key and sends it).
- One line per request on the ``g4v_jax.serve.access`` logger: request id, method, path, status, tokens (prompt +
  completion, for chat completions), seconds. A client error is an INFO line, never a traceback; a client that goes
  away is ``status=disconnected``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

logger = logging.getLogger("g4v_jax.serve.access")


def key_matches(header: str | None, key: str) -> bool:
    """``header`` (an ``Authorization`` value) is ``Bearer <key>``; constant time in the key's length."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode("utf-8", "surrogateescape"),
                               key.encode("utf-8"))


def _error(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


class AccessMiddleware:
    """The API key check and the request log (module docstring), as plain ASGI: streaming responses and
    ``http.disconnect`` pass through untouched (Starlette's BaseHTTPMiddleware would buffer them)."""

    def __init__(self, app, api_key: str = "") -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = f"req-{uuid.uuid4().hex[:12]}"
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        seen = {"status": None, "done": False}
        path = scope.get("path", "")

        async def logged_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["done"] = True
            await send(message)

        if self.api_key and path.startswith("/v1/") and scope.get("method") != "OPTIONS":
            headers = dict(scope.get("headers") or ())
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not key_matches(auth, self.api_key):
                body = _error("a valid API key is required: send 'Authorization: Bearer <key>'",
                              "invalid_api_key")
                await logged_send({"type": "http.response.start", "status": 401,
                                   "headers": [(b"content-type", b"application/json"),
                                               (b"content-length", str(len(body)).encode()),
                                               (b"www-authenticate", b"Bearer")]})
                await logged_send({"type": "http.response.body", "body": body})
                self._log(rid, scope, seen, state, t0)
                return
        try:
            await self.app(scope, receive, logged_send)
        finally:
            self._log(rid, scope, seen, state, t0)

    @staticmethod
    def _log(rid, scope, seen, state, t0) -> None:
        status = seen["status"] if seen["done"] else "disconnected"
        usage = state.get("usage")
        tokens = f" tokens={usage['prompt_tokens']}+{usage['completion_tokens']}" if usage else ""
        logger.info("%s %s %s status=%s%s seconds=%.3f", rid, scope.get("method"), scope.get("path"), status, tokens,
                    time.perf_counter() - t0)
