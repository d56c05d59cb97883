"""The HTTP layer of ``crossfind serve``: FastAPI routes over :class:`~retrieval.server.service.Service`.

Every JSON answer has the shape of the matching CLI command's ``--json``
(``/api/search`` is exactly ``search --json``'s object); every refusal is a
4xx with ``{"error": "..."}``; an unexpected failure is a 500 with a one-line
``{"error"}`` and the traceback goes to the server's log only. ``/docs`` is
Swagger UI served from the package (fastapi-offline), so it works offline.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from ..errors import CrossfindError, LibraryError
from ..types import MAX_K, SearchQuery
from . import SOCKET_NAME
from .jobs import JobBusy
from .service import NotFound, Service
from .thumbs import MAX_SIZE, MIN_SIZE

LOG = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
#: Largest upload accepted (bytes).
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
TOKEN_COOKIE = "crossfind_token"


@dataclass(frozen=True)
class ServeOptions:
    """How ``crossfind serve`` listens."""

    host: str = "127.0.0.1"  # TCP address to bind
    port: int = 8756  # TCP port (0: any free port)
    model: str | None = None  # model for requests that name none (None: the library's default)
    token: str | None = None  # bearer token every TCP request must carry
    insecure_no_token: bool = False  # allow a non-loopback host without a token
    cors: tuple[str, ...] = ()  # origins allowed cross-origin requests
    unix_socket: bool = True  # also listen on LIBRARY/serve.sock (the CLI's way in)
    db: str | None = field(default=None, repr=False)  # the store's database URL (None: $CROSSFIND_DATABASE_URL, else SQLite in the library)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _id(raw: str) -> int:
    """An item id from the URL; anything else (a path, ``..``) is simply not found."""
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"no item {raw!r}: items are addressed by their numeric id")
    return int(raw)


def _over_unix_socket(request: Request) -> bool:
    """Requests on the library's unix socket: only the library owner can connect (mode 0600)."""
    server = request.scope.get("server")
    return isinstance(server, (tuple, list)) and len(server) == 2 and server[1] is None


