"""``asteria-bench reference``: asteria's optimizers against third-party implementations, step by step.

Each comparison starts asteria and a reference implementation from the same parameters, sets the same seeded
gradients by hand (``p.grad = ...``) before every step and compares the parameters after every step:
``|ours − ref| ≤ atol + rtol·|ref|`` elementwise (``torch.testing.assert_close``'s rule), reported as the worst
``|ours − ref| / (atol + rtol·|ref|)`` over all steps and parameters (≤ 1 passes). asteria runs twice in
lockstep, with ``RuntimeConfig(refresh="sync")`` and with ``RuntimeConfig(refresh="async", staleness=0)``;
the two runs must also be bit-identical to each other after every step (the staleness-0 contract).

References (their code is never part of asteria; none is imported by asteria itself):

* PyPI, test-only dependencies pinned in ``scripts/make-venv`` (installed with ``--no-deps``, so they never bring
  another torch): ``pytorch-optimizer`` (module ``pytorch_optimizer``) and ``heavyball``. Always compared.
* Local, not on PyPI, found through environment variables (skipped when unset): ``ASTERIA_REF_DS``, a
  directory containing the ``distributed_shampoo`` package (facebookresearch/optimizers);
  ``ASTERIA_REF_VYAS``, a directory containing ``soap.py`` (nikhilvyas/SOAP); ``ASTERIA_REF_KLM``, a directory
  containing ``kl_opt.py`` (yorkerlin/KL-Methods ``optim/kl_opt.py``).

Where a reference's semantics differ from asteria's documented ones, each comparison uses settings under which
the two compute the same thing in exact arithmetic, and says so in its ``notes``. The differences found (in
pytorch-optimizer 4.1.0 and heavyball 3.2.1, read in their installed source and measured):

pytorch-optimizer ``SOAP``
    * Keeps the first moment in the original coordinates and projects it every step (asteria keeps it in the
      basis and rotates it exactly when the basis changes): equal in exact arithmetic, no setting needed.
    * Computes the QR of the power step in fp32 whatever the state dtype: the comparison runs in fp32.
    * Decoupled weight decay ``p ← p·(1 − lr·λ)`` after the update, bias correction with the step count of the
      calls that update (the skipped first call is not counted), ``shampoo_beta=None`` falling back to β2 and a
      negative ``shampoo_beta`` refused: all as asteria in this version (checked with ``correct_bias`` on and
      off and with ``shampoo_beta`` None and explicit).
    * Dims above ``max_precondition_dim`` are left unrotated (asteria blocks them) and ``merge_dims`` merges
      dims: the shapes stay below both limits and ``merge_dims=False`` (its default).

heavyball ``SOAP``
    * Refreshes the basis at the calls ``k`` where ``⌊k/f⌋`` grows, counting the skipped first call, i.e. one
      step earlier than asteria (and the SOAP reference code), which refreshes at steps ``t ≡ 0 (mod f)`` with
      ``t = k − 1``; the two schedules agree only for ``precondition_frequency=1`` (a refresh after every step),
      which the comparison uses.
    * Adam in the basis with bias-corrected moments and ``m̂ / max(√v̂, ε)``; asteria folds the bias
      correction into the step size and divides by ``√v + ε``. The two differ only through ε:
      ``eps=1e-20`` (negligible against √v) makes them equal.
    * Bias-corrects the factor EMA (a positive scale of every factor, which changes neither the eigenvectors
      nor the sort nor the QR of the power step): no setting needed.
    * The power step is taken on ``L + 1e-8·max|diag(QᵀLQ)|·I`` (a floor it applies whatever ``eps`` is), which
      moves each refreshed basis by about 1e-8 relative; this sets the fp64 tolerance. The new basis keeps the
      old column order and the second moment is not permuted: the same as asteria's sorted basis with the
      second moment permuted, relabelled.
    * Weight decay ``p ← p·(1 − lr·λ) − lr·u`` acts on the weights before the update (asteria: after, as the
      SOAP reference code): ``weight_decay=0``.
    * ``merge_dims`` (default True) would merge a 2-D weight into one dim: ``merge_dims=False``. Its
      ``shampoo_beta`` defaults to 0.95 rather than β2: passed explicitly to both.
    * Scalars such as ``lr·step/step`` and ``β_s^step`` are computed as tensors in torch's default dtype:
      the fp64 comparison runs with the default dtype float64.
    * Steps are compiled with ``torch.compile`` unless ``heavyball.utils.compile_mode`` is None: set to None
      for the comparison (restored afterwards).

heavyball ``KLSOAP`` and ``KLShampoo`` are not compared: neither follows the KL-Shampoo authors' algorithm that
asteria's ``KLSOAP``/``KLShampoo`` implement. heavyball takes each factor's eigenvalue estimate from the
factor itself (``diag(QᵀSQ)``) where the authors keep a separate EMA of the whitened gradient's second moment
(started at ``init_factor`` and clamped); its KL-weighted factor update is used for 2-D weights only (3-D weights
get SOAP's plain outer products); it bias-corrects the factor EMA, which changes the KL weighting (the
scale of one factor enters the other's update); its ``KLSOAP`` bias-corrects Adam and seeds the factors with
an unscaled outer product; its ``KLShampoo`` seeds the factors with ``init_factor·I`` (a degenerate first
eigh), dampens the gradient and rebalances the factors' norms every step. No setting makes these the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from asteria.optim import KLSOAP, SOAP, KLShampoo, Shampoo
from asteria.runtime.config import RuntimeConfig

__all__ = [
    "COMPARISONS",
    "LOCAL_REFERENCES",
    "PYPI_REFERENCES",
    "RUNTIMES",
    "Comparison",
    "Result",
    "Unavailable",
    "compare",
    "import_reference",
    "run",
    "table",
]

#: PyPI references: distribution name -> (module, pinned version). The same pins are in scripts/make-venv (which
#: installs them) and in pyproject.toml's ``test`` extra; tests/test_optim_reference.py checks that they agree.
PYPI_REFERENCES = {"pytorch-optimizer": ("pytorch_optimizer", "4.1.0"), "heavyball": ("heavyball", "3.2.1")}
#: Local references: environment variable -> (module, repository, what the directory must contain).
LOCAL_REFERENCES = {
    "ASTERIA_REF_DS": ("distributed_shampoo", "facebookresearch/optimizers", "the distributed_shampoo package"),
    "ASTERIA_REF_VYAS": ("soap", "nikhilvyas/SOAP", "soap.py"),
    "ASTERIA_REF_KLM": ("kl_opt", "yorkerlin/KL-Methods", "kl_opt.py (optim/kl_opt.py)"),
}
#: The two runtimes asteria is compared with; staleness 0 is specified to be bit-identical to sync.
RUNTIMES = {
    "sync": lambda: RuntimeConfig(refresh="sync"),
    "async S=0": lambda: RuntimeConfig(refresh="async", staleness=0),
}


class Unavailable(Exception):
    """A reference that cannot be imported here (an unset variable); the comparison is skipped."""


@dataclasses.dataclass
class Result:
    """Outcome of one comparison.

    Attributes:
        worst: The worst ``|ours − ref| / (atol + rtol·|ref|)`` over every step and parameter, per runtime.
        failure: The first violation (a step beyond tolerance, or sync and async S=0 not bit-identical), or None.
        steps: Steps compared.
    """

    worst: dict[str, float]
    failure: str | None
    steps: int

    @property
    def worst_overall(self) -> float:
        return max(self.worst.values())


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One comparison: asteria against a reference with fixed settings.

    Attributes:
        key: Identifier (pytest id), ``<row>-<variant>``.
        row: The table row it belongs to (its worst is the row's worst over its comparisons).
        source: ``"pypi:<distribution>"`` or ``"env:<VARIABLE>"``.
        settings: What the table says about the settings of the row.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        body: Runs the comparison (raises `Unavailable` when the reference cannot be imported).
    """

    key: str
    row: str
    source: str
    settings: str
    rtol: float
    atol: float
    body: Callable[[Comparison], Result]

    def run(self) -> Result:
        return self.body(self)


