"""fusecc serve: the fleet's batch execution against the models run alone, and the Open Inference Protocol server
over loopback with real clients (httpx, tritonclient's HTTP client): every endpoint, every error path, concurrent
mixed traffic, hot swap under load, overload, and the SIGTERM drain of the command.

Every server listens on 127.0.0.1, starts and stops inside its test, and every load loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
T = pytest.importorskip("transformers")

from fusecc.serve import FleetServer, Request, ServedFleet, TensorSpec  # noqa: E402
from fusecc.serve.batcher import DynamicBatcher, Overloaded  # noqa: E402
from tests.cli_models import small_cnn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["alpha", "beta", "gamma"]
IMG = (3, 8, 8)
V = 50


def _cnns(n=3, seed=0):
    torch.manual_seed(seed)
    models = [small_cnn().eval() for _ in range(n)]
    for m in models:  # BN statistics that differ per model
        with torch.no_grad():
            bn = m[1]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return models


def _berts(n=3, seed=0):
    torch.manual_seed(seed)
    cfg = T.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return [T.BertForSequenceClassification(cfg).eval() for _ in range(n)]


@pytest.fixture(scope="module")
def cnns():
    return _cnns()


@pytest.fixture(scope="module")
def cnn_fleet(cnns):
    return ServedFleet(cnns, NAMES, inputs=[TensorSpec("input", torch.float32, IMG)], max_batch=8)


@pytest.fixture(scope="module")
def berts():
    return _berts()


@pytest.fixture(scope="module")
def bert_fleet(berts):
    return ServedFleet(berts, NAMES, max_batch=8, example_length=12)


def _alone(model, x):
    with torch.no_grad():
        return model(x)


def _bert_alone(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids)).logits


# ------------------------------------------------------------------------------------------------ the fleet alone

def _mixed_cnn_requests(seed=0):
    g = torch.Generator().manual_seed(seed)
    plan = [(0, 3), (2, 1), (0, 2), (0, 1), (1, 2)]  # model 0 busy, model 1 and 2 a few rows
    return [Request(m, {"input": torch.randn((r,) + IMG, generator=g)}, r) for m, r in plan]


@pytest.mark.parametrize("strategy", ["auto", "fused", "per-model"])
def test_mixed_batch_equals_models_alone(cnns, cnn_fleet, strategy):
    reqs = _mixed_cnn_requests()
    cnn_fleet.strategy = strategy
    try:
        plan = cnn_fleet.run(reqs)
    finally:
        cnn_fleet.strategy = "auto"
    assert plan.strategy == {"auto": plan.strategy, "fused": "fused", "per-model": "per-model"}[strategy]
    for r in reqs:
        torch.testing.assert_close(r.outputs["output"], _alone(cnns[r.model], r.inputs["input"]), rtol=1e-5,
                                   atol=1e-5)


def test_split_plans_serve_every_row(cnns, cnn_fleet):
    """Every B* the planner considers (0 and each model's row count: fused part + per-model overflow) gives each
    request its own rows."""
    reqs = _mixed_cnn_requests(1)
    counts = [6, 2, 1]
    from fusecc.serve.fleet import CostModel
    saved = cnn_fleet.cost
    try:
        for b in (0, 1, 2, 6):
            # a cost model whose best plan is B* = b: the fused call is free up to b rows per model, then dear
            cnn_fleet.cost = CostModel({k: (0.0 if k <= b else 10.0) + 1e-6 * k for k in range(1, 9)},
                                       {k: 1.0 for k in range(1, 9)})
            plan = cnn_fleet.run(reqs)
            assert plan.fused_rows == b and plan.per_model_calls == sum(1 for c in counts if c > b)
            for r in reqs:
                torch.testing.assert_close(r.outputs["output"], _alone(cnns[r.model], r.inputs["input"]),
                                           rtol=1e-5, atol=1e-5)
    finally:
        cnn_fleet.cost = saved


def test_text_rows_of_any_length_and_mask(berts, bert_fleet):
    g = torch.Generator().manual_seed(3)
    reqs, refs = [], []
    for m, rows, length, with_mask in [(0, 2, 7, False), (1, 1, 12, True), (0, 1, 3, True), (2, 3, 9, False)]:
        ids = torch.randint(0, V, (rows, length), generator=g)
        inputs = {"input_ids": ids}
        mask = None
        if with_mask:
            mask = torch.ones(rows, length, dtype=torch.long)
            mask[0, length // 2:] = 0
            inputs["attention_mask"] = mask
        reqs.append(Request(m, inputs, rows))
        refs.append(_bert_alone(berts[m], ids, mask))
    assert bert_fleet.routed is not None  # Linear, LayerNorm, Embedding: every row through one routed copy
    for strategy in ("fused", "per-model", "routed", "auto"):
        bert_fleet.strategy = strategy
        try:
            bert_fleet.run(reqs)
        finally:
            bert_fleet.strategy = "auto"
        for r, ref in zip(reqs, refs):
            torch.testing.assert_close(r.outputs["logits"], ref, rtol=1e-4, atol=1e-5)


def test_routed_needs_routable_layers(cnns, cnn_fleet):
    assert cnn_fleet.routed is None  # convs and batch norms with per-model weights: no routed form
    with pytest.raises(ValueError, match="strategy 'routed' needs"):
        ServedFleet(cnns, inputs=[TensorSpec("input", torch.float32, IMG)], strategy="routed", calibrate=False)


def test_routed_shares_what_every_model_shares(berts):
    """Weights equal in every model stay one tensor in the routed copy; the answers still follow each model."""
    import copy
    ms = [copy.deepcopy(berts[0]) for _ in range(3)]
    with torch.no_grad():
        for i, m in enumerate(ms[1:], 1):  # only the heads differ, the head's bias in one model only
            m.classifier.weight.add_(0.1 * i)
        ms[1].classifier.bias.add_(0.5)
    fleet = ServedFleet(ms, strategy="routed", max_batch=4, example_length=6, calibrate=False)
    assert type(fleet.routed.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear  # shared: the plain one
    ids = torch.randint(0, V, (3, 6))
    reqs = [Request(m, {"input_ids": ids[m:m + 1]}, 1) for m in (2, 0, 1)]
    fleet.run(reqs)
    for r in reqs:
        torch.testing.assert_close(r.outputs["logits"], _bert_alone(ms[r.model], r.inputs["input_ids"]),
                                   rtol=1e-4, atol=1e-5)


def test_lora_fleet_serves_each_adapter(berts):
    """N peft LoRA adapters (ranks 2, 4, 8) on one base: the fused call (adapters padded to the largest rank) gives
    each request its own adapter's answer, with the attention mask as an input."""
    peft = pytest.importorskip("peft")
    import copy
    ms = []
    for r in (2, 4, 8):
        m = peft.get_peft_model(copy.deepcopy(berts[0]), peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                                         target_modules=["query", "value"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
        ms.append(m.eval())
    fleet = ServedFleet(ms, ["r2", "r4", "r8"], max_batch=4, example_length=8)
    assert [s.name for s in fleet.inputs][:2] == ["input_ids", "attention_mask"]
    g = torch.Generator().manual_seed(1)
    reqs = [Request(m, {"input_ids": torch.randint(0, V, (1, 5 + m), generator=g)}, 1) for m in (2, 0, 1, 2)]
    fleet.run(reqs)
    for r in reqs:
        torch.testing.assert_close(r.outputs["logits"], _bert_alone(ms[r.model], r.inputs["input_ids"]),
                                   rtol=1e-4, atol=1e-5)
    other = _bert_alone(ms[1], reqs[0].inputs["input_ids"])  # the adapters differ: the check above can fail
    assert not torch.allclose(reqs[0].outputs["logits"], other, atol=1e-4)


def test_swap_that_unshares_keeps_routed_answers_right(berts):
    """A swap that makes a tensor shared by every model differ (the heads' zero biases) un-shares it; the routed
    copy and the per-model views follow the new tensors."""
    import copy
    ms = [copy.deepcopy(m) for m in berts]
    fleet = ServedFleet(ms, max_batch=4, example_length=6, calibrate=False)
    assert "classifier.bias" in fleet.fused.shared_tensors
    new = copy.deepcopy(ms[1])
    with torch.no_grad():
        new.classifier.bias.add_(1.0)
    fleet.load_model_state_dict(1, new.state_dict())
    assert "classifier.bias" not in fleet.fused.shared_tensors
    ids = torch.randint(0, V, (3, 6))
    for strategy in ("routed", "per-model", "fused"):
        fleet.strategy = strategy
        reqs = [Request(m, {"input_ids": ids[m:m + 1]}, 1) for m in range(3)]
        fleet.run(reqs)
        for r, ref in zip(reqs, [ms[0], new, ms[2]]):
            torch.testing.assert_close(r.outputs["logits"], _bert_alone(ref, r.inputs["input_ids"]), rtol=1e-4,
                                       atol=1e-5)


def test_fleet_leaves_models_untouched_and_checks_names(cnns):
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in cnns]
    with pytest.raises(ValueError, match="given twice"):
        ServedFleet(cnns, ["a", "a", "b"], inputs=[TensorSpec("input", torch.float32, IMG)])
    with pytest.raises(ValueError, match="one name per model"):
        ServedFleet(cnns, ["a"], inputs=[TensorSpec("input", torch.float32, IMG)])
    with pytest.raises(ValueError, match="give the inputs per row"):
        ServedFleet(cnns)
    for m, sd in zip(cnns, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])


def test_cost_model_picks_the_cheaper_plan():
    from fusecc.serve.fleet import CostModel
    # fused call: 10 ms + 1 ms per padded row-slot of 4 models; one model: 5 ms + 1 ms per row
    cm = CostModel({b: 0.010 + 0.004 * b for b in (1, 2, 4, 8, 16)}, {b: 0.005 + 0.001 * b for b in (1, 2, 4, 8, 16)})
    assert cm.plan([2, 2, 2, 2]).strategy == "fused"                 # uniform: one fused call
    p = cm.plan([16, 1, 1, 1])                                         # one busy model: it runs alone past B*
    assert p.fused_rows == 1 and p.per_model_calls == 1
    assert cm.plan([8, 0, 0, 0]).strategy == "per-model"              # one model only: no padding of the others


# ------------------------------------------------------------------------------------------------ the batcher

class _Flaky:
    """A fleet stand-in whose run fails when a request carries a poisoned row."""

    num_models = 2

    def __init__(self):
        self.calls = []

    def run(self, reqs):
        self.calls.append(len(reqs))
        if any(bool((r.inputs["x"] < 0).any()) for r in reqs):
            raise RuntimeError("poisoned row")
        for r in reqs:
            r.outputs = {"y": r.inputs["x"] * 2}
        return None

    def load_model_state_dict(self, i, sd):
        pass


def test_one_bad_request_fails_only_itself():
    fleet = _Flaky()
    b = DynamicBatcher(fleet, max_batch=16, max_delay=0.2, max_queue=64)
    try:
        futs = [b.submit(Request(i % 2, {"x": torch.full((1,), float(v))}, 1)) for i, v in enumerate([1, 2, -1, 3])]
        for f, v in zip(futs, [1, 2, -1, 3]):
            if v < 0:
                with pytest.raises(RuntimeError, match="poisoned"):
                    f.result(10)
            else:
                assert f.result(10).outputs["y"].item() == 2 * v
        assert fleet.calls[0] == 4  # one batch first, then each alone
    finally:
        b.close()


def test_batcher_full_queue_refuses_and_drains_on_close():
    fleet = _Flaky()
    b = DynamicBatcher(fleet, max_batch=4, max_delay=10.0, max_queue=3)  # a long delay: rows stay queued
    futs = [b.submit(Request(0, {"x": torch.ones(1)}, 1)) for _ in range(3)]
    with pytest.raises(Overloaded) as e:
        b.submit(Request(0, {"x": torch.ones(1)}, 1))
    assert e.value.retry_after > 0
    b.close(drain=True, timeout=30)  # closing cuts the delay short and serves what is queued
    assert all(f.result(0).outputs["y"].item() == 2 for f in futs)


# ------------------------------------------------------------------------------------------------ over HTTP

def _infer_body(x, name="input", datatype="FP32", **extra):
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.flatten().tolist()}],
            **extra}


