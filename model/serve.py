"""The HTTP server for the MedRegA pyfunc: MLflow's scoring contract, hardened.

`POST /invocations` takes what `mlflow models serve` takes for this model (a JSON object with one
of `dataframe_records`, `dataframe_split`, `inputs` or `instances`, and optional
`params.max_new_tokens`) and answers `{"predictions": [{"answer", "regions"}, ...]}`;
`GET /ping` and `GET /health` say it is up (and how busy). Unlike MLflow's scoring server:

- every refusal is a 4xx with a short JSON `{"error_code", "message"}` that names the problem and
  never carries a stack trace, a file path or the request's data; an unexpected failure is a
  500 saying only that (the trace goes to the server's log);
- the body is bounded before it is parsed (Content-Length, then while streaming, then in time),
  its JSON by nesting depth and number of arrays/objects, the request by rows and fields;
- `max_new_tokens` is capped, and each request has a deadline (queueing included) that stops
  generation after the current token: the worker is free again, not left burning a core;
- generation runs on a bounded number of worker threads with a bounded queue (then 503);
- a client that hangs up stops its generation; SIGTERM/SIGINT stop every generation at once
  and the server exits, with no child process to leave behind.

The limits are `the serve section of the config (medrega.config.ServeConfig)`. Run: `medrega serve`, or
`python -m model.serve --model URI_OR_DIR [--port 5001] [--limit deadline_s=30 ...]`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import threading
import time
from typing import Any

from medrega.config import ServeConfig

log = logging.getLogger("medrega.serve")

FORMATS = ("dataframe_records", "dataframe_split", "inputs", "instances")
COLUMNS = ("image", "question", "task")
PARAMS = ("max_new_tokens",)
DEADLINE_GRACE_S = 5.0  # after the deadline, how long to wait for a worker to notice it

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?')  # an unterminated string runs to the end: linear
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class HTTPError(Exception):
    """A refusal: status, a machine-readable code and a short message for the client."""

    def __init__(self, status: int, message: str, code: str = "BAD_REQUEST", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _name(value: Any) -> str:
    """A client-supplied name, safe and short enough to quote in a message."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- the request body -------------------------------------------------------------------------

def check_content_type(value: str | None) -> None:
    if not value:
        raise HTTPError(415, "Content-Type must be application/json", "UNSUPPORTED_MEDIA_TYPE")
    mime, *options = [part.strip() for part in value.split(";")]
    if mime.lower() != "application/json":
        raise HTTPError(415, "Content-Type must be application/json (PNG/JPEG images go base64 inside it)",
                        "UNSUPPORTED_MEDIA_TYPE")
    for option in options:
        key, _, val = option.partition("=")
        if key.strip().lower() != "charset" or val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise HTTPError(415, "Content-Type may only carry charset=utf-8", "UNSUPPORTED_MEDIA_TYPE")


def check_json_shape(text: str, limits: ServeConfig) -> None:
    """Depth and count of arrays/objects, measured on the text before the parser sees it."""
    skeleton = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if len(skeleton) > 2 * limits.max_json_containers:
        raise HTTPError(400, f"the JSON body has more than {limits.max_json_containers} arrays and objects")
    depth = 0
    for ch in skeleton:
        depth += 1 if ch in "[{" else -1
        if depth > limits.max_json_depth:
            raise HTTPError(400, f"the JSON body is nested more than {limits.max_json_depth} levels deep")


def _no_constants(name: str):
    raise ValueError(name)