# ------------------------------------------------------------------------------------------------------------
# the comparison loop
# ------------------------------------------------------------------------------------------------------------
def compare(
    ours: Callable[[list[torch.nn.Parameter], RuntimeConfig], Any],
    ref: Callable[[list[torch.nn.Parameter]], Any],
    shapes: Sequence[tuple[int, ...]],
    steps: int,
    dtype: torch.dtype,
    rtol: float,
    atol: float,
    seed: int = 0,
    grad_scale: float = 1.0,
) -> Result:
    """Steps asteria (once per runtime of `RUNTIMES`) and the reference in lockstep on the same gradients.

    Args:
        ours: Builds the asteria optimizer from parameters and a runtime.
        ref: Builds the reference optimizer from parameters.
        shapes: Parameter shapes.
        steps: Steps to take.
        dtype: Parameter and gradient dtype.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        seed: Seed of the initial parameters (``100 + seed``) and of the gradients (``seed + i`` for parameter i).
        grad_scale: Factor of the standard normal gradients.

    Returns:
        The `Result` (never raises on a mismatch: ``failure`` names the first one).
    """
    g = torch.Generator().manual_seed(100 + seed)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    p_ref = [torch.nn.Parameter(x.clone()) for x in init]
    p_ours = {name: [torch.nn.Parameter(x.clone()) for x in init] for name in RUNTIMES}
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(shapes))]
    worst = dict.fromkeys(RUNTIMES, 0.0)
    failure: str | None = None
    opts = {}
    try:
        for name, make in RUNTIMES.items():
            opts[name] = ours(p_ours[name], make())
        with _quiet():
            r = ref(p_ref)
        for t in range(1, steps + 1):
            for i, s in enumerate(shapes):
                grad = torch.randn(s, generator=gens[i], dtype=dtype) * grad_scale
                p_ref[i].grad = grad.clone()
                for ps in p_ours.values():
                    ps[i].grad = grad.clone()
            for o in opts.values():
                o.step()
            with _quiet():
                r.step()
            first = next(iter(RUNTIMES))
            for i, b in enumerate(p_ref):
                b = b.detach()
                for name, ps in p_ours.items():
                    a = ps[i].detach()
                    ratio = torch.nan_to_num((a - b).abs() / (atol + rtol * b.abs()), nan=math.inf).max().item()
                    worst[name] = max(worst[name], ratio)
                    if ratio > 1.0 and failure is None:
                        failure = (f"{name}: parameter {i} {tuple(shapes[i])} at step {t} differs by "
                                   f"{(a - b).abs().max().item():.3g} (worst error / tolerance {ratio:.3g})")
                    if name != first and not torch.equal(a, p_ours[first][i].detach()) and failure is None:
                        failure = f"{name} is not bit-identical to {first}: parameter {i} at step {t}"
    finally:
        for o in opts.values():
            o.close()
    return Result(worst, failure, steps)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences the references' prints (KL-Methods and Distributed Shampoo print their settings)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _dynamo_disabled() -> Iterator[None]:
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = old