@pytest.fixture(scope="module")
def server(cnn_fleet):
    srv = FleetServer(cnn_fleet, max_delay_ms=2.0, max_queue=64, max_body_bytes=1 << 20).start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_health_and_metadata(client, cnn_fleet):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2").json()
    assert meta["name"] == "fusecc" and "binary_tensor_data" in meta["extensions"]
    m = client.get("/v2/models/beta").json()
    assert m["name"] == "beta" and m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
    assert m["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get("/v2/models/beta/versions/1").json() == m
    assert client.get("/v2/models/beta/ready").json() == {"name": "beta", "ready": True}
    idx = client.post("/v2/repository/index").json()
    assert [e["name"] for e in idx] == NAMES and {e["state"] for e in idx} == {"READY"}
    r = client.get("/v2/models/delta")
    assert r.status_code == 404 and "alpha, beta, gamma" in r.json()["error"]
    assert client.get("/v2/models/beta/versions/2").status_code == 404
    assert client.get("/v2/models/delta/ready").status_code == 404


def test_infer_json_each_model(client, cnns):
    g = torch.Generator().manual_seed(5)
    for i, name in enumerate(NAMES):
        x = torch.randn((2,) + IMG, generator=g)
        r = client.post(f"/v2/models/{name}/infer", json=_infer_body(x, id=f"req-{i}"),
                        headers={"x-request-id": f"trace-{i}"})
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == f"trace-{i}"
        doc = r.json()
        assert doc["model_name"] == name and doc["id"] == f"req-{i}"
        (out,) = doc["outputs"]
        assert out["name"] == "output" and out["shape"] == [2, 10] and out["datatype"] == "FP32"
        torch.testing.assert_close(torch.tensor(out["data"]).view(2, 10), _alone(cnns[i], x), rtol=1e-5, atol=1e-5)
    # the versioned path, and an output asked for by name
    x = torch.randn((1,) + IMG, generator=g)
    r = client.post("/v2/models/gamma/versions/1/infer", json=_infer_body(x, outputs=[{"name": "output"}]))
    torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]).view(1, 10), _alone(cnns[2], x),
                               rtol=1e-5, atol=1e-5)


