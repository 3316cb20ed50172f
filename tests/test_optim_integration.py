"""End-to-end checks: a small GPT-like model (every weight gets a real preconditioner), convergence against
AdamW, and the usual training-loop companions (GradScaler, clipping, accumulation, torch.compile, bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from asteria.optim import KLSOAP, SOAP, KLShampoo, Shampoo
from asteria.runtime import RuntimeConfig
from helpers import assert_same_bits
from models import TinyGPT, lm_loss


FACTORIES = {
    "Shampoo": lambda ps, **kw: Shampoo(ps, lr=1e-3, precondition_frequency=2, start_preconditioning_step=2, **kw),
    "SOAP": lambda ps, **kw: SOAP(ps, precondition_frequency=2, **kw),
    "KLShampoo": lambda ps, **kw: KLShampoo(ps, precondition_frequency=2, **kw),
    "KLSOAP": lambda ps, **kw: KLSOAP(ps, precondition_frequency=2, **kw),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_matrix_weight_gets_a_non_identity_preconditioner(name):
    torch.manual_seed(0)
    model = TinyGPT()
    named = list(model.named_parameters())
    opt = FACTORIES[name](named, runtime=RuntimeConfig(refresh="sync"))  # refreshes installed at once
    idx = torch.randint(0, 16, (4, 7))
    for _ in range(3):  # first refresh: Shampoo at step 2; SOAP/KL basis from the first call, QR at step 2
        opt.zero_grad()
        lm_loss(model, idx).backward()
        opt.step()
    checked = 0
    for pname, p in named:
        if p.dim() < 2:
            continue
        for blk in opt.state[p]["blocks"]:
            prefix = "root_" if name == "Shampoo" else "basis_"
            mats = [v for k, v in blk.items() if k.startswith(prefix) and k[len(prefix):].isdigit()]
            assert mats, pname
            for X in mats:
                if X.shape[0] == 1:
                    continue
                eye = torch.eye(X.shape[0])
                assert not torch.allclose(X.abs(), eye, atol=1e-6), f"{pname}: preconditioner left at identity"
                checked += 1
    assert checked >= 6


def _regression(seed=0, din=16, dout=8, n=256):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(din, din, generator=g))
    X = torch.randn(n, din, generator=g) @ (q @ torch.diag(torch.logspace(0, -2, din))).T
    return X, X @ torch.randn(dout, din, generator=g).T


def _final_loss(make, steps=100):
    X, Y = _regression()
    W = nn.Parameter(torch.zeros(8, 16))
    opt = make([W])
    for _ in range(steps):
        opt.zero_grad()
        ((X @ W.T - Y) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        return ((X @ W.T - Y) ** 2).mean().item()


def test_second_order_optimizers_beat_adamw_on_a_rotated_ill_conditioned_problem():
    adamw = min(_final_loss(lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0)) for lr in (0.1, 0.3, 1.0))
    ours = {
        "Shampoo": _final_loss(lambda ps: Shampoo(ps, lr=0.3, merge_dims=False, precondition_frequency=5,
                                                  start_preconditioning_step=5, epsilon=1e-8)),
        "SOAP": _final_loss(lambda ps: SOAP(ps, lr=0.3, betas=(0.9, 0.999), weight_decay=0.0, precondition_frequency=5)),
        "KLShampoo": _final_loss(lambda ps: KLShampoo(ps, lr=3.0, weight_decay=0.0, precondition_frequency=5)),
        "KLSOAP": _final_loss(lambda ps: KLSOAP(ps, lr=0.1, weight_decay=0.0, precondition_frequency=5)),
    }
    for name, loss in ours.items():
        assert loss < 0.5 * adamw, f"{name}: {loss:.3g} vs best AdamW {adamw:.3g}"


CLIP = 0.25  # below the gradient norms of these steps: clipping is active


def _accumulated_clipped_run(name, *, scaler, overflow_at=None, steps=6):
    """Trains TinyGPT with two accumulated micro-batches per step and global-norm clipping at CLIP, through a GradScaler
    (after ``unscale_``) or without one. At step ``overflow_at`` one gradient entry is set to Inf after backward.

    Returns:
        ``(parameters after every step, gradient norms before clipping, losses, state_dict before and after the
        overflow step or None)``.
    """
    torch.manual_seed(0)
    model = TinyGPT()
    opt = FACTORIES[name](model.parameters())
    idx = torch.randint(0, 16, (8, 7))
    params, norms, losses, around = [], [], [], None
    for step in range(steps):
        opt.zero_grad()
        for chunk in idx.chunk(2):  # gradient accumulation
            loss = lm_loss(model, chunk) / 2
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if step == overflow_at:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        if scaler is not None:
            scaler.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        before = opt.state_dict() if step == overflow_at else None
        if scaler is not None:
            scaler.step(opt)  # skips opt.step() when the unscaled gradients hold Inf/NaN
            scaler.update()
        elif step != overflow_at:
            opt.step()
        if before is not None:
            around = (before, opt.state_dict())
        params.append([p.detach().clone() for p in model.parameters()])
        losses.append(lm_loss(model, idx).item())
    opt.close()
    return params, norms, losses, around


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_grad_scaler_clipping_and_accumulation(name):
    """A GradScaler (after ``unscale_``), global-norm clipping and two accumulated micro-batches: the optimizer sees
    the unscaled, clipped sum of the micro-batch gradients and nothing else. With the scaler the run equals, bit for
    bit after every step, one that accumulates and clips without it (scaling by a power of two is exact); clipping
    really shortens the gradients; the step whose scaled gradients overflow is skipped by the scaler and leaves the
    optimizer state exactly as it was; the loss goes down."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaled, norms, losses, (before, after) = _accumulated_clipped_run(name, scaler=scaler, overflow_at=3)
    plain, plain_norms, _, _ = _accumulated_clipped_run(name, scaler=None, overflow_at=3)
    assert_same_bits(before, after)  # the skipped step touched nothing
    assert scaler.get_scale() == 2.0**7  # the overflow halved the scale
    for step, (a, b) in enumerate(zip(scaled, plain)):
        assert_same_bits(a, b, f"step {step}")
    assert [n for i, n in enumerate(norms) if i != 3] == [n for i, n in enumerate(plain_norms) if i != 3]
    assert max(n for i, n in enumerate(norms) if i != 3) > CLIP  # clipping changed the gradients the optimizer saw
    assert losses[-1] < losses[0]