def parse_body(body: bytes, limits: ServeConfig) -> tuple[list[dict], dict]:
    """The body -> (rows, params), each row a dict of image, question and optional task strings."""
    if not body.strip():
        raise HTTPError(400, "the request body is empty (expected a JSON object)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "the request body is not valid UTF-8") from None
    check_json_shape(text, limits)
    try:
        payload = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise HTTPError(400, "the request body is not valid JSON") from None
    accepted = ", ".join(FORMATS)
    if not isinstance(payload, dict):
        raise HTTPError(400, f"the body must be a JSON object with one of {accepted}")
    for key in payload:
        if key not in FORMATS and key != "params":
            raise HTTPError(400, f"unknown top-level field {_name(key)} (expected one of {accepted}, and params)")
    present = [key for key in FORMATS if key in payload]
    if len(present) != 1:
        raise HTTPError(400, f"the body must have exactly one of {accepted}")
    rows = _rows(present[0], payload[present[0]], limits)
    params = payload.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise HTTPError(400, "params must be a JSON object")
    for key in params:
        if key not in PARAMS:
            raise HTTPError(400, f"params: unknown parameter {_name(key)} (accepted: {', '.join(PARAMS)})")
    return rows, params


def _rows(fmt: str, data: Any, limits: ServeConfig) -> list[dict]:
    if fmt == "dataframe_split":
        if not isinstance(data, dict):
            raise HTTPError(400, "dataframe_split must be an object with columns and data")
        for key in data:
            if key not in ("columns", "data", "index"):
                raise HTTPError(400, f"dataframe_split: unknown field {_name(key)} (expected columns, data, index)")
        columns, values = data.get("columns"), data.get("data")
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise HTTPError(400, "dataframe_split.columns must be a list of column names")
        if len(set(columns)) != len(columns):
            raise HTTPError(400, "dataframe_split.columns has a repeated name")
        if not isinstance(values, list):
            raise HTTPError(400, "dataframe_split.data must be a list of rows")
        _count(len(values), limits)
        rows = []
        for n, row in enumerate(values):
            if not isinstance(row, list) or len(row) != len(columns):
                raise HTTPError(400, f"row {n}: must be a list of {len(columns)} values, one per column")
            rows.append(dict(zip(columns, row)))
    elif isinstance(data, dict) and fmt in ("inputs", "instances"):  # columns: {"image": [...], ...}
        lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
        if not data or -1 in lengths or len(lengths) != 1:
            raise HTTPError(400, f"{fmt}: as an object, each field must be a list, all of one length")
        count = lengths.pop()
        _count(count, limits)
        rows = [{key: values[n] for key, values in data.items()} for n in range(count)]
    elif isinstance(data, list):
        _count(len(data), limits)
        rows = data
    else:
        raise HTTPError(400, f"{fmt} must be a list of rows")
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise HTTPError(400, f"row {n}: must be an object with image, question and optional task")
        for key, value in row.items():
            if key not in COLUMNS:
                raise HTTPError(400, f"row {n}: unknown field {_name(key)} (expected {', '.join(COLUMNS)})")
            if not isinstance(value, str) and not (key == "task" and value is None):
                raise HTTPError(400, f"row {n}: {key} must be a string")
            if isinstance(value, str) and not value.isascii():
                try:  # JSON may spell lone surrogates, which no UTF-8 consumer (Arrow, tokenizers) takes
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise HTTPError(400, f"row {n}: {key} is not valid Unicode text") from None
        for key in ("image", "question"):
            if key not in row:
                raise HTTPError(400, f"row {n}: missing field {key!r}")
    return rows


def _count(n: int, limits: ServeConfig) -> None:
    if n == 0:
        raise HTTPError(400, "the request has no rows")
    if n > limits.max_rows:
        raise HTTPError(400, f"at most {limits.max_rows} rows per request (got {n})")


# -- running generations ----------------------------------------------------------------------

class Job:
    """One request's generation: its deadline and the reasons it may have to stop."""

    def __init__(self, deadline_s: float, stopping: threading.Event):
        self.deadline = time.monotonic() + deadline_s
        self.client_gone = threading.Event()
        self.stopping = stopping

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def should_stop(self) -> bool:
        return self.stopping.is_set() or self.client_gone.is_set() or time.monotonic() >= self.deadline


class Pool:
    """At most `workers` generations at once on daemon threads, `workers + max_queue` requests
    admitted; a worker's slot is freed when its thread ends, not when its client gives up."""

    def __init__(self, limits: ServeConfig):
        self.limits = limits
        self.admitted = 0
        self.running = 0
        self._slots: asyncio.Semaphore | None = None

    def admit(self) -> None:
        if self.admitted >= self.limits.workers + self.limits.max_queue:
            raise HTTPError(503, "the server is busy; retry later", "TEMPORARILY_UNAVAILABLE", {"Retry-After": "5"})
        self.admitted += 1

    def release(self) -> None:
        self.admitted -= 1

    async def run(self, fn, job: Job):
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.workers)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=job.remaining())
        except asyncio.TimeoutError:
            raise HTTPError(504, f"the {self.limits.deadline_s:g} s deadline passed while the request was queued",
                            "DEADLINE_EXCEEDED") from None
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.running += 1

        def finished(outcome):
            self.running -= 1
            self._slots.release()
            if not done.done():
                done.set_result(outcome)

        def work():
            try:
                outcome = (True, fn())
            except BaseException as err:  # handed to the event loop, which answers for it
                outcome = (False, err)
            try:
                loop.call_soon_threadsafe(finished, outcome)
            except RuntimeError:  # the loop is gone: the server has stopped
                pass

        threading.Thread(target=work, name="medrega-generate", daemon=True).start()
        try:
            ok, value = await asyncio.wait_for(asyncio.shield(done), timeout=job.remaining() + DEADLINE_GRACE_S)
        except asyncio.TimeoutError:  # the worker has not noticed yet (a long prefill): answer now
            raise HTTPError(504, f"generation passed the {self.limits.deadline_s:g} s deadline", "DEADLINE_EXCEEDED") from None
        if not ok:
            raise value
        return value