def test_infer_binary_extension(client, cnns):
    x = torch.randn((3,) + IMG)
    raw = x.numpy().tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": [3, *IMG], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    r = client.post("/v2/models/alpha/infer", content=head + raw,
                    headers={"Inference-Header-Content-Length": str(len(head)),
                             "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    doc = json.loads(r.content[:n])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 3 * 10 * 4
    got = torch.frombuffer(bytearray(r.content[n:]), dtype=torch.float32).view(3, 10)
    torch.testing.assert_close(got, _alone(cnns[0], x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"inputs": []}).encode(), 400, "non-empty list"),
    (json.dumps(_infer_body(torch.zeros(1, 3, 8, 8), datatype="FP64")).encode(), 400, "expected datatype FP32"),
    (json.dumps(_infer_body(torch.zeros(1, 3, 4, 4))).encode(), 400, "expected shape [-1, 3, 8, 8]"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 10}]}
                ).encode(), 400, "holds 192 elements, \"data\" has 10"),
    (json.dumps(_infer_body(torch.zeros(1, 3, 8, 8), name="pixels")).encode(), 400, "unknown input 'pixels'"),
    (json.dumps(_infer_body(torch.zeros(1, 3, 8, 8), outputs=[{"name": "probs"}])).encode(), 400,
     "unknown output 'probs'"),
    (json.dumps(_infer_body(torch.zeros(9, 3, 8, 8))).encode(), 400, "at most 8 per request"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32",
                             "data": ["a"] * 192}]}).encode(), 400, "not a list of FP32"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FLOAT"}]}).encode(), 400,
     "unknown datatype"),
])
def test_bad_requests_get_400_naming_what_was_expected(client, body, status, message):
    r = client.post("/v2/models/beta/infer", content=body)
    assert r.status_code == status
    assert message in r.json()["error"]
    assert client.get("/v2/health/ready").status_code == 200  # and the server goes on


