"""``ASVDConfig``: every knob of one compression run, saved as JSON beside the model."""

from __future__ import annotations

import difflib
import inspect
from functools import cache

from optimum.configuration_utils import BaseConfig
from transformers import PretrainedConfig

from .errors import InvalidInputError

METHODS = ("svd", "asvd", "whiten")
ALLOCATIONS = ("uniform", "strs", "fisher")
DEFAULT_STRS_CANDIDATES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ASVD_STATISTICS = ("abs_mean", "abs_max")
DEFAULT_PARAM_RATIO = 0.9
KV_ALLOCATIONS = ("uniform", "fisher")
KV_BITS = (8, 4)  # stored bits of a quantized latent cache (kv/quant.py)
KV_QUANT_GRANULARITIES = ("channel", "tensor")
PIPELINES = ("auto", "whole", "sequential")
DEVICES = ("auto", "cpu", "cuda")
OUTPUT_WHITENINGS = ("none", "gradient")
LOWRANK_FORMS = ("pair", "interpolative")
# Fields that older versions wrote into asvd_config.json and this one dropped (options that measured worse
# or equal): loading such a folder skips them; passing them to ``ASVDConfig(...)`` is an error.
REMOVED_FIELDS = frozenset({"refit_up", "svd_dtype", "kv_equal_widths"})
# Keys a saved asvd_config.json may hold besides PretrainedConfig's current ones: optimum's version stamp,
# the hub's commit hash, and transformers 4's name for ``dtype`` (see ``passthrough_keys``).
SAVED_BASE_KEYS = frozenset({"optimum_version", "_commit_hash", "torch_dtype"})


@cache
def passthrough_keys() -> frozenset[str]:
    """Keys of the base classes that ``ASVDConfig(**kwargs)`` hands to them: PretrainedConfig's own
    fields (what it writes into a saved config) and ``SAVED_BASE_KEYS``; anything else is a typo."""
    return frozenset(PretrainedConfig().to_dict()) | SAVED_BASE_KEYS


def unknown_field_error(name: str, known) -> InvalidInputError:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(sorted(known))}"
    if name in REMOVED_FIELDS:
        hint = " (removed: it measured no better than the default; see research/README.md)"
    return InvalidInputError(f"ASVDConfig has no field {name!r}{hint}")