def create_app(service: Service, token: str | None = None, cors: tuple[str, ...] = (),
               allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The ASGI app for ``service``: JSON API under ``/api``, the web page at ``/``, docs at ``/docs``.

    ``allowed_hosts`` (when given) are the only ``Host`` headers answered: a
    server on 127.0.0.1 answers only to loopback names, so a web page cannot
    reach it by pointing its own domain name at 127.0.0.1 (DNS rebinding).
    """
    from .. import __version__

    app = FastAPIOffline(
        title="crossfind",
        version=__version__,
        description="Search a crossfind library by text or example image. JSON objects have the shape of the CLI's `--json`.",
        redoc_url=None,
    )

    _add_error_handlers(app)
    _add_guards(app, token, cors, allowed_hosts)

    # -------------------------------------------------------------- page
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    _add_search_routes(app, service)
    _add_item_routes(app, service)
    _add_library_routes(app, service)
    return app


def _answer(res: Any) -> JSONResponse:
    """A search's (or duplicates') JSON, with its notes in the ``X-Crossfind-Notes`` header."""
    return JSONResponse(res.to_json(), headers={"X-Crossfind-Notes": json.dumps(list(res.notes))})


def _add_error_handlers(app: FastAPI) -> None:
    """Library errors as one-line JSON errors with their HTTP status; anything else a 500 that names only its type."""
    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body"))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", "invalid request")))

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(JobBusy)
    async def busy(_: Request, exc: JobBusy) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(CrossfindError)
    async def refused(_: Request, exc: CrossfindError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        LOG.error("unexpected error", exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server's log")


def _add_guards(app: FastAPI, token: str | None, cors: tuple[str, ...], allowed_hosts: tuple[str, ...]) -> None:
    """The token check, the Host check (DNS rebinding) and CORS, each only when asked for."""
    if token:
        @app.middleware("http")
        async def require_token(request: Request, call_next: Callable[[Request], Any]) -> Response:
            if _over_unix_socket(request):
                return await call_next(request)
            given = request.headers.get("authorization", "")
            bearer = given[7:] if given.lower().startswith("bearer ") else ""
            cookie = request.cookies.get(TOKEN_COOKIE, "")
            query = request.query_params.get("token", "") if request.url.path == "/" else ""
            if any(hmac.compare_digest(x.encode(), token.encode()) for x in (bearer, cookie, query) if x):
                response: Response = await call_next(request)
                if query:  # the page opened as /?token=...: later requests (images too) carry a cookie
                    response = RedirectResponse("/", status_code=303)
                    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
            return _error(401, "this server needs a token: send 'Authorization: Bearer TOKEN' (or open /?token=TOKEN)")

    if allowed_hosts:
        @app.middleware("http")
        async def check_host(request: Request, call_next: Callable[[Request], Any]) -> Response:
            raw = request.headers.get("host", "")
            host = raw[1 : raw.index("]")] if raw.startswith("[") and "]" in raw else raw.rsplit(":", 1)[0]
            if _over_unix_socket(request) or host in allowed_hosts:
                response: Response = await call_next(request)
                return response
            return _error(400, f"unexpected Host header {host!r}; this server answers to {', '.join(allowed_hosts)}")

    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Crossfind-Notes"])


def _add_search_routes(app: FastAPI, service: Service) -> None:
    """``/api/search`` by GET and POST (JSON body or an uploaded image)."""
    @app.get("/api/search", summary="Search (text, or an image of the library)", tags=["search"])
    def search_get(
        request: Request,
        q: str | None = Query(None, description="Text query"),
        image_id: int | None = Query(None, description="Query by a library image (more like this)"),
        target: str = Query("images", description="images or texts"),
        k: int = Query(10, ge=1, le=MAX_K),
        candidates: int = Query(50, ge=1, le=MAX_K, description="Candidates the reranker re-scores"),
        rerank: bool = Query(True),
        threshold: float | None = Query(None, ge=0, le=1, description="Keep hits whose match probability is at least this"),
        path: str | None = Query(None, description="Images: only paths matching this glob"),
        corpus: str | None = Query(None, description="Texts: only this corpus"),
        since: str | None = Query(None, description="Images: taken on or after (YYYY-MM-DD)"),
        until: str | None = Query(None, description="Images: taken on or before (YYYY-MM-DD)"),
        model: str | None = Query(None, description="Model spec (default: the server's)"),
    ) -> JSONResponse:
        """Exactly `crossfind search --json`'s object. Notes (no reranker...) come in the `X-Crossfind-Notes` header."""
        req = {k_: v for k_, v in request.query_params.items() if k_ != "token"}
        req.pop("model", None)
        query = SearchQuery.from_request(req, service.image_path)
        return _answer(service.search(query, model))

    @app.post("/api/search", summary="Search with a JSON body or an uploaded image", tags=["search"],
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": {"type": "object", "example": {
                      "q": "a red circle", "target": "images", "k": 10,
                      "terms": [{"weight": 1.0, "text": "blue"}, {"weight": -1.0, "image_id": 3}]}}},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary"}, "target": {"type": "string"}, "k": {"type": "integer"}}}},
              }}})
    async def search_post(request: Request) -> JSONResponse:
        """JSON `{"q", "image_id", "terms": [{"weight", "text" | "image_id"}], "target", "k", ...}` (the GET
        parameters), or a multipart form with the image in `file` plus the same fields; the uploaded image is
        not added to the library. Answers exactly `crossfind search --json`'s object."""
        from starlette.concurrency import run_in_threadpool

        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            return await _search_upload(request, service)
        if not ctype.startswith("application/json"):
            return _error(415, "send Content-Type: application/json (or a multipart form with the image in 'file')")
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return _error(400, "the body is not JSON; send a JSON object or a multipart form with the image in 'file'")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        model = body.pop("model", None)
        library_default = bool(body.pop("library_default", False))
        if model is not None and not isinstance(model, str):
            return _error(400, "model must be a string")

        def run() -> Any:
            query = SearchQuery.from_request(body, service.image_path, allow_paths=_over_unix_socket(request))
            return service.search(query, model, library_default)

        return _answer(await run_in_threadpool(run))


