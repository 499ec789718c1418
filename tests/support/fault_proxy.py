"""A fault-injecting reverse proxy in front of the real FHIR server, for the outage tests.

Run by the tests as
    mitmdump --mode reverse:http://127.0.0.1:8090/ -p PORT -s tests/support/fault_proxy.py

Controlled over HTTP on the proxy itself (these paths never reach the FHIR server):
    GET /__fault/mode?set=pass|hang   hang: requests are held unanswered (the client times out)
                                      until the mode is set back to pass; then they are dropped
    GET /__fault/inject?status=429&retry_after=2&count=5&methods=PUT,POST
                                      the next COUNT requests with one of METHODS are answered
                                      STATUS with `Retry-After: RETRY_AFTER` instead of forwarded
    GET /__fault/log                  every request seen: [{"t", "method", "path", "injected"}]
"""

import asyncio
import json
import time
from urllib.parse import parse_qs, urlsplit

from mitmproxy import http

STATE = {"mode": "pass", "inject": None, "log": []}


def _control(flow: http.HTTPFlow, path: str, query: dict) -> None:
    q = {k: v[0] for k, v in query.items()}
    if path == "/__fault/mode":
        STATE["mode"] = q.get("set", "pass")
    elif path == "/__fault/inject":
        STATE["inject"] = {
            "status": int(q.get("status", "503")),
            "retry_after": q.get("retry_after"),
            "count": int(q.get("count", "1")),
            "methods": set(q.get("methods", "GET,PUT,POST").split(",")),
        }
    elif path != "/__fault/log":
        flow.response = http.Response.make(404, b"unknown control path", {"Content-Type": "text/plain"})
        return
    body = json.dumps({"mode": STATE["mode"], "inject": bool(STATE["inject"]), "log": STATE["log"]})
    flow.response = http.Response.make(200, body.encode(), {"Content-Type": "application/json"})


async def request(flow: http.HTTPFlow) -> None:
    parts = urlsplit(flow.request.path)
    if parts.path.startswith("/__fault/"):
        _control(flow, parts.path, parse_qs(parts.query))
        return
    entry = {"t": time.time(), "method": flow.request.method, "path": flow.request.path, "injected": None}
    STATE["log"].append(entry)
    inject = STATE["inject"]
    if inject and inject["count"] > 0 and flow.request.method in inject["methods"]:
        inject["count"] -= 1
        if inject["count"] == 0:
            STATE["inject"] = None
        headers = {"Content-Type": "application/fhir+json"}
        if inject["retry_after"] is not None:
            headers["Retry-After"] = str(inject["retry_after"])
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "throttled", "diagnostics": "injected by the fault proxy"}],
        }
        flow.response = http.Response.make(inject["status"], json.dumps(outcome).encode(), headers)
        entry["injected"] = inject["status"]
        return
    if STATE["mode"] == "hang":
        entry["injected"] = "hang"
        while STATE["mode"] == "hang":
            await asyncio.sleep(0.1)
        flow.kill()
