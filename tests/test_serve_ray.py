"""fusecc on Ray Serve, on a local Ray instance: a fleet sharded over two fused deployments behind one router, with
two replicas of each shard; answers checked against the models run alone; hot swap through the router (after a
redeploy to one replica per shard); 404/400."""

from __future__ import annotations

import base64
import io
import os

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from tests.test_serve import IMG, _alone, _cnns, _free_port, _infer_body, save_checkpoints  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_fleet(tmp_path_factory):
    from fusecc.serve.ray_serve import FleetSpec, fleet_app

    d = tmp_path_factory.mktemp("ckpts")
    models = _cnns(4, seed=7)
    paths = save_checkpoints(models, d, "m")
    names = ["m0", "m1", "m2", "m3"]
    spec = FleetSpec(names=names, arch=os.path.join(ROOT, "tests", "cli_models.py:small_cnn"), weights=paths,
                     example_input=(1,) + IMG, max_batch=8, threads=1)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(fleet_app(spec, shards=2, replicas=2, shard_cpus=0.5), route_prefix="/", name="fleet")
        yield models, names, f"http://127.0.0.1:{port}", spec
    finally:
        serve.shutdown()
        ray.shutdown()


def test_sharded_fleet_answers_like_the_models(ray_fleet):
    models, names, url, _ = ray_fleet
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/v2/health/ready").status_code == 200
        assert [e["name"] for e in c.post("/v2/repository/index").json()] == names
        meta = c.get("/v2/models/m3").json()
        assert meta["inputs"][0]["shape"] == [-1, *IMG]
        g = torch.Generator().manual_seed(0)
        for k in (0, 1, 2, 3, 1, 2):  # both shards
            x = torch.randn((2,) + IMG, generator=g)
            r = c.post(f"/v2/models/{names[k]}/infer", json=_infer_body(x))
            assert r.status_code == 200, r.text
            torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]).view(2, 10),
                                       _alone(models[k], x), rtol=1e-5, atol=1e-5)
        r = c.post("/v2/models/m9/infer", json=_infer_body(x))
        assert r.status_code == 404 and "m0, m1, m2, m3" in r.json()["error"]
        r = c.post("/v2/models/m2/infer", json=_infer_body(torch.zeros(1, 3, 4, 4)))
        assert r.status_code == 400 and "expected shape" in r.json()["error"]


def test_hot_swap_through_the_router(ray_fleet):
    """Replicated shards refuse the load API (one call reaches one replica) and say how to update; redeployed with
    one replica per shard (Ray's rolling update), a load swaps the model in place."""
    from fusecc.serve.ray_serve import fleet_app

    models, names, url, spec = ray_fleet
    buf = io.BytesIO()
    torch.save(models[0].state_dict(), buf)
    body = {"parameters": {"file:m0.pt": base64.b64encode(buf.getvalue()).decode()}}
    x = torch.randn((1,) + IMG)
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v2/repository/models/m3/load", json=body)
        assert r.status_code == 501 and "replicas=1" in r.json()["error"]
        serve.run(fleet_app(spec, shards=2, replicas=1, shard_cpus=0.5), route_prefix="/", name="fleet")
        r = c.post("/v2/models/m3/infer", json=_infer_body(x))
        torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]).view(1, 10), _alone(models[3], x),
                                   rtol=1e-5, atol=1e-5)
        r = c.post("/v2/repository/models/m3/load", json=body)
        assert r.status_code == 200, r.text
        for _ in range(3):
            r = c.post("/v2/models/m3/infer", json=_infer_body(x))
            torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]).view(1, 10),
                                       _alone(models[0], x), rtol=1e-5, atol=1e-5)
