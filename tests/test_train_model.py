"""Tests of asteria.train.model: shapes, parameter counts, causality, tying."""

import pytest
import torch

from asteria.train.model import GPT, PRESETS, ModelConfig, param_groups, preset

EXPECTED_PARAMS = {"tiny": 842_496, "small": 4_837_376, "base": 25_416_704}


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts(name):
    cfg = preset(name)
    assert cfg.num_parameters() == EXPECTED_PARAMS[name]
    if name != "base":  # building the 25M model is slow-ish; the formula is checked on the others
        assert GPT(cfg).num_parameters() == EXPECTED_PARAMS[name]


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, context=16))
    x = torch.randint(0, 256, (3, 16))
    logits, loss = model(x, x)
    assert logits.shape == (3, 16, 256)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    logits, loss = model(x[:, :5])
    assert logits.shape == (3, 5, 256) and loss is None


def test_tiny_preset_forward():
    model = GPT(preset("tiny", context=64))
    logits, _ = model(torch.randint(0, 256, (2, 64)))
    assert logits.shape == (2, 64, 256)


def test_causal():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, context=16))
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert torch.equal(a[0, :10], b[0, :10])
    assert not torch.equal(a[0, 10:], b[0, 10:])


def test_embedding_is_tied_and_init_is_seeded():
    torch.manual_seed(3)
    a = GPT(preset("tiny"))
    torch.manual_seed(3)
    b = GPT(preset("tiny"))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert not any("lm_head" in n for n, _ in a.named_parameters())


def test_context_limit_and_validation():
    model = GPT(ModelConfig(n_layer=1, n_head=1, d_model=8, context=4))
    with pytest.raises(ValueError, match="exceeds the model context"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_layer=1, n_head=3, d_model=8)
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig(n_layer=0, n_head=1, d_model=8)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


def test_param_groups_split_matrices_and_vectors():
    model = GPT(ModelConfig(n_layer=1, n_head=1, d_model=8, context=4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_untied_output_projection_is_its_own_weight():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, context=8, tie_embeddings=False)
    model = GPT(cfg)
    assert model.num_parameters() == cfg.num_parameters() == preset_count(cfg) + 256 * 16
    assert model.head.weight.shape == (256, 16) and model.head.weight is not model.tok_emb.weight
    x = torch.randint(0, 256, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    assert model.head.weight.grad is not None and model.tok_emb.weight.grad is not None
    with torch.no_grad():
        model.head.weight.zero_()
        logits, _ = model(x)
    assert torch.equal(logits, torch.zeros_like(logits))  # the logits come from the head, not the embedding
    with pytest.raises(ValueError, match="tie_embeddings"):
        ModelConfig(n_layer=1, n_head=1, d_model=8, tie_embeddings=1)


def preset_count(cfg):
    """The parameter count of the tied model of the same shape."""
    return ModelConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, context=cfg.context).num_parameters()
