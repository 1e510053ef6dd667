"""An OpenAI-compatible chat-completions server on 127.0.0.1 for the judge tests: a real HTTP
server (http.server in a thread) whose replies come from a Python function, plus scripted 429 / 5xx
answers and malformed replies."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


class JudgeServer:
    """``with JudgeServer(reply) as s: s.url``; ``reply(request_body, n) -> str`` gives the message
    content of the n-th completed request (0-based). ``fail``: HTTP statuses to answer first, in
    order, before any reply (e.g. [429, 503]); ``retry_after``: the Retry-After header sent with them.
    Every request is kept in ``requests`` (path, lower-cased headers, body)."""

    def __init__(self, reply: Callable[[dict, int], str], fail: Optional[list[int]] = None, retry_after: str = "0",
                 delay: float = 0.0):
        self.reply, self.fail, self.retry_after, self.delay = reply, list(fail or []), retry_after, delay
        self.requests: list[dict] = []
        self.completed = 0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "headers": {k.lower(): v for k, v in self.headers.items()}})
                    status = server.fail.pop(0) if server.fail else 200
                    n = server.completed
                    if status == 200:
                        server.completed += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.delay:
                        time.sleep(server.delay)  # lets concurrent requests overlap, to count them
                    self._answer(status, body, n)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, status, body, n):
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": "not found"}})
                if status != 200:
                    return self._send(status, {"error": {"message": f"scripted {status}", "type": "test"}},
                                      {"Retry-After": server.retry_after})
                content = server.reply(body, n)
                self._send(200, {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def text_of(body: dict) -> str:
    """All text of a request's messages (to find the responses and labels the judge was shown)."""
    out = []
    for m in body["messages"]:
        c = m["content"]
        out.append(c if isinstance(c, str) else "\n".join(p.get("text", "") for p in c if p.get("type") == "text"))
    return "\n".join(out)


def images_of(body: dict) -> list[str]:
    return [p["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p.get("type") == "image_url"]