async def _search_upload(request: Request, service: Service) -> JSONResponse:
    from starlette.concurrency import run_in_threadpool

    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_UPLOAD_BYTES + 64 * 1024:
        return _error(413, f"upload too large: at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    form = await request.form(max_files=1, max_fields=20)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return _error(400, "put the image in the form field 'file'")
        fields: dict[str, Any] = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
        model = fields.pop("model", None) or None
        if "terms" in fields:
            try:
                fields["terms"] = json.loads(fields["terms"])
            except ValueError:
                return _error(400, "terms must be a JSON list")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
    finally:
        await form.close()
    if len(data) > MAX_UPLOAD_BYTES:
        return _error(413, f"upload too large: at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    if not data:
        return _error(400, "the uploaded file is empty")

    def run() -> Any:
        fd, tmp = tempfile.mkstemp(prefix="upload-", dir=service.library)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            loaded = service.load_upload(Path(tmp), model)
        finally:
            os.unlink(tmp)
        query = SearchQuery.from_request(fields, service.image_path, image=loaded.image)
        return service.search(query, model)

    return _answer(await run_in_threadpool(run))


def _add_item_routes(app: FastAPI, service: Service) -> None:
    """Near-duplicates, items, thumbnails and original files, served by id only."""
    @app.get("/api/duplicates", summary="Near-duplicate groups (`crossfind duplicates --json`)", tags=["search"])
    def duplicates(
        threshold: float | None = Query(None, gt=0, le=1, description="Cosine similarity at or above which two images "
                                        "are duplicates (default: the model's measured one)"),
        path: str | None = Query(None, description="Only images whose path matches this glob"),
        model: str | None = Query(None, description="Model spec (default: the server's)"),
    ) -> JSONResponse:
        """Exactly `crossfind duplicates --json`'s object: groups of near-duplicate and byte-identical images,
        each naming the one to keep. Takes seconds on a large library. crossfind never deletes a file."""
        return _answer(service.duplicates(threshold, path or None, model or None))

    @app.get("/api/items/{kind}/{item_id}", tags=["items"], summary="An image or a text of the library")
    def item(kind: str, item_id: str) -> dict[str, Any]:
        """`kind` is images or texts: path or text, size, date, status and failure reason."""
        return service.item(kind, _id(item_id))

    @app.get("/api/thumbs/{image_id}", tags=["items"], summary="A JPEG thumbnail of a library image")
    def thumb(request: Request, image_id: str, size: int = Query(256, ge=MIN_SIZE, le=MAX_SIZE)) -> Response:
        """EXIF-oriented, cached on disk in the library; `ETag` and `Cache-Control` for the browser."""
        headers = {"Cache-Control": "private, max-age=86400"}
        iid = _id(image_id)
        etag = service.thumb_etag(iid, size)
        if etag is not None and request.headers.get("if-none-match") == etag:
            service.image_file(iid)  # still allowed (not removed, not redirected outside)
            return Response(status_code=304, headers={**headers, "ETag": etag})
        path, etag = service.thumbnail(iid, size)
        # A few KB: read here, in this worker thread, rather than streamed in more thread hops.
        return Response(path.read_bytes(), media_type="image/jpeg", headers={**headers, "ETag": etag})

    @app.get("/api/files/{image_id}", tags=["items"], summary="The original image file")
    def file(image_id: str) -> FileResponse:
        """Served by id only: never a path from the request."""
        path, _ = service.image_file(_id(image_id))
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})