def _losses(opt, forward, idx, steps):
    """Trains ``steps`` steps on one batch; returns the loss of each."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = lm_loss(forward, idx)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Shampoo", "KLSOAP"])
def test_compiled_model(name):
    """A model compiled with torch.compile's default backend (Inductor: generated kernels, not eager ones) trains with
    asteria's default (asynchronous) runtime like the eager model: graphs were really compiled, the gradient hooks the
    runtime collects results from still fire for every parameter at every step (they run outside the compiled graph),
    the same refreshes are submitted and installed, and the loss falls as in the eager run.

    The parameters themselves are not compared: the generated kernels round differently, and the first updates of
    these optimizers normalise coordinates whose gradient is round-off (Adam grafting at step 1, the null space of
    the rank-deficient factors of a tiny batch), so the two runs' parameters differ by far more than round-off while
    their losses agree to 1e-6."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = TinyGPT()
        fired = []
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p, fired=fired: fired.append(1))
        forward = torch.compile(model) if mode == "compiled" else model
        opt = FACTORIES[name](model.parameters())
        losses = _losses(opt, forward, torch.randint(0, 16, (4, 7)), 8)
        stats = opt.runtime.stats()
        opt.close()
        runs[mode] = (losses, len(fired), stats["jobs_submitted"], stats["batches_installed"])
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo captured the model and Inductor compiled it
    (eager, eager_hooks, *eager_jobs), (compiled, compiled_hooks, *compiled_jobs) = runs["eager"], runs["compiled"]
    assert compiled_hooks == eager_hooks == 8 * len(list(TinyGPT().parameters()))
    assert compiled_jobs == eager_jobs and eager_jobs[1] > 0
    for t in range(2, 8):
        fall = eager[0] - eager[t]
        assert fall > 0 and abs((compiled[0] - compiled[t]) - fall) <= 0.05 * fall, (t, eager, compiled)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_low_precision_parameters(name, dtype):
    torch.manual_seed(0)
    model = TinyGPT().to(dtype)
    opt = FACTORIES[name](model.parameters())
    idx = torch.randint(0, 16, (4, 7))
    for _ in range(4):
        opt.zero_grad()
        lm_loss(model, idx).float().backward()
        opt.step()
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p.float()).all()
        for blk in opt.state[p]["blocks"]:
            for k, v in blk.items():
                if v.is_floating_point():
                    assert v.dtype == torch.float32, k