@contextlib.contextmanager
def _heavyball_eager(heavyball: Any) -> Iterator[None]:
    old = heavyball.utils.compile_mode
    heavyball.utils.compile_mode = None
    try:
        yield
    finally:
        heavyball.utils.compile_mode = old


def import_reference(source: str) -> Any:
    """Imports the module behind ``source`` (``pypi:<distribution>`` or ``env:<VARIABLE>``).

    Raises:
        Unavailable: an ``env:`` variable is unset.
        ImportError: a PyPI reference is not installed (``make venv`` installs them), or a local directory lacks
            the module.
    """
    kind, name = source.split(":", 1)
    if kind == "pypi":
        module, _ = PYPI_REFERENCES[name]
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"{name} is not installed: scripts/make-venv installs it (pinned, --no-deps)") from e
    module, repo, what = LOCAL_REFERENCES[name]
    path = os.environ.get(name)
    if not path:
        raise Unavailable(f"{name} is not set (a directory containing {what} of {repo})")
    if path not in sys.path:
        sys.path.insert(0, path)
    with _quiet():
        return importlib.import_module(module)


def describe_source(source: str) -> str:
    """The reference's version (PyPI) or repository and variable (local), for the table."""
    kind, name = source.split(":", 1)
    if kind == "pypi":
        from importlib import metadata

        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return f"{name} (not installed)"
    return f"{LOCAL_REFERENCES[name][1]} (`${name}`)"


