"""``LowRankLinear``: the module a compressed projection becomes (two thin linears)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import InvalidInputError


class LowRankLinear(nn.Module):
    """``y = up(down(x))`` with ``down: in -> rank`` (no bias) and ``up: rank -> out`` (keeps the bias).

    The activation scaling S⁻¹ is already folded into ``down``; nothing else happens at run time.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out × in) matrix ``up.weight @ down.weight``, computed on each access.

        Read-only, for code that inspects a projection's ``.weight`` in place of the dense module
        it replaced: e.g. transformers' GPT-2 ``_init_weights`` reads ``attn.c_proj.weight`` while
        ``from_pretrained`` loads a compressed folder. Writing into the returned tensor changes nothing.
        """
        with torch.no_grad():
            return self.up.weight @ self.down.weight

    @classmethod
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, dtype, device):
        """Build from ``down`` (rank × in) and ``up`` (out × rank) weight matrices."""
        rank, in_features = down.shape
        module = cls(in_features, up.shape[0], rank, bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            module.down.weight.copy_(down)
            module.up.weight.copy_(up)
            if bias is not None:
                module.up.bias.copy_(bias)
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The (out × in) weight of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (stored in × out)."""
    if isinstance(module, nn.Linear):
        return module.weight
    from .families import stores_transposed

    if stores_transposed(module):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear projection")


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a projection module, factored (``LowRankLinear``) or not."""
    if isinstance(module, LowRankLinear):
        return module.out_features, module.in_features
    out_features, in_features = projection_weight(module).shape
    return out_features, in_features


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_with_empty_lowrank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Swap each named projection for an uninitialised ``LowRankLinear`` of that rank (used on load)."""
    for name, rank in ranks.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError as err:
            raise InvalidInputError(f"The saved ASVD ranks name {name!r}, which this model does not have") from err
        out_features, in_features = projection_shape(dense)
        weight = projection_weight(dense)
        bias = getattr(dense, "bias", None)
        lowrank = LowRankLinear(in_features, out_features, rank, bias is not None, dtype=weight.dtype, device=weight.device)
        replace_module(model, name, lowrank)
