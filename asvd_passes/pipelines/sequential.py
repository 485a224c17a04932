"""The sequential (layer-wise) pipeline: one decoder block in memory at a time, as GPTQ calibrates.

1. The calibration windows run through the embeddings; the hidden states entering block 0 are kept
   (with what every block is called with: masks, position embeddings).
2. Allocation (``fisher``) needs every projection's loss-cost curve, so a first pass stores each
   block's dense inputs on disk, back-propagates the loss block by block (last to first, one block
   materialised, exact whole-model gradients) and, per block, observes the statistics, takes each
   scaled SVD and keeps only its cost curve. The global greedy then meets the budget exactly.
   ``uniform`` and explicit ranks need no first pass.
3. For each block in turn: take its graph (``torch.export`` runs once per distinct block structure,
   see ``block_graphs.py``), match its projections,
   insert observers, run the calibration hidden states through the observed graph, decompose with
   the planned ranks, rewrite the block graph's projection nodes into the
   low-rank modules and run **that rewritten graph** to produce the next block's inputs; then swap
   the modules into the block and hand it back (written to shards when the model is offloaded).

With ``sequential_calibration`` on, block i is observed on the outputs of the already-compressed
blocks before it; off, on the dense model's (then the factors equal the whole-model path's).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import kv
from ..allocation.block_cache import decoder_layers
from ..allocation.budget import greedy_plan
from ..allocation.fisher import loss_cost_curve
from ..allocation.sensitivity import gradient_moment
from ..config import ASVDConfig
from ..decompose import ScaledSVD, output_root
from ..errors import InvalidInputError
from ..graph import InsertObserversPass, LowRankRewritePass, RemoveObserversPass, find_projections, group_by_input
from ..modules import LowRankLinear, projection_weight, replace_module
from ..ranks import ProjectionShape, RankPlan
from ..scaling import WhiteningScaling, shared_scalings
from .whole import NoProjectionsError
from .block_graphs import BlockGraphs
from .blocks import BlockCall, _patched_forwards, block_prefix, record_block_inputs, run_block
from .heap import return_freed_memory
from . import planning


class SequentialPipelineError(InvalidInputError):
    """The configuration asks for something the sequential pipeline does not do."""


@dataclass
class SequentialResult:
    plan: RankPlan
    kv_plan: "kv.KVPlan | None"
    shapes: dict[str, ProjectionShape]
    seconds: dict[str, float] = field(default_factory=dict)


def _structure(block: nn.Module) -> tuple:
    """What makes two blocks' graphs alike: their modules' names and types (shapes may differ)."""
    return tuple((name, type(module).__qualname__) for name, module in block.named_modules())


class _ActivationStore:
    """Per-block hidden states kept on disk between the passes (memory follows one block, not the depth)."""

    def __init__(self, folder: Path | None):
        self.folder = Path(tempfile.mkdtemp(prefix="asvd-activations-", dir=folder))

    def put(self, index: int, tensors) -> None:
        """A list or dict of tensors, saved on the CPU."""
        torch.save(torch.utils._pytree.tree_map(lambda t: t.cpu(), tensors), self.folder / f"block-{index:05d}.pt")

    def get(self, index: int):
        return torch.load(self.folder / f"block-{index:05d}.pt", weights_only=True)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class SequentialPipeline:
    """Compress ``model`` block by block; ``weights`` says where block tensors live between uses."""

    def __init__(
        self,
        model: nn.Module,
        weights,
        config: ASVDConfig,
        windows: torch.Tensor,
        device: torch.device,
        select: Callable[[str, nn.Module], bool],
        kv_layouts: list | None = None,
        on_block_done: Callable[[str, nn.Module], None] | None = None,
        offload_folder: str | Path | None = None,
        progress: bool = True,
    ):
        if config.allocation == "strs" and config.compresses_weights:
            raise SequentialPipelineError("STRS probes perplexity on the whole model: use --pipeline whole for strs")
        if config.include_lm_head and config.compresses_weights:
            raise SequentialPipelineError("the sequential pipeline compresses decoder blocks only; drop include_lm_head")
        self.model = model
        self.weights = weights
        self.config = config
        self.windows = windows
        self.device = torch.device(device)
        self.select = select
        self.kv_layouts = kv_layouts
        self.on_block_done = on_block_done
        self.offload_folder = Path(offload_folder) if offload_folder is not None else None
        self.progress = progress
        self.layers = decoder_layers(model)
        self.prefix = block_prefix(model)
        self.seconds: dict[str, float] = {}
        self.group_size = kv.resolve_group_size(kv_layouts, config.kv_group_size) if kv_layouts else None
        self._storage_dtype = next(p for p in model.parameters()).dtype
        # Blocks may compute in another dtype than they are stored in (float32 on CPU).
        self.compute_dtype = getattr(weights, "compute_dtype", None) or self._storage_dtype
        self._graphs = BlockGraphs()  # one torch.export per distinct block structure, for both passes

    def _release(self, prefix: str, block: nn.Module, dtype: torch.dtype) -> None:
        self.weights.release(prefix, block, dtype)
        # Captured graphs hold the block's tensors inside reference cycles (graph <-> nodes <-> module);
        # without a collection they outlive the block, and memory grows with the depth.
        gc.collect()
        return_freed_memory()

    def _feed(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.compute_dtype)

    # -- structure -------------------------------------------------------------------------------

    def _name(self, index: int, relative: str) -> str:
        return f"{self.prefix}.{index}.{relative}"

    def _kv_sources(self, index: int) -> list[str]:
        if not self.kv_layouts:
            return []
        return list(dict.fromkeys(l.source(r) for l in self._block_layouts(index) for r in kv.plan.ROLES))

    def _block_layouts(self, index: int) -> list:
        head = f"{self.prefix}.{index}."
        return [l for l in (self.kv_layouts or []) if l.name.startswith(head)]

    def _block_projections(self, index: int, graph, block):
        """(weight-plan projections, observed projections incl. K/V sources) of block ``index``'s graph."""
        found = find_projections(graph, block)
        relative = [p.name for p in found]
        for p in found:
            p.name = self._name(index, p.name)
        kv_sources = set(self._kv_sources(index))
        by_name = {p.name: p for p in found}
        missing = [name for name in kv_sources if name not in by_name]
        if missing:
            raise InvalidInputError(f"K/V projections {missing[:3]} were not found in the traced block graph")
        selected = []
        if self.config.compresses_weights:
            selected = [by_name[name] for name in self._selected_names(index, relative)]
        observed = selected + [by_name[name] for name in by_name if name in kv_sources]
        return selected, observed

    def _survey(self, hidden: torch.Tensor, calls: list[BlockCall]) -> dict[str, ProjectionShape]:
        """Shapes of the selected projections of every block.

        Blocks are grouped by structure (their modules' names and types, read from the model without
        weights); one block of each group is captured and its projections stand for the group's.
        A model whose later blocks differ (an extra projection, dense-then-MoE) is thus surveyed in
        full; shapes are read block by block (widths may differ).
        """
        structures = [_structure(layer) for layer in self.layers]
        relative_of: dict[tuple, list[str]] = {}
        for index, structure in enumerate(structures):
            if structure in relative_of:
                continue
            prefix = self._name(index, "")[:-1]
            block = self.weights.load(prefix, self.layers[index])
            try:
                # Only the input's shape matters to the capture: block 0's input stands for every block's.
                graph = self._graphs.capture(block, self._feed(hidden), calls[index])
                relative_of[structure] = [p.name for p in find_projections(graph, block)]
            finally:
                self._release(prefix, self.layers[index], self._storage_dtype)
        if not any(relative_of.values()):
            raise NoProjectionsError(f"{type(self.model).__name__} has no linear projections to compress")
        shapes = {}
        for index, structure in enumerate(structures):
            for name in self._selected_names(index, relative_of[structure]):
                out_features, in_features = projection_weight(self.model.get_submodule(name)).shape
                shapes[name] = ProjectionShape(out_features, in_features, self.config.interpolative)
        if not shapes:
            raise NoProjectionsError("No projection is left to compress after the filters")
        return shapes

    def _selected_names(self, index: int, relative: list[str]) -> list[str]:
        """Qualified names of block ``index``'s weight-plan projections among its ``relative`` projection names."""
        kv_sources = set(self._kv_sources(index))
        names = [self._name(index, name) for name in relative]
        return [name for name in names if name not in kv_sources and self.select(name, self.model.get_submodule(name))]

    def _check_surveyed(self, index: int, selected, shapes) -> None:
        """Block ``index``'s own graph selects exactly what the survey planned for it (never half-compressed)."""
        head = self._name(index, "")
        planned = {name for name in shapes if name.startswith(head)}
        seen = {p.name for p in selected}
        if planned != seen:
            difference = sorted(planned ^ seen)
            raise SequentialPipelineError(
                f"block {index} of {type(self.model).__name__} differs from the survey of its structure group "
                f"({difference[:3]}); its projections cannot be planned ahead")

    # -- passes ----------------------------------------------------------------------------------

    def run(self) -> SequentialResult:
        # Each block's release collects the reference cycles of its captured graph. Freezing what exists
        # now (torch, transformers, the model's modules: none of it a block's garbage) keeps those
        # collections to what the run itself makes instead of walking every object of the libraries.
        gc.collect()
        gc.freeze()
        try:
            return self._run()
        finally:
            gc.unfreeze()

    def _run(self) -> SequentialResult:
        tick = time.perf_counter()
        hidden, calls = record_block_inputs(self.model, self.windows, self.device)
        calls = [call.to(self.device, self.compute_dtype) for call in calls]
        self.seconds["block_inputs"] = time.perf_counter() - tick

        tick = time.perf_counter()
        shapes = self._survey(hidden[0], calls) if self.config.compresses_weights else {}
        needs_curves = (self.config.compresses_weights and self.config.allocation == "fisher" and not
                        (self.config.ranks and self.config.param_ratio is None)) or (
            self.kv_layouts is not None and self.config.kv_allocation == "fisher") or self._output_whitening
        # Pass 1 keeps each block's output-gradient covariances on disk for pass 2 (out² floats per projection).
        self._covariances = _ActivationStore(self.offload_folder) if self._output_whitening else None
        try:
            curves, kv_costs = self._cost_curves(hidden, calls, shapes) if needs_curves else ({}, {})
            plan = self._plan(shapes, curves)
            kv_plan = self._kv_plan(kv_costs)
            self.seconds["allocate"] = time.perf_counter() - tick
            self.weights.release_rest(self.prefix)  # pass 2 runs blocks only (done already where pass 1 ran)

            tick = time.perf_counter()
            self._factor(hidden, calls, plan, kv_plan)
            self.seconds["factor"] = time.perf_counter() - tick
        finally:
            if self._covariances is not None:
                self._covariances.close()
        return SequentialResult(plan, kv_plan, shapes, self.seconds)

    @property
    def _output_whitening(self) -> bool:
        return self.config.compresses_weights and self.config.output_whitening == "gradient"

    def _output_root(self, covariances: dict, name: str):
        """R with R·Rᵀ = the damped output-gradient covariance of ``name`` (taken out of ``covariances``)."""
        if name not in covariances:
            return None
        return output_root(covariances.pop(name).to(self.device, torch.float64), self.config.output_damping)

    def _plan(self, shapes, curves) -> RankPlan:
        config = self.config
        return planning.weight_plan(config, shapes, lambda: greedy_plan(
            shapes, lambda name, rank: curves[name][min(rank, len(curves[name]) - 1)], config.param_ratio,
            config.rank_multiple))

    def _kv_plan(self, costs):
        return planning.kv_plan(self.config, self.kv_layouts, self.group_size, lambda: costs, self._storage_dtype.itemsize)

    def _observe(self, index: int, block, inputs: list[torch.Tensor], call: BlockCall, factored=None):
        """Capture block ``index``, observe its projection inputs over ``inputs``; returns the graph and stats.

        With ``factored`` (the names pass 2 will factor) only those and the K/V sources are observed:
        a projection kept dense needs no statistics (a block with none is not observed at all).
        """
        graph = self._graphs.capture(block, self._feed(inputs[0]), call)
        selected, observed = self._block_projections(index, graph, block)
        if factored is not None:
            kv_sources = set(self._kv_sources(index))
            observed = [p for p in observed if p.name in factored or p.name in kv_sources]
        statistics = {}
        needed = self.config.statistics
        if observed and needed:
            observe = InsertObserversPass(group_by_input(observed), needed)
            graph = observe(graph).graph_module
            with torch.no_grad():
                for x in inputs:
                    graph(self._feed(x), *call.args, **call.kwargs)
            RemoveObserversPass()(graph)
            statistics = observe.observers
        return graph, selected, observed, statistics

    def _cost_curves(self, hidden, calls, shapes):
        """Pass 1: every weight projection's and K/V group's loss-cost curve, on the dense model."""
        config = self.config
        store = _ActivationStore(self.offload_folder)
        samples = min(config.sensitivity_samples, len(hidden))
        try:
            current = hidden
            for index, layer in enumerate(tqdm(self.layers, desc="dense pass", disable=not self.progress)):
                store.put(index, current)
                block = self.weights.load(self._name(index, "")[:-1], layer)
                with torch.no_grad():
                    current = [run_block(block, self._feed(x), calls[index]).cpu() for x in current]
                self._release(self._name(index, "")[:-1], layer, self._storage_dtype)
            grads = self._head_gradients(current[:samples])
            del current
            self.weights.release_rest(self.prefix)  # the backward sweep runs blocks only
            curves, kv_costs = {}, {}
            for index in tqdm(range(len(self.layers) - 1, -1, -1), desc="sensitivities", disable=not self.progress):
                layer = self.layers[index]
                prefix = self._name(index, "")[:-1]
                block = self.weights.load(prefix, layer)
                inputs = store.get(index)
                _, selected, observed, statistics = self._observe(index, block, inputs, calls[index])
                self._check_surveyed(index, selected, shapes)
                names = [p.name for p in observed]
                covariance = {p.name for p in selected} if self._output_whitening else set()
                fisher, grads = self._block_fisher(block, prefix, names, inputs[:samples], grads, calls[index], covariance)
                # Kept in float32 (on disk until pass 2); pass 1 factors the same rounded values.
                covariances = {name: fisher.pop(name).float() for name in covariance}
                if covariance:
                    self._covariances.put(index, covariances)
                layouts = self._block_layouts(index)
                for group, scalings in self._scalings(statistics, selected, observed, layouts):
                    for p in group:
                        if p.name not in shapes:
                            continue
                        svd = ScaledSVD.of(projection_weight(self.model.get_submodule(p.name)), scalings[p.name],
                                           self._output_root(covariances, p.name))
                        stats = statistics.get(p.name)
                        # The curve reads XᵀX only for diagonal/identity scalings (whitening already holds it).
                        gram = (stats.gram / stats.count if stats is not None and stats.gram is not None
                                and not isinstance(scalings[p.name], WhiteningScaling) else None)
                        curves[p.name] = loss_cost_curve(svd, fisher.get(p.name), gram).tolist()
                        del svd
                        if not layouts:  # the KV pass reads q/o weights for its metrics
                            self.weights.discard(self.model.get_submodule(p.name))
                if layouts and config.kv_allocation == "fisher":
                    svds = self._kv_svds(layouts, scalings, statistics)
                    kv_costs.update(kv.plan.fisher_kv_costs(layouts, svds, fisher, statistics, self.group_size))
                del statistics, scalings, inputs, covariances
                self._release(prefix, layer, self._storage_dtype)
        finally:
            store.close()
        return curves, kv_costs

    def _head_gradients(self, last_hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """∂(summed token loss)/∂(last block output) per sensitivity window; blocks are bypassed."""
        grads = []
        # Only the hidden state needs a gradient: no weight gradients (the LM head's alone is vocab × hidden).
        flags = {p: p.requires_grad for p in self.model.parameters()}
        for p in flags:
            p.requires_grad_(False)
        try:
            for position, h in enumerate(last_hidden):
                grads.append(self._head_gradient(position, h))
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        return grads

    # Logits elements per head-gradient chunk: the loss's logits, softmax and their gradients are a
    # few copies of (tokens × vocab) floats, ~0.4 GiB for a 512-token window at a 32k vocab in one go.
    head_chunk_elements = 2**22

    def _head_gradient(self, position: int, h: torch.Tensor) -> torch.Tensor:
        """∂(Σ token losses)/∂h for one window, over chunks of positions.

        With the blocks bypassed, each token's loss depends on its own position's hidden state only,
        so the window splits into chunks that overlap by one position (a chunk's last position only
        feeds the next chunk's first prediction) and the gradients add up to the whole window's.
        """
        layers = self.layers
        ids = self.windows[position][None].to(self.device)
        h = h.to(self.device, self._storage_dtype)
        grad = torch.zeros_like(h)
        chunk = max(8, self.head_chunk_elements // int(self.model.config.vocab_size))
        leaf = None

        def make_forward(index):
            def forward(hidden_states, *args, **kwargs):
                return leaf if index == len(layers) - 1 else hidden_states

            return forward

        with _patched_forwards(layers, make_forward):
            for start in range(0, ids.shape[1] - 1, chunk):
                stop = min(start + chunk, ids.shape[1] - 1) + 1  # predicts tokens start+1 … stop-1
                leaf = h[:, start:stop].detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = self.model(input_ids=ids[:, start:stop], labels=ids[:, start:stop], use_cache=False).loss
                    (loss * (stop - start - 1)).backward()
                grad[:, start:stop] += leaf.grad
        return grad.cpu()

    def _block_fisher(self, block, prefix, names, inputs, grads, call, covariance=frozenset()):
        """Diagonal Fisher of each named projection's output in one block (for names in ``covariance``
        the whole matrix E[g·gᵀ]), and the gradient at the block's input."""
        sums: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(name):
            def record(grad):
                flat = gradient_moment(grad, name in covariance).cpu()
                sums[name] = flat if name not in sums else sums[name] + flat

            def hook(module, args, output):
                if output.requires_grad:
                    output.register_hook(record)

            return hook

        for name in names:
            handles.append(self.model.get_submodule(name).register_forward_hook(make_hook(name)))
        flags = {p: p.requires_grad for p in block.parameters()}
        previous = []
        tokens = 0
        try:
            for p in block.parameters():
                p.requires_grad_(False)
            for x, grad in zip(inputs, grads):
                leaf = self._feed(x).detach().requires_grad_(True)
                with torch.enable_grad():
                    out = run_block(block, leaf, call)
                    out.backward(grad.to(out.device, out.dtype))
                previous.append(leaf.grad.detach().cpu())
                tokens += x.shape[1] - 1
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
        missing = [name for name in names if name not in sums]
        if missing:
            raise RuntimeError(f"No gradient reached {missing[:3]}")
        return {name: value / tokens for name, value in sums.items()}, previous

    def _scalings(self, statistics: dict, selected, observed, layouts):
        """(projections reading one input, their scalings), one input at a time, each dropped when done.

        Only one input's whitening factor is then alive at a time (a 5632² one is 254 MB). With latent
        K/V in the block, every observed input's scaling is built at once and kept: the KV pass reads
        them after the weight projections.
        """
        consume = self._consumable(statistics, layouts)
        config = self.config
        if layouts:
            scalings = shared_scalings(config.method, statistics, [p.name for p in observed], config.alpha,
                                       config.asvd_statistic, consume)
            yield selected, scalings
            return
        groups: dict[int, list] = {}
        for p in selected:
            groups.setdefault(id(statistics.get(p.name)), []).append(p)
        for group in groups.values():
            scalings = shared_scalings(config.method, statistics, [p.name for p in group], config.alpha,
                                       config.asvd_statistic, consume)
            yield group, scalings
            scalings.clear()  # the caller's loop variable still names the dict; its factors go now

    def _consumable(self, statistics: dict, layouts):
        """Whether nothing reads an observer's Gram matrix once whitening has factored it (then the
        factor takes over its buffer). Kept for the inputs of latent K/V (their output-side metric and
        costs read XᵀX)."""
        keep = {id(statistics.get(layout.source(role))) for layout in layouts or () for role in kv.plan.ROLES}
        return lambda stats: id(stats) not in keep

    def _calibrate_kv_quantizers(self, layouts, bits: int, run) -> None:
        attentions = [self.model.get_submodule(layout.name) for layout in layouts]
        with torch.no_grad():
            kv.quant.calibrate_latent_quantizers(attentions, run, bits, self.config.kv_quant_granularity,
                                                 self.config.kv_quant_rotate, self.config.seed)

    def _kv_svds(self, layouts, scalings, statistics):
        sources = {l.source(r) for l in layouts for r in kv.plan.ROLES}
        grams = planning.mean_grams(statistics, sources) if self.config.kv_output_metric else None
        return kv.group_svds(self.model, layouts, scalings, self.group_size, grams)

    def _factor(self, hidden, calls, plan: RankPlan, kv_plan) -> None:
        """Pass 2: factor each block with the planned ranks and produce the next block's inputs."""
        config = self.config
        current = hidden
        factored = plan.factored
        for index, layer in enumerate(tqdm(self.layers, desc="compress blocks", disable=not self.progress)):
            prefix = self._name(index, "")[:-1]
            block = self.weights.load(prefix, layer)
            call = calls[index]
            graph, selected, observed, statistics = self._observe(index, block, current, call, factored)
            self._check_surveyed(index, selected, plan.shapes)
            selected = [p for p in selected if p.name in factored]  # the projections factored below
            layouts = self._block_layouts(index)
            if not config.sequential_calibration:
                with torch.no_grad():  # the dense block's outputs feed the next block
                    dense_outputs = [graph(self._feed(x), *call.args, **call.kwargs).cpu() for x in current]
            replacements, scalings = {}, {}
            covariances = self._covariances.get(index) if self._output_whitening else {}
            for group, scalings in self._scalings(statistics, selected, observed, layouts):
                for p in group:
                    rank = plan.ranks.get(p.name)
                    if rank is None:
                        continue
                    dense = self.model.get_submodule(p.name)
                    weight = projection_weight(dense)
                    svd = ScaledSVD.of(weight, scalings[p.name], self._output_root(covariances, p.name))
                    down, up = svd.factors(rank)
                    del svd
                    replacements[p.name] = LowRankLinear.from_factors(
                        down, up, getattr(dense, "bias", None), dtype=weight.dtype, device=weight.device,
                        interpolative=plan.shapes[p.name].interpolative)
                    del weight, down, up
                    if not layouts:
                        # Nothing reads the dense weight again (the graph's node for it is rewritten
                        # below): one projection's dense and factored copies are alive at a time.
                        self.weights.discard(dense)
            relative = {name[len(prefix) + 1:]: module for name, module in replacements.items()}
            if layouts:
                svds = self._kv_svds(layouts, scalings, statistics)
                for name, module in relative.items():
                    replace_module(block, name, module)
                kv.apply_kv_plan(self.model, layouts, kv_plan, svds)
                step = lambda x: run_block(block, x, call)  # noqa: E731  (the latent attention runs eagerly)
                if kv_plan.bits is not None:  # the cache's scales, on the inputs this block will see
                    self._calibrate_kv_quantizers(layouts, kv_plan.bits, lambda: [step(self._feed(x)) for x in current])
            else:
                projections = {p.name[len(prefix) + 1:]: p for p in selected}
                for p in projections.values():
                    p.name = p.name[len(prefix) + 1:]
                LowRankRewritePass(list(projections.values()), relative)(graph)
                step = lambda x, g=graph: g(x, *call.args, **call.kwargs)  # noqa: E731  (the rewritten graph executes)
                for name, module in relative.items():
                    replace_module(block, name, module)
            if config.sequential_calibration:
                with torch.no_grad():
                    current = [step(self._feed(x)).cpu() for x in current]
            else:
                current = dense_outputs
            del graph, statistics, scalings, replacements
            if self.on_block_done is not None:
                self.on_block_done(prefix, self.layers[index])
            self._release(prefix, self.layers[index], self._storage_dtype)