def test_unknown_model_404_and_oversize_413(client):
    x = torch.zeros((1,) + IMG)
    r = client.post("/v2/models/delta/infer", json=_infer_body(x))
    assert r.status_code == 404 and "not served here" in r.json()["error"]
    assert client.post("/v2/models/beta/versions/7/infer", json=_infer_body(x)).status_code == 404
    big = b"{" + b" " * (1 << 20) + b"}"
    r = client.post("/v2/models/beta/infer", content=big)
    assert r.status_code == 413 and "at most" in r.json()["error"]

    def chunks():  # no Content-Length: refused while it streams
        for _ in range(40):
            yield b" " * 32768
    r = client.post("/v2/models/beta/infer", content=chunks())
    assert r.status_code == 413
    assert client.post("/v2/models/beta/infer", json=_infer_body(x)).status_code == 200


def test_text_fleet_validates_token_ids(berts, bert_fleet):
    with FleetServer(bert_fleet) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        meta = c.get("/v2/models/alpha").json()
        assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
        ids = torch.randint(0, V, (2, 10))
        body = {"inputs": [{"name": "input_ids", "shape": [2, 10], "datatype": "INT64", "data": ids.flatten().tolist()}]}
        r = c.post("/v2/models/gamma/infer", json=body)
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]).view(2, 3), _bert_alone(berts[2], ids),
                                   rtol=1e-4, atol=1e-5)
        bad = {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [3, V]}]}
        r = c.post("/v2/models/gamma/infer", json=bad)
        assert r.status_code == 400 and f"values must lie in [0, {V})" in r.json()["error"]
        long = {"inputs": [{"name": "input_ids", "shape": [1, 41], "datatype": "INT64", "data": [1] * 41}]}
        r = c.post("/v2/models/gamma/infer", json=long)
        assert r.status_code == 400 and "at most 40" in r.json()["error"]
        miss = {"inputs": [{"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]}]}
        r = c.post("/v2/models/gamma/infer", json=miss)
        assert r.status_code == 400 and "missing input 'input_ids'" in r.json()["error"]


def test_concurrent_clients_on_mixed_models(cnns, cnn_fleet):
    """Many clients at once, Zipf-like popularity: every answer equals its model run alone, and requests for
    several models share batches."""
    with FleetServer(cnn_fleet, max_delay_ms=20.0) as srv:
        g = torch.Generator().manual_seed(11)
        work = []
        for k in range(96):
            m = [0, 0, 0, 0, 1, 1, 2][int(torch.randint(0, 7, (), generator=g))]
            work.append((m, torch.randn((1 + k % 3,) + IMG, generator=g)))
        deadline = time.monotonic() + 120

        def one(item):
            m, x = item
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                assert time.monotonic() < deadline
                r = c.post(f"/v2/models/{NAMES[m]}/infer", json=_infer_body(x))
            return m, x, r

        with cf.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, work))
        for m, x, r in results:
            assert r.status_code == 200, r.text
            torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]).view(x.shape[0], 10),
                                       _alone(cnns[m], x), rtol=1e-5, atol=1e-5)
        metrics = httpx.get(srv.url + "/metrics").text
    batches = _metric(metrics, "fusecc_batch_requests_count")
    assert batches < len(work)  # requests were batched together
    assert _metric(metrics, 'fusecc_requests_total{code="200",model="alpha"}') == sum(1 for m, _ in work if m == 0)
    assert _metric(metrics, 'fusecc_rows_total{model="gamma"}') == sum(x.shape[0] for m, x in work if m == 2)
    assert "fusecc_request_seconds_bucket" in metrics and "fusecc_queue_rows" in metrics