def _add_library_routes(app: FastAPI, service: Service) -> None:
    """Status, history, and background index jobs."""
    @app.get("/api/status", tags=["library"], summary="`crossfind status --json`")
    def status() -> dict[str, Any]:
        out = service.status()
        return out

    @app.get("/api/server", tags=["library"], summary="The server's model and the library's models")
    def server_info() -> dict[str, Any]:
        return {"model": service.resolve_model(None), "library": str(service.library)}

    @app.get("/api/history", tags=["library"], summary="`crossfind history --json`")
    def history(limit: int = Query(20, ge=1, le=10000)) -> dict[str, Any]:
        return service.history(limit)

    @app.get("/api/history/{query_id}", tags=["library"], summary="`crossfind show ID --json`")
    def history_item(query_id: int) -> dict[str, Any]:
        return service.show(query_id)

    @app.post("/api/index", tags=["jobs"], status_code=202, summary="Index a folder in the background",
              openapi_extra={"requestBody": {"content": {"application/json": {"schema": {
                  "type": "object", "properties": {"path": {"type": "string"}, "model": {"type": "string"}},
                  "required": ["path"]}}}}})
    async def index(request: Request) -> JSONResponse:
        """`{"path": "/abs/folder"}` starts a job (202); while one runs, another gets 409."""
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _error(415, "send Content-Type: application/json")  # a cross-site form cannot start jobs
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            return _error(400, 'send {"path": "/absolute/folder"}')
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            return _error(400, "model must be a string")
        from starlette.concurrency import run_in_threadpool

        job = await run_in_threadpool(service.start_index, body["path"], model)
        return JSONResponse(job, status_code=202)

    @app.get("/api/jobs", tags=["jobs"], summary="This server's index jobs, newest first")
    def jobs() -> dict[str, Any]:
        return service.all_jobs()

    @app.get("/api/jobs/{job_id}", tags=["jobs"], summary="An index job's progress")
    def job(job_id: int) -> dict[str, Any]:
        """`{"state", "done", "total", "failed", "rate", "report", "error", ...}`."""
        return service.job(job_id)


# ------------------------------------------------------------------ running
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_tcp(host: str, port: int) -> socket.socket:
    """Listen on HOST:PORT with TCP_NODELAY, which accepted connections inherit.

    asyncio sets TCP_NODELAY only on sockets created with ``proto=IPPROTO_TCP``,
    which ``socket.create_server`` does not do; without it a keep-alive client
    (every browser) waits ~40 ms per response for a delayed ACK (Nagle's
    algorithm holds the body back behind the headers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = socket.create_server((host, port), family=family)
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return tcp


def _bind_unix(path: Path) -> socket.socket | None:
    """Listen on the library's socket; refuse when a live server already owns it."""
    if len(os.fsencode(path)) >= 104:
        return None  # too long for AF_UNIX: the CLI searches in process
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: its server is gone
        else:
            raise LibraryError(f"a server already runs for this library ({path}); stop it first")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is created 0600: only the library's owner may use it
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    return sock


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def run(library: str | os.PathLike[str] | None, opts: ServeOptions, echo: Callable[[str], None]) -> None:
    """Serve until interrupted (SIGINT/SIGTERM); ``echo`` gets the address and warnings."""
    import uvicorn

    if not _is_loopback(opts.host) and not opts.token and not opts.insecure_no_token:
        raise LibraryError(f"binding {opts.host} exposes the library to the network: give --token TOKEN "
                           "(clients send 'Authorization: Bearer TOKEN') or --insecure-no-token")
    service = Service(library, model=opts.model, db=opts.db)
    sockets: list[socket.socket] = []
    uds: Path | None = None
    try:
        family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
        tcp = _bind_tcp(opts.host, opts.port)
        sockets.append(tcp)
        if opts.unix_socket:
            uds_path = service.library / SOCKET_NAME
            unix = _bind_unix(uds_path)
            if unix is None:
                echo("warning: library path too long for a unix socket; `crossfind search` will not use this server")
            else:
                sockets.append(unix)
                uds = uds_path
        spec = service.warm()
        if not _is_loopback(opts.host) and not opts.token:
            echo(f"WARNING: serving {opts.host} without a token: anyone who can reach this port can read your library")
        port = tcp.getsockname()[1]
        shown = f"[{opts.host}]" if family == socket.AF_INET6 else opts.host
        echo(f"crossfind serve: http://{shown}:{port}/ (library {service.library}, model {spec}); Ctrl-C stops")
        hosts = ("127.0.0.1", "localhost", "::1") if _is_loopback(opts.host) else ()
        app = create_app(service, token=opts.token, cors=opts.cors, allowed_hosts=hosts)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        # uvicorn stops gracefully on SIGINT/SIGTERM and then re-raises the signal
        # with the previous handler: make SIGTERM an exception so the socket is removed below.
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            uvicorn.Server(config).run(sockets=sockets)
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
        echo("crossfind serve: stopped")
    except OSError as exc:
        raise LibraryError(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}") from None
    finally:
        for s in sockets:
            s.close()
        if uds is not None:
            uds.unlink(missing_ok=True)
        service.close()
