"""LoRA fleets made with peft: one base computation over all rows plus a per-model low-rank update, exact against
the N peft models run one by one (ranks, alphas and adapters differ per model)."""

import copy

import pytest
import torch

import fusecc
from tests.utils import assert_close

peft = pytest.importorskip("peft")
T = pytest.importorskip("transformers")

VOCAB = 100


def base_model(seed=0):
    torch.manual_seed(seed)
    cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return T.BertForSequenceClassification(cfg).eval()


def lora_fleet(ranks_alphas, task_type=None, seed=0):
    """One base model, an adapter per model (rank r, alpha) on query/value with non-zero B (a trained adapter)."""
    base = base_model(seed)
    models = []
    for i, (r, alpha) in enumerate(ranks_alphas):
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value"], lora_dropout=0.0,
                              task_type=task_type)
        m = peft.get_peft_model(copy.deepcopy(base), cfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        models.append(m.eval())
    return models


def logits_loop(models, ids, mask):
    with torch.no_grad():
        return torch.stack([m(input_ids=ids[i], attention_mask=mask[i]).logits for i, m in enumerate(models)])


def inputs(n, b=2, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, b, s), generator=g)
    mask = torch.ones(n, b, s, dtype=torch.long)
    mask[:, 0, 5:] = 0  # padding in one row
    return ids, mask


def test_lora_fleet_of_mixed_ranks_is_one_base_plus_per_model_updates():
    spec = [(4, 8), (8, 8), (6, 24)]  # ranks 4, 8, 6 (padded to 8), scalings 2, 1, 4
    models = lora_fleet(spec)
    snapshot = [copy.deepcopy(m.state_dict()) for m in models]
    fused = fusecc.fuse(models)
    ids, mask = inputs(3)
    with torch.no_grad():
        out = fused(input_ids=ids, attention_mask=mask).logits
    assert_close("logits", out, logits_loop(models, ids, mask))
    # the base weights are stored once and run as one GEMM over every model's rows
    shared = fused.shared_tensors
    assert all("lora_" not in k for k in shared)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight" in shared
    assert fused.fusion_report.count("linear", "one GEMM (weight shared by all models)") >= 12
    base_bytes = sum(t.numel() * t.element_size() for k, t in models[0].state_dict().items() if "lora_" not in k)
    assert fused.weight_bytes()["shared"] >= base_bytes - 1000  # (+ scalings shared? no: they differ)
    assert fused.weight_bytes()["per_model"] < 0.2 * base_bytes
    # the user's models are untouched (no padding, scaling still a float)
    for m, s in zip(models, snapshot):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in s.items())
    layer = models[0].base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer.scaling["default"], float) and layer.lora_A["default"].weight.shape[0] == 4
    # each model's own rank out, and back in
    for i, (r, _) in enumerate(spec):
        sd = fused.model_state_dict(i)
        assert sd["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"].shape[0] == r
        fresh = lora_fleet([spec[i]], seed=0)[0]
        fresh.load_state_dict(sd)
        with torch.no_grad():
            assert_close(f"model {i}", fresh(input_ids=ids[i], attention_mask=mask[i]).logits, out[i])
    fused.load_model_state_dict(1, models[1].state_dict())
    with pytest.raises(ValueError, match="lora_A.default.weight' has shape"):
        fused.load_model_state_dict(0, models[1].state_dict())  # rank 8 into model 0's rank-4 slot


def test_unfuse_gives_back_peft_models_with_their_ranks_and_scalings():
    spec = [(2, 4), (4, 4)]
    models = lora_fleet(spec)
    fused = fusecc.fuse(models)
    back = fused.unfuse()
    ids, mask = inputs(2)
    assert_close("unfused", logits_loop(back, ids, mask), logits_loop(models, ids, mask))
    for b, m in zip(back, models):
        q, mq = b.base_model.model.bert.encoder.layer[1].attention.self.query, \
            m.base_model.model.bert.encoder.layer[1].attention.self.query
        assert q.r == mq.r and q.lora_alpha == mq.lora_alpha and q.scaling == mq.scaling
        assert b.peft_config["default"].r == m.peft_config["default"].r
        assert q.lora_A["default"].weight.shape == mq.lora_A["default"].weight.shape


def test_training_a_lora_fleet_updates_only_the_adapters_per_model():
    spec = [(4, 8), (2, 8), (4, 4)]
    models = [m.train() for m in lora_fleet(spec, task_type="SEQ_CLS")]
    refs = [copy.deepcopy(m) for m in models]
    fused = fusecc.fuse(models)
    lrs = [1e-2, 3e-3, 3e-2]
    opt = fusecc.optim.AdamW(fused, lr=lrs)
    ref_opts = [torch.optim.AdamW([p for p in r.parameters() if p.requires_grad], lr=lr) for r, lr in zip(refs, lrs)]
    ids, mask = inputs(3, seed=1)
    labels = torch.randint(0, 3, (3, 2), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        fused(input_ids=ids, attention_mask=mask, labels=labels).loss.sum().backward()
        opt.step()
        opt.zero_grad()
        for i, (r, o) in enumerate(zip(refs, ref_opts)):
            r(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]).loss.backward()
            o.step()
            o.zero_grad()
    # the frozen base stayed shared (stored once), the adapters (and peft's trainable classifier copy) moved per model
    assert "base_model.model.bert.encoder.layer.0.attention.self.value.base_layer.weight" in fused.shared_tensors
    for i, r in enumerate(refs):
        mine = fused.model_state_dict(i)
        for k, v in r.state_dict().items():
            assert_close(f"model {i} {k}", mine[k], v, rtol=1e-4, atol=1e-5)


def test_dora_is_refused_with_what_to_do():
    base = base_model()
    models = [peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
              for _ in range(2)]
    with pytest.raises(fusecc.FusionError, match="DoRA .*Merge this adapter"):
        fusecc.fuse(models)


def test_adapters_on_different_modules_are_refused():
    base = base_model()
    a = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"]))
    b = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["value"]))
    with pytest.raises(fusecc.FusionError, match="adapters on the same modules"):
        fusecc.fuse([a, b])


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(16, 16)
        self.o = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.o(torch.relu(self.q(x)))


@pytest.mark.parametrize("alphas", [(4, 8, 4), (4, 4, 4)])  # per-model scalings, then one shared scaling
def test_triton_path_runs_the_update_as_one_kernel(alphas):
    """On the Triton path (here the interpreter) the shrink, expand and scale of every model are ONE launch of
    fusecc.kernels.lora, equal to the N peft models."""
    from fusecc.kernels import use_backend

    torch.manual_seed(0)
    base = Tiny().eval()
    models = []
    for i, (r, alpha) in enumerate(zip((2, 4, 4), alphas)):
        m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r if alphas[0] != alphas[1] else 4,
                                                                     lora_alpha=alpha, target_modules=["q"]))
        with torch.no_grad():
            for k, p in m.named_parameters():
                if "lora_B" in k:
                    p.normal_(generator=torch.Generator().manual_seed(i))
        models.append(m.eval())
    x = torch.randn(3, 5, 16)
    with use_backend("triton"), torch.no_grad():
        fused = fusecc.fuse(models)
        out = fused(x)
    assert fused.fusion_report.count("lora", "per-model low-rank update, one launch (Triton kernel)") == 1
    assert "low_rank_update" in fused.code
    with torch.no_grad():
        ref = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert_close("out", out, ref, rtol=1e-4, atol=1e-5)