# -- the application ----------------------------------------------------------------------------

def _error(status: int, code: str, message: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error_code": code, "message": message}, status_code=status, headers=headers)


async def read_body(request, limits: ServeConfig) -> bytes:
    """The body, bounded in size (Content-Length first, then while streaming) and in time."""
    too_large = HTTPError(413, f"the request body is larger than {limits.max_body_bytes / (1024 * 1024):g} MiB",
                          "REQUEST_TOO_LARGE", {"Connection": "close"})
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
        raise too_large
    chunks, size = [], 0

    async def receive_all():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limits.max_body_bytes:
                chunks.append(chunk)
            elif size > 2 * limits.max_body_bytes:
                break
            # past the limit, read on (discarding, up to twice the limit) so that the client
            # can read our answer instead of a connection reset

    try:
        await asyncio.wait_for(receive_all(), timeout=limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                        "REQUEST_TIMEOUT", {"Connection": "close"}) from None
    if size > limits.max_body_bytes:
        raise too_large
    return b"".join(chunks)


def parse_frame(body: bytes, limits: ServeConfig):
    import pandas as pd

    rows, params = parse_body(body, limits)
    return pd.DataFrame(rows, columns=[c for c in COLUMNS if any(c in row for row in rows)]), params


async def watch_disconnect(request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.client_gone.set()
            return


def _stopped_error(job: Job, limits: ServeConfig, stopping: threading.Event) -> HTTPError:
    """Why a generation stopped early, as the answer to its client."""
    if stopping.is_set():
        return HTTPError(503, "the server is shutting down", "TEMPORARILY_UNAVAILABLE")
    if job.client_gone.is_set():
        return HTTPError(499, "the client closed the connection", "CLIENT_CLOSED_REQUEST")
    return HTTPError(504, f"generation stopped at the {limits.deadline_s:g} s deadline "
                          "(ask for fewer max_new_tokens or fewer rows)", "DEADLINE_EXCEEDED")


def error_handlers() -> dict:
    """Every failure as a short JSON body: no trace, no path, no request data."""
    from mlflow.exceptions import MlflowException
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    async def on_http_error(request, err: HTTPError):
        return _error(err.status, err.code, err.message, err.headers)

    async def on_mlflow_error(request, err: MlflowException):
        status = err.get_http_status_code()
        if status >= 500:
            log.error("model error on %s", request.url.path, exc_info=err)
            return _error(500, "INTERNAL_ERROR", "internal error")
        return _error(status, err.error_code, _short(err.message))

    async def on_starlette_error(request, err: HTTPException):
        messages = {404: "not found (POST /invocations, GET /ping, GET /health)", 405: "method not allowed"}
        return _error(err.status_code, "NOT_FOUND" if err.status_code == 404 else "BAD_REQUEST",
                      messages.get(err.status_code, "bad request"), getattr(err, "headers", None))

    async def on_client_gone(request, err: ClientDisconnect):
        return _error(499, "CLIENT_CLOSED_REQUEST", "the client closed the connection")

    async def on_unexpected(request, err: Exception):  # Starlette re-raises it to uvicorn's log
        return _error(500, "INTERNAL_ERROR", "internal error")

    return {HTTPError: on_http_error, MlflowException: on_mlflow_error, HTTPException: on_starlette_error,
            ClientDisconnect: on_client_gone, Exception: on_unexpected}


def bounded_headers(app, limits: ServeConfig):
    """ASGI middleware: uvicorn bounds only headers that arrive in pieces; one read can carry far more."""
    async def middleware(scope, receive, send):
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > limits.max_header_bytes:
                response = _error(431, "REQUEST_HEADER_FIELDS_TOO_LARGE",
                                  f"the request headers are larger than {limits.max_header_bytes // 1024} KiB",
                                  {"Connection": "close"})
                return await response(scope, receive, send)
        return await app(scope, receive, send)

    return middleware


def create_app(python_model, limits: ServeConfig, stopping: threading.Event | None = None):
    """A Starlette app around a loaded MedRegAModel (anything with `answer(df, params, limits,
    should_stop)`)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from model.infer import Stopped

    stopping = stopping or threading.Event()
    pool = Pool(limits)

    async def invocations(request):
        check_content_type(request.headers.get("content-type"))
        if stopping.is_set():
            raise HTTPError(503, "the server is shutting down", "TEMPORARILY_UNAVAILABLE")
        pool.admit()
        try:
            job = Job(limits.deadline_s, stopping)
            frame, params = await run_in_threadpool(parse_frame, await read_body(request, limits), limits)
            watcher = asyncio.ensure_future(watch_disconnect(request, job))
            try:
                result = await pool.run(lambda: python_model.answer(frame, params, limits=limits,
                                                                    should_stop=job.should_stop), job)
            except Stopped:
                raise _stopped_error(job, limits, stopping) from None
            finally:
                watcher.cancel()
        finally:
            pool.release()
        return JSONResponse({"predictions": result.to_dict("records")})

    async def health(request):
        return JSONResponse({"status": "stopping" if stopping.is_set() else "ok",
                             "running": pool.running, "admitted": pool.admitted})

    app = Starlette(routes=[Route("/invocations", invocations, methods=["POST"]),
                            Route("/ping", health, methods=["GET"]), Route("/health", health, methods=["GET"])],
                    exception_handlers=error_handlers())
    return bounded_headers(app, limits)


def _short(message: str, limit: int = 300) -> str:
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else "bad request"
    return first if len(first) <= limit else first[:limit - 3] + "..."


# -- running the server -------------------------------------------------------------------------

def protocol_class(limits: ServeConfig):
    """uvicorn's h11 protocol with a deadline for each request's headers: uvicorn has none, and a
    client trickling a header in would hold its connection (one of max_connections) for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"error_code": "REQUEST_TIMEOUT",
                       "message": f"the request headers did not arrive within {limits.header_timeout_s:g} s"}).encode()
    late = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body

    class Protocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # closed already, or a request is being answered
            self.transport.write(late)
            self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers on this connection

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return Protocol


