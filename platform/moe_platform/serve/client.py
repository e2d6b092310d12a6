"""A minimal stdlib client for the completions and chat completions endpoints (tests, benchmarks, scripts).

Any OpenAI-compatible client works too (base_url=<app url>/v1); this one needs
nothing beyond the standard library and shows exactly what goes over the wire.
"""
from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Union
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    body: Any  # parsed JSON, or the raw text when the body is not JSON
    headers: Dict[str, str]


class CompletionsClient:
    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout_s: float = 60.0) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def complete(self, **request: Any) -> Reply:
        """POST /v1/completions with the given fields as the JSON body."""
        return self.request("POST", "/v1/completions", request)

    def chat(self, **request: Any) -> Reply:
        """POST /v1/chat/completions with the given fields (messages=[...], ...) as the JSON body."""
        return self.request("POST", "/v1/chat/completions", request)

    def models(self) -> Reply:
        return self.request("GET", "/v1/models")

    def request(
        self,
        method: str,
        path: str,
        body: Union[None, bytes, Dict[str, Any]] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> Reply:
        conn = self._connect()
        try:
            conn.request(method, self.prefix + path, body=_encode(body), headers=self._headers(headers))
            response = conn.getresponse()
            raw = response.read().decode("utf-8", errors="replace")
            return Reply(response.status, _parse(raw), {k.lower(): v for k, v in response.getheaders()})
        finally:
            conn.close()

    def stream(self, **request: Any) -> Iterator[Union[Dict[str, Any], str]]:
        """POST a streaming completion; yield each event's JSON, then the string "[DONE]".
        Raises RuntimeError with the error body if the server answers with an error status."""
        return self._stream("/v1/completions", request)

    def stream_chat(self, **request: Any) -> Iterator[Union[Dict[str, Any], str]]:
        """As `stream`, for /v1/chat/completions."""
        return self._stream("/v1/chat/completions", request)

    def _stream(self, path: str, request: Dict[str, Any]) -> Iterator[Union[Dict[str, Any], str]]:
        conn = self._connect()
        try:
            body = _encode({**request, "stream": True})
            conn.request("POST", self.prefix + path, body=body, headers=self._headers(None))
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read().decode(errors='replace')}")
            yield from _sse_events(response)
        finally:
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def _headers(self, extra: Optional[Dict[str, str]]) -> Dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(extra or {})
        return headers


def _encode(body: Union[None, bytes, Dict[str, Any]]) -> Optional[bytes]:
    if body is None or isinstance(body, bytes):
        return body
    return json.dumps(body).encode()


def _parse(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _sse_events(response: http.client.HTTPResponse) -> Iterator[Union[Dict[str, Any], str]]:
    """Server-sent events: `data: ...` lines, events separated by a blank line."""
    data: List[str] = []
    for raw_line in response:
        line = raw_line.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            payload = "\n".join(data)
            data = []
            if payload == "[DONE]":
                yield "[DONE]"
                return
            yield json.loads(payload)
