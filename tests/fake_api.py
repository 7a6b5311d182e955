"""A scripted OpenAI-compatible server on 127.0.0.1 (chat completions, and completions with log-probs), for
the tests of the API judges and of the classifier judges' server mode."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

KEY_ENV = "DEEPALIGN_TEST_JUDGE_KEY"
FAKE_KEY = "sk-test-FAKE-0123456789abcdef"
TAG = re.compile(r"\[\[(\w+)\]\]")


class FakeAPI:
    """A scripted OpenAI-compatible chat-completions server on 127.0.0.1.

    Each request's messages are searched for a tag `[[name]]`; `script[name]` is a list of actions
    consumed one per request: ("status", code, headers) / ("sleep", seconds) then a normal reply /
    ("reply", content). When it runs out, `final[name]` (else `default`: rubric score 1) is replied.

    The completions endpoint (`/v1/completions`) is scripted the same way, its request's `prompt` searched
    for the tag; a request asking for `logprobs` gets `logprobs[name]` (`{"tokens": [...], "top_logprobs":
    [{token: logprob, ...}, ...]}`) when set, else none.
    """

    def __init__(self):
        self.script: dict[str, list[tuple]] = {}
        self.final: dict[str, str] = {}
        self.default = "#thereason: fine\n#thescore: 1"  # the reply for a tag without a final one
        self.late = "#thereason: late\n#thescore: 1"  # the same after a ("sleep", s) action
        self.logprobs: dict[str, dict] = {}  # completions endpoint: the log-probs replied for a tag
        self.calls: list[str] = []  # the tag of every request, in arrival order
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.delay = 0.0  # added to every request (concurrency test)
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_POST(self):
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client left (timeout)
                    api.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def count(self, tag: str) -> int:
        return self.calls.count(tag)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        completion = h.path == "/v1/completions"
        text = body["prompt"] if completion else "\n".join(m["content"] for m in body["messages"])
        match = TAG.search(text)
        tag = match.group(1) if match else ""
        with self.lock:
            self.calls.append(tag)
            self.bodies.append(body)
            self.headers.append({k.lower(): v for k, v in h.headers.items()})
            queue = self.script.get(tag, [])
            action = queue.pop(0) if queue else ("reply", self.final.get(tag, self.default))
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if h.path not in ("/v1/chat/completions", "/v1/completions"):
                action = ("status", 404, {})
            if self.delay:
                time.sleep(self.delay)
            if action[0] == "sleep":
                time.sleep(action[1])
                action = ("reply", self.final.get(tag, self.late))
            if action[0] == "status":
                self.send(
                    h,
                    action[1],
                    {
                        "error": {
                            "message": action[3] if len(action) > 3 else "scripted",
                            "type": "test",
                            "code": None,
                        }
                    },
                    action[2],
                )
            elif completion:
                logprobs = self.logprobs.get(tag) if body.get("logprobs") else None
                choice = {"index": 0, "text": action[1], "logprobs": logprobs, "finish_reason": "stop"}
                self.send(
                    h,
                    200,
                    {
                        "id": "cmpl-test",
                        "object": "text_completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [choice],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
                    },
                )
            else:
                self.send(
                    h,
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": action[1]},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    },
                )
        finally:
            with self.lock:
                self.inflight -= 1

    @staticmethod
    def send(h: BaseHTTPRequestHandler, code: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)


def serve_fake_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    """The body of an `api` fixture: the key in KEY_ENV, no proxy for 127.0.0.1, a running FakeAPI."""
    pytest.importorskip("openai")
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    fake = FakeAPI()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
