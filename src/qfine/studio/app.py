"""The studio's web app (Starlette): a JSON API, server-sent events for live curves and chat, and the
static page under ``static/`` (its plotting library, uPlot, ships in the package: nothing from a CDN).

Every route sits behind :class:`Guard`: a Host header that names this machine on a loopback bind (a
web page elsewhere cannot reach the studio through DNS rebinding), the access token on any other
bind, and, for a request that changes something, a JSON or octet-stream body (a cross-site form post
cannot send one without the browser asking first, which the studio never allows).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from qfine import config as C
from qfine.studio import chat, paths, presets, views
from qfine.studio.jobs import GGUF_QUANTS, Jobs
from qfine.studio.runs import METRICS, Metrics, listing
from qfine.util import runstate
from qfine.util.errors import QfineError

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
POLL_S = 0.25  # how often a live view looks at metrics.jsonl: a new row is shown within about this


@dataclass
class Settings:
    """What ``qfine studio`` was started with."""

    runs: Path
    data: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None  # required on every route when set (any non-loopback bind sets one)
    max_upload: int = 256 * 2**20  # bytes

    @property
    def uploads(self) -> Path:
        return self.data[0] / "uploads"


class Guard:
    """ASGI middleware: Host check on loopback, token elsewhere, no simple cross-site posts."""

    def __init__(self, app, settings: Settings):
        self.app, self.s = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        why = self.refusal(scope, headers)
        if why is not None:
            status, text = why
            return await Response(text, status, media_type="text/plain")(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if self.s.token and query.get("token") and scope["method"] == "GET" and scope["path"] == "/":
            # the printed link: keep the token in a cookie and drop it from the address bar
            resp = Response(status_code=303, headers={"location": "/"})
            resp.set_cookie("qfine_token", self.s.token, httponly=True, samesite="strict")
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, scope, headers) -> tuple[int, str] | None:
        if self.s.token:
            if not self._token_ok(scope, headers):
                return 401, "qfine studio: this address needs the access token printed when the studio started"
        elif _host_name(headers.get("host", "")) not in LOOPBACK:
            return 403, "qfine studio: bound to loopback; open it as http://127.0.0.1:PORT"
        if scope["method"] not in ("GET", "HEAD"):
            kind = headers.get("content-type", "").split(";")[0].strip()
            if kind not in ("application/json", "application/octet-stream"):
                return 415, "qfine studio: requests that change something send JSON (or a file as octet-stream)"
        return None

    def _token_ok(self, scope, headers) -> bool:
        given = []
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[7:])
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is no token
            pass
        if "qfine_token" in cookie:
            given.append(cookie["qfine_token"].value)
        given += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        return any(hmac.compare_digest(g.encode(), self.s.token.encode()) for g in given)


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _error(e: Exception) -> JSONResponse:
    status = 403 if isinstance(e, paths.Refused) else 400
    return JSONResponse({"error": str(e)}, status)


def build(settings: Settings) -> Starlette:
    """The studio's app for ``settings`` (also what the tests serve)."""
    settings.runs.mkdir(parents=True, exist_ok=True)
    metrics, jobs, models = Metrics(), Jobs(settings.runs), chat.Models(settings.runs)
    # read every run's files once in the background, so that the first page is served from the cache
    threading.Thread(target=listing, args=(settings.runs, metrics), daemon=True).start()
    meta_answer = {"presets": {k: {"title": v["title"], "fields": presets.flat(k)} for k, v in presets.PRESETS.items()},
                   "fields": views.form_fields(), "quants": list(GGUF_QUANTS), "max_upload": settings.max_upload,
                   "data_roots": [str(r) for r in settings.data], "runs_root": str(settings.runs)}

    def run_dir(request: Request, exists: bool = True) -> Path:
        name = paths.run_name(request.path_params["name"])
        d = settings.runs / name
        if exists and not (d / "config.yaml").is_file() and runstate.lock_holder(d) is None \
                and jobs.latest(name) is None:
            raise QfineError(f"no run named {name} under {settings.runs}")
        return d

    async def body(request: Request) -> dict:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError:
            raise QfineError("the request body is not JSON") from None
        if not isinstance(data, dict):
            raise QfineError("the request body must be a JSON object")
        return data

    def api(handler):
        """A JSON route: QfineError → 400 (403 for a refused path) with its message."""
        async def route(request: Request):
            try:
                out = await handler(request)
            except QfineError as e:
                return _error(e)
            return out if isinstance(out, Response) else JSONResponse(out)
        return route

    @api
    async def runs(request):
        return {"runs": await run_in_threadpool(listing, settings.runs, metrics, jobs), "root": str(settings.runs)}

    @api
    async def run(request):
        d = run_dir(request)
        out = await run_in_threadpool(views.run_detail, d, metrics)
        out["state"], out["detail"] = jobs.state(d.name, (out["state"], out["detail"]))
        out["jobs"] = jobs.jobs(d.name)
        return out

    @api
    async def run_metrics(request):
        d = run_dir(request)
        rows, version = metrics.rows(d / METRICS)
        return {"rows": rows, "version": version}

    @api
    async def report(request):
        d = run_dir(request)
        if not (d / "report.html").is_file():
            raise QfineError(f"{d.name} has no report yet")
        return FileResponse(d / "report.html", media_type="text/html",
                            headers={"Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; "
                                                                "style-src 'unsafe-inline'"})

    async def events(request: Request):
        """Server-sent events for a live run page: ``rows`` (new metrics rows, or all of them again after
        the file was replaced, with ``reset``) and ``state`` whenever the run's state changes."""
        try:
            d = run_dir(request)
        except QfineError as e:
            return _error(e)
        sent = int(request.query_params.get("from", "0") or 0)

        async def stream():
            nonlocal sent
            version, state, seen_jobs = None, None, None
            while not await request.is_disconnected():
                rows, v = metrics.rows(d / METRICS)
                reset = version is not None and v != version
                if reset:
                    sent = 0
                if len(rows) > sent or reset:
                    yield _sse("rows", {"from": sent, "rows": rows[sent:], "reset": reset, "version": v})
                    sent = len(rows)
                version = v
                now = jobs.state(d.name, runstate.state_of(d))
                views_ = jobs.jobs(d.name)
                seen = [(j["state"], j["log"][-200:]) for j in views_]
                if now != state or seen != seen_jobs:  # a job's progress, or its end, redraws the page
                    state, seen_jobs = now, seen
                    yield _sse("state", {"state": now[0], "detail": now[1], "jobs": views_})
                await asyncio.sleep(POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-store"})

    @api
    async def launch(request):
        data = await body(request)
        name = paths.run_name(str(data.get("name", "")))
        cfg = views.build_config(data.get("fields") or {}, settings.data)
        job = await run_in_threadpool(jobs.launch, name, cfg)
        return {"run": name, "job": job.view()}

    @api
    async def stop(request):
        return {"pid": jobs.stop(run_dir(request).name)}

    @api
    async def resume(request):
        return {"job": (await run_in_threadpool(jobs.resume, run_dir(request).name)).view()}

    @api
    async def export(request):
        data = await body(request)
        job = jobs.export(run_dir(request).name, str(data.get("form", "gguf")), str(data.get("quant", "")))
        return {"job": job.view()}

    @api
    async def job_list(request):
        return {"jobs": jobs.jobs(request.query_params.get("run"))}

    @api
    async def plan(request):
        data = await body(request)
        cfg = views.build_config(data.get("fields") or {}, settings.data, need_data=False)
        return await run_in_threadpool(views.plan_text, cfg, str(data.get("gpu_memory", "24GiB")))

    @api
    async def data_files(request):
        return {"files": await run_in_threadpool(paths.listed, settings.data),
                "roots": [str(r) for r in settings.data]}

    @api
    async def preview(request):
        data = await body(request)
        path = paths.in_roots(settings.data, str(data.get("path", "")))
        fields = {k: v for k, v in (data.get("fields") or {}).items() if k.startswith("data.") and v not in ("", None)}
        cfg = views.build_config({**fields, "data.path": str(data.get("path"))}, settings.data)
        source = views.model_source(str((data.get("fields") or {}).get("model.source") or "default"), settings.data)
        text = await run_in_threadpool(views.preview_text, path, source, cfg.data, int(data.get("example", 0)))
        return {"text": text}

    @api
    async def run_preview(request):
        d = run_dir(request)
        cfg = C.load_yaml(d / "config.yaml")
        path = Path(cfg.data.path or "")
        roots = [settings.runs, *settings.data]
        if not cfg.data.path or not any(path.resolve().is_relative_to(r.resolve()) for r in roots):
            raise paths.Refused(f"{d.name}'s data file {cfg.data.path} lies outside the studio's folders "
                                "(qfine studio --data DIR to show it)")
        source = cfg.model.source if not Path(cfg.model.source).exists() else str(Path(cfg.model.source).resolve())
        return {"text": await run_in_threadpool(views.preview_text, path.resolve(), source, cfg.data)}

    @api
    async def upload(request):
        return await _upload(request, settings)

    async def chat_route(request: Request):
        try:
            data = await body(request)
            name = paths.run_name(str(data.get("run", "")))
            if not (settings.runs / name / "config.yaml").is_file():
                raise QfineError(f"no run named {name}")
            messages = chat.check_messages(data.get("messages"))
            max_new = min(int(data.get("max_new_tokens", 128)), 1024)
            temperature = float(data.get("temperature", 0.0))
            what = str(data.get("what", "adapter"))
            # load before answering, so that a missing adapter is a clean 400 and not a broken stream
            await run_in_threadpool(models.get, name, what)
        except (QfineError, ValueError, TypeError) as e:
            return _error(e if isinstance(e, QfineError) else QfineError(str(e)))
        pieces = chat.reply(models, name, what, messages, max_new, temperature)

        async def stream():
            t0 = time.perf_counter()
            try:
                async for piece in iterate_in_threadpool(pieces):
                    yield _sse("piece", {"text": piece})
            except Exception as e:  # noqa: BLE001 - shown in the chat pane, the studio stays up
                yield _sse("error", {"error": str(e)})
            yield _sse("done", {"seconds": round(time.perf_counter() - t0, 2)})

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-store"})

    @api
    async def meta(request):
        return meta_answer

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    routes = [
        Route("/", index),
        Route("/api/meta", meta),
        Route("/api/runs", runs),
        Route("/api/runs/{name}", run),
        Route("/api/runs/{name}/metrics", run_metrics),
        Route("/api/runs/{name}/events", events),
        Route("/api/runs/{name}/report", report),
        Route("/api/runs/{name}/preview", run_preview, methods=["POST"]),
        Route("/api/runs/{name}/stop", stop, methods=["POST"]),
        Route("/api/runs/{name}/resume", resume, methods=["POST"]),
        Route("/api/runs/{name}/export", export, methods=["POST"]),
        Route("/api/jobs", job_list),
        Route("/api/launch", launch, methods=["POST"]),
        Route("/api/plan", plan, methods=["POST"]),
        Route("/api/data", data_files),
        Route("/api/preview", preview, methods=["POST"]),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/chat", chat_route, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(Guard, settings=settings)
    return app


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _upload(request: Request, settings: Settings) -> dict:
    """A data file sent as the raw body (``?name=FILE``), at most ``settings.max_upload`` bytes: a
    declared length over the cap is refused before a byte is read, and a body without one is cut off
    (and its partial file removed) as soon as it passes the cap."""
    if not settings.data:
        raise QfineError("no data root was given (qfine studio --data DIR): nowhere to put uploads")
    name = request.query_params.get("name", "")
    if not paths.RUN_NAME.fullmatch(name) or not name.endswith((".jsonl", ".json", ".csv", ".txt")):
        raise QfineError(f"{name!r}: an upload is named like data.jsonl (letters, digits, '._-'; .jsonl, .json, "
                         ".csv or .txt)")
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > settings.max_upload:
        return JSONResponse({"error": f"upload of {int(declared):,} bytes refused: the limit is "
                                      f"{settings.max_upload:,} (qfine studio --max-upload)"}, 413,
                            headers={"connection": "close"})
    settings.uploads.mkdir(parents=True, exist_ok=True)
    target = paths.inside(settings.data[0], f"uploads/{name}", must_exist=False)
    if target.exists():
        raise QfineError(f"uploads/{name} exists already: rename the file")
    fd, tmp = tempfile.mkstemp(dir=settings.uploads, prefix=".upload-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_upload:
                    os.unlink(tmp)
                    # closing the connection stops a client that would send the rest of its body
                    return JSONResponse({"error": f"upload refused at {size:,} bytes: the limit is "
                                                  f"{settings.max_upload:,} (qfine studio --max-upload)"}, 413,
                                        headers={"connection": "close"})
                f.write(chunk)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": f"uploads/{name}", "bytes": size}
