"""Float64 oracle implementations of asteria's optimizers, written from docs/algorithms.md (not from the library).

Each oracle updates ONE block (a numpy float64 array) with plain, unbatched numpy: Gram matrices with
``np.tensordot``, projections by contracting dim 0 and moving the new axis to the back (the reference
convention of docs/algorithms.md §1.2), ``np.linalg.eigh`` / ``np.linalg.qr`` for the refresh math. Tests
compare the library's trajectories against these step by step.

``staleness`` (S, default 0) makes an oracle install the refresh computed from the statistics of step s at
step ``s + o + S`` (o = 0 Shampoo, 1 SOAP/KL; docs/algorithms.md §6.1, skip rule §6.2): the result is
held in a pending slot, and a refresh step that falls while the slot is full is skipped. The first SOAP/KL
basis is always installed at once. ``phase`` (φ, default 0) shifts the refresh steps by φ, as staggered phases
do (``RuntimeConfig.refresh_phases``, docs/algorithms.md §6.2).
"""

from __future__ import annotations

import math

import numpy as np


# ------------------------------------------------------------------------------------------------
# tensor algebra (reference conventions)
# ------------------------------------------------------------------------------------------------
def gram(x: np.ndarray, i: int) -> np.ndarray:
    """Mode-i Gram: contract x with itself over every dim but i."""
    other = [j for j in range(x.ndim) if j != i]
    return np.tensordot(x, x, axes=(other, other))


def apply_dims(x: np.ndarray, mats: list[np.ndarray | None], transpose: bool) -> np.ndarray:
    """Contract dim 0 with each matrix in turn (matrix dim 0, or dim 1 if ``transpose``), axes rotate back."""
    for mat in mats:
        if mat is None:
            x = np.moveaxis(x, 0, -1)
        else:
            x = np.tensordot(x, mat, axes=([0], [1 if transpose else 0]))
    return x


def project(x, Q):
    """Into the eigenbasis: Q_Lᵀ X Q_R in 2-D."""
    return apply_dims(x, Q, transpose=False)


def project_back(x, Q):
    """Out of the eigenbasis: Q_L X Q_Rᵀ in 2-D."""
    return apply_dims(x, Q, transpose=True)


def inverse_root(A: np.ndarray, eps: float, root: float) -> np.ndarray:
    """(A + εI)^{-1/root} with the DS perturb-before stabilisation (docs/algorithms.md §2.4)."""
    w, Q = np.linalg.eigh(A + eps * np.eye(A.shape[0]))
    lmin = w.min()
    if lmin < eps:
        w = w - lmin + eps
    return (Q * w ** (-1.0 / root)) @ Q.T


def eigh_descending(A: np.ndarray) -> np.ndarray:
    w, Q = np.linalg.eigh(A)
    return Q[:, ::-1].copy()


