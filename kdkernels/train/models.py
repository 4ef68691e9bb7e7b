"""The trainer's models: a small pure-PyTorch causal transformer, and a wrapper that gives a local
Hugging Face causal LM the same three-part interface.

Every model in this module exposes
    ``hidden_states(input_ids [B, S]) -> [B, S, D]``   (the final, normalised hidden states),
    ``lm_head``                                       (an ``nn.Linear`` from D to the vocabulary),
    ``forward(input_ids) -> logits [B, S, V]``,
so the loss can take either the logits (``kd_loss``) or the hidden states and the head weight
(``fused_linear_kd_loss``, which never materialises the logits).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels._optional import import_extra


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a :class:`TinyTransformer` (GPT-style, pre-norm, learned positions)."""

    vocab_size: int = 256
    context: int = 128
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return f"{self.layers}x{self.d_model}"


HEAD_WIDTH = 32  # the width of one attention head in the built-in shapes


def transformer_shape(layers: int, d_model: int, context: int, **options) -> TransformerConfig:
    """A :class:`TransformerConfig` with one head per ``HEAD_WIDTH`` channels (at least one)."""
    heads = max(1, d_model // HEAD_WIDTH)
    while d_model % heads:
        heads -= 1
    return TransformerConfig(context=context, layers=layers, d_model=d_model, heads=heads, **options)


class CausalLM(nn.Module):
    """The interface the trainer uses: ``hidden_states`` and an ``lm_head`` (``nn.Linear``)."""

    lm_head: nn.Linear

    @property
    def hidden_size(self) -> int:
        return self.lm_head.in_features

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, D]
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, V]
        return self.lm_head(self.hidden_states(input_ids))


class _Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp_norm = nn.LayerNorm(cfg.d_model)
        self.mlp_in = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.mlp_out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, D]
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(width, dim=-1)
        # [B, S, D] -> [B, heads, S, D / heads]
        q, k, v = (t.view(batch, seq, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.attn_out(attn.transpose(1, 2).reshape(batch, seq, width)))
        return x + self.drop(self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)))))


class TinyTransformer(CausalLM):
    """A small causal language model, written out so the demo needs nothing but torch."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.heads:
            raise ValueError(f"d_model ({cfg.d_model}) must be a multiple of heads ({cfg.heads})")
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaling of the residual output projections: std 0.02 / sqrt(2 * layers).
        for block in self.blocks:
            for proj in (block.attn_out, block.mlp_out):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def context(self) -> int:
        return self.config.context

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        if seq > self.config.context:
            raise ValueError(f"input length {seq} exceeds the model context {self.config.context}")
        positions = torch.arange(seq, device=input_ids.device)
        x = self.drop(self.token_embedding(input_ids) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


class HFCausalLM(CausalLM):
    """A local Hugging Face causal LM behind the same interface as :class:`TinyTransformer`.

    ``base_model`` (the decoder without its head) gives the final normalised hidden states, and
    ``get_output_embeddings()`` is the head, so the logits need not be computed for the loss.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model
        head = hf_model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the checkpoint's output embedding is a {type(head).__name__}, not nn.Linear")
        self.lm_head = head

    @property
    def context(self) -> int:
        cfg = self.hf_model.config
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        return 1 << 30

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf_model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def load_hf_model(path: str) -> HFCausalLM:
    """Loads a causal LM from a local directory (never from the network), in float32."""
    transformers = import_extra("transformers", "--teacher/--student PATH")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    return HFCausalLM(hf_model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
