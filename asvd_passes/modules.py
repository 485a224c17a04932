"""``LowRankLinear``: the module a compressed projection becomes (two thin linears)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import InvalidInputError


class LowRankLinear(nn.Module):
    """A rank-r projection ``y = W'·x`` stored as two thin linears; the scaling S⁻¹ is folded into ``down``.

    Two storage forms of the same rank-r matrix W' = U·D (U: out × r, D: r × in):

    * pair: ``down`` = D, ``up`` = U, ``y = up(down(x))``: r·(in + out) parameters (the form of the
      ASVD and SVD-LLM papers).
    * interpolative (``interpolative=True``): r rows of W' are stored as
      ``down`` and every other row as a combination of them, ``up`` (out − r) × r; ``rows`` puts the
      outputs back in order: ``y = [down(x), up(down(x))][rows]``. The same matrix in r·(in + out − r)
      parameters (r² fewer), so a parameter budget buys a higher rank. Needs r < out. Rows are
      chosen by pivoted LU and maxvol swaps so every coefficient is at most 1.05 in magnitude.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        interpolative: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.interpolative = interpolative_form(rank, out_features, interpolative)
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        if self.interpolative:
            self.up = nn.Linear(rank, out_features - rank, bias=False, dtype=dtype, device=device)
            # Output j is entry rows[j] of [down(x), up(down(x))]: saved with the weights (out int32s).
            self.register_buffer("rows", torch.arange(out_features, dtype=torch.int32, device=device))
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        else:
            self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.interpolative:
            return self.up(self.down(x))
        skeleton = self.down(x)
        y = torch.cat([skeleton, self.up(skeleton)], dim=-1).index_select(-1, self.rows)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out × in) matrix the factors stand for, computed on each access.

        Read-only, for code that inspects a projection's ``.weight`` in place of the dense module
        it replaced: e.g. transformers' GPT-2 ``_init_weights`` reads ``attn.c_proj.weight`` while
        ``from_pretrained`` loads a compressed folder. Writing into the returned tensor changes nothing.
        """
        with torch.no_grad():
            product = self.up.weight @ self.down.weight
            if not self.interpolative:
                return product
            return torch.cat([self.down.weight, product]).index_select(0, self.rows)

    @classmethod
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, dtype, device,
                     interpolative: bool = False):
        """Build from ``down`` (rank × in) and ``up`` (out × rank) weight matrices, in either form."""
        rank, in_features = down.shape
        out_features = up.shape[0]
        module = cls(in_features, out_features, rank, bias is not None, dtype=dtype, device=device,
                     interpolative=interpolative)
        rows = None
        if module.interpolative:
            down, up, rows = interpolative_factors(down, up)
        with torch.no_grad():
            module.down.weight.copy_(down)
            module.up.weight.copy_(up)
            if rows is not None:
                module.rows.copy_(rows)
            if bias is not None:
                (module.bias if module.interpolative else module.up.bias).copy_(bias)
        return module

    def extra_repr(self) -> str:
        form = ", interpolative" if self.interpolative else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{form}"


def interpolative_form(rank: int, out_features: int, requested: bool) -> bool:
    """Whether a factor of this rank is stored interpolatively (it saves nothing once r = out)."""
    return bool(requested) and rank < out_features


def interpolative_factors(down: torch.Tensor, up: torch.Tensor, bound: float = 1.05
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(skeleton, coefficients, rows) with U·D = [skeleton; coefficients·skeleton][rows], exactly.

    LU with partial pivoting of U (out × r) gives Π·U = L·R with L unit lower trapezoidal: the first
    r pivoted rows of U·D are the skeleton U_top·D, and the others are U_rest·U_top⁻¹·skeleton =
    L_rest·L_top⁻¹·skeleton (L_top is unit triangular, so this holds even where U is rank-deficient).
    Then maxvol swaps (Goreinov et al.) exchange a skeleton row for the row with the largest
    coefficient until every |coefficient| ≤ ``bound``: small coefficients keep float32 rounding
    near the two-factor form's (LU alone left coefficients up to ~3 and twice the logits' rounding
    error on SmolLM2).
    """
    down, up = down.to(torch.float64), up.to(torch.float64)
    out_features, rank = up.shape
    lu, pivots, _ = torch.linalg.lu_factor_ex(up)  # a zero pivot (dead direction) is fine here
    order = list(range(out_features))
    for i, pivot in enumerate((pivots - 1).tolist()):  # LAPACK's row swaps, applied in turn
        order[i], order[pivot] = order[pivot], order[i]
    order = torch.tensor(order, device=up.device)
    lower_top = torch.tril(lu[:rank], diagonal=-1) + torch.eye(rank, dtype=lu.dtype, device=lu.device)
    coefficients = torch.linalg.solve_triangular(lower_top, lu[rank:], upper=False, left=False, unitriangular=True)
    del lu, lower_top
    # B (out × r): row k expresses output k in the skeleton outputs (identity rows for the skeleton).
    full = torch.empty(out_features, rank, dtype=up.dtype, device=up.device)
    full[order[:rank]] = torch.eye(rank, dtype=up.dtype, device=up.device)
    full[order[rank:]] = coefficients
    del coefficients
    skeleton_rows = order[:rank].clone()
    for _ in range(4 * rank):  # each swap raises |det U_top| by the pivot's factor; few are needed
        i, j = divmod(int(full.abs().argmax()), rank)
        pivot = full[i, j].item()
        if abs(pivot) <= bound:
            break
        column, row = full[:, j].clone(), full[i].clone()
        row[j] -= 1
        full.addr_(column, row, alpha=-1.0 / pivot)  # row i becomes e_j: output i joins the skeleton
        skeleton_rows[j] = i
    rest = torch.ones(out_features, dtype=torch.bool, device=up.device)
    rest[skeleton_rows] = False
    order = torch.cat([skeleton_rows, rest.nonzero().flatten()])
    coefficients = full[order[rank:]]
    del full
    skeleton = up[order[:rank]] @ down
    rows = torch.empty_like(order)
    rows[order] = torch.arange(out_features, device=up.device)
    return skeleton, coefficients, rows


def stores_transposed(module: nn.Module) -> bool:
    """Whether a projection keeps its weight in × out (transformers' ``Conv1D``, used by GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The (out × in) weight of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (stored in × out)."""
    if isinstance(module, nn.Linear):
        return module.weight
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


def replace_with_empty_lowrank(model: nn.Module, ranks: dict[str, int], interpolative: bool = False) -> None:
    """Swap each named projection for an uninitialised ``LowRankLinear`` of that rank and form (used on load)."""
    for name, rank in ranks.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError as err:
            raise InvalidInputError(f"The saved ASVD ranks name {name!r}, which this model does not have") from err
        out_features, in_features = projection_shape(dense)
        weight = projection_weight(dense)
        bias = getattr(dense, "bias", None)
        lowrank = LowRankLinear(in_features, out_features, rank, bias is not None, dtype=weight.dtype, device=weight.device,
                                interpolative=interpolative)
        replace_module(model, name, lowrank)