# ------------------------------------------------------------------------------------------------------------
# pytorch-optimizer SOAP
# ------------------------------------------------------------------------------------------------------------
_PO_SHAPES = [(8, 8), (6, 6), (3, 4, 5), (5,)]


def _pytorch_optimizer_soap(correct_bias: bool, weight_decay: float, shampoo_beta: float | None, eps: float):
    def body(c: Comparison) -> Result:
        po = import_reference(c.source)
        kw = dict(lr=0.01, betas=(0.9, 0.95), eps=eps, weight_decay=weight_decay, precondition_frequency=3,
                  shampoo_beta=shampoo_beta, correct_bias=correct_bias)
        return compare(
            lambda ps, rt: SOAP(ps, eigh_ridge=1e-30, runtime=rt, **kw),
            lambda ps: po.SOAP(ps, merge_dims=False, precondition_1d=False, normalize_gradient=False, **kw),
            _PO_SHAPES, 12, torch.float32, c.rtol, c.atol,
        )

    return body


# ------------------------------------------------------------------------------------------------------------
# heavyball SOAP
# ------------------------------------------------------------------------------------------------------------
_HB_SHAPES = [(8, 8), (6, 6), (3, 4, 5), (5,)]


def _heavyball_soap(betas: tuple[float, float], shampoo_beta: float):
    def body(c: Comparison) -> Result:
        hb = import_reference(c.source)
        kw = dict(lr=2**-7, betas=betas, eps=1e-20, weight_decay=0.0, precondition_frequency=1, shampoo_beta=shampoo_beta)
        with _heavyball_eager(hb), _default_dtype(torch.float64):
            return compare(
                lambda ps, rt: SOAP(ps, eigh_ridge=1e-30, state_dtype=torch.float64, runtime=rt, **kw),
                lambda ps: hb.SOAP(ps, merge_dims=False, precondition_1d=False, storage_dtype="float64", **kw),
                _HB_SHAPES, 12, torch.float64, c.rtol, c.atol,
            )

    return body


# ------------------------------------------------------------------------------------------------------------
# local references
# ------------------------------------------------------------------------------------------------------------
def _distributed_shampoo(max_dim: int, shapes: list[tuple[int, ...]], grafting: str):
    def body(c: Comparison) -> Result:
        ds = import_reference(c.source)
        # DS keeps lr in an fp32 tensor: an lr exact in fp32. epsilon 1e-3 keeps the round-off of the
        # rank-deficient early factors from being amplified by eps^(-1/p).
        kw = dict(lr=2**-7, betas=(0.9, 0.999), epsilon=1e-3, weight_decay=0.01, precondition_frequency=2,
                  start_preconditioning_step=2, max_preconditioner_dim=max_dim)
        graft = ds.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8) if grafting == "adam" else None

        def ref(ps):
            return ds.DistributedShampoo(
                ps, weight_decay_type=ds.WeightDecayType.DECOUPLED, grafting_config=graft,
                preconditioner_config=ds.RootInvShampooPreconditionerConfig(
                    factor_matrix_dtype=torch.float64, inv_factor_matrix_dtype=torch.float64),
                **kw)

        # DS computes its bias corrections as `beta ** step_tensor`, i.e. in the default dtype: make it fp64
        with _default_dtype(torch.float64):
            return compare(
                lambda ps, rt: Shampoo(ps, grafting=grafting, grafting_epsilon=1e-8, state_dtype=torch.float64,
                                       runtime=rt, **kw),
                ref, shapes, 10, torch.float64, c.rtol, c.atol,
            )

    return body


