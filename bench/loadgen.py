"""HTTP load for the cluster tests and the soak benchmark: concurrent chat requests, each classified.

Every request ends in exactly one outcome:

* ``ok``: 200 with a complete answer (non-streaming: a JSON body with choices; streaming: chunks up
  to a ``finish_reason`` and then ``data: [DONE]``);
* ``error``: answered with an OpenAI error object (a 4xx/5xx JSON body ``{"error": {...}}``, or, once
  streaming, an SSE event ``data: {"error": ...}`` followed by ``data: [DONE]``);
* ``disconnected``: this client closed the stream on purpose (random disconnects);
* ``cut``: the answer ended without an error object (connection dropped, a stream without
  ``[DONE]``, a body that is not an error object) -- a server bug;
* ``hung``: no answer within ``timeout_s`` -- a server bug.
"""
from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import httpx

OUTCOMES = ("ok", "error", "disconnected", "cut", "hung")


@dataclass
class Result:
    outcome: str
    kind: str  # "stream", "plain" or "bad"
    start: float  # time.monotonic()
    end: float
    status: int = 0
    replica: str = ""
    detail: str = ""
    retry_after: Optional[str] = None
    code: Optional[str] = None  # the error object's code (error outcomes)

    def as_dict(self) -> dict:
        return asdict(self)


def _is_error_object(body) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]


def chat(client: httpx.Client, url: str, model: str, *, stream: bool, max_tokens: int, prompt: str = "Hi!",
         bad: bool = False, disconnect_after: Optional[int] = None, timeout_s: float = 60.0) -> Result:
    """One chat completion against ``url`` (the app's base URL), classified (see module docstring).

    ``bad``: an invalid request (out-of-range temperature; a 400 error object is its right answer).
    ``disconnect_after``: close a stream after that many SSE events."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": stream}
    if bad:
        body["temperature"] = 7.5
    kind = "bad" if bad else ("stream" if stream else "plain")
    t0 = time.monotonic()

    def done(outcome, status=0, replica="", detail="", retry_after=None, error=None) -> Result:
        code = (error or {}).get("code") or (error or {}).get("type") if error else None
        return Result(outcome, kind, t0, time.monotonic(), status, replica, detail[:300], retry_after, code)

    try:
        if not stream:
            r = client.post(f"{url}/v1/chat/completions", json=body, timeout=timeout_s)
            try:
                data = r.json()
            except ValueError:
                return done("cut", r.status_code, detail=r.text)
            if r.status_code == 200 and data.get("choices"):
                return done("ok", 200, r.headers.get("x-eeserve-replica", ""))
            if r.status_code >= 400 and _is_error_object(data):
                return done("error", r.status_code, detail=json.dumps(data["error"]),
                            retry_after=r.headers.get("retry-after"), error=data["error"])
            return done("cut", r.status_code, detail=r.text)
        with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout_s) as r:
            replica = r.headers.get("x-eeserve-replica", "")
            if r.status_code != 200:
                r.read()
                try:
                    data = r.json()
                except ValueError:
                    return done("cut", r.status_code, detail=r.text)
                ok = _is_error_object(data)
                return done("error" if ok else "cut", r.status_code, detail=r.text,
                            retry_after=r.headers.get("retry-after"), error=data["error"] if ok else None)
            events, finished, error, deadline = 0, False, None, t0 + timeout_s
            for line in r.iter_lines():
                if time.monotonic() > deadline:
                    return done("hung", 200, replica, "stream past its deadline")
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    if error is not None:
                        return done("error", 200, replica, json.dumps(error), error=error)
                    return done("ok" if finished else "cut", 200, replica, "" if finished else "[DONE] early")
                data = json.loads(payload)
                if _is_error_object(data):
                    error = data["error"]
                    continue
                events += 1
                if any(c.get("finish_reason") for c in data.get("choices", [])):
                    finished = True
                if disconnect_after is not None and events >= disconnect_after:
                    return done("disconnected", 200, replica)
            return done("cut", 200, replica, "stream ended without [DONE]")
    except httpx.TimeoutException as e:
        return done("hung", detail=repr(e))
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return done("cut", detail=repr(e))


@dataclass
class LoadGenerator:
    """``concurrency`` threads sending requests back to back until :meth:`stop`.

    Each request is streaming with probability ``stream_share`` (else non-streaming), invalid with
    probability ``bad_share``; a stream is closed early with probability ``disconnect_share``."""

    url: str
    model: str
    concurrency: int
    max_tokens: int = 32
    stream_share: float = 0.5
    bad_share: float = 0.0
    disconnect_share: float = 0.0
    timeout_s: float = 60.0
    prompts: tuple = ("Hi!", "Write one sentence about the sea.", "List three colors.", "Count to five.")
    seed: int = 0
    results: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._target = self.concurrency
        self._busy: dict[int, tuple[float, str]] = {}  # thread -> (start, kind) of its request in flight

    def _worker(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        with httpx.Client() as client:
            while not self._stop.is_set():
                if i >= self._target:
                    time.sleep(0.1)
                    continue
                stream = rng.random() < self.stream_share
                bad = rng.random() < self.bad_share
                cut = rng.randint(1, 4) if stream and rng.random() < self.disconnect_share else None
                self._busy[i] = (time.monotonic(), "bad" if bad else ("stream" if stream else "plain"))
                res = chat(client, self.url, self.model, stream=stream, bad=bad, disconnect_after=cut,
                           max_tokens=rng.randint(self.max_tokens // 2, self.max_tokens),
                           prompt=rng.choice(self.prompts), timeout_s=self.timeout_s)
                with self._lock:
                    self._busy.pop(i, None)
                    self.results.append(res)

    def start(self) -> "LoadGenerator":
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True)
                         for i in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def set_concurrency(self, n: int) -> None:
        """Active threads from now on (at most ``concurrency``); the others idle."""
        self._target = min(n, self.concurrency)

    def stop(self, join_timeout_s: Optional[float] = None) -> list[Result]:
        """Stop sending; wait for the requests in flight (at most their timeout); return all results
        (a request still without an answer then counts as ``hung``)."""
        self._stop.set()
        deadline = time.monotonic() + (join_timeout_s if join_timeout_s is not None else self.timeout_s + 10)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = [Result("hung", kind, start, time.monotonic(), detail="no answer at stop")
                     for i, (start, kind) in self._busy.items() if self._threads[i].is_alive()]
            return list(self.results) + stuck


def summarize(results: list[Result]) -> dict:
    """Counts per outcome (all of :data:`OUTCOMES`), in all and per kind (with its ``total``)."""
    out = {o: 0 for o in OUTCOMES}
    kinds: dict[str, dict[str, int]] = {}
    for r in results:
        out[r.outcome] += 1
        k = kinds.setdefault(r.kind, {"total": 0, **{o: 0 for o in OUTCOMES}})
        k[r.outcome] += 1
        k["total"] += 1
    return {"total": len(results), **out, "by_kind": kinds}