# ------------------------------------------------------------------------------------------------
# Shampoo (Distributed Shampoo semantics, docs/algorithms.md §2.3-2.4)
# ------------------------------------------------------------------------------------------------
class ShampooOracle:
    def __init__(self, shape, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.0,
                 precondition_frequency=10, start_preconditioning_step=10, grafting="adam",
                 grafting_beta2=None, grafting_epsilon=1e-8, use_bias_correction=True, exponents=None, staleness=0, phase=0):
        self.shape = tuple(shape)
        self.S = staleness
        self.phase = phase
        self.pending = None  # (install step, roots)
        self.installs = []  # (snapshot step, install step)
        k = len(self.shape)
        self.lr, self.betas, self.eps, self.wd = lr, betas, epsilon, weight_decay
        self.f, self.s = precondition_frequency, start_preconditioning_step
        self.grafting, self.geps, self.bc = grafting, grafting_epsilon, use_bias_correction
        self.gb2 = grafting_beta2 if grafting_beta2 is not None else {"adam": 0.999, "rmsprop": 0.99}.get(grafting, 1.0)
        self.exponents = exponents or [1.0 / (2 * k)] * k
        self.L = [np.zeros((d, d)) if e != 0 else None for d, e in zip(self.shape, self.exponents)]
        self.X = [np.eye(d) if e != 0 else None for d, e in zip(self.shape, self.exponents)]
        self.M = np.zeros(self.shape)
        self.V = np.zeros(self.shape)
        self.t = 0

    def _graft(self, gbar, bc2g):
        if self.grafting == "sgd":
            return gbar
        return gbar / (np.sqrt(self.V / bc2g) + self.geps)

    def _install(self, t):
        _, roots, version = self.pending
        self.X = [X if R is None else R for X, R in zip(self.X, roots)]
        self.installs.append((version, t))
        self.pending = None

    def step(self, W: np.ndarray, G: np.ndarray) -> np.ndarray:
        self.t += 1
        t = self.t
        b1, b2 = self.betas
        w = 1.0 if b2 == 1.0 else 1.0 - b2
        for i, L in enumerate(self.L):
            if L is not None:
                self.L[i] = b2 * L + w * gram(G, i)
        bc2 = 1.0 - b2**t if self.bc and b2 < 1.0 else 1.0
        if self.pending is not None and self.pending[0] <= t:
            self._install(t)
        u = t - self.phase
        if ((u % self.f == 0 and u > self.s) or u == self.s) and self.pending is None:
            roots = [None if L is None else inverse_root(L / bc2, self.eps, 1.0 / self.exponents[i])
                     for i, L in enumerate(self.L)]
            self.pending = (t + self.S, roots, t)
            if self.S == 0:
                self._install(t)
        bc2g = 1.0
        if self.grafting == "adagrad":
            self.V = self.V + G * G
        elif self.grafting in ("adam", "rmsprop"):
            self.V = self.gb2 * self.V + (1.0 - self.gb2) * G * G
            if self.grafting == "adam" and self.bc:
                bc2g = 1.0 - self.gb2**t
        if b1 != 0.0:
            self.M = b1 * self.M + (1.0 - b1) * G
            gbar = self.M / (1.0 - b1**t) if self.bc else self.M
        else:
            gbar = G
        if t < self.s and self.grafting != "none":
            P = self._graft(gbar, bc2g)
        else:
            P = project(gbar, self.X)  # X symmetric
            if self.grafting != "none":
                g = self._graft(gbar, bc2g)
                P = P * (np.linalg.norm(g) / (np.linalg.norm(P) + 1e-16))
        P = P + self.wd * W
        return W - self.lr * P


# ------------------------------------------------------------------------------------------------
# SOAP (reference-code semantics, docs/algorithms.md §3.3-3.4); 1-D / unfactored: the same update without rotation
# ------------------------------------------------------------------------------------------------
class SOAPOracle:
    def __init__(self, shape, lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, shampoo_beta=None, correct_bias=True, staleness=0, phase=0):
        self.shape = tuple(shape)
        self.S = staleness
        self.phase = phase
        self.pending = None  # (install boundary, perms, bases, snapshot step)
        self.installs = []
        self.factored = len(self.shape) >= 2
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.f = precondition_frequency
        self.sb = betas[1] if shampoo_beta is None else shampoo_beta
        self.correct_bias = correct_bias
        k = len(self.shape)
        self.L = [np.zeros((d, d)) for d in self.shape] if self.factored else []
        self.Q = [np.eye(d) for d in self.shape] if self.factored else [None] * k
        self.m = np.zeros(self.shape)
        self.v = np.zeros(self.shape)
        self.t = 0
        self.initialized = False
        self.perms_seen = []

    def step(self, W, G):
        if not self.initialized:
            self.initialized = True
            if self.factored:
                self.L = [(1.0 - self.sb) * gram(G, i) for i in range(G.ndim)]
                self.Q = [eigh_descending(L) for L in self.L]
            return W
        self.t += 1
        t = self.t
        b1, b2 = self.betas
        g = project(G, self.Q)
        self.m = b1 * self.m + (1.0 - b1) * g
        self.v = b2 * self.v + (1.0 - b2) * g * g
        eta = self.lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t) if self.correct_bias else self.lr
        U = project_back(self.m / (np.sqrt(self.v) + self.eps), self.Q)
        W = W - eta * U
        W = W - self.lr * self.wd * W
        if self.factored:
            self.L = [L + (1.0 - self.sb) * (gram(G, i) - L) for i, L in enumerate(self.L)]
            if t - self.phase >= 1 and (t - self.phase) % self.f == 0 and self.pending is None:
                perms, bases = [], []
                for i in range(G.ndim):
                    Q = self.Q[i]  # the basis installed now, at snapshot time
                    e = np.diag(Q.T @ self.L[i] @ Q)
                    perm = np.argsort(-e, kind="stable")
                    perms.append(perm)
                    bases.append(np.linalg.qr(self.L[i] @ Q[:, perm])[0])
                self.pending = (t + 1 + self.S, perms, bases, t)
            if self.pending is not None and self.pending[0] <= t + 1:  # install at the boundary before step t+1
                _, perms, bases, version = self.pending
                m_orig = project_back(self.m, self.Q)
                for i, perm in enumerate(perms):
                    self.v = np.take(self.v, perm, axis=i)
                self.Q = bases
                self.m = project(m_orig, self.Q)
                self.perms_seen.extend(perms)
                self.installs.append((version, t + 1))
                self.pending = None
        return W


