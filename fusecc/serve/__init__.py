"""``fusecc serve``: one server for a fleet of N models under live traffic, on the Open Inference Protocol (KServe
v2; NVIDIA Triton's and KServe's clients work unchanged), with model-aware dynamic batching, hot swap, Prometheus
metrics and a graceful drain.

    from fusecc.serve import ServedFleet, FleetServer, TensorSpec
    fleet = ServedFleet(models, names=["a", "b", "c"], inputs=[TensorSpec("input", torch.float32, (3, 32, 32))])
    with FleetServer(fleet, port=8000) as server:     # or server.serve_forever()
        ...  # POST {server.url}/v2/models/b/infer

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); ``ServedFleet`` alone needs none of them.
"""

from .fleet import Request, ServedFleet, TensorSpec

__all__ = ["FleetServer", "Request", "ServedFleet", "TensorSpec", "build_app"]


def __getattr__(name: str):  # the HTTP layer imports fastapi/uvicorn only when used
    if name == "FleetServer":
        from .server import FleetServer
        return FleetServer
    if name == "build_app":
        from .app import build_app
        return build_app
    raise AttributeError(name)
