"""A client of the engine agent's HTTP API (`weightlift serve --http`, `Receiver.serve_http`),
with the standard library only.

    client = weightlift.Client("http://127.0.0.1:8000", token=None)
    client.update_weights(8, sender="unix:/tmp/trainer.sock")   # or disk="/ckpt/step-8"
    client.weights_checker("snapshot"); client.weights_checker("compare")
    client.version()    # {"version": 8, "dirty": False, ...}
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Iterable, Optional

from weightlift._weightlift import WeightliftError


class AgentError(WeightliftError):
    """An error answer of the agent: `status` (HTTP), `code` (`busy`, `stale_version`,
    `paused`, `update_failed`, `fetch_failed`, `not_found`, `invalid_request`, ...), the
    message, and `report` when an update was attempted and not committed."""

    def __init__(self, status: int, code: str, message: str, report: Optional[dict] = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.report = status, code, message, report


class Client:
    """Client(url, token=None, timeout=600.0): calls to one agent; every error answer raises
    AgentError."""

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            with e:  # close the connection now, not whenever the exception is collected
                payload = e.read()
            try:
                error = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                raise AgentError(e.code, "http_error", payload.decode(errors="replace")) from None
            raise AgentError(e.code, error.get("code", "?"), error.get("message", ""), error.get("report")) from None
        return json.loads(payload) if kind.startswith("application/json") else payload.decode()

    def health(self) -> dict:
        return self._call("GET", "/health")

    def version(self) -> dict:
        """{"version": committed, "dirty": bool, "dirty_tensors": [...], "in_flight": int | None}"""
        return self._call("GET", "/version")

    def metrics(self) -> str:
        """The Prometheus (OpenMetrics) text."""
        return self._call("GET", "/metrics")

    def openapi(self) -> dict:
        return self._call("GET", "/openapi.json")

    def update_weights(
        self,
        version: int,
        *,
        disk: Optional[str] = None,
        sender: Optional[str] = None,
        transfer_mode: str = "auto",
    ) -> dict:
        """Updates the engine to `version` from a checkpoint directory (`disk`) or from a sender
        waiting for receivers (`sender`, e.g. "unix:/tmp/trainer.sock"); returns the committed
        update's report."""
        if (disk is None) == (sender is None):
            raise ValueError("give exactly one of disk= and sender=")
        source = {"disk": disk} if disk is not None else {"sender": sender}
        body = {"version": str(version), "source": source, "transfer_mode": transfer_mode}
        return self._call("POST", "/update_weights", body)

    def weights_checker(self, action: str) -> dict:
        """`snapshot`, `compare`, `reset` or `checksum`."""
        return self._call("POST", "/weights_checker", {"action": action})

    def release_memory_occupation(self, tags: Optional[Iterable[str]] = None) -> dict:
        return self._call("POST", "/release_memory_occupation", {"tags": list(tags or [])})

    def resume_memory_occupation(self, tags: Optional[Iterable[str]] = None) -> dict:
        return self._call("POST", "/resume_memory_occupation", {"tags": list(tags or [])})