# ------------------------------------------------------------------------------------------------
# KL-Shampoo / KL-SOAP (the authors' code semantics, docs/algorithms.md §4.2-4.4)
# ------------------------------------------------------------------------------------------------
def _ema_sqrt_inv(s, delta, beta, clamp):
    with np.errstate(divide="ignore", invalid="ignore"):
        D = 1.0 / (s * s)
        D[~np.isfinite(D)] = 0.0
        D = beta * D + (1.0 - beta) * delta
        out = 1.0 / np.sqrt(D)
    out[~np.isfinite(out)] = 0.0
    if clamp is not None:
        out = np.minimum(out, clamp)
    return out


def _whiten(G, P_list, skip):
    """Apply P_jᵀ along every dim j != skip (P_j = Q_j diag(s_j)); dim ``skip`` is left as is."""
    return apply_dims(G, [None if j == skip else P for j, P in enumerate(P_list)], transpose=False)


class KLOracle:
    def __init__(self, shape, klsoap=False, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, shampoo_beta=None, init_factor=0.1, using_clamping=True,
                 max_clamp_value=4000, staleness=0, phase=0):
        self.shape = tuple(shape)
        self.staleness = staleness
        self.phase = phase
        self.pending = None  # (install boundary, bases, snapshot step)
        self.installs = []
        self.klsoap = klsoap
        self.factored = len(self.shape) >= 2
        if not self.factored:  # AdamW fallback, with SOAP conventions
            self.fallback = SOAPOracle(shape, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, staleness=staleness)
            return
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.T = precondition_frequency
        self.beta = betas[1] if shampoo_beta is None else shampoo_beta
        self.S = [np.zeros((d, d)) for d in self.shape]
        self.Q = [np.eye(d) for d in self.shape]
        self.s = [np.full(d, 1.0 / math.sqrt(init_factor)) for d in self.shape]
        self.clamps = [max(10, min(d, max_clamp_value)) if using_clamping else None for d in self.shape]
        self.m = np.zeros(self.shape)
        self.v = np.zeros(self.shape)
        self.t = 0
        self.initialized = False

    def step(self, W, G):
        if not self.factored:
            return self.fallback.step(W, G)
        beta = self.beta
        N = G.size
        if not self.initialized:
            self.initialized = True
            self.S = [beta * S + (1.0 - beta) * gram(G, i) / (N / d) for i, (S, d) in enumerate(zip(self.S, self.shape))]
            self.Q = [eigh_descending(S) for S in self.S]
            return W
        self.t += 1
        t = self.t
        b1, b2 = self.betas
        if self.klsoap:
            g = project(G, self.Q)
            self.m = b1 * self.m + (1.0 - b1) * g
            self.v = b2 * self.v + (1.0 - b2) * g * g
            U = project_back(self.m / (np.sqrt(self.v) + self.eps), self.Q)
        else:
            self.m = b1 * self.m + (1.0 - b1) * G
            c = self.s[0]
            for sv in self.s[1:]:
                c = np.multiply.outer(c, sv)
            c = c / (1.0 + self.eps * c)
            U = project_back(project(self.m, self.Q) * c, self.Q)
        W = W - self.lr * U
        W = W - self.lr * self.wd * W
        # statistics
        k = G.ndim
        g_full = project(G, self.Q)
        if k == 2:
            P = [Q * s[None, :] for Q, s in zip(self.Q, self.s)]
            new_S = []
            for i in range(2):
                other = self.shape[1 - i]
                new_S.append(beta * self.S[i] + (1.0 - beta) / other * gram(_whiten(G, P, i), i))
            da = np.mean((g_full * self.s[1][None, :]) ** 2, axis=1)
            db = np.mean((g_full * self.s[0][:, None]) ** 2, axis=0)
            self.s = [_ema_sqrt_inv(self.s[0], da, beta, self.clamps[0]), _ema_sqrt_inv(self.s[1], db, beta, self.clamps[1])]
            self.S = new_S
        else:
            d1, d2, d3 = self.shape
            s1, s2, s3 = self.s
            P_old = [Q * s[None, :] for Q, s in zip(self.Q, self.s)]
            # S_3 and S_2 with the old estimates
            self.S[2] = beta * self.S[2] + (1.0 - beta) / (d1 * d2) * gram(_whiten(G, P_old, 2), 2)
            self.S[1] = beta * self.S[1] + (1.0 - beta) / (d1 * d3) * gram(_whiten(G, P_old, 1), 1)
            # D_3 (old s1, s2), then D_2 (old s1, new s3)
            s3n = _ema_sqrt_inv(s3, np.mean((g_full * s1[:, None, None] * s2[None, :, None]) ** 2, axis=(0, 1)), beta, self.clamps[2])
            s2n = _ema_sqrt_inv(s2, np.mean((g_full * s1[:, None, None] * s3n[None, None, :]) ** 2, axis=(0, 2)), beta, self.clamps[1])
            # S_1 and D_1 with the new s2 and the old s3
            P_mix = [None, self.Q[1] * s2n[None, :], self.Q[2] * s3[None, :]]
            self.S[0] = beta * self.S[0] + (1.0 - beta) / (d2 * d3) * gram(_whiten(G, P_mix, 0), 0)
            s1n = _ema_sqrt_inv(s1, np.mean((g_full * s2n[None, :, None] * s3[None, None, :]) ** 2, axis=(1, 2)), beta, self.clamps[0])
            self.s = [s1n, s2n, s3n]
        if t - self.phase >= 1 and (t - self.phase) % self.T == 0 and self.pending is None:
            self.pending = (t + 1 + self.staleness, [np.linalg.qr(S @ Q)[0] for S, Q in zip(self.S, self.Q)], t)
        if self.pending is not None and self.pending[0] <= t + 1:  # install at the boundary before step t+1
            _, bases, version = self.pending
            if self.klsoap:
                self.m = project(project_back(self.m, self.Q), bases)
            self.Q = bases  # D (self.s) carries over column by column
            self.installs.append((version, t + 1))
            self.pending = None
        return W


# ------------------------------------------------------------------------------------------------
# helpers shared by the tests
# ------------------------------------------------------------------------------------------------
def gradient_sequence(shape, steps, seed=0, drift=True):
    """Seeded float64 gradients whose dominant directions move over time (so refreshes reorder bases)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        g = rng.standard_normal(shape)
        if drift and len(shape) >= 1:
            scale = np.ones(shape[0])
            scale[t % shape[0]] = 4.0
            g = g * scale.reshape((-1,) + (1,) * (len(shape) - 1))
        out.append(g)
    return out


def random_orthogonal(n, seed):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))