def _metric(text, key):
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {key}")


def test_overload_answers_503_with_retry_after(cnn_fleet):
    """A full queue refuses at once; the others are still served once the fleet is free."""
    with FleetServer(cnn_fleet, max_delay_ms=1.0, max_queue=2) as srv:
        x = torch.zeros((1,) + IMG)
        pool = cf.ThreadPoolExecutor(8)

        def post(_):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                return c.post("/v2/models/alpha/infer", json=_infer_body(x))

        cnn_fleet._lock.acquire()  # the batch in flight cannot finish: the queue fills
        try:
            futs = [pool.submit(post, i) for i in range(8)]
            time.sleep(1.0)
            refused = [f for f in futs if f.done()]
            assert refused, "the queue should have refused some requests"
            for f in refused:
                r = f.result()
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
                assert "queue is full" in r.json()["error"]
        finally:
            cnn_fleet._lock.release()
            pool.shutdown(wait=True)
        codes = sorted(f.result().status_code for f in futs)
        assert set(codes) == {200, 503} and codes.count(200) >= 2
        assert httpx.post(srv.url + "/v2/models/alpha/infer", json=_infer_body(x), timeout=60).status_code == 200


def _state_bytes(model) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def test_hot_swap_under_load(cnns):
    """Model alpha gets model gamma's weights while clients hammer it: every answer is entirely the old or
    entirely the new model's, no request fails, and after the swap every answer is the new one."""
    fleet = ServedFleet(_cnns(seed=0), NAMES, inputs=[TensorSpec("input", torch.float32, IMG)], max_batch=8)
    x = torch.randn((2,) + IMG)
    old, new = _alone(cnns[0], x), _alone(cnns[2], x)
    with FleetServer(fleet, max_delay_ms=2.0) as srv:
        stop = threading.Event()
        seen = []

        def hammer():
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                t_end = time.monotonic() + 60
                while not stop.is_set() and time.monotonic() < t_end and len(seen) < 2000:
                    r = c.post("/v2/models/alpha/infer", json=_infer_body(x))
                    seen.append((time.monotonic(), r.status_code, r.json()))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        body = {"parameters": {"file:gamma.pt": base64.b64encode(_state_bytes(cnns[2])).decode()}}
        r = httpx.post(srv.url + "/v2/repository/models/alpha/load", json=body, timeout=60)
        swapped = time.monotonic()
        assert r.status_code == 200 and r.json() == {"name": "alpha", "swaps": 1}
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
        metrics = httpx.get(srv.url + "/metrics").text
    assert all(code == 200 for _, code, _ in seen)
    kinds = []
    for t, _, doc in seen:
        y = torch.tensor(doc["outputs"][0]["data"]).view(2, 10)
        is_old = torch.allclose(y, old, rtol=1e-5, atol=1e-5)
        is_new = torch.allclose(y, new, rtol=1e-5, atol=1e-5)
        assert is_old != is_new, "an answer from a mix of weights"
        kinds.append((t, is_new))
    assert any(not k for _, k in kinds) and any(k for _, k in kinds)
    assert all(k for t, k in kinds if t > swapped + 0.05)  # answered after the swap returned: the new weights
    assert _metric(metrics, 'fusecc_swaps_total{model="alpha",result="ok"}') == 1
    assert cnns[0][0].weight.data_ptr() != fleet.fused.get_parameter("0.weight").data_ptr()  # the user's model untouched