def _vyas_soap(weight_decay: float, eps: float):
    def body(c: Comparison) -> Result:
        vyas = import_reference(c.source)
        kw = dict(lr=0.01, betas=(0.9, 0.95), eps=eps, weight_decay=weight_decay, precondition_frequency=2)
        return compare(
            lambda ps, rt: SOAP(ps, eigh_ridge=1e-30, runtime=rt, **kw),
            lambda ps: vyas.SOAP(ps, merge_dims=False, normalize_grads=False, **kw),
            [(8, 8), (6, 6), (5,)], 8, torch.float32, c.rtol, c.atol,
        )

    return body


def _kl_methods(klsoap: bool, clamping: bool, eps: float, shampoo_beta: float | None, grad_scale: float):
    def body(c: Comparison) -> Result:
        klm = import_reference(c.source)
        kw = dict(lr=0.01, betas=(0.9, 0.98), eps=eps, weight_decay=0.01, precondition_frequency=3,
                  init_factor=0.1, using_clamping=clamping)
        cls = KLSOAP if klsoap else KLShampoo
        # the reference spells "shampoo_beta = β2" as -1; the reference wraps helpers in torch.compile: run them eagerly
        with _dynamo_disabled():
            return compare(
                lambda ps, rt: cls(ps, eigh_ridge=1e-30, shampoo_beta=shampoo_beta, runtime=rt, **kw),
                lambda ps: klm.KLOpt(ps, using_klsoap=klsoap, cast_dtype=torch.float32, using_damping=False,
                                     shampoo_beta=-1 if shampoo_beta is None else shampoo_beta, **kw),
                [(6, 6), (3, 4, 5)], 15, torch.float32, c.rtol, c.atol, grad_scale=grad_scale,
            )

    return body


# ------------------------------------------------------------------------------------------------------------
# the list
# ------------------------------------------------------------------------------------------------------------
def _build() -> list[Comparison]:
    out: list[Comparison] = []
    po_settings = ("SOAP, fp32, 12 steps, 8×8, 6×6, 3×4×5 and 5, f=3; correct_bias on/off × "
                   "(weight_decay 0, shampoo_beta None, eps 1e-8 / weight_decay 0.125, shampoo_beta 0.9, eps 1e-3)")
    for cb in (True, False):
        for wd, sb, eps in ((0.0, None, 1e-8), (0.125, 0.9, 1e-3)):
            out.append(Comparison(
                f"pytorch-optimizer-soap-bias{int(cb)}-wd{wd}-sb{sb}-eps{eps:g}", "pytorch-optimizer SOAP",
                "pypi:pytorch-optimizer", po_settings, 1e-5, 1e-5, _pytorch_optimizer_soap(cb, wd, sb, eps)))
    hb_settings = ("SOAP, fp64, 12 steps, 8×8, 6×6, 3×4×5 and 5, f=1, eps=1e-20, weight_decay 0; "
                   "betas (0.9, 0.95)/(0.95, 0.99), shampoo_beta 0.95/0.9")
    for betas, sb in (((0.9, 0.95), 0.95), ((0.95, 0.99), 0.9)):
        out.append(Comparison(
            f"heavyball-soap-b{betas[0]}-{betas[1]}-sb{sb}", "heavyball SOAP", "pypi:heavyball", hb_settings,
            3e-8, 3e-8, _heavyball_soap(betas, sb)))
    ds_settings = "Shampoo, fp64, 10 steps, Adam grafting on/off, blocked and unblocked"
    for max_dim, shapes in ((64, [(6, 5), (7,)]), (8, [(6, 5), (10, 3), (3, 4, 2)])):
        for grafting in ("adam", "none"):
            out.append(Comparison(
                f"distributed-shampoo-dim{max_dim}-{grafting}", "Distributed Shampoo", "env:ASTERIA_REF_DS", ds_settings,
                1e-9, 1e-11, _distributed_shampoo(max_dim, shapes, grafting)))
    for wd, eps in ((0.0, 1e-8), (0.125, 1e-3)):
        out.append(Comparison(
            f"vyas-soap-wd{wd}-eps{eps:g}", "SOAP reference", "env:ASTERIA_REF_VYAS",
            "SOAP, fp32, 8 steps, (weight_decay 0, eps 1e-8) and (0.125, 1e-3)", 1e-5, 1e-5, _vyas_soap(wd, eps)))
    # clamping bounds D^(-1/2) by 10 here: it acts only once D < 0.01, i.e. with small gradients and a short
    # eigenvalue EMA (gradients 0.01·N(0, 1), shampoo_beta 0.5), where clamping on and off differ by
    # hundreds of tolerances; with N(0, 1) gradients it never acts
    kl_settings = ("KL-Shampoo and KL-SOAP, fp32, 15 steps, 6×6 and 3×4×5: defaults (eps 1e-8 and 1e-3); "
                   "gradients ×0.01 with shampoo_beta 0.5, clamping on (active) and off")
    for klsoap in (False, True):
        name = "klsoap" if klsoap else "klshampoo"
        for variant, clamping, eps, sb, scale in (("default", True, 1e-8, None, 1.0), ("eps1e-3", True, 1e-3, None, 1.0),
                                                 ("clamped", True, 1e-8, 0.5, 1e-2), ("unclamped", False, 1e-8, 0.5, 1e-2)):
            out.append(Comparison(
                f"kl-methods-{name}-{variant}", "KL-Shampoo / KL-SOAP (KL-Methods)", "env:ASTERIA_REF_KLM", kl_settings,
                1e-4, 1e-6, _kl_methods(klsoap, clamping, eps, sb, scale)))
    return out


