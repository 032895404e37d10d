"""fusecc on Ray Serve: the fleet served by Ray Serve beyond one process or machine, on the same Open Inference
Protocol.

    from ray import serve
    from fusecc.serve.ray_serve import FleetSpec, fleet_app
    spec = FleetSpec(arch="torchvision.models:resnet18", weights=paths, names=names, example_input=(1, 3, 224, 224))
    serve.run(fleet_app(spec, shards=2, replicas=3), route_prefix="/")   # POST /v2/models/{name}/infer

- ``replicas``: copies of each fused shard; Ray's router spreads requests over them (more throughput). New weights
  for a replicated shard: ``serve.run`` again with the new checkpoint (Ray's rolling update); the load API (hot swap
  in place) needs ``replicas=1``, since one call reaches one replica.
- ``shards``: the models split into groups, one fused fleet (a Ray Serve deployment) per group, for fleets that do
  not fit one replica's memory; a router deployment (the HTTP ingress) sends each request to its model's shard.

Each replica builds its fleet from a :class:`FleetSpec` (checkpoint paths the replicas can read, never tensors sent
through Ray) and runs its own :class:`~fusecc.serve.app.FleetService` with its dynamic batcher, exactly as
``fusecc serve`` does. Nothing here starts or manages a cluster: that is Ray's (``ray start``, KubeRay, or the local
instance ``serve.run`` starts).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ray import serve
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from .app import LIVE, Reply, _error, _json, server_metadata

__all__ = ["FleetSpec", "FleetShard", "FleetRouter", "fleet_app"]


@dataclass
class FleetSpec:
    """How a replica builds its fleet: ``arch`` + ``weights`` (one checkpoint per model) or ``hf`` (Hugging Face
    directories), ``names`` (one per model), ``example_input`` (a batch's shape; the batch dim is dynamic), and the
    serving settings of ``fusecc serve``."""

    names: List[str]
    arch: Optional[str] = None
    arch_kwargs: Dict[str, Any] = field(default_factory=dict)
    weights: List[str] = field(default_factory=list)
    hf: List[str] = field(default_factory=list)
    example_input: Tuple[int, ...] = ()
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 1024
    mode: str = "fused"
    threads: int = 0

    def __post_init__(self) -> None:
        paths = self.hf or self.weights
        if bool(self.hf) == bool(self.arch):
            raise ValueError("FleetSpec: give arch (with weights) or hf, not both or neither")
        if len(paths) != len(self.names):
            raise ValueError(f"FleetSpec: {len(self.names)} names for {len(paths)} checkpoints; one name per model")

    def subset(self, names: Sequence[str]) -> "FleetSpec":
        pick = [self.names.index(n) for n in names]
        return dataclasses.replace(self, names=list(names), weights=[self.weights[i] for i in pick] if self.weights
                                   else [], hf=[self.hf[i] for i in pick] if self.hf else [])

    def build(self) -> Any:
        import torch

        from ..checkpoints import load_fleet, load_hf_fleet
        from .fleet import ServedFleet, inputs_from_example

        if self.threads:
            torch.set_num_threads(self.threads)
        models = [m.eval() for m in (load_hf_fleet(self.hf) if self.hf else
                                     load_fleet(self.arch, self.arch_kwargs, self.weights))]
        specs, length = inputs_from_example(models[0], [self.example_input] if self.example_input else [])
        return ServedFleet(models, self.names, inputs=specs, mode=self.mode, max_batch=self.max_batch,
                           example_length=length)


@serve.deployment(ray_actor_options={"num_cpus": 1})
class FleetShard:
    """One fused fleet (a shard of the models) with its batcher, called by the router through its handle."""

    def __init__(self, spec: FleetSpec) -> None:
        from .app import FleetService

        self.svc = FleetService(spec.build(), max_batch=spec.max_batch, max_delay_ms=spec.max_delay_ms,
                                max_queue=spec.max_queue)
        self.svc.start()

    async def infer(self, name: str, version: Optional[str], body: bytes, headers: Dict[str, str]) -> Reply:
        return await self.svc.infer(name, version, body, headers)

    async def load(self, name: str, body: bytes, headers: Dict[str, str]) -> Reply:
        return await self.svc.load(name, body, headers)

    def metadata(self, name: str, version: Optional[str]) -> Reply:
        return self.svc.metadata(name, version)

    def ready(self, name: str, version: Optional[str]) -> Reply:
        return self.svc.model_ready(name, version)

    def prometheus(self) -> Reply:
        return self.svc.prometheus()


_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/infer|/ready)?$")
_LOAD = re.compile(r"^/v2/repository/models/([^/]+)/(load|unload)$")


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FleetRouter:
    """The HTTP ingress: the protocol's paths, each request sent to the shard that holds its model."""

    def __init__(self, groups: List[List[str]], replicas: int, *shards: Any) -> None:
        self.shard_of = {name: shards[k] for k, names in enumerate(groups) for name in names}
        self.names = [n for names in groups for n in names]
        self.replicas = replicas

    async def __call__(self, request: HTTPRequest) -> Response:
        path = request.url.path.rstrip("/") or "/"
        reply = await self._route(request, path)
        status, body, headers = reply
        return Response(body, status_code=status, headers=headers)

    def _unknown(self, name: str) -> Reply:
        shown = ", ".join(self.names[:8]) + (", ..." if len(self.names) > 8 else "")
        return _error(404, f"model {name!r} is not served here; the models are {shown}", "-")

    async def _route(self, request: HTTPRequest, path: str) -> Reply:
        headers = {k.lower(): v for k, v in request.headers.items()}
        if path == "/v2/health/live" and request.method == "GET":
            return LIVE
        if path == "/v2/health/ready" and request.method == "GET":
            return _json({"ready": True})
        if path == "/v2" and request.method == "GET":
            return server_metadata()
        if path == "/v2/repository/index" and request.method == "POST":
            return _json([{"name": n, "version": "1", "state": "READY"} for n in self.names])
        m = _MODEL.match(path)
        if m:
            name, version, what = m.group(1), m.group(2), m.group(3)
            shard = self.shard_of.get(name)
            if shard is None:
                return self._unknown(name)
            if what == "/infer" and request.method == "POST":
                return await shard.infer.remote(name, version, await request.body(), headers)
            if what == "/ready" and request.method == "GET":
                return await shard.ready.remote(name, version)
            if what is None and request.method == "GET":
                return await shard.metadata.remote(name, version)
        m = _LOAD.match(path)
        if m and request.method == "POST":
            name, what = m.group(1), m.group(2)
            shard = self.shard_of.get(name)
            if shard is None:
                return self._unknown(name)
            if what == "unload":
                return _error(400, "a fused fleet keeps every model loaded; unload is not supported", "-")
            if self.replicas > 1:  # a handle call reaches one replica: the others would keep the old weights
                return _error(501, f"hot swap through the load API needs replicas=1 (this shard has {self.replicas} "
                                   "replicas, and one call reaches one of them); with Ray Serve, give the new "
                                   "checkpoint to serve.run again: Ray rolls the replicas over without dropping "
                                   "requests", "-")
            return await shard.load.remote(name, await request.body(), headers)
        return _error(404, f"no such endpoint: {request.method} {path}", "-")


def fleet_app(spec: FleetSpec, shards: int = 1, replicas: int = 1, shard_cpus: float = 1.0) -> Any:
    """The Ray Serve application: ``shards`` fused fleets (the models split in order), ``replicas`` replicas each,
    behind one router. Run it with ``serve.run(app, route_prefix="/")``."""
    n = len(spec.names)
    if not 1 <= shards <= n:
        raise ValueError(f"fleet_app: shards must be between 1 and the number of models ({n}), got {shards}")
    if replicas < 1:
        raise ValueError(f"fleet_app: replicas must be >= 1, got {replicas}")
    size = -(-n // shards)
    groups = [spec.names[i:i + size] for i in range(0, n, size)]
    bound = [FleetShard.options(name=f"fusecc-shard-{k}", num_replicas=replicas,
                                ray_actor_options={"num_cpus": shard_cpus}).bind(spec.subset(g))
             for k, g in enumerate(groups)]
    return FleetRouter.options(name="fusecc-router").bind(groups, replicas, *bound)
