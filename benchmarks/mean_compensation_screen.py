"""Screen of mean compensation on the whole path: a bias b = (W − Ŵ)·E[x] added to each factored
projection (``bias``), or the whitening Gram centered first so the SVD fits the covariance and the
bias the mean (``centered``, the optimum of E‖Wx − Ŵx − b‖²); ``ow`` adds output whitening with damping λ.
Validation and test perplexity as in ``output_whitening_screen.py``. A research screen, not an API.

    python benchmarks/mean_compensation_screen.py ow 0.03 0.8 bias,centered
Results of 2026-11-26: benchmarks/results/output_whitening_screen.log
"""
import json, math, os, sys, time
import torch, torch.nn.functional as F
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from asvd_passes import ASVDCompressor, ASVDConfig, perplexity
from asvd_passes.pipelines import whole as whole_mod
from asvd_passes.data import read_text, tokenize, random_windows
from asvd_passes.modules import replace_module, LowRankLinear, projection_weight

DATA = str(ROOT.parent / "shared" / "data" / "wikitext-2") + "/"
ow = sys.argv[1] == "ow"
lam = float(sys.argv[2])
ratios = [float(x) for x in sys.argv[3].split(",")]
modes = sys.argv[4].split(",")  # plain, bias, centered

comp = ASVDCompressor.from_pretrained(None)
model, tok = comp.model, comp.tokenizer
valid = tokenize(tok, read_text(DATA + "wiki.valid.tokens"))
calib = random_windows(valid, 16, 512, 0, "calib")
gen = torch.Generator().manual_seed(0)
starts = torch.randint(0, valid.numel() - 512, (16,), generator=gen).tolist()
held = []
for i in range(valid.numel() // 512):
    a, b = i * 512, (i + 1) * 512
    if all(b <= s or a >= s + 512 for s in starts):
        held.append(valid[a:b])
held = torch.stack(held[-30:])

@torch.no_grad()
def val_ppl(m):
    nll, n = 0.0, 0
    for w in held:
        logits = m(input_ids=w[None], use_cache=False).logits.float()
        nll += F.cross_entropy(logits[0, :-1], w[1:], reduction="sum").item(); n += 511
    return math.exp(nll / n)

# signed input means of every linear over the calibration windows
sums, counts, hs = {}, {}, []
for name, mod in model.named_modules():
    if isinstance(mod, torch.nn.Linear) and name != "lm_head":
        def pre(m, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.sum(0); counts[name] = counts.get(name, 0) + x.shape[0]
        hs.append(mod.register_forward_pre_hook(pre))
with torch.no_grad():
    for w in calib: model(input_ids=w[None], use_cache=False)
for h in hs: h.remove()
mu = {n: sums[n] / counts[n] for n in sums}

original_shared = whole_mod.shared_scalings
center = {"on": False}
def shared(method, statistics, names, *a, **k):
    if center["on"]:
        done = set()
        for n in names:
            st = statistics.get(n)
            if st is not None and id(st) not in done and st.gram is not None:
                done.add(id(st)); m = mu[n]
                st.gram -= st.count * torch.outer(m, m)
    return original_shared(method, statistics, names, *a, **k)
whole_mod.shared_scalings = shared

orig_fisher = whole_mod.output_fisher
cache = {}
def cached_fisher(model, names, windows, progress=True, covariance=False):
    key = (tuple(names), covariance)
    if key not in cache:
        cache[key] = orig_fisher(model, names, windows, progress=False, covariance=covariance)
    return {k: v.clone() for k, v in cache[key].items()}
whole_mod.output_fisher = cached_fisher

base = dict(method="whiten", allocation="fisher", pipeline="whole", seqlen=512)
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
                    lr = model.get_submodule(n)
                    if isinstance(lr, LowRankLinear):
                        W = d.weight.double(); What = lr.up.weight.double() @ lr.down.weight.double()
                        b = (W - What) @ mu[n]
                        if lr.up.bias is not None: b = b + lr.up.bias.double()
                        lr.up.bias = torch.nn.Parameter(b.to(lr.up.weight.dtype))
        v = val_ppl(model)
        te = perplexity(model, tok, DATA + "wiki.test.raw", 512, 30, progress=False)["ppl"]
        print(json.dumps(dict(ow=ow, lam=lam, mode=mode, ratio=r, val=v, test=te, achieved=rep.selected_ratio,
                              s=time.time() - t)), flush=True)
        for n, m in dense.items(): replace_module(model, n, m)
        if hasattr(model.config, "quantization_config"): del model.config.quantization_config
    del analysis
