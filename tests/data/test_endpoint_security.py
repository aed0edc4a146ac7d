"""The API key stays with the configured host: a real redirecting server on 127.0.0.1 pointing at a second real
server, and plain http to another machine refused before any request."""

import http.server
import threading

import pytest

from g4v_jax.endpoint import ChatEndpoint, EndpointRejected


class _Server:
    def __init__(self, handler):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_redirect_never_carries_the_key_elsewhere():
    seen = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            seen.append(dict(self.headers))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"choices": [{"message": {"content": "stolen"}}]}')

        def log_message(self, *args):
            pass

    other = _Server(Elsewhere)

    class Redirector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(307)
            self.send_header("Location", other.url + "/v1/chat/completions")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = _Server(Redirector)
    try:
        endpoint = ChatEndpoint(server.url, "m", api_key="sk-secret", max_retries=0)
        with pytest.raises(EndpointRejected) as e:
            endpoint.complete([{"role": "user", "content": "hi"}])
        assert f"redirected the request (HTTP 307) to {other.url}/v1/chat/completions" in str(e.value)
        assert seen == []  # the second server never got the request, nor the key
    finally:
        server.close()
        other.close()


@pytest.mark.parametrize("url", ["http://api.example.com/v1", "http://10.0.0.5:8000"])
def test_plain_http_to_another_machine_with_a_key_is_refused(url):
    with pytest.raises(ValueError, match="refusing to send an API key over plain http to"):
        ChatEndpoint(url, "m", api_key="sk-secret")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/v1", "https://api.example.com"])
def test_https_and_this_machine_are_fine(url):
    ChatEndpoint(url, "m", api_key="sk-secret")


def test_plain_http_without_a_key_is_fine(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ChatEndpoint("http://10.0.0.5:8000", "m")