class ASVDConfig(BaseConfig):
    """Configuration of an ASVD compression run (Optimum ``BaseConfig``: JSON save/load).

    Args:
        method: ``svd`` (S = I), ``asvd`` (S = diag(stat|x|^alpha)) or ``whiten`` (S = chol(XᵀX)).
        param_ratio: kept / original parameters of the selected projections, in (0, 1]. ``None`` (the
            default) means 0.9 when nothing else is asked for, and no weight compression when
            ``ranks``, ``ppl_target`` or ``kv_ratio`` is given: ``ASVDConfig(kv_ratio=0.5)`` compresses
            only K/V, like ``asvd compress --kv-ratio 0.5``. Give ``param_ratio`` explicitly to
            compress the weights as well.
        ranks: explicit ``{module_name: rank}``; alone, only the names it lists are factored; with
            ``param_ratio`` it overrides the allocation for the names it lists.
        alpha: ASVD exponent on the activation statistic.
        asvd_statistic: ``abs_mean`` (the paper) or ``abs_max`` for the ``asvd`` method.
        allocation: how ranks are chosen under the budget: ``uniform`` (one ratio everywhere),
            ``strs`` (ASVD's sensitivity search) or ``fisher`` (closed-form error × loss weight).
        ppl_target: with ``strs``, choose ranks by a calibration-perplexity threshold instead of a ratio.
        rank_multiple: round every rank down to a multiple of this (e.g. 8 for kernels).
        sensitivity_samples: calibration windows used for sensitivities (Fisher / STRS probes).
        strs_candidates: candidate per-projection ratios probed by ``strs``.
        include_lm_head: also compress the output projection (excluded by default).
        calibration: ``None``/``"selfgen"``, a text file path, or ``"hf:NAME[:CONFIG[:SPLIT]]"``.
        calib_samples, seqlen, seed: calibration set shape and seed.
        kv_ratio: latent KV cache width / dense K+V width, in (0, 1]; ``None`` leaves K/V alone.
            Alone it leaves the weights dense; with ``param_ratio`` too, the weight budget covers the
            other projections.
        kv_group_size: KV heads per latent group (``None``: one latent shared by all KV heads).
        kv_allocation: ``fisher`` (per layer, K and V apart, by loss cost) or ``uniform``.
        kv_output_metric: weight K/V errors by how attention reads them (queries for K, ``o_proj``
            for V) in the decomposition; ``False`` gives the plain scaled SVD of each group.
        kv_bits: store the cached latents as ``8``-bit or ``4``-bit codes with static scales
            calibrated on the calibration windows (``None``: the model's float dtype). Needs ``kv_ratio``
            (``kv_ratio=1.0`` keeps the full width and only quantizes).
        kv_budget: cache bytes per token for the latent KV cache, in place of ``kv_ratio``/``kv_bits``: the
            ranks of every layer and one storage (float, 8 or 4 bits) for all are chosen together to
            minimise the predicted loss (``kv/plan.py``: ``budget_kv_plan``); needs the fisher KV allocation.
        kv_quant_granularity: ``channel`` (a scale and zero point per latent channel) or ``tensor``
            (one per layer and K/V).
        kv_quant_rotate: turn each latent by a random orthogonal matrix folded into its down and up
            before calibrating the scales (spreads outlier channels; the float model is unchanged).
        output_whitening: ``gradient`` also whitens each weight projection's outputs by the covariance
            of the loss gradient with respect to them, G = E[g·gᵀ] over ``sensitivity_samples`` windows
            (K-FAC's output factor): the SVD is of R_Gᵀ·W·S, so truncation minimises the predicted loss
            increase instead of the output error; ``none`` (default) keeps the plain scaled SVD.
        output_damping: G + damping·mean(diag G)·I is factored (G from a few windows is rank-deficient).
        lowrank_form: how each factored projection is stored (``LowRankLinear``): ``interpolative``
            keeps r rows of the rank-r matrix and writes the other rows as combinations of them,
            r·(in + out − r) parameters; ``pair`` is the papers' two factors, r·(in + out). The matrix
            at a given rank is the same; the budget buys a higher rank in the interpolative form.
            Default ``pair``: the interpolative form measures better at every ratio but rounds less
            well (fp32 logits vs ONNX Runtime 2.8e-4 apart where pairs stay within 1e-4) and its int4
            export of SmolLM2 was destroyed (docs/BENCHMARKS.md); ``strs`` (ASVD's reproduction) always uses pairs.
    """

    CONFIG_NAME = "asvd_config.json"
    FULL_CONFIGURATION_FILE = "asvd_config.json"

    def __init__(
        self,
        method: str = "whiten",
        param_ratio: float | None = None,
        ranks: dict[str, int] | None = None,
        alpha: float = 0.5,
        asvd_statistic: str = "abs_mean",
        allocation: str = "fisher",
        ppl_target: float | None = None,
        rank_multiple: int = 1,
        sensitivity_samples: int = 4,
        strs_candidates: tuple[float, ...] | list[float] = DEFAULT_STRS_CANDIDATES,
        include_lm_head: bool = False,
        calibration: str | None = None,
        calib_samples: int = 16,
        seqlen: int = 512,
        seed: int = 0,
        kv_ratio: float | None = None,
        kv_group_size: int | None = None,
        kv_allocation: str = "fisher",
        kv_output_metric: bool = True,
        kv_bits: int | None = None,
        kv_budget: float | None = None,
        kv_quant_granularity: str = "channel",
        kv_quant_rotate: bool = False,
        pipeline: str = "auto",
        sequential_calibration: bool = True,
        device: str = "auto",
        max_memory: float | None = None,
        offload_folder: str | None = None,
        output_whitening: str = "none",
        output_damping: float = 0.1,
        lowrank_form: str = "pair",
        **kwargs,
    ):
        for name in kwargs:
            if name not in passthrough_keys():
                raise unknown_field_error(name, self.fields())
        super().__init__(**kwargs)
        if param_ratio is None and not ranks and ppl_target is None and kv_ratio is None and kv_budget is None:
            param_ratio = DEFAULT_PARAM_RATIO  # nothing asked for: compress the weights at the default ratio
        self.method = method
        self.param_ratio = param_ratio
        self.ranks = dict(ranks) if ranks else None
        self.alpha = alpha
        self.asvd_statistic = asvd_statistic
        self.allocation = allocation
        self.ppl_target = ppl_target
        self.rank_multiple = rank_multiple
        self.sensitivity_samples = sensitivity_samples
        self.strs_candidates = [float(c) for c in strs_candidates]
        self.include_lm_head = include_lm_head
        self.calibration = calibration
        self.calib_samples = calib_samples
        self.seqlen = seqlen
        self.seed = seed
        self.kv_ratio = kv_ratio
        self.kv_group_size = kv_group_size
        self.kv_allocation = kv_allocation
        self.kv_output_metric = kv_output_metric
        self.kv_bits = kv_bits
        self.kv_budget = kv_budget
        self.kv_quant_granularity = kv_quant_granularity
        self.kv_quant_rotate = kv_quant_rotate
        self.pipeline = pipeline
        self.sequential_calibration = sequential_calibration
        self.device = device
        self.max_memory = max_memory
        self.offload_folder = None if offload_folder is None else str(offload_folder)
        self.output_whitening = output_whitening
        self.output_damping = output_damping
        self.lowrank_form = lowrank_form
        self.validate()

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The names ``ASVDConfig`` takes: the parameters of its ``__init__``."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "ASVDConfig":
        """A saved ``asvd_config.json`` (``from_pretrained`` reads through this); fields an older version wrote
        and this one removed are skipped, so older folders still load."""
        kept = {key: value for key, value in config_dict.items() if key not in REMOVED_FIELDS}
        return super().from_dict(kept, **kwargs)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.asvd_statistic not in ASVD_STATISTICS:
            raise InvalidInputError(f"Unknown asvd_statistic {self.asvd_statistic!r}; choose one of {ASVD_STATISTICS}")
        if self.allocation not in ALLOCATIONS:
            raise InvalidInputError(f"Unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.pipeline not in PIPELINES:
            raise InvalidInputError(f"Unknown pipeline {self.pipeline!r}; choose one of {', '.join(PIPELINES)}")
        if self.device not in DEVICES:
            raise InvalidInputError(f"Unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.output_whitening not in OUTPUT_WHITENINGS:
            raise InvalidInputError(
                f"Unknown output_whitening {self.output_whitening!r}; choose one of {', '.join(OUTPUT_WHITENINGS)}")
        if self.lowrank_form not in LOWRANK_FORMS:
            raise InvalidInputError(
                f"Unknown lowrank_form {self.lowrank_form!r}; choose one of {', '.join(LOWRANK_FORMS)}")
        if self.lowrank_form == "interpolative" and self.allocation == "strs":
            raise InvalidInputError("allocation 'strs' reproduces ASVD with the papers' two factors: "
                                    "use lowrank_form 'pair' (the default)")
        if not float(self.output_damping) > 0:
            raise InvalidInputError(f"output_damping must be positive, got {self.output_damping}")
        if self.max_memory is not None and not float(self.max_memory) > 0:
            raise InvalidInputError(f"max_memory must be a positive number of GiB, got {self.max_memory}")
        if self.pipeline == "sequential" and (self.allocation == "strs" and self.compresses_weights):
            raise InvalidInputError("allocation 'strs' probes the whole model: use pipeline 'whole' (or 'auto')")
        if self.ppl_target is not None and self.allocation != "strs":
            raise InvalidInputError("ppl_target needs allocation='strs'")
        if self.param_ratio is None and not self.ranks and self.ppl_target is None and not self.latent_kv:
            raise InvalidInputError("Give a param_ratio in (0, 1], a ppl_target, an explicit ranks map, a kv_ratio or a kv_budget")
        if self.kv_budget is not None:
            if self.kv_ratio is not None or self.kv_bits is not None:
                raise InvalidInputError("kv_budget chooses the KV ratio and bits itself: give it without kv_ratio and kv_bits")
            if not float(self.kv_budget) > 0:
                raise InvalidInputError(f"kv_budget must be a positive number of cache bytes per token, got {self.kv_budget}")
            if self.kv_allocation != "fisher":
                raise InvalidInputError("kv_budget prices ranks and bits by their predicted loss: use kv_allocation 'fisher'")
        if self.kv_ratio is not None and not (0.0 < float(self.kv_ratio) <= 1.0):
            raise InvalidInputError(f"kv_ratio must lie in (0, 1], got {self.kv_ratio}")
        if self.kv_allocation not in KV_ALLOCATIONS:
            raise InvalidInputError(f"Unknown kv_allocation {self.kv_allocation!r}; choose one of {', '.join(KV_ALLOCATIONS)}")
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise InvalidInputError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))} or None, got {self.kv_bits!r}")
        if self.kv_bits is not None and self.kv_ratio is None:
            raise InvalidInputError("kv_bits quantizes the latent KV cache: give a kv_ratio too (1.0 keeps its full width)")
        if self.kv_quant_granularity not in KV_QUANT_GRANULARITIES:
            raise InvalidInputError(f"Unknown kv_quant_granularity {self.kv_quant_granularity!r}; "
                                    f"choose one of {', '.join(KV_QUANT_GRANULARITIES)}")
        if self.kv_group_size is not None and (not isinstance(self.kv_group_size, int) or self.kv_group_size < 1):
            raise InvalidInputError(f"kv_group_size must be a positive integer, got {self.kv_group_size!r}")
        if self.rank_multiple < 1 or self.sensitivity_samples < 1:
            raise InvalidInputError("rank_multiple and sensitivity_samples must be >= 1")
        if not self.strs_candidates or not all(0.0 < c < 1.0 for c in self.strs_candidates):
            raise InvalidInputError(f"strs_candidates must lie in (0, 1), got {self.strs_candidates}")
        if self.param_ratio is not None and not (0.0 < float(self.param_ratio) <= 1.0):
            raise InvalidInputError(f"param_ratio must lie in (0, 1], got {self.param_ratio}")
        if self.alpha < 0:
            raise InvalidInputError(f"alpha must be >= 0, got {self.alpha}")
        if self.calib_samples < 1 or self.seqlen < 2:
            raise InvalidInputError("calib_samples must be >= 1 and seqlen >= 2")
        for name, rank in (self.ranks or {}).items():
            if not isinstance(rank, int) or rank < 1:
                raise InvalidInputError(f"rank for {name!r} must be a positive integer, got {rank!r}")

    @property
    def statistics(self) -> tuple[str, ...]:
        """Which observer statistics this configuration needs."""
        needed = []
        if self.method == "asvd":
            needed.append(self.asvd_statistic)
        # Whitening needs XᵀX; so does the closed-form output error of the fisher allocation.
        weights_fisher = self.compresses_weights and self.allocation == "fisher" and not self.ranks
        kv_fisher = self.latent_kv and self.kv_allocation == "fisher"
        if self.method == "whiten" or weights_fisher or kv_fisher:
            needed.append("gram")
        return tuple(needed)

    @property
    def interpolative(self) -> bool:
        """Whether factored projections are stored in the interpolative form (see ``lowrank_form``)."""
        return self.lowrank_form == "interpolative"

    @property
    def latent_kv(self) -> bool:
        """Whether K/V get a latent cache (by ratio or by byte budget)."""
        return self.kv_ratio is not None or self.kv_budget is not None

    @property
    def compresses_weights(self) -> bool:
        return self.param_ratio is not None or bool(self.ranks) or self.ppl_target is not None
