"""Screen of `ASVDConfig(output_whitening="gradient")` choices on the whole path, selected on validation perplexity.

Varies the damping λ of G = E[g·gᵀ], the labels the gradients use (``data``: the calibration text's
next tokens, the empirical Fisher the library uses; ``sampled``: labels drawn from the model's own
predictions, the true Fisher / Gauss-Newton) and the shrinkage target (``identity``: λ·mean(diag G)·I,
the library's; ``diag``: λ·diag G). Each row prints validation perplexity (30 windows of
wiki.valid.tokens that touch no calibration window) and test perplexity (the usual protocol).
A research screen that patches the whole pipeline's internals, not a supported API.

    python research/output_whitening_screen.py data 0.1,0.01,0.03,0.3,1.0 0.8
    python research/output_whitening_screen.py sampled 0.03,0.1 0.8 1
Results of 2026-11-26: research/results/output_whitening_screen.log
"""

import json
import sys
import time

import torch
import torch.nn.functional as F

from screen_common import DATA, load, restore_dense, reuse_output_fisher, validation_perplexity

from asvd_passes import ASVDConfig, perplexity  # noqa: E402  (screen_common puts this checkout first)
from asvd_passes.allocation.sensitivity import gradient_moment
from asvd_passes.pipelines import whole

labels_mode = sys.argv[1]  # data | sampled
lambdas = [float(x) for x in sys.argv[2].split(",")]
ratios = [float(x) for x in sys.argv[3].split(",")]
samples_per_token = int(sys.argv[4]) if len(sys.argv) > 4 else 1
shrink = sys.argv[5] if len(sys.argv) > 5 else "identity"  # identity | diag


def fisher_sampled(model, names, windows, progress=True, covariance=False):
    """``output_fisher`` with each position's label drawn from the model's own prediction (true Fisher)."""
    sums = {n: None for n in names}
    tokens, handles = 0, []

    def make_hook(name):
        def record(g):
            moment = gradient_moment(g, covariance)
            sums[name] = moment if sums[name] is None else sums[name] + moment

        def hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(record)

        return hook

    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
        handles.append(model.get_submodule(n).register_forward_hook(make_hook(n)))
    generator = torch.Generator().manual_seed(1)
    for row in windows:
        for _ in range(samples_per_token):
            with torch.enable_grad():
                logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
                labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator)[:, 0]
                F.cross_entropy(logits, labels, reduction="sum").div(samples_per_token ** 0.5).backward()
        tokens += row.numel() - 1
    for handle in handles:
        handle.remove()
    for p, flag in requires.items():
        p.grad = None
        p.requires_grad_(flag)
    return {n: v / tokens for n, v in sums.items()}


def root_toward_diagonal(g, damping):
    """Lower Cholesky factor of G + damping·diag G (shrinkage toward the diagonal, not the identity)."""
    g = g.double()
    damped = g + torch.diag(damping * g.diagonal().clamp_min(1e-30 * g.diagonal().mean()))
    return torch.linalg.cholesky(damped)


comp, model, tok, calib, held = load()
reuse_output_fisher(fisher_sampled if labels_mode == "sampled" else None,
                    log=lambda line: print(line.replace("fisher", f"fisher {labels_mode}"), flush=True))
if shrink == "diag":
    whole.output_root = root_toward_diagonal

print(json.dumps(dict(dense_val=validation_perplexity(model, held))), flush=True)
base = dict(method="whiten", allocation="fisher", pipeline="whole", output_whitening="gradient", sensitivity_samples=16,
            seqlen=512, lowrank_form="pair")
for lam in lambdas:
    t = time.time()
    analysis = comp.analyze(ASVDConfig(param_ratio=0.8, output_damping=lam, **base), calibration=calib, progress=False)
    dense_modules = {n: model.get_submodule(n) for n in analysis.shapes}
    for r in ratios:
        rep = comp.apply(analysis, ASVDConfig(param_ratio=r, output_damping=lam, **base), progress=False)
        v = validation_perplexity(model, held)
        te = perplexity(model, tok, DATA + "wiki.test.raw", 512, 30, progress=False)["ppl"]
        print(json.dumps(dict(labels=labels_mode, shrink=shrink, spt=samples_per_token, lam=lam, ratio=r, val=v, test=te,
                              achieved=rep.selected_ratio, s=time.time() - t)), flush=True)
        restore_dense(model, dense_modules)
    del analysis