def test_tritonclient_http_unchanged(cnns, cnn_fleet):
    """NVIDIA Triton's own HTTP client: health, metadata, binary and JSON inference, repository load."""
    tc = pytest.importorskip("tritonclient.http")
    import numpy as np
    with FleetServer(cnn_fleet) as srv:
        client = tc.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready("beta")
            meta = client.get_model_metadata("beta")
            assert meta["inputs"][0]["name"] == "input"
            x = np.random.default_rng(0).standard_normal((2, *IMG)).astype(np.float32)
            for binary in (True, False):
                inp = tc.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                out = tc.InferRequestedOutput("output", binary_data=binary)
                res = client.infer("beta", [inp], outputs=[out], request_id="tc-1")
                torch.testing.assert_close(torch.from_numpy(res.as_numpy("output").copy()), _alone(cnns[1], torch.from_numpy(x)),
                                           rtol=1e-5, atol=1e-5)
            assert res.get_response()["id"] == "tc-1"
            with pytest.raises(tc.InferenceServerException, match="not served here"):
                client.infer("delta", [inp])
            bad = tc.InferInput("input", [2, 3, 4, 4], "FP32")
            bad.set_data_from_numpy(np.zeros((2, 3, 4, 4), np.float32))
            with pytest.raises(tc.InferenceServerException, match="expected shape"):
                client.infer("beta", [bad])
            # hot swap through the repository API: beta gets alpha's weights, then its own back
            client.load_model("beta", files={"file:alpha.pt": _state_bytes(cnns[0])})
            res = client.infer("beta", [inp])
            torch.testing.assert_close(torch.from_numpy(res.as_numpy("output").copy()), _alone(cnns[0], torch.from_numpy(x)),
                                       rtol=1e-5, atol=1e-5)
            with pytest.raises(tc.InferenceServerException, match="do not fit model 'beta'"):
                client.load_model("beta", files={"file:bad.pt": _state_bytes(nn.Linear(2, 2))})
            client.load_model("beta", files={"file:beta.pt": _state_bytes(cnns[1])})
            res = client.infer("beta", [inp])
            torch.testing.assert_close(torch.from_numpy(res.as_numpy("output").copy()), _alone(cnns[1], torch.from_numpy(x)),
                                       rtol=1e-5, atol=1e-5)
        finally:
            client.close()