def test_closure_returns_loss():
    torch.manual_seed(0)
    model = TinyGPT()
    opt = SOAP(model.parameters())
    idx = torch.randint(0, 16, (4, 7))

    def closure():
        opt.zero_grad()
        loss = lm_loss(model, idx)
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_ordinary_steps_never_read_tensor_values_on_the_host(name, monkeypatch):
    """Between refreshes a step must not synchronise: no .item(), no Python branch on a tensor value. (Aligned phases:
    with staggered ones every step snapshots and installs some blocks' refreshes.)"""
    torch.manual_seed(0)
    model = TinyGPT()
    opt = FACTORIES[name](model.parameters(), runtime=RuntimeConfig(refresh_phases="aligned"))
    idx = torch.randint(0, 16, (4, 7))
    # frequency 2: Shampoo refreshes at steps 2, 4, ...; SOAP/KL initialise at call 0 and refresh at steps 2, 4, ...
    # After these warm-up calls the next call is step 5, an ordinary step.
    for _ in range(4 if name == "Shampoo" else 5):
        opt.zero_grad()
        lm_loss(model, idx).backward()
        opt.step()
    opt.zero_grad()
    lm_loss(model, idx).backward()
    before = [p.detach().clone() for p in model.parameters()]

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor value during an ordinary optimizer step")

    for attr in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    opt.step()
    monkeypatch.undo()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_compute_dtype(name):
    """compute_dtype=None and float32 (the state dtype) are the same bits; float64 and bfloat16 products change the
    numbers a little and nothing else: the state stays float32 and training goes on."""
    def run(dtype):
        torch.manual_seed(0)
        model = TinyGPT()
        opt = FACTORIES[name](model.parameters(), compute_dtype=dtype, runtime=RuntimeConfig(refresh="sync"))
        losses = _losses(opt, model, torch.randint(0, 16, (4, 7)), 6)
        dtypes = {v.dtype for p in model.parameters() for blk in opt.state[p]["blocks"] for v in blk.values()
                  if v.is_floating_point()}
        opt.close()
        return [p.detach().clone() for p in model.parameters()], losses, dtypes

    ref, ref_losses, ref_dtypes = run(None)
    same, _, _ = run(torch.float32)
    assert_same_bits(ref, same)
    for dtype in (torch.float64, torch.bfloat16):
        params, losses, dtypes = run(dtype)
        assert dtypes == ref_dtypes == {torch.float32}
        assert any(not torch.equal(a, b) for a, b in zip(ref, params))  # the products really ran in `dtype`
        assert losses[-1] < losses[0] and abs(losses[-1] - ref_losses[-1]) < 0.05 * ref_losses[0]
    with pytest.raises(ValueError, match="compute_dtype"):
        FACTORIES[name](TinyGPT().parameters(), compute_dtype=torch.int8)