def load(model_uri: str, model_config: dict | None = None):
    """The MedRegAModel inside a pyfunc model URI or folder (loaded with this `model` package);
    `model_config` ({"dtype", "device_map"}) places it instead of the config it was logged with."""
    import mlflow.pyfunc

    python_model = mlflow.pyfunc.load_model(model_uri, model_config=model_config).unwrap_python_model()
    if not callable(getattr(python_model, "answer", None)):
        raise ValueError(f"{model_uri}: not a MedRegA pyfunc model")
    return python_model


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5001, limits: ServeConfig | None = None,
          python_model=None) -> int:
    """Load the model once and serve it in this process until SIGTERM/SIGINT. Returns an exit code
    (a SIGTERM ends the process through its default action once the server has stopped)."""
    import uvicorn

    limits = limits or ServeConfig()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    python_model = python_model or load(model_uri)
    stopping = threading.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            stopping.set()  # every generation stops after its current token
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(python_model, limits, stopping), host=host, port=port, http=protocol_class(limits), loop="asyncio",
        lifespan="off", server_header=False, proxy_headers=False, log_level="info",
        limit_concurrency=limits.max_connections, timeout_keep_alive=5,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=int(max(1, limits.graceful_shutdown_s)),
    )
    log.info("serving %s on http://%s:%d/invocations", model_uri, host, port)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # SIGINT, re-raised by uvicorn once it has stopped
        return 130
    return 0


def _limit(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not a number") from None
    return key.strip(), int(number) if number.is_integer() else number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="pyfunc model URI (models:/medrega@champion) or folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--limit", type=_limit, action="append", default=[], metavar="KEY=VALUE",
                        help="override one of the serve section of the config (medrega.config.ServeConfig), e.g. deadline_s=30")
    args = parser.parse_args(argv)
    try:
        limits = ServeConfig.model_validate(dict(args.limit))
        python_model = load(args.model)
    except Exception as err:  # a short reason, no trace: the model URI or a limit is wrong
        print(f"error: {getattr(err, 'message', None) or err}", file=sys.stderr)
        return 3
    return serve(args.model, args.host, args.port, limits, python_model=python_model)


if __name__ == "__main__":
    sys.exit(main())