def save_checkpoints(models, folder, prefix):
    """One state dict file per model, ``folder/{prefix}{i}.pt``; their paths."""
    paths = []
    for i, m in enumerate(models):
        p = folder / f"{prefix}{i}.pt"
        torch.save(m.state_dict(), p)
        paths.append(str(p))
    return paths


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_serves_swaps_and_drains_on_sigterm(tmp_path):
    """`fusecc serve` from checkpoints, `fusecc swap`, and SIGTERM: requests in flight are answered, then exit 0."""
    models = _cnns(2, seed=4)
    paths = save_checkpoints(models, tmp_path, "ckpt")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "fusecc", "serve", "--arch", os.path.join(ROOT, "tests", "cli_models.py:small_cnn"),
           "--weights", *paths, "--example-input", "1,3,8,8", "--port", str(port), "--max-delay-ms", "1500",
           "--max-batch", "8", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        x = torch.randn((1,) + IMG)
        r = httpx.post(url + "/v2/models/ckpt1/infer", json=_infer_body(x), timeout=30)  # names from the files
        torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]).view(1, 10), _alone(models[1], x),
                                   rtol=1e-5, atol=1e-5)
        sw = subprocess.run([sys.executable, "-m", "fusecc", "swap", "--url", url, "--model", "ckpt1", "--weights",
                             paths[0]], env=env, capture_output=True, text=True, timeout=120)
        assert sw.returncode == 0 and "ckpt1: new weights" in sw.stdout, sw.stderr
        sw = subprocess.run([sys.executable, "-m", "fusecc", "swap", "--url", url, "--model", "nope", "--weights",
                             paths[0]], env=env, capture_output=True, text=True, timeout=120)
        assert sw.returncode == 1 and "HTTP 404" in sw.stderr
        with cf.ThreadPoolExecutor(6) as pool:  # in flight when SIGTERM comes (queued: a batch waits up to 1.5 s)
            futs = [pool.submit(httpx.post, url + f"/v2/models/ckpt{i % 2}/infer", json=_infer_body(x), timeout=60)
                    for i in range(6)]
            t_end = time.monotonic() + 30
            while _metric(httpx.get(url + "/metrics").text, "fusecc_queue_rows") < 6:  # all six queued, waiting
                assert time.monotonic() < t_end
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            rs = [f.result() for f in futs]
        assert [r.status_code for r in rs] == [200] * 6
        for r in rs:  # both slots hold model 0's weights now
            torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]).view(1, 10), _alone(models[0], x),
                                       rtol=1e-5, atol=1e-5)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "listening on" in out and "drained and stopped" in out and "2 models (ckpt0, ckpt1)" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ routed export

