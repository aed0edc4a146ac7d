"""A programmable fake OpenAI-compatible chat-completions server on 127.0.0.1, for tests.

    def handler(req: FakeRequest) -> str | Reply:
        return "the reply text"                       # -> 200 with a chat-completions body
        return Reply(429, headers={"Retry-After": "3"})  # any status, headers, content or raw body

    with FakeOpenAI(handler) as srv:                  # srv.url = "http://127.0.0.1:<port>"
        ...
    srv.calls, srv.requests                           # HTTP requests seen (thread-safe), in arrival order

``die_after=N``: from request N+1 on, the server hangs up without answering (a dead endpoint, seen by the client as
a dropped connection). ``stop()`` shuts it down early; the port is then closed (connection refused).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclasses.dataclass(frozen=True)
class FakeRequest:
    path: str
    body: dict
    headers: dict[str, str]

    @property
    def user(self) -> str:
        """Text of the last message (the user prompt)."""
        return self.body["messages"][-1]["content"]

    @property
    def system(self) -> str | None:
        first = self.body["messages"][0]
        return first["content"] if first["role"] == "system" else None


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int = 200
    content: str | None = None  # the reply text; a 200 with None content is a chat completion with null content
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    raw: bytes | None = None  # the whole body as is (overrides content)


def chat_body(content: str | None) -> bytes:
    return json.dumps({"id": "fake", "object": "chat.completion",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


class FakeOpenAI:
    def __init__(self, handler: Callable[[FakeRequest], str | Reply], *, die_after: int | None = None) -> None:
        self.handler, self.die_after = handler, die_after
        self.requests: list[FakeRequest] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                req = FakeRequest(self.path, body, {k: v for k, v in self.headers.items()})
                with outer._lock:
                    outer.requests.append(req)
                    n = len(outer.requests)
                if outer.die_after is not None and n > outer.die_after:
                    self.close_connection = True  # hang up without a status line
                    return
                reply = outer.handler(req)
                if isinstance(reply, str):
                    reply = Reply(content=reply)
                data = reply.raw if reply.raw is not None else (
                    chat_body(reply.content) if reply.status == 200 else json.dumps(
                        {"error": {"message": reply.content or f"fake error {reply.status}"}}).encode())
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # a short poll interval: shutdown() waits for the serving loop to notice, 0.5 s by default
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._stopped = False

    @property
    def calls(self) -> int:
        return len(self.requests)

    def start(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
