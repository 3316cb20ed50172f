"""A small GPT-style decoder for byte-level language modelling.

Architecture (GPT-2 style, pre-LayerNorm):

* token embedding (256 x d) + learned position embedding (context x d);
* ``n_layer`` blocks of ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``, where ``attn`` is
  causal multi-head self-attention (``torch.nn.functional.scaled_dot_product_attention``)
  and ``mlp`` is ``Linear(d, 4d) -> GELU -> Linear(4d, d)``;
* a final LayerNorm and an output projection **tied** to the token embedding (the same
  ``Parameter``; with a byte vocabulary the embedding is small, and tying is the GPT-2
  choice). Every optimizer sees it as one 256 x d matrix. ``tie_embeddings=False`` gives the
  projection its own ``vocab x d`` weight (``head``).
* No dropout, so a forward pass is a deterministic function of the weights and the batch.

Initialisation follows GPT-2: normal(0, 0.02) weights, zero biases, and the residual output
projections scaled by ``1/sqrt(2 n_layer)``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from .corpus import VOCAB_SIZE


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of the decoder.

    Attributes:
        n_layer: number of transformer blocks, >= 1.
        n_head: attention heads per block, >= 1; must divide ``d_model``.
        d_model: residual width, >= 8.
        context: maximum sequence length (size of the position embedding), >= 2.
        vocab_size: vocabulary size (256 for bytes).
        tie_embeddings: the output projection is the token embedding (True) or its own weight.
    """

    n_layer: int
    n_head: int
    d_model: int
    context: int = 128
    vocab_size: int = VOCAB_SIZE
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name, low in (("n_layer", 1), ("n_head", 1), ("d_model", 8), ("context", 2),
                          ("vocab_size", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"ModelConfig.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )

    def num_parameters(self) -> int:
        """Parameter count of :class:`GPT` with this shape (a tied embedding counted once)."""
        d, v, t = self.d_model, self.vocab_size, self.context
        per_block = (
            2 * 2 * d  # two LayerNorms (weight + bias)
            + d * 3 * d + 3 * d  # qkv projection
            + d * d + d  # attention output projection
            + d * 4 * d + 4 * d  # MLP up
            + 4 * d * d + d  # MLP down
        )
        head = 0 if self.tie_embeddings else v * d
        return v * d + t * d + self.n_layer * per_block + 2 * d + head


#: Model presets selectable with ``--model`` (the context is set separately).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, d_model=128),
    "small": dict(n_layer=6, n_head=8, d_model=256),
    "base": dict(n_layer=8, n_head=8, d_model=512),
}


def preset(name: str, context: int = 128) -> ModelConfig:
    """Return the :class:`ModelConfig` of a preset.

    Args:
        name: one of :data:`PRESETS`.
        context: sequence length.

    Raises:
        ValueError: for an unknown preset name.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
    return ModelConfig(context=context, **PRESETS[name])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer over bytes; see the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the transformer blocks (attention and MLP projections): what Muon is meant for.

        The embeddings (token, tied to the output projection, and position) and every 1-D parameter are not.
        """
        return [p for p in self.blocks.parameters() if p.ndim == 2]

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Run the model.

        Args:
            idx: ``int64`` tokens of shape ``(batch, time)``, time <= context.
            targets: optional ``int64`` next tokens of the same shape.

        Returns:
            ``(logits, loss)``: logits of shape ``(batch, time, vocab)`` and the mean
            cross-entropy in nats per byte (None without targets).
        """
        t = idx.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence length {t} exceeds the model context {self.cfg.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        out = self.tok_emb.weight if self.head is None else self.head.weight  # tied or own output projection
        logits = F.linear(self.ln_f(x), out)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (matrices) and a non-decayed one (vectors).

    Biases and LayerNorm parameters (1-D) get no weight decay, the usual GPT recipe; the
    same groups are used for every optimizer so that comparisons are fair.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