COMPARISONS: list[Comparison] = _build()


# ------------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------------
def _tolerance(rtol: float, atol: float) -> str:
    return f"{rtol:g}" if rtol == atol else f"rtol {rtol:g}, atol {atol:g}"


def table(results: dict[str, Result | str]) -> list[str]:
    """The README table: one row per reference, its worst error / tolerance over its comparisons."""
    lines = ["| reference | version / source | settings | tolerance | worst error / tolerance |", "|---|---|---|---|---|"]
    rows: dict[str, list[Comparison]] = {}
    for c in COMPARISONS:
        rows.setdefault(c.row, []).append(c)
    for row, cs in rows.items():
        outcomes = [results[c.key] for c in cs]
        done = [r for r in outcomes if isinstance(r, Result)]
        if not done:
            cell = f"skipped: {outcomes[0]}"
        else:
            cell = f"{max(r.worst_overall for r in done):.2g}"
            if any(r.failure for r in done):
                cell += " FAILED"
            if len(done) < len(outcomes):
                cell += f" ({len(outcomes) - len(done)} of {len(outcomes)} not run)"
        tol = sorted({_tolerance(c.rtol, c.atol) for c in cs})
        lines.append(f"| {row} | {describe_source(cs[0].source)} | {cs[0].settings} | {'; '.join(tol)} | {cell} |")
    return lines


def run(args: Any) -> None:
    """``asteria-bench reference``: runs every comparison and prints each result and the README table."""
    results: dict[str, Result | str] = {}
    failed = 0
    for dist, (_, pinned) in PYPI_REFERENCES.items():
        print(f"{describe_source('pypi:' + dist)} (pinned {pinned})")
    for var in LOCAL_REFERENCES:
        print(f"{var} = {os.environ.get(var) or '(unset: skipped)'}")
    for c in COMPARISONS:
        try:
            res = c.run()
        except Unavailable as e:
            results[c.key] = str(e)
            print(f"{c.key:48} skipped: {e}", flush=True)
            continue
        results[c.key] = res
        per = ", ".join(f"{name} {w:.3g}" for name, w in res.worst.items())
        status = f"FAILED: {res.failure}" if res.failure else "ok"
        failed += bool(res.failure)
        print(f"{c.key:48} worst error / tolerance {per}  {status}", flush=True)
    print()
    print("Worst error as a fraction of the tolerance, over the sync and the async S=0 runs"
          + (" (bit-identical to each other at every step):" if not failed else ":"))
    print()
    for line in table(results):
        print(line)
    if failed:
        raise SystemExit(f"asteria-bench reference: {failed} comparison(s) beyond tolerance")
