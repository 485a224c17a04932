"""Modules of a latent-KV attention: the grouped low-rank K/V projection and the attention itself.

``LatentProjection``: ``down`` (hidden → Σ r_g, the cached latent) and one ``up`` per head group
(r_g → group_size·head_dim), i.e. a block-diagonal ``up`` (Palu's group-head decomposition).

``LatentKVAttention`` replaces a model's attention module and keeps its submodules under their
own names (``q_proj``, ``o_proj``, ``q_norm``…), so saved weights keep the dense model's keys apart
from the factored K/V. Per step it projects the new tokens to latents, appends them to the cache,
rebuilds K and V of every cached token with ``up``, applies the model's own per-head norm and RoPE
at each token's absolute position, and attends with the model's configured attention function.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .layout import AttentionLayout


class LatentProjection(nn.Module):
    """``x → latent = down(x)`` (cached) and ``latent → up_g(latent_g)`` per head group (rebuilt)."""

    def __init__(self, in_features: int, ranks: list[int], group_width: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.ranks = [int(r) for r in ranks]
        self.group_width = group_width
        self.down = nn.Linear(in_features, sum(self.ranks), bias=False, dtype=dtype, device=device)
        self.ups = nn.ModuleList(nn.Linear(r, group_width, bias=bias, dtype=dtype, device=device) for r in self.ranks)

    @property
    def latent_width(self) -> int:
        return sum(self.ranks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)

    def rebuild(self, latent: torch.Tensor) -> torch.Tensor:
        """(…, Σ r_g) latents → (…, groups·group_width) projected K or V."""
        if len(self.ups) == 1:
            return self.ups[0](latent)
        if len(set(self.ranks)) == 1:  # equal ranks: all groups in one batched matmul, no split/cat
            groups, rank = len(self.ranks), self.ranks[0]
            per_group = latent.reshape(-1, groups, rank).transpose(0, 1)  # (groups, tokens, r)
            up = torch.stack([u.weight for u in self.ups]).transpose(1, 2)  # (groups, r, width)
            rebuilt = torch.bmm(per_group, up).transpose(0, 1)  # (tokens, groups, width)
            if self.ups[0].bias is not None:
                rebuilt = rebuilt + torch.stack([u.bias for u in self.ups])
            return rebuilt.reshape(*latent.shape[:-1], groups * self.group_width)
        parts = latent.split(self.ranks, dim=-1)
        return torch.cat([up(part) for up, part in zip(self.ups, parts)], dim=-1)

    @classmethod
    def from_factors(cls, factors: list[tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor | None, dtype, device):
        """``factors``: per group ``(down_g (r_g × in), up_g (group_width × r_g))``; ``bias`` over all groups."""
        ranks = [down.shape[0] for down, _ in factors]
        group_width = factors[0][1].shape[0]
        module = cls(factors[0][0].shape[1], ranks, group_width, bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            module.down.weight.copy_(torch.cat([down for down, _ in factors], dim=0))
            for g, (_, up) in enumerate(factors):
                module.ups[g].weight.copy_(up)
                if bias is not None:
                    module.ups[g].bias.copy_(bias[g * group_width : (g + 1) * group_width])
        return module

    def extra_repr(self) -> str:
        return f"latent={self.latent_width}, groups={len(self.ranks)}, ranks={self.ranks}"


class KeyPositionEmbeddings:
    """cos/sin at the positions of every cached key, computed once per forward for all layers.

    The model computes the new tokens' cos/sin once and hands the same tensors to every layer (one
    pair per layer type for Gemma 3); the rebuilt keys also need them at the cached positions. Keyed
    on the identity of the model's tensors (held, so the identity cannot be reused), the first layer
    of each layer type computes them and the other layers of the same forward reuse them: one sin/cos
    over the context per step and layer type, not one per layer.
    """

    def __init__(self, family, rotary: nn.Module):
        self.family = family
        self.rotary = rotary
        self._last: dict = {}  # layer type -> (query cos, past, key cos/sin)

    def query(self, like: torch.Tensor, positions: torch.Tensor, layer_type: str | None):
        return self.family.rope(self.rotary, like, positions, layer_type)

    def __call__(self, like: torch.Tensor, key_positions: torch.Tensor, query_cos: torch.Tensor, past: int,
                 layer_type: str | None = None):
        last = self._last.get(layer_type)
        if last is not None and last[0] is query_cos and last[1] == past:
            return last[2]
        embeddings = self.family.rope(self.rotary, like, key_positions, layer_type)
        self._last[layer_type] = (query_cos, past, embeddings)
        return embeddings

    def clear(self) -> None:
        self._last = {}


class LatentKVAttention(nn.Module):
    """Self-attention whose cache holds K/V latents; drop-in for the module it was built from.

    What differs between families (fused query rows, q/k norms per head or over the projection,
    softcapping, sliding windows, the rotary call, the cache keyword) comes from the layout's entry
    in :mod:`asvd_passes.families`.
    """

    def __init__(self, dense: nn.Module, layout: AttentionLayout, key: LatentProjection, value: LatentProjection,
                 query: nn.Module | None = None, key_embeddings: KeyPositionEmbeddings | None = None):
        super().__init__()
        family = layout.family
        self.layout = layout
        self.family = family
        self.config = dense.config
        self.layer_idx = layout.layer_idx
        self.head_dim = layout.head_dim
        self.num_heads = layout.heads
        self.num_key_value_heads = layout.kv_heads
        self.num_key_value_groups = layout.heads // layout.kv_heads
        self.scaling = family.scaling(dense, layout.head_dim)
        self.is_causal = True
        self.attention_dropout = 0.0
        self.sliding_window = family.sliding_window(dense, self.config)
        self.softcap = family.softcap_of(self.config)
        self.layer_type = family.layer_type(self.config, layout.layer_idx)
        # Query: the dense module's own q_proj, or the query rows of a fused projection.
        self.q_proj = query if query is not None else dense.q_proj
        self.k_proj = key
        self.v_proj = value
        # Set by kv/quant.py for a quantized cache: the cache then holds their codes, not float latents.
        self.key_quantizer = None
        self.value_quantizer = None
        setattr(self, layout.output, getattr(dense, layout.output))
        self.output_name = layout.output
        if family.qk_norm is not None:
            self.q_norm, self.k_norm = dense.q_norm, dense.k_norm
        # Shared with the model, not owned: kept out of this module's state dict.
        if family.positions == "rope" and key_embeddings is None:
            raise ValueError(f"{layout.name}: a RoPE family ({family.name}) needs the model's KeyPositionEmbeddings")
        self.__dict__["key_embeddings"] = key_embeddings if family.positions == "rope" else None
        module = sys.modules[type(dense).__module__]
        self.__dict__["apply_rotary"] = getattr(module, "apply_rotary_pos_emb", None) if family.positions == "rope" else None
        self.__dict__["eager_attention"] = getattr(module, "eager_attention_forward", None)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = next((c for c in (cache, past_key_values, kwargs.pop(self.family.cache_kwarg, None)) if c is not None), None)
        kwargs.pop("layer_past", None)
        kwargs.pop("output_attentions", None)
        kwargs.pop("use_cache", None)
        batch, steps, _ = hidden_states.shape
        query = self.q_proj(hidden_states) if not isinstance(self.q_proj, nn.Identity) else hidden_states
        key_latent = self.k_proj(hidden_states)
        value_latent = self.v_proj(hidden_states)
        quantized = self.key_quantizer is not None
        if quantized:  # what the cache holds (and, without a cache, what it would give back)
            dtype = key_latent.dtype
            key_latent, value_latent = self.key_quantizer.quantize(key_latent), self.value_quantizer.quantize(value_latent)
        if cache is not None:
            # Stored as (batch, 1, seq, r): the cache layers' sequence axis is -2, one "head" of width r.
            key_latent, value_latent = cache.update(key_latent[:, None], value_latent[:, None], self.layer_idx)
            key_latent, value_latent = key_latent[:, 0], value_latent[:, 0]
        if quantized:
            key_latent = self.key_quantizer.dequantize(key_latent, dtype)
            value_latent = self.value_quantizer.dequantize(value_latent, dtype)
        total = key_latent.shape[1]
        past = total - steps  # what the cache returned besides the new tokens (a sliding window may crop it)

        if self.absorb_key(steps, total):  # scores on the K latent: the query takes K's up instead
            query = self._absorbed_query(query.view(batch, steps, -1, self.head_dim).transpose(1, 2))
            key = self._latent_per_head(self.k_proj, key_latent)
        else:
            key = self.k_proj.rebuild(key_latent)
            if self.family.qk_norm == "projection":  # OLMo 2: the norm spans the whole (rebuilt) projection
                query, key = self.q_norm(query), self.k_norm(key)
            query = query.view(batch, steps, -1, self.head_dim)
            key = key.view(batch, total, -1, self.head_dim)
            if self.family.qk_norm == "head":
                query, key = self.q_norm(query), self.k_norm(key)
            query, key = query.transpose(1, 2), key.transpose(1, 2)
        fold = self.fold_value(steps, total)
        if fold:  # attend over the V latent itself; V's up is applied to the attention output below
            value = self._latent_per_head(self.v_proj, value_latent)
        else:
            value = self.v_proj.rebuild(value_latent).view(batch, total, -1, self.head_dim).transpose(1, 2)

        if self.key_embeddings is not None:
            query, key = self._rotate(query, key, position_embeddings, position_ids, past, steps, total)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager_attention)
        output, weights = interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
            sliding_window=self.sliding_window, **({"softcap": self.softcap} if self.softcap is not None else {}), **kwargs,
        )
        if fold:
            output = self._value_up(output)
        output = output.reshape(batch, steps, -1).contiguous()
        return getattr(self, self.output_name)(output), weights

    # -- V folding -------------------------------------------------------------------------------
    # V carries no position information (RoPE and the per-head norms touch Q and K only), so
    # softmax(QKᵀ)·(L·Uᵀ + b) = (softmax(QKᵀ)·L)·Uᵀ + b: attention can run over the latent L and
    # apply V's up afterwards, per query head. That skips rebuilding V for every cached token.

    fold_policy = "auto"  # "auto": fold when it needs fewer multiply-adds; "always"; "never"

    def fold_value(self, steps: int, total: int) -> bool:
        """Whether to attend over the V latent: it needs equal ranks across head groups, and (auto) fewer MACs.

        Per layer and step, rebuilding V costs total·r·kv_width (up) + heads·steps·total·head_dim (P·V);
        folding costs heads·steps·total·r_g (P·L) + heads·steps·r_g·head_dim (up on the output).
        For decoding (steps = 1) folding wins whenever r_g < kv_width·total/(heads·(total+head_dim))…
        roughly always; for a long prefill rebuilding is cheaper.
        """
        ranks = self.v_proj.ranks
        if self.fold_policy == "never" or len(set(ranks)) != 1:
            return False
        if self.fold_policy == "always":
            return True
        r, heads = ranks[0], self.num_heads
        rebuild = total * sum(ranks) * self.v_proj.group_width + heads * steps * total * self.head_dim
        folded = heads * steps * total * r + heads * steps * r * self.head_dim
        return folded < rebuild

    def _latent_per_head(self, projection: LatentProjection, latent: torch.Tensor) -> torch.Tensor:
        """(batch, total, Σr) → (batch, kv_heads, total, r_g): each KV head sees its group's latent."""
        batch, total, _ = latent.shape
        groups = len(projection.ranks)
        per_group = latent.view(batch, total, groups, -1).transpose(1, 2)
        if groups == 1 and self.num_key_value_groups == 1:
            # One latent and one KV head per query head (GPT-2, OPT): keep the single head; matmul and
            # SDPA broadcast it over the query heads (no attention interface repeats KV heads here), and
            # an exported graph does not materialise heads × context copies of the latent (an Expand would).
            return per_group
        if groups == 1:  # GQA: the interface repeats KV heads, so it must get all of them (a view, no copy)
            return per_group.expand(batch, self.num_key_value_heads, total, per_group.shape[-1])
        return per_group.repeat_interleave(self.num_key_value_heads // groups, dim=1) if groups < self.num_key_value_heads else per_group

    # -- K absorption ----------------------------------------------------------------------------
    # Without RoPE or a K norm between them (GPT-2, OPT: learned absolute positions), nothing acts
    # on K after its up, so q·(L·Uᵀ + b)ᵀ = (q·U)·Lᵀ + q·b: scores are computed on the cached latent
    # L with the query mapped through U once per new token, and no key is rebuilt. q·b is the same
    # for every key of a query, and softmax ignores a constant shift, so the bias drops out (which
    # is why a softcap, tanh before the softmax, rules absorption out).

    absorb_policy = "auto"  # "auto": absorb when it needs fewer multiply-adds; "always"; "never"

    def can_absorb_key(self) -> bool:
        """Exact only where K is used as ``up`` returns it: no rotation, no norm, no softcap; equal group ranks."""
        return (self.family.positions != "rope" and self.family.qk_norm is None and self.softcap is None
                and len(set(self.k_proj.ranks)) == 1)

    def absorb_key(self, steps: int, total: int) -> bool:
        """Whether this call scores queries against the K latent (``always`` still needs :meth:`can_absorb_key`).

        Rebuilding costs total·Σr·kv_width (up) + heads·steps·total·head_dim (QKᵀ); absorbing
        costs heads·steps·head_dim·r_g (the query through up) + heads·steps·total·r_g (QLᵀ).
        Decoding (steps = 1) always absorbs; a long prefill absorbs only when r_g < head_dim.
        """
        if self.absorb_policy == "never" or not self.can_absorb_key():
            return False
        if self.absorb_policy == "always":
            return True
        r, heads = self.k_proj.ranks[0], self.num_heads
        rebuild = total * self.k_proj.latent_width * self.k_proj.group_width + heads * steps * total * self.head_dim
        absorbed = heads * steps * self.head_dim * r + heads * steps * total * r
        return absorbed < rebuild

    def _per_head_up(self, projection: LatentProjection) -> torch.Tensor:
        """(heads, head_dim, r_g): the rows of ``up`` that give each query head's KV head."""
        up = torch.cat([u.weight for u in projection.ups], dim=0)  # (kv_width, r_g), groups stacked
        return up.view(self.num_key_value_heads, self.head_dim, -1).repeat_interleave(self.num_key_value_groups, dim=0)

    def _absorbed_query(self, query: torch.Tensor) -> torch.Tensor:
        """(batch, heads, steps, head_dim) queries → (batch, heads, steps, r_g), to be scored against latents."""
        return torch.einsum("bhsd,hdr->bhsr", query, self._per_head_up(self.k_proj))

    def _value_up(self, output: torch.Tensor) -> torch.Tensor:
        """(batch, steps, heads, r_g) attention over latents → (batch, steps, heads, head_dim) values."""
        up = torch.cat([u.weight for u in self.v_proj.ups], dim=0)  # (kv_width, r_g), groups stacked
        bias = torch.cat([u.bias for u in self.v_proj.ups]) if self.v_proj.ups[0].bias is not None else None
        if self.value_up_as_linear:
            return self._value_up_linear(output, up, bias)
        result = torch.einsum("bshr,hdr->bshd", output, self._per_head_up(self.v_proj))
        if bias is not None:
            result = result + bias.view(self.num_key_value_heads, self.head_dim).repeat_interleave(
                self.num_key_value_groups, dim=0)
        return result

    # Weight-only quantizers (ONNX Runtime's MatMulNBits) rewrite MatMuls by a constant 2-D weight only;
    # the per-head einsum above reads a 3-D one. The ONNX export of an int8/int4 model switches to this
    # form: one 2-D ``linear`` by the whole V up (every head against every KV head, kv_heads× the
    # multiply-adds of the einsum, still small next to one projection), then each head keeps its own
    # KV head's block.
    value_up_as_linear = False

    def _value_up_linear(self, output: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        batch, steps, heads, _ = output.shape
        kv_heads, groups = self.num_key_value_heads, self.num_key_value_groups
        every = nn.functional.linear(output, up, bias).view(batch, steps, kv_heads, groups, kv_heads, self.head_dim)
        own = torch.diagonal(every, dim1=2, dim2=4)  # (batch, steps, groups, head_dim, kv_heads)
        return own.permute(0, 1, 4, 2, 3).reshape(batch, steps, heads, self.head_dim)

    def _rotate(self, query, key, position_embeddings, position_ids, past: int, steps: int, total: int):
        """RoPE on the new queries and on every rebuilt key, each at its absolute position.

        Cached tokens sit at consecutive positions ending just before the first new token (what
        ``generate`` does, left padding included: pads hold positions that the mask hides anyway).
        """
        if position_ids is None:
            position_ids = torch.arange(past, past + steps, device=query.device)[None]
        offsets = torch.arange(-past, 0, device=query.device)[None] + position_ids[:, :1]
        key_positions = torch.cat([offsets, position_ids], dim=1) if past else position_ids
        if position_embeddings is None:
            position_embeddings = self.key_embeddings.query(query, position_ids, self.layer_type)
        cos_q, sin_q = position_embeddings
        if not past:
            return self.apply_rotary(query, key, cos_q, sin_q)
        cos_k, sin_k = self.key_embeddings(key, key_positions, cos_q, past, self.layer_type)
        # The model's own RoPE (partial rotary included) rotates q and k with one cos/sin; here
        # they differ in length, so each call rotates one of them. The other argument is a
        # one-head slice of the right length (partial rotary concatenates it back), discarded.
        query = self.apply_rotary(query, query[:, :1], cos_q, sin_q)[0]
        key = self.apply_rotary(key[:, :1], key, cos_k, sin_k)[1]
        return query, key

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, key_latent={self.k_proj.latent_width}, value_latent={self.v_proj.latent_width}"
