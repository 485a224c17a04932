"""Screen of `--output-whitening gradient` choices on the whole path, selected on validation perplexity.

Varies the damping λ of G = E[g·gᵀ], the labels the gradients use (``data``: the calibration text's
next tokens, the empirical Fisher the library uses; ``sampled``: labels drawn from the model's own
predictions, the true Fisher / Gauss-Newton) and the shrinkage target (``identity``: λ·mean(diag G)·I,
the library's; ``diag``: λ·diag G). Each row prints validation perplexity (30 windows of
wiki.valid.tokens that touch no calibration window) and test perplexity (the usual protocol).
A research screen that patches the whole pipeline's internals, not a supported API.

    python benchmarks/output_whitening_screen.py data 0.1,0.01,0.03,0.3,1.0 0.8
    python benchmarks/output_whitening_screen.py sampled 0.03,0.1 0.8 1
Results of 2026-11-26: benchmarks/results/output_whitening_screen.log
"""
import json, math, sys, time
import torch, torch.nn.functional as F
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from asvd_passes import ASVDCompressor, ASVDConfig, perplexity
from asvd_passes.pipelines import whole as whole_mod
from asvd_passes.allocation.sensitivity import gradient_moment
from asvd_passes.data import read_text, tokenize, random_windows
from asvd_passes.modules import replace_module

DATA = str(ROOT.parent / "shared" / "data" / "wikitext-2") + "/"
labels_mode = sys.argv[1]          # data | sampled
lambdas = [float(x) for x in sys.argv[2].split(",")]
ratios = [float(x) for x in sys.argv[3].split(",")]
samples_per_token = int(sys.argv[4]) if len(sys.argv) > 4 else 1
shrink = sys.argv[5] if len(sys.argv) > 5 else "identity"

comp = ASVDCompressor.from_pretrained(None)
model, tok = comp.model, comp.tokenizer
valid = tokenize(tok, read_text(DATA + "wiki.valid.tokens"))
calib = random_windows(valid, 16, 512, 0, "calib")
gen = torch.Generator().manual_seed(0)
starts = torch.randint(0, valid.numel() - 512, (16,), generator=gen).tolist()
# held-out validation windows: non-overlapping 512 windows that do not touch any calibration window
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

def fisher_sampled(model, names, windows, progress=True, covariance=False):
    sums = {n: None for n in names}; tokens = 0; handles = []
    def mk(name):
        def record(g):
            f = gradient_moment(g, covariance)
            sums[name] = f if sums[name] is None else sums[name] + f
        def hook(mod, i, o):
            if o.requires_grad: o.register_hook(record)
        return hook
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters(): p.requires_grad_(False)
    for n in names:
        for p in model.get_submodule(n).parameters(): p.requires_grad_(True)
        handles.append(model.get_submodule(n).register_forward_hook(mk(n)))
    g = torch.Generator().manual_seed(1)
    for row in windows:
        for s in range(samples_per_token):
            with torch.enable_grad():
                logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
                y = torch.multinomial(logits.detach().softmax(-1), 1, generator=g)[:, 0]
                F.cross_entropy(logits, y, reduction="sum").div(samples_per_token ** 0.5).backward()
        tokens += row.numel() - 1
    for h in handles: h.remove()
    for p, f in req.items(): p.grad = None; p.requires_grad_(f)
    return {n: v / tokens for n, v in sums.items()}

original = whole_mod.output_fisher
cache = {}
def cached_fisher(model, names, windows, progress=True, covariance=False):
    key = (tuple(names), covariance)
    if key not in cache:
        t = time.time()
        fn = fisher_sampled if labels_mode == "sampled" and covariance else original
        cache[key] = fn(model, names, windows, progress=False, covariance=covariance)
        print(f"# fisher {labels_mode} covariance={covariance} {time.time()-t:.0f}s", flush=True)
    return {k: v.clone() for k, v in cache[key].items()}
whole_mod.output_fisher = cached_fisher
def root_diag(g, damping):
    g = g.double()
    damped = g + torch.diag(damping * g.diagonal().clamp_min(1e-30 * g.diagonal().mean()))
    return torch.linalg.cholesky(damped)
if shrink == "diag":
    whole_mod.output_root = root_diag

print(json.dumps(dict(dense_val=val_ppl(model))), flush=True)
base = dict(method="whiten", allocation="fisher", pipeline="whole", output_whitening="gradient", sensitivity_samples=16,
            seqlen=512)
for lam in lambdas:
    t = time.time()
    cfg = ASVDConfig(param_ratio=0.8, output_damping=lam, **base)
    analysis = comp.analyze(cfg, calibration=calib, progress=False)
    dense_modules = {n: model.get_submodule(n) for n in analysis.shapes}
    for r in ratios:
        rep = comp.apply(analysis, ASVDConfig(param_ratio=r, output_damping=lam, **base), progress=False)
        v = val_ppl(model)
        te = perplexity(model, tok, DATA + "wiki.test.raw", 512, 30, progress=False)["ppl"]
        print(json.dumps(dict(labels=labels_mode, shrink=shrink, spt=samples_per_token, lam=lam, ratio=r, val=v, test=te,
                              achieved=rep.selected_ratio, s=time.time() - t)), flush=True)
        for n, m in dense_modules.items(): replace_module(model, n, m)
        if hasattr(model.config, "quantization_config"): del model.config.quantization_config
    del analysis
