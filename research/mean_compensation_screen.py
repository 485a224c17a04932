"""Screen of mean compensation on the whole path: a bias b = (W − Ŵ)·E[x] added to each factored
projection (``bias``), or the whitening Gram centered first so the SVD fits the covariance and the
bias the mean (``centered``, the optimum of E‖Wx − Ŵx − b‖²); ``ow`` adds output whitening with damping λ.
Validation and test perplexity as in ``output_whitening_screen.py``. A research screen, not an API.

    python research/mean_compensation_screen.py ow 0.03 0.8 bias,centered
Results of 2026-11-26: research/results/output_whitening_screen.log
"""

import json
import sys
import time

import torch

from screen_common import DATA, load, restore_dense, reuse_output_fisher, validation_perplexity

from asvd_passes import ASVDConfig, perplexity  # noqa: E402  (screen_common puts this checkout first)
from asvd_passes.modules import LowRankLinear
from asvd_passes.pipelines import whole

ow = sys.argv[1] == "ow"
lam = float(sys.argv[2])
ratios = [float(x) for x in sys.argv[3].split(",")]
modes = sys.argv[4].split(",")  # plain, bias, centered

comp, model, tok, calib, held = load()

# Signed input mean of every projection over the calibration windows.
sums, counts, handles = {}, {}, []
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear) and name != "lm_head":
        def pre(m, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(module.register_forward_pre_hook(pre))
with torch.no_grad():
    for w in calib:
        model(input_ids=w[None], use_cache=False)
for handle in handles:
    handle.remove()
mu = {n: sums[n] / counts[n] for n in sums}

original_shared = whole.shared_scalings
center = {"on": False}


def shared(method, statistics, names, *args, **kwargs):
    """``shared_scalings`` on the centered Gram (XᵀX − n·μμᵀ) when ``center`` is on."""
    if center["on"]:
        done = set()
        for n in names:
            stats = statistics.get(n)
            if stats is not None and id(stats) not in done and stats.gram is not None:
                done.add(id(stats))
                stats.gram -= stats.count * torch.outer(mu[n], mu[n])
    return original_shared(method, statistics, names, *args, **kwargs)


whole.shared_scalings = shared
reuse_output_fisher()

base = dict(method="whiten", allocation="fisher", pipeline="whole", seqlen=512, lowrank_form="pair")
if ow:
    base.update(output_whitening="gradient", sensitivity_samples=16, output_damping=lam)
for mode in modes:
    t = time.time()
    center["on"] = mode == "centered"
    analysis = comp.analyze(ASVDConfig(param_ratio=0.8, **base), calibration=calib, progress=False)
    dense = {n: model.get_submodule(n) for n in analysis.shapes}
    for r in ratios:
        rep = comp.apply(analysis, ASVDConfig(param_ratio=r, **base), progress=False)
        if mode in ("bias", "centered"):
            with torch.no_grad():
                for n, d in dense.items():
                    factored = model.get_submodule(n)
                    if isinstance(factored, LowRankLinear):
                        error = d.weight.double() - factored.up.weight.double() @ factored.down.weight.double()
                        b = error @ mu[n]
                        if factored.up.bias is not None:
                            b = b + factored.up.bias.double()
                        factored.up.bias = torch.nn.Parameter(b.to(factored.up.weight.dtype))
        v = validation_perplexity(model, held)
        te = perplexity(model, tok, DATA + "wiki.test.raw", 512, 30, progress=False)["ppl"]
        print(json.dumps(dict(ow=ow, lam=lam, mode=mode, ratio=r, val=v, test=te, achieved=rep.selected_ratio,
                              s=time.time() - t)), flush=True)
        restore_dense(model, dense)
    del analysis