@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_routed_export_takes_rows_of_any_models(berts, tmp_path, fmt, capsys):
    """`fusecc export --routed`: one artifact, inputs [rows, seq] plus model_id [rows], rows and length dynamic;
    each row's answer is its own model's."""
    from fusecc.cli import main
    from fusecc.export import load
    dirs = []
    for i, m in enumerate(berts):
        d = tmp_path / f"bert-{i}"
        m.save_pretrained(d)
        dirs.append(str(d))
    out = str(tmp_path / f"routed.{'pt2' if fmt == 'pt2' else 'pt'}")
    argv = ["export", "--hf", *dirs, "--example-input", "4,9", "--routed", "--format", fmt, "-o", out, "-q"]
    if fmt == "torchscript":
        argv += ["--triton-repo", str(tmp_path / "repo"), "--name", "fleet", "--max-batch", "16"]
    assert main(argv) == 0
    assert "verified row by row" in capsys.readouterr().out
    artifact = load(out, fmt)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, V, (7, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 8:] = 0
    model_id = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    with torch.no_grad():
        got = artifact(ids, mask, model_id)["logits"]
    for r, k in enumerate(model_id.tolist()):
        torch.testing.assert_close(got[r:r + 1], _bert_alone(berts[k], ids[r:r + 1], mask[r:r + 1]), rtol=1e-4,
                                   atol=1e-5)
    if fmt == "torchscript":
        cfg = (tmp_path / "repo" / "fleet" / "config.pbtxt").read_text()
        assert "max_batch_size: 16" in cfg and "dynamic_batching" in cfg
        assert 'name: "INPUT__2" data_type: TYPE_INT64 dims: [ 1 ]' in cfg  # model_id, one per row
        assert 'name: "INPUT__0" data_type: TYPE_INT64 dims: [ -1 ]' in cfg  # token ids of any length
        with torch.no_grad():  # Triton's batcher sends model_id as [rows, 1]
            torch.testing.assert_close(artifact(ids, mask, model_id[:, None])["logits"], got)


def test_routed_export_refuses_convs(tmp_path, capsys):
    from fusecc.cli import main
    out = str(tmp_path / "r.pt2")
    rc = main(["export", "--arch", os.path.join(ROOT, "tests", "cli_models.py:small_cnn"), "--num-models", "2",
               "--example-input", "2,3,8,8", "--routed", "--format", "pt2", "-o", out, "-q"])
    assert rc == 1 and "not routable" in capsys.readouterr().err and not os.path.exists(out)
