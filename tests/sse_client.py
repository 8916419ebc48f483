"""A streaming completion over real HTTP, for tests that read the SSE events a server sends."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def stream_completion(base_url: str, body: dict, timeout: float = 60) -> tuple[int, list[dict]]:
    """Status and the SSE events (``[DONE]`` dropped) of a streaming ``/v1/completions``; an HTTP error
    gives its status and its JSON body as the one event."""
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            events = [json.loads(line[6:]) for line in resp.read().decode().splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            return resp.status, events
    except urllib.error.HTTPError as err:
        return err.code, [json.loads(err.read())]
