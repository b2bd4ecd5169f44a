"""Feature generators (docs/method.md "Primitive generator").

:class:`PrimitiveGenerator` is PADing's generator: a class's semantic embedding a_c is
projected to ã_c = W_p a_c, which is the single query token of a small stack of post-norm
transformer decoder layers whose cross-attention memory is a bank of K learnable
primitives. Gaussian noise is added to the cross-attention residual sum of every layer
(before that block's LayerNorm, as in the authors' release), and a final LayerNorm gives the
synthetic query embedding x'.

:class:`GMMNGenerator` is the ZS3Net-style baseline: x' = MLP([a_c, z]).

Both map ``semantic (N, S) -> (N, D)`` and expose ``project(semantic (C, S)) -> (C, D)``,
the class embeddings ã_c that the alignment and relation losses compare against.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from pading.config import GeneratorConfig
from pading.errors import ConfigError, DataError
from pading.model.dropout import Dropout, dropout_mask

NoiseInput = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]

# Tokens whose cross-attention weights (heads x tokens x primitives) are held at once: 8 heads x
# 4096 x 400 primitives are 52 MB of float32, whatever the number of samples synthesised.
ATTENTION_ROWS_PER_BLOCK = 4096


def _check_semantic(semantic: torch.Tensor, semantic_dim: int, source: str) -> None:
    if semantic.dim() != 2 or semantic.shape[1] != semantic_dim:
        raise DataError(
            source, f"expected semantic embeddings of shape (N, {semantic_dim}), got {tuple(semantic.shape)}"
        )


def _sample_noise(shape: tuple, *, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``like``'s device/dtype, drawn from ``generator``
    (which may live on the CPU while ``like`` is on an accelerator)."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return noise.to(like.device)


class PrimitiveDecoderLayer(nn.Module):
    """One post-norm transformer decoder layer with noise injection.

    token -> norm1(token + SelfAttn(token)) -> norm2(. + CrossAttn(., primitives) + noise_std * z)
          -> norm3(. + FFN(.))

    The noise enters the residual sum *before* the cross-attention LayerNorm, as in the
    authors' release (docs/method.md, "Primitive generator").

    The self-attention runs over the sample's single token (so each sample only sees
    itself); the cross-attention lets every token attend to the whole primitive bank. Both
    keep ``nn.MultiheadAttention``'s parameters (so state dicts are unchanged) and are computed
    by :meth:`_attend_to_itself` and :meth:`_attend_to_primitives`, which give its outputs.
    """

    def __init__(self, *, embed_dim: int, num_heads: int, feedforward_dim: int, dropout: float):
        super().__init__()
        self.self_attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.feedforward = nn.Sequential(
            nn.Linear(embed_dim, feedforward_dim),
            nn.ReLU(),
            Dropout(dropout),
            nn.Linear(feedforward_dim, embed_dim),
        )
        self.self_attention_dropout = Dropout(dropout)
        self.cross_attention_dropout = Dropout(dropout)
        self.feedforward_dropout = Dropout(dropout)
        self.self_attention_norm = nn.LayerNorm(embed_dim)
        self.cross_attention_norm = nn.LayerNorm(embed_dim)
        self.feedforward_norm = nn.LayerNorm(embed_dim)

    def forward(self, token: torch.Tensor, primitives: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            token: (N, D) one query token per sample.
            primitives: (K, D) the shared primitive bank (keys and values).
            noise: (N, D) already scaled noise added to the cross-attention residual sum, or None.
        Returns:
            (N, D) the updated tokens.
        """
        token = self.self_attention_norm(token + self.self_attention_dropout(self._attend_to_itself(token)))  # (N, D)
        residual = token + self.cross_attention_dropout(self._attend_to_primitives(token, primitives))  # (N, D)
        if noise is not None:
            residual = residual + noise  # (N, D) the stochastic input
        token = self.cross_attention_norm(residual)  # (N, D)
        token = self.feedforward_norm(token + self.feedforward_dropout(self.feedforward(token)))  # (N, D)
        return token

    def _attend_to_itself(self, token: torch.Tensor) -> torch.Tensor:
        """``self_attention`` over each sample's sequence of one token, written out: the softmax
        over a single key is exactly 1, so the output is out_proj(V token), with the attention
        dropout dropping whole heads of a sample. The query and key projections cannot change
        it (their gradient is exactly zero either way) and are not computed."""
        attention = self.self_attention
        num_samples, dim = token.shape
        value = F.linear(token, attention.in_proj_weight[2 * dim:], attention.in_proj_bias[2 * dim:])  # (N, D)
        if self.training and attention.dropout > 0:
            heads = attention.num_heads
            weights = dropout_mask(token.new_empty(num_samples, heads, 1), attention.dropout)  # (N, H, 1)
            value = (value.view(num_samples, heads, dim // heads) * weights).view(num_samples, dim)
        return attention.out_proj(value)

    def _attend_to_primitives(self, token: torch.Tensor, primitives: torch.Tensor) -> torch.Tensor:
        """``cross_attention`` of every token to the K primitives, written out. Every token attends
        to the same bank, so the bank's keys and values are projected once per call, not per token.
        nn.MultiheadAttention computes the same, but its dropout mask of the (H, N, K) attention
        weights (``bernoulli_``) and its checks for fully masked rows took a third of the
        generator's step on CPU (docs/performance.md, "The generator step"). The tokens attend
        independently, so they are taken :data:`ATTENTION_ROWS_PER_BLOCK` at a time: the
        attention weights of one block are held at once, however many samples are drawn."""
        attention = self.cross_attention
        (num_samples, dim), heads = token.shape, attention.num_heads
        head_dim = dim // heads
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        query = F.linear(token, weight[:dim], bias[:dim]).view(num_samples, heads, head_dim).transpose(0, 1)
        key, value = F.linear(primitives, weight[dim:], bias[dim:]).view(-1, 2, heads, head_dim).unbind(1)
        key, value = key.permute(1, 2, 0), value.transpose(0, 1)  # (H, head_dim, K), (H, K, head_dim)
        blocks = []
        for start in range(0, max(num_samples, 1), ATTENTION_ROWS_PER_BLOCK):  # one (empty) block for no rows
            scores = torch.bmm(query[:, start:start + ATTENTION_ROWS_PER_BLOCK] * head_dim ** -0.5, key)  # (H, n, K)
            weights = scores.softmax(dim=-1)
            if self.training and attention.dropout > 0:
                weights = weights * dropout_mask(weights, attention.dropout)
            blocks.append(torch.bmm(weights, value))  # (H, n, head_dim)
        assembled = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)  # (H, N, head_dim)
        return attention.out_proj(assembled.transpose(0, 1).reshape(num_samples, dim))  # (N, D)


class PrimitiveGenerator(nn.Module):
    """PADing's primitive generator x' = G(W_p a_c, P, z).

    Args:
        semantic_dim: S, size of the class semantic embeddings a_c.
        embed_dim: D, size of the segmenter's query embeddings (256 in the paper).
        config: number of primitives K, layers L, heads, feed-forward size, dropout, noise std.
    """

    def __init__(self, semantic_dim: int, embed_dim: int, config: GeneratorConfig):
        super().__init__()
        if embed_dim % config.num_heads != 0:
            raise ConfigError(f"generator.num_heads={config.num_heads} must divide the embedding size {embed_dim}")
        self.semantic_dim = semantic_dim
        self.embed_dim = embed_dim
        self.noise_std = config.noise_std
        self.semantic_projection = nn.Linear(semantic_dim, embed_dim)  # W_p
        self.primitives = nn.Parameter(torch.randn(config.num_primitives, embed_dim))  # (K, D)
        self.layers = nn.ModuleList(
            PrimitiveDecoderLayer(
                embed_dim=embed_dim,
                num_heads=config.num_heads,
                feedforward_dim=config.feedforward_dim,
                dropout=config.dropout,
            )
            for _ in range(config.num_layers)
        )
        self.output_norm = nn.LayerNorm(embed_dim)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def project(self, semantic: torch.Tensor) -> torch.Tensor:
        """ã_c = W_p a_c: (C, S) -> (C, D)."""
        _check_semantic(semantic, self.semantic_dim, "PrimitiveGenerator.project")
        return self.semantic_projection(semantic)

    def _layer_noise(self, noise: NoiseInput, token: torch.Tensor, generator: Optional[torch.Generator]) -> list:
        num_samples = token.shape[0]
        if noise is None:
            draws = [_sample_noise((num_samples, self.embed_dim), like=token, generator=generator) for _ in self.layers]
        else:
            draws = list(noise.unbind(0)) if isinstance(noise, torch.Tensor) else list(noise)
            if len(draws) != self.num_layers:
                raise DataError(
                    "PrimitiveGenerator noise",
                    f"expected {self.num_layers} noise tensors (one per layer), got {len(draws)}",
                )
            for draw in draws:
                if tuple(draw.shape) != (num_samples, self.embed_dim):
                    raise DataError(
                        "PrimitiveGenerator noise",
                        f"expected each noise tensor of shape ({num_samples}, {self.embed_dim}), "
                        f"got {tuple(draw.shape)}",
                    )
        return [self.noise_std * draw for draw in draws]

    def forward(
        self,
        semantic: torch.Tensor,
        noise: NoiseInput = None,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Synthesise one query embedding per row of ``semantic``.

        Args:
            semantic: (N, S) semantic embedding a_c of each sample's class.
            noise: optional standard-normal noise, a (L, N, D) tensor or a list of L
                (N, D) tensors (scaled by ``noise_std`` here); drawn when None.
            generator: torch.Generator for drawing the noise (repeatable runs).
        Returns:
            (N, D) synthetic query embeddings.
        """
        _check_semantic(semantic, self.semantic_dim, "PrimitiveGenerator.forward")
        token = self.semantic_projection(semantic)  # (N, D)
        layer_noise = self._layer_noise(noise, token, generator)
        for layer, layer_noise_draw in zip(self.layers, layer_noise):
            token = layer(token, self.primitives, layer_noise_draw)  # (N, D)
        return self.output_norm(token)  # (N, D)


class GMMNGenerator(nn.Module):
    """ZS3Net-style generative moment matching network: x' = MLP([a_c, z]).

    One hidden layer (``gmmn_hidden_dim``, LeakyReLU, dropout ``gmmn_dropout``); the noise
    z has the semantic size. ``project`` is a *fixed* random Gaussian projection (a buffer,
    seeded by ``projection_seed``, not trained): the baseline has no W_p of its own, and a
    fixed random map approximately preserves the cosine similarities between semantic
    embeddings (Johnson-Lindenstrauss), so the alignment/relation losses still compare
    against the class semantics rather than against a map they could bend.
    """

    def __init__(
        self,
        semantic_dim: int,
        embed_dim: int,
        config: GeneratorConfig,
        *,
        negative_slope: float = 0.2,
        projection_seed: int = 0,
    ):
        super().__init__()
        self.semantic_dim = semantic_dim
        self.embed_dim = embed_dim
        self.noise_std = config.noise_std
        self.mlp = nn.Sequential(
            nn.Linear(2 * semantic_dim, config.gmmn_hidden_dim),
            nn.LeakyReLU(negative_slope),
            Dropout(config.gmmn_dropout),
            nn.Linear(config.gmmn_hidden_dim, embed_dim),
        )
        seeded = torch.Generator().manual_seed(projection_seed)
        projection = torch.randn(embed_dim, semantic_dim, generator=seeded) / semantic_dim**0.5  # (D, S)
        self.register_buffer("fixed_projection", projection)

    def project(self, semantic: torch.Tensor) -> torch.Tensor:
        """ã_c = R a_c with the fixed random R: (C, S) -> (C, D)."""
        _check_semantic(semantic, self.semantic_dim, "GMMNGenerator.project")
        return semantic @ self.fixed_projection.t()  # (C, D)

    def forward(
        self,
        semantic: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """
        Args:
            semantic: (N, S) class semantic embeddings.
            noise: optional (N, S) standard-normal noise (scaled by ``noise_std``); drawn when None.
            generator: torch.Generator for drawing the noise.
        Returns:
            (N, D) synthetic query embeddings.
        """
        _check_semantic(semantic, self.semantic_dim, "GMMNGenerator.forward")
        if noise is None:
            noise = _sample_noise(tuple(semantic.shape), like=semantic, generator=generator)
        elif tuple(noise.shape) != tuple(semantic.shape):
            raise DataError("GMMNGenerator noise", f"expected shape {tuple(semantic.shape)}, got {tuple(noise.shape)}")
        inputs = torch.cat([semantic, self.noise_std * noise], dim=1)  # (N, 2S)
        return self.mlp(inputs)  # (N, D)


def build_generator(config: GeneratorConfig, semantic_dim: int, embed_dim: int) -> nn.Module:
    """The generator ``config.kind`` names (``primitive`` or ``gmmn``)."""
    if config.kind == "primitive":
        return PrimitiveGenerator(semantic_dim, embed_dim, config)
    if config.kind == "gmmn":
        return GMMNGenerator(semantic_dim, embed_dim, config)
    raise ConfigError(f"generator.kind must be primitive or gmmn, not {config.kind!r}")
