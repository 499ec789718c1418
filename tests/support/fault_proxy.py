"""A fault-injecting reverse proxy in front of the real FHIR server, for the outage tests.

Run by the tests as
    mitmdump --mode reverse:http://127.0.0.1:8090/ -p PORT -s tests/support/fault_proxy.py

Controlled over HTTP on the proxy itself (these paths never reach the FHIR server):
    GET /__fault/mode?set=pass|hang|garbage|noversion|create200
                                      hang: requests are held unanswered (the client times out)
                                      until the mode is set back to pass; then they are dropped
                                      garbage: every request is answered 200 without reaching the
                                      server, in turn with an HTML page, an empty body, broken JSON
                                      and a batch-response with no entries (a proxy's error page, a
                                      body lost on the way)
                                      noversion: forwarded, but the answers carry no version: no
                                      ETag or Location header, batch entries without etag,
                                      location or resource, creates answered 200 (a server seen in
                                      the field)
                                      create200: forwarded, creates answered 200 instead of 201,
                                      and every other _history listed oldest-first
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

STATE = {"mode": "pass", "inject": None, "log": [], "garbage": 0, "history": 0}

GARBAGE = [
    (b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>", "text/html"),
    (b"", "application/fhir+json"),
    (b'{"resourceType": "Bundle", "type": "batch-response", "entry": [', "application/fhir+json"),
    (b'{"resourceType": "Bundle", "type": "batch-response"}', "application/fhir+json"),
]


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
    if STATE["mode"] == "garbage":
        body, ctype = GARBAGE[STATE["garbage"] % len(GARBAGE)]
        STATE["garbage"] += 1
        flow.response = http.Response.make(200, body, {"Content-Type": ctype})
        entry["injected"] = "garbage"
        return
    if STATE["mode"] == "hang":
        entry["injected"] = "hang"
        while STATE["mode"] == "hang":
            await asyncio.sleep(0.1)
        flow.kill()


def _created_as_200(status: str) -> str:
    return "200 OK" if status.startswith("201") else status


def response(flow: http.HTTPFlow) -> None:
    mode = STATE["mode"]
    if mode not in ("noversion", "create200") or flow.request.path.startswith("/__fault/"):
        return
    resp = flow.response
    if resp is None:
        return
    if resp.status_code == 201:
        resp.status_code = 200
        resp.reason = "OK"
    if mode == "noversion":
        for h in ("ETag", "Location", "Content-Location"):
            if h in resp.headers:
                del resp.headers[h]
    try:
        body = json.loads(resp.content or b"null")
    except ValueError:
        return
    if not isinstance(body, dict):
        return
    changed = False
    if body.get("resourceType") == "Bundle" and body.get("type") == "batch-response":
        try:
            sent = [e.get("request", {}).get("method") for e in json.loads(flow.request.content).get("entry", [])]
        except (ValueError, AttributeError):
            sent = []
        for e, method in zip(body.get("entry", []), sent):
            r = e.get("response", {})
            r["status"] = _created_as_200(r.get("status", ""))
            if mode == "noversion" and method == "PUT" and r.get("status", "").startswith("2"):
                for k in ("etag", "location", "lastModified"):
                    r.pop(k, None)
                e.pop("resource", None)
        changed = True
    elif mode == "noversion" and flow.request.method == "PUT":
        body.pop("meta", None)
        changed = True
    elif mode == "create200" and "/_history" in flow.request.path and body.get("resourceType") == "Bundle":
        STATE["history"] += 1
        if STATE["history"] % 2 == 0:
            body["entry"] = list(reversed(body.get("entry", [])))
            changed = True
    if changed:
        resp.content = json.dumps(body).encode()
