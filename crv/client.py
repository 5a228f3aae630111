"""A Python client of the crv service::

    from crv.client import Client
    c = Client("http://127.0.0.1:8000", api_key=None)
    steps = c.verify("arith", "(3+4)*2", ["3+4=7 => 7*2", "7*2=15 => 15"])
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx


class ServiceError(RuntimeError):
    """The service answered with an error (``status`` and its ``detail``)."""

    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail
        super().__init__(f"{status}: {detail}")


class Client:
    """Calls ``/v1/*`` of a crv server; retries a full queue (429) after its ``Retry-After``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0, retries: int = 5) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, json: dict | None = None) -> dict:
        for attempt in range(self.retries + 1):
            r = self.http.request(method, path, json=json)
            if r.status_code == 429 and attempt < self.retries:
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status_code >= 400:
                try:
                    detail = r.json().get("detail", r.text)
                except ValueError:
                    detail = r.text
                raise ServiceError(r.status_code, str(detail))
            return r.json()
        raise AssertionError("unreachable")

    def model(self) -> dict:
        return self._call("GET", "/v1/model")

    def verify(self, task: str, question: str, steps: Sequence[str], include_graph: bool = False) -> list[dict]:
        """Per-step verdicts (index, text, p_faulty, flagged, threshold, top_features, fingerprint[, graph])."""
        body = {"task": task, "question": question, "steps": list(steps), "include_graph": include_graph}
        return self._call("POST", "/v1/verify", body)["steps"]

    def intervene(self, task: str, question: str, steps: Sequence[str], step_index: int,
                  features: Sequence[tuple[int, int]] | str = "auto", mode: str = "clamp", value: float = 0.0) -> dict:
        """Edit features at a step and regenerate the rest of the trace (see ``POST /v1/intervene``)."""
        body = {"task": task, "question": question, "steps": list(steps), "step_index": step_index,
                "features": features if isinstance(features, str) else [list(f) for f in features], "mode": mode, "value": value}
        return self._call("POST", "/v1/intervene", body)
