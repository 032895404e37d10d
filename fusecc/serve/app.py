"""The HTTP application: the Open Inference Protocol's endpoints over a :class:`ServedFleet` and its
:class:`DynamicBatcher`, the model repository's ``load`` as hot swap, and Prometheus metrics on ``/metrics``.

    GET  /v2/health/live, /v2/health/ready, /v2                      server liveness, readiness, metadata
    GET  /v2/models/{name}[/versions/1], .../ready                    model metadata (inputs, outputs), readiness
    POST /v2/models/{name}[/versions/1]/infer                         inference (JSON, or binary tensor data)
    POST /v2/repository/index                                         the models and their state
    POST /v2/repository/models/{name}/load                            hot swap: new weights for one model
    GET  /metrics                                                      Prometheus text format

Errors are ``{"error": "..."}`` with 400 (bad request), 404 (unknown model or version), 413 (body over the limit),
503 (queue full, with Retry-After; or draining) and 500 (a model failed on this request alone).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
from typing import Any, AsyncIterator, Dict, Mapping, Optional, Tuple

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..checkpoints import CheckpointError, load_checkpoint
from ..version import __version__
from .batcher import DynamicBatcher, Overloaded, ShuttingDown
from .fleet import Plan, Request, ServedFleet
from .protocol import HEADER_LENGTH, ProtocolError, datatype_of, encode_infer_response, parse_infer_request

__all__ = ["build_app", "FleetService", "Metrics"]

log = logging.getLogger("fusecc.serve")
VERSION = "1"  # a served model has one version: its current weights (swaps replace them in place)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two servers in one process do not mix)."""

    def __init__(self, batcher_rows: Any, max_batch: int) -> None:
        r = self.registry = CollectorRegistry()
        self.max_batch = max_batch
        self.requests = Counter("fusecc_requests", "Inference requests, by model and HTTP status", ["model", "code"],
                                registry=r)
        self.rows = Counter("fusecc_rows", "Rows served, by model", ["model"], registry=r)
        self.latency = Histogram("fusecc_request_seconds", "Time from the request's arrival to its response",
                                 ["model"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_rows = Histogram("fusecc_batch_rows", "Rows in each batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_fill = Histogram("fusecc_batch_fill", "Rows in each batch / the largest batch", registry=r,
                                    buckets=(.05, .1, .25, .5, .75, .9, 1.0))
        self.batch_requests = Histogram("fusecc_batch_requests", "Requests in each batch", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("fusecc_batch_seconds", "Time to run each batch", registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.batches = Counter("fusecc_batches", "Batches, by how they ran (fused, per-model, fused+per-model)",
                               ["strategy"], registry=r)
        self.padding = Counter("fusecc_padding_rows", "Padding rows computed in fused calls (idle slots)",
                               registry=r)
        self.queue = Gauge("fusecc_queue_rows", "Rows waiting for a batch", registry=r)
        self.queue.set_function(batcher_rows)
        self.swaps = Counter("fusecc_swaps", "Hot swaps of a model's weights, by model and result",
                             ["model", "result"], registry=r)

    def on_batch(self, rows: int, requests: int, plan: Optional[Plan], seconds: float, num_models: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_fill.observe(min(rows / self.max_batch, 1.0))
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)
        if plan is not None:
            self.batches.labels(plan.strategy).inc()
            if plan.fused_rows:
                self.padding.inc(max(plan.fused_rows * num_models - rows, 0))


Reply = Tuple[int, bytes, Dict[str, str]]  # status, body, headers


def _error(status: int, message: str, rid: str, headers: Optional[Dict[str, str]] = None) -> Reply:
    return status, json.dumps({"error": message}).encode(), {"content-type": "application/json", "x-request-id": rid,
                                                             **(headers or {})}


def _json(doc: Any, status: int = 200) -> Reply:
    return status, json.dumps(doc).encode(), {"content-type": "application/json"}


def _rid(headers: Mapping[str, str]) -> str:
    return headers.get("x-request-id") or uuid.uuid4().hex[:16]


class FleetService:
    """The protocol's handlers over a fleet and its batcher, independent of the web framework: each takes the
    request's path parameters, body and headers and returns ``(status, body, headers)``. The FastAPI app below and
    the Ray Serve deployments (``fusecc.serve.ray_serve``) are thin shells around it."""

    def __init__(self, fleet: ServedFleet, *, max_batch: Optional[int] = None, max_delay_ms: float = 5.0,
                 max_queue: int = 1024, max_body_bytes: int = 64 << 20) -> None:
        max_batch = max_batch or fleet.max_batch
        if max_batch > fleet.max_batch:
            raise ValueError(f"fusecc serve: max_batch {max_batch} is larger than the fleet's ({fleet.max_batch}); "
                             "build the ServedFleet with the same max_batch")
        self.fleet, self.max_batch, self.max_delay_ms, self.max_queue = fleet, max_batch, max_delay_ms, max_queue
        self.max_body_bytes = max_body_bytes
        self.ready = False
        self.batcher: Optional[DynamicBatcher] = None
        self.metrics = Metrics(lambda: self.batcher.queued_rows if self.batcher else 0, max_batch)

    # ------------------------------------------------------------------------------------------ life
    def start(self) -> None:
        if self.batcher is None:
            self.batcher = DynamicBatcher(
                self.fleet, max_batch=self.max_batch, max_delay=self.max_delay_ms / 1000, max_queue=self.max_queue,
                on_batch=lambda rows, n, plan, s: self.metrics.on_batch(rows, n, plan, s, self.fleet.num_models))
            self.ready = True

    def close(self) -> None:
        """Stop taking requests and serve what is queued (blocking)."""
        self.ready = False
        if self.batcher is not None:
            self.batcher.close()

    # ------------------------------------------------------------------------------------------ handlers
    def model_index(self, name: str, version: Optional[str] = None) -> int:
        fleet = self.fleet
        if name not in fleet.index:
            shown = ", ".join(fleet.names[:8]) + (", ..." if fleet.num_models > 8 else "")
            raise ProtocolError(404, f"model {name!r} is not served here; the models are {shown}")
        if version is not None and version != VERSION:
            raise ProtocolError(404, f"model {name!r} has no version {version!r}; its one version is {VERSION!r}")
        return fleet.index[name]

    def metadata(self, name: str, version: Optional[str] = None) -> Reply:
        try:
            self.model_index(name, version)
        except ProtocolError as e:
            return _error(e.status, e.message, uuid.uuid4().hex[:16])
        return _json({
            "name": name, "versions": [VERSION], "platform": "pytorch_fusecc",
            "inputs": [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": [-1, *s.shape],
                        **({"optional": True} if s.optional else {})} for s in self.fleet.inputs],
            "outputs": [{"name": k, "datatype": datatype_of(dt), "shape": [-1, *shape]}
                        for k, (dt, shape) in self.fleet.outputs.items()],
        })

    def model_ready(self, name: str, version: Optional[str] = None) -> Reply:
        try:
            self.model_index(name, version)
        except ProtocolError as e:
            return _error(e.status, e.message, uuid.uuid4().hex[:16])
        return _json({"name": name, "ready": self.ready}, 200 if self.ready else 503)

    def index(self) -> Reply:
        return _json([{"name": n, "version": VERSION, "state": "READY" if self.ready else "UNAVAILABLE"}
                      for n in self.fleet.names])

    def _check_size(self, body: bytes) -> None:
        if len(body) > self.max_body_bytes:
            raise ProtocolError(413, f"the request body is {len(body)} bytes; this server takes at most "
                                     f"{self.max_body_bytes} (--max-body-mb)")

    async def infer(self, name: str, version: Optional[str], body: bytes, headers: Mapping[str, str]) -> Reply:
        t0 = time.perf_counter()
        fleet = self.fleet
        rid = _rid(headers)
        code, rows, label = 500, 0, name if name in fleet.index else "_unknown"
        try:
            idx = self.model_index(name, version)
            if not self.ready or self.batcher is None:
                raise ShuttingDown("the server is not ready")
            self._check_size(body)
            req = parse_infer_request(body, headers.get(HEADER_LENGTH), fleet.inputs, list(fleet.outputs),
                                      self.max_batch)
            rows = req.rows
            fut = self.batcher.submit(Request(idx, req.inputs, req.rows))
            done = await asyncio.wrap_future(fut)
            payload, out_headers = encode_infer_response(name, VERSION, req, done.outputs)
            code = 200
            self.metrics.rows.labels(label).inc(rows)
            return 200, payload, {**out_headers, "x-request-id": rid}
        except ProtocolError as e:
            code = e.status
            return _error(code, e.message, rid)
        except Overloaded as e:
            code = 503
            return _error(code, str(e), rid, {"retry-after": str(max(1, math.ceil(e.retry_after)))})
        except ShuttingDown as e:
            code = 503
            return _error(code, str(e), rid, {"retry-after": "1"})
        except Exception as e:  # noqa: BLE001 (the model failed on this request alone)
            log.exception("request %s for %s failed", rid, name)
            return _error(500, f"the model failed on this request: {type(e).__name__}: {e}", rid)
        finally:
            dt = time.perf_counter() - t0
            self.metrics.requests.labels(label, str(code)).inc()
            if code == 200:
                self.metrics.latency.labels(label).observe(dt)
            log.log(logging.INFO if code == 200 else logging.WARNING, "request %s model=%s rows=%d status=%d %.1f ms",
                    rid, name, rows, code, dt * 1000)

    async def load(self, name: str, body: bytes, headers: Mapping[str, str]) -> Reply:
        """Hot swap: ``{"parameters": {"file:<name>.pt" or ".safetensors": base64 state dict}}`` (what
        tritonclient's ``load_model(name, files=...)`` sends); served requests never see a mix of weights."""
        rid = _rid(headers)
        fleet = self.fleet
        try:
            idx = self.model_index(name, None)
            self._check_size(body)
            if self.batcher is None:
                raise ShuttingDown("the server is not ready")
            try:
                doc = json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ProtocolError(400, f"the request body is not valid JSON: {e}") from None
            params = (doc.get("parameters") or {}) if isinstance(doc, dict) else {}
            files = {k[5:]: v for k, v in params.items() if isinstance(k, str) and k.startswith("file:")}
            if len(files) != 1:
                raise ProtocolError(400, "give the new weights as one file parameter: {\"parameters\": "
                                         "{\"file:weights.pt\": <base64 of a state dict file>}} (tritonclient: "
                                         "load_model(name, files={'file:weights.pt': data}); fusecc swap ...); "
                                         f"got {len(files)} file parameters")
            (fname, data), = files.items()
            try:
                raw = base64.b64decode(data, validate=True)
            except (ValueError, TypeError) as e:
                raise ProtocolError(400, f"file parameter {fname!r} is not base64: {e}") from None
            suffix = ".safetensors" if fname.endswith(".safetensors") else ".pt"
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "weights" + suffix)
                with open(path, "wb") as f:
                    f.write(raw)
                try:
                    sd = load_checkpoint(path)
                except CheckpointError as e:
                    raise ProtocolError(400, f"file {fname!r}: {e}".replace(path, fname)) from None
            fut = self.batcher.swap(idx, sd)
            try:
                await asyncio.wrap_future(fut)
            except (KeyError, ValueError, RuntimeError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                raise ProtocolError(400, f"the weights do not fit model {name!r}: {msg}") from None
            self.metrics.swaps.labels(name, "ok").inc()
            log.info("request %s: model %s has new weights (swap %d)", rid, name, fleet.version[idx])
            return _json({"name": name, "swaps": fleet.version[idx]})
        except ProtocolError as e:
            if name in fleet.index:
                self.metrics.swaps.labels(name, "rejected").inc()
            return _error(e.status, e.message, rid)
        except ShuttingDown as e:
            return _error(503, str(e), rid)

    def unload(self, name: str) -> Reply:
        try:
            self.model_index(name, None)
        except ProtocolError as e:
            return _error(e.status, e.message, uuid.uuid4().hex[:16])
        return _error(400, "a fused fleet keeps every model loaded; unload is not supported (load swaps weights)",
                      uuid.uuid4().hex[:16])

    def prometheus(self) -> Reply:
        return 200, generate_latest(self.metrics.registry), {"content-type": CONTENT_TYPE_LATEST}


LIVE = _json({"live": True})


def server_metadata() -> Reply:
    return _json({"name": "fusecc", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]})


async def _read_body(request: HTTPRequest, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (by Content-Length at once, else while it streams)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit} "
                                 "(--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"the request body is over {limit} bytes, the most this server takes "
                                     "(--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def _response(reply: Reply) -> Response:
    status, body, headers = reply
    return Response(body, status_code=status, headers=headers)


def build_app(fleet: ServedFleet, *, max_batch: Optional[int] = None, max_delay_ms: float = 5.0, max_queue: int = 1024,
              max_body_bytes: int = 64 << 20) -> FastAPI:
    """The ASGI app serving ``fleet``. Its batcher starts with the app's lifespan and drains when it ends (uvicorn
    ends it on SIGTERM after the requests in flight are answered)."""
    svc = FleetService(fleet, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                       max_body_bytes=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, svc.close)
            log.info("fusecc serve: drained and stopped")

    app = FastAPI(title="fusecc serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = svc

    async def body_of(request: HTTPRequest) -> Any:
        try:
            return await _read_body(request, max_body_bytes)
        except ProtocolError as e:
            return _response(_error(e.status, e.message, _rid(request.headers)))

    async def infer(request: HTTPRequest, name: str, version: Optional[str] = None) -> Response:
        body = await body_of(request)
        if isinstance(body, Response):
            svc.metrics.requests.labels(name if name in fleet.index else "_unknown", str(body.status_code)).inc()
            return body
        return _response(await svc.infer(name, version, body, request.headers))

    async def load(request: HTTPRequest, name: str) -> Response:
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        return _response(await svc.load(name, body, request.headers))

    async def metadata(name: str, version: Optional[str] = None) -> Response:
        return _response(svc.metadata(name, version))

    async def ready_model(name: str, version: Optional[str] = None) -> Response:
        return _response(svc.model_ready(name, version))

    async def unload(name: str) -> Response:
        return _response(svc.unload(name))

    async def live() -> Response:
        return _response(LIVE)

    async def ready() -> Response:
        return _response(_json({"ready": svc.ready}, 200 if svc.ready else 503))

    async def meta() -> Response:
        return _response(server_metadata())

    async def index() -> Response:
        return _response(svc.index())

    async def prometheus() -> Response:
        return _response(svc.prometheus())

    for path, fn, method in [
        ("/v2/health/live", live, "GET"), ("/v2/health/ready", ready, "GET"), ("/v2", meta, "GET"),
        ("/v2/models/{name}", metadata, "GET"), ("/v2/models/{name}/versions/{version}", metadata, "GET"),
        ("/v2/models/{name}/ready", ready_model, "GET"),
        ("/v2/models/{name}/versions/{version}/ready", ready_model, "GET"),
        ("/v2/models/{name}/infer", infer, "POST"), ("/v2/models/{name}/versions/{version}/infer", infer, "POST"),
        ("/v2/repository/index", index, "POST"), ("/v2/repository/models/{name}/load", load, "POST"),
        ("/v2/repository/models/{name}/unload", unload, "POST"), ("/metrics", prometheus, "GET"),
    ]:
        app.add_api_route(path, fn, methods=[method])
    return app
