"""Hugging Face transformers fleets and models torch.fx cannot trace, through the dynamo frontend.

Tiny configs with random weights (no download). The oracle is the N original models run one by one, each on its
own batch with its own padding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fusecc
from fusecc.errors import FusionError
from tests.utils import assert_close

T = pytest.importorskip("transformers")

V = 100  # vocabulary
N = 3


def _text(cls, cfg_cls, **cfg):
    return lambda: cls(cfg_cls(vocab_size=V, **cfg))


BERTISH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, num_labels=3)
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=64)

# name -> (factory, extra call keywords, output to compare)
MODELS = {
    "bert": (_text(T.BertForSequenceClassification, T.BertConfig, **BERTISH), {}, "logits"),
    "distilbert": (_text(T.DistilBertForSequenceClassification, T.DistilBertConfig, dim=32, n_layers=2, n_heads=4,
                         hidden_dim=64, max_position_embeddings=64, num_labels=3), {}, "logits"),
    "roberta": (_text(T.RobertaForSequenceClassification, T.RobertaConfig, pad_token_id=1,
                      **{**BERTISH, "max_position_embeddings": 66}), {}, "logits"),
    "gpt2": (_text(T.GPT2LMHeadModel, T.GPT2Config, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                   eos_token_id=0), {"use_cache": False}, "logits"),
    "xlnet": (_text(T.XLNetForSequenceClassification, T.XLNetConfig, d_model=32, n_layer=2, n_head=4, d_inner=64,
                    num_labels=3), {}, "logits"),
    "llama": (_text(T.LlamaForCausalLM, T.LlamaConfig, **DECODER), {"use_cache": False}, "logits"),
    "qwen2": (_text(T.Qwen2ForCausalLM, T.Qwen2Config, **DECODER), {"use_cache": False}, "logits"),
    "albert": (_text(T.AlbertForSequenceClassification, T.AlbertConfig, embedding_size=16, **BERTISH), {}, "logits"),
    "electra": (_text(T.ElectraForSequenceClassification, T.ElectraConfig, embedding_size=16, **BERTISH), {},
                "logits"),
    "deberta_v2": (_text(T.DebertaV2ForSequenceClassification, T.DebertaV2Config, **BERTISH), {}, "logits"),
    "mpnet": (_text(T.MPNetForSequenceClassification, T.MPNetConfig, **{**BERTISH, "max_position_embeddings": 66}),
              {}, "logits"),
    "t5_encoder": (_text(T.T5EncoderModel, T.T5Config, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4), {},
                   "last_hidden_state"),
}
# the list runs in every `make test-fast`; the others are marked slow
FAST = {"bert", "distilbert", "roberta", "gpt2", "xlnet", "llama"}


def _batch(b: int, s: int, seed: int = 0):
    """Token ids and attention masks for N models, each model's batch padded its own way."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (N, b, s), generator=g)
    mask = torch.ones(N, b, s, dtype=torch.long)
    for i in range(N):
        for j in range(b):
            pad = int(torch.randint(0, s // 2, (), generator=g)) if (i + j) % 2 else 0
            if pad:
                mask[i, j, s - pad:] = 0
    return ids, mask


def _loop(models, key, **inputs):
    outs = []
    for i, m in enumerate(models):
        kw = {k: (v[i] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        outs.append(m(**kw)[key])
    return torch.stack(outs)


@pytest.mark.parametrize("name", [pytest.param(k, marks=() if k in FAST else pytest.mark.slow) for k in MODELS])
def test_transformers_fleet_equals_models(name):
    factory, extra, key = MODELS[name]
    torch.manual_seed(0)
    models = [factory().eval() for _ in range(N)]
    fused = fusecc.fuse(models)
    with torch.no_grad():
        for b, s in ((2, 10), (3, 17)):  # a new batch size and sequence length: the same capture
            ids, mask = _batch(b, s, seed=s)
            out = fused(input_ids=ids, attention_mask=mask, **extra)
            assert type(out) is type(models[0](input_ids=ids[0], attention_mask=mask[0], **extra))
            ref = _loop(models, key, input_ids=ids, attention_mask=mask, **extra)
            assert_close(name, out[key], ref, atol=1e-5, rtol=1e-4)
            assert (ref[0] - ref[1]).abs().max() > 1e-3  # the models differ: each slot ran its own weights
    assert fused._fusecc_last.frontend == "dynamo"
    assert sum(len(v) for v in fused._fusecc_compiled.values()) == 1, "a new length must not capture again"
    assert not fused.fusion_report.fallbacks, fused.fusion_report.table()


def test_bert_shared_inputs_and_token_types():
    """N classifiers scoring the same text; token_type_ids and position_ids passed as the models take them."""
    factory, _, _ = MODELS["bert"]
    torch.manual_seed(1)
    models = [factory().eval() for _ in range(N)]
    ids, mask = _batch(2, 12)
    ids, mask = ids[0], mask[1]
    tt = torch.zeros_like(ids)
    tt[:, 6:] = 1
    fused = fusecc.fuse(models, shared_inputs=True)
    with torch.no_grad():
        out = fused(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        ref = torch.stack([m(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits for m in models])
    assert_close("shared", out.logits, ref, atol=1e-5, rtol=1e-4)
    # only the ids shared; masks per model
    fused = fusecc.fuse(models, shared_inputs=["input_ids"])
    ids2, mask2 = _batch(2, 12, seed=3)
    with torch.no_grad():
        out = fused(input_ids=ids2[0], attention_mask=mask2)
        ref = torch.stack([m(input_ids=ids2[0], attention_mask=mask2[i]).logits for i, m in enumerate(models)])
    assert_close("shared ids", out.logits, ref, atol=1e-5, rtol=1e-4)


def test_sizes_outside_the_capture_capture_again():
    """A batch of 1 (dynamo specialises sizes 0 and 1) and a sequence longer than the position table: the guards
    send both to a new capture, which gives the model's own answer (or its own error), never a silent wrong one."""
    factory, _, _ = MODELS["bert"]
    torch.manual_seed(2)
    models = [factory().eval() for _ in range(N)]
    fused = fusecc.fuse(models)
    with torch.no_grad():
        ids, mask = _batch(2, 8)
        fused(input_ids=ids, attention_mask=mask)
        ids1, mask1 = _batch(1, 8)
        out = fused(input_ids=ids1, attention_mask=mask1)
        assert_close("b1", out.logits, _loop(models, "logits", input_ids=ids1, attention_mask=mask1), atol=1e-5,
                     rtol=1e-4)
        long_ids = torch.randint(2, V, (N, 2, 70))
        with pytest.raises(Exception) as fused_err:
            fused(input_ids=long_ids)
        with pytest.raises(Exception) as model_err:
            models[0](input_ids=long_ids[0])
    assert type(model_err.value).__name__ in str(fused_err.value) or type(fused_err.value) is type(model_err.value)


def test_kv_cache_is_a_clear_error():
    factory, _, _ = MODELS["gpt2"]
    models = [factory().eval() for _ in range(2)]
    fused = fusecc.fuse(models)
    ids = torch.randint(2, V, (2, 1, 6))
    with pytest.raises(FusionError, match="use_cache=False"):
        fused(input_ids=ids)


def test_explicit_frontend_choice():
    factory, _, _ = MODELS["bert"]
    models = [factory().eval() for _ in range(2)]
    ids, mask = torch.randint(2, V, (2, 2, 6)), torch.ones(2, 2, 6, dtype=torch.long)
    with pytest.raises(FusionError, match="torch.fx cannot trace"):
        fusecc.fuse(models, frontend="fx")(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="frontend"):
        fusecc.fuse(models, frontend="jit")
    fused = fusecc.fuse(models, frontend="dynamo")
    with torch.no_grad():
        fused(input_ids=ids, attention_mask=mask)
    assert "captured by torch._dynamo" in repr(fused)


class Branchy(nn.Module):
    """torch.fx cannot trace this (Python control flow on a size), dynamo can: ``fuse`` picks dynamo."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[1] > 4:
            x = torch.relu(self.a(x))
        return self.b(x)


def test_auto_frontend_on_control_flow():
    torch.manual_seed(3)
    models = [Branchy() for _ in range(N)]
    fused = fusecc.fuse(models)
    for s in (6, 3):  # both sides of the branch: two captures, each guarded
        x = torch.randn(N, 2, s, 8)
        y = fused(x)
        ref = torch.stack([m(x[i]) for i, m in enumerate(models)])
        assert_close(f"s={s}", y, ref)
    assert fused._fusecc_last.frontend == "dynamo"
    assert sum(len(v) for v in fused._fusecc_compiled.values()) == 2
    # a plain model still goes through torch.fx
    plain = fusecc.fuse([nn.Linear(3, 2) for _ in range(2)])
    plain(torch.randn(2, 4, 3))
    assert plain._fusecc_last.frontend == "fx"


@pytest.mark.slow
def test_timm_mobilevit_auto_frontend():
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    models = [timm.create_model("mobilevit_xxs", num_classes=3).eval() for _ in range(2)]
    fused = fusecc.fuse(models)
    x = torch.randn(2, 2, 3, 64, 64)
    with torch.no_grad():
        y = fused(x)
        ref = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert_close("mobilevit", y, ref, atol=1e-5, rtol=1e-4)
    assert fused._fusecc_last.frontend == "dynamo"
    assert not fused.fusion_report.fallbacks


def test_vit_image_classifier():
    torch.manual_seed(5)
    cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, num_labels=3)
    models = [T.ViTForImageClassification(cfg).eval() for _ in range(N)]
    fused = fusecc.fuse(models)
    x = torch.randn(N, 2, 3, 32, 32)
    with torch.no_grad():
        y = fused(pixel_values=x)
        ref = torch.stack([m(pixel_values=x[i]).logits for i, m in enumerate(models)])
    assert_close("vit", y.logits, ref, atol=1e-5, rtol=1e-4)


def _bert_no_dropout():
    cfg = T.BertConfig(vocab_size=V, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **BERTISH)
    return T.BertForSequenceClassification(cfg)


def test_bert_fleet_fine_tunes_like_n_models():
    """Training: loss from labels inside the model, per-model gradients, fusecc.optim.AdamW with a per-model lr,
    three steps: every model's weights equal those of the same model trained alone with torch.optim.AdamW."""
    torch.manual_seed(6)
    models = [_bert_no_dropout().train() for _ in range(N)]
    refs = [copy.deepcopy(m) for m in models]
    lrs = [1e-3, 3e-3, 1e-2]
    fused = fusecc.fuse(models)
    opt = fusecc.optim.AdamW(fused.parameters(), lr=lrs, weight_decay=0.01, num_models=N)
    ref_opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01) for m, lr in zip(refs, lrs)]
    for step in range(3):
        ids, mask = _batch(4, 9, seed=10 + step)
        labels = torch.randint(0, 3, (N, 4))
        out = fused(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.loss.shape == (N,)
        opt.zero_grad()
        out.loss.sum().backward()
        losses = []
        for i, (m, o) in enumerate(zip(refs, ref_opts)):
            o.zero_grad()
            loss = m(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]).loss
            loss.backward()
            losses.append(loss.detach())
            if step == 0:  # the gradients themselves, before any update
                for name, p in m.named_parameters():
                    assert_close(f"grad {name}", fused.get_parameter(name).grad[i], p.grad, atol=1e-5, rtol=1e-4)
        assert_close(f"loss {step}", out.loss.detach(), torch.stack(losses), atol=1e-5, rtol=1e-4)
        opt.step()
        for o in ref_opts:
            o.step()
    for i, m in enumerate(refs):
        for name, p in m.named_parameters():
            assert_close(f"model {i} {name}", fused.get_parameter(name).detach()[i], p.detach(), atol=1e-5, rtol=1e-4)
    assert not any(torch.equal(p, q) for p, q in zip(models[0].parameters(), refs[0].parameters())
                   if p.dim() > 1), "the user's models must not be trained (fuse copies)"


def test_bert_training_dropout_masks_are_per_model():
    """Dropout (hidden and attention) draws its own mask for every model: N copies of ONE model give N different
    outputs in training, and the same output in eval."""
    cfg = T.BertConfig(vocab_size=V, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3, **BERTISH)
    torch.manual_seed(7)
    one = T.BertForSequenceClassification(cfg)
    fused = fusecc.fuse([copy.deepcopy(one) for _ in range(N)], shared_inputs=True).train()
    ids = torch.randint(2, V, (4, 12))
    y = fused(input_ids=ids).logits
    assert (y[0] - y[1]).abs().max() > 1e-4 and (y[1] - y[2]).abs().max() > 1e-4
    report = fused.fusion_report.table()
    assert "independent per model" in report
    fused.eval()
    with torch.no_grad():
        y = fused(input_ids=ids).logits
        assert_close("eval", y, one.eval()(input_ids=ids).logits.expand(N, -1, -1), atol=1e-5, rtol=1e-4)


def test_hf_models_in_and_out():
    """model_state_dict / load_model_state_dict / unfuse on a transformers fleet."""
    factory, _, _ = MODELS["distilbert"]
    torch.manual_seed(8)
    models = [factory().eval() for _ in range(N)]
    fused = fusecc.fuse(models)
    ids, mask = _batch(2, 7)
    other = factory().eval()
    fused.load_model_state_dict(1, other.state_dict())
    with torch.no_grad():
        out = fused(input_ids=ids, attention_mask=mask).logits
        assert_close("slot 1", out[1], other(input_ids=ids[1], attention_mask=mask[1]).logits, atol=1e-5, rtol=1e-4)
        back = fused.unfuse()
        assert type(back[0]) is type(models[0])
        assert_close("unfused", back[2](input_ids=ids[2], attention_mask=mask[2]).logits, out[2], atol=1e-5,
                     rtol=1e-4)


@pytest.mark.slow
def test_bert_fleet_under_torch_compile():
    """torch.compile(fused) on a dynamo-captured fleet: exact at three sizes, one fusecc capture (inductor compiles
    again for the dynamic sizes, then reuses it)."""
    factory, _, _ = MODELS["bert"]
    torch.manual_seed(9)
    models = [factory().eval() for _ in range(N)]
    fused = fusecc.fuse(models)
    comp = torch.compile(fused)
    with torch.no_grad():
        for b, s in ((2, 10), (3, 17), (2, 12)):
            ids, mask = _batch(b, s, seed=s)
            y = comp(input_ids=ids, attention_mask=mask).logits
            assert_close(f"{b}x{s}", y, _loop(models, "logits", input_ids=ids, attention_mask=mask), atol=1e-5,
                         rtol=1e-4)
    assert sum(len(v) for v in fused._fusecc_compiled.values()) == 1
