"""Shared fixtures: tiny random-weight causal LMs (fp32, eval mode, seeded) of twelve families.

Each model has 2 decoder layers, hidden size 32, MLP width 64 and a 128-token vocabulary, so a
whole capture → calibrate → decompose → save round trip takes well under a second on a CPU.
The Llama-like families use grouped-query attention (2 KV heads for 4 query heads); GPT-2 has
``Conv1D`` projections with a fused ``c_attn``; Phi-3 fuses ``qkv_proj`` and ``gate_up_proj``;
OPT has biases and learned positions. Llama, Qwen3, OPT and GPT-2 tie the LM head to the input
embedding, Mistral, Qwen2 and Phi-3 do not. The families added with the adapter table
(``asvd_passes/families.py``):

- ``llama3``: Llama with ``rope_type`` llama3 scaling (original context 16, so it changes frequencies);
- ``olmo2``: q/k RMSNorm over the whole projection;
- ``gpt_neox``: fused ``query_key_value`` interleaved per head, partial rotary (half of each head),
  parallel attention and MLP, biases, untied head;
- ``gemma2``: attention logit softcapping (0.5, so that it bites), ``query_pre_attn_scalar``, alternating
  sliding (window 8) / full layers, head_dim 16 ≠ hidden / heads, tied embeddings;
- ``gemma3``: the text model: per-head q/k norms, sliding (window 8) / full layers with their own
  RoPE bases, head_dim 16 ≠ hidden / heads, tied embeddings.

Mistral also gets a sliding window of 8, shorter than the test sequences (the default 4096 never bites).
Gemma 2/3 use ``initializer_range`` 0.2 so that scores are large enough for softcapping and the
windows to change the logits.
"""

from __future__ import annotations

import copy
import gc
import json
import os
from pathlib import Path

# One OpenMP thread per test process (set before torch loads, so subprocesses inherit it too): the models
# here are tiny, and on a busy 2-core machine OpenMP's spinning workers made 64-wide matmuls take 15 ms and
# tiny tests 10-40 s. Real-model tests get the process's share of the cores back (``torch_threads``).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch
from torch import nn

WIKITEXT = Path(os.environ.get("ASVD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "wikitext-2"

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "phi3", "llama3", "olmo2", "gpt_neox", "gemma2", "gemma3")
SLIDING_WINDOW = 8  # shorter than the test sequences
VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
TIED = {"llama": True, "mistral": False, "qwen2": False, "qwen3": True, "phi3": False, "llama3": True, "olmo2": False}


def tiny_config(family: str):
    """A 2-layer config of ``family`` with random-init-friendly sizes."""
    from transformers import AutoConfig

    special = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if family in TIED:
        kwargs = dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=TIED[family],
            **special,
        )
        if family == "qwen3":
            kwargs["head_dim"] = 8
        if family == "mistral":
            kwargs["sliding_window"] = SLIDING_WINDOW
        if family == "llama3":
            kwargs["rope_parameters"] = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=16)
            return AutoConfig.for_model("llama", **kwargs)
        return AutoConfig.for_model(family, **kwargs)
    if family in ("gemma2", "gemma3"):
        kwargs = dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"], initializer_range=0.2, **special,
        )
        if family == "gemma2":
            return AutoConfig.for_model("gemma2", attn_logit_softcapping=0.5, query_pre_attn_scalar=12, **kwargs)
        return AutoConfig.for_model("gemma3_text", query_pre_attn_scalar=12, **kwargs)
    if family == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5, use_parallel_residual=True,
            tie_word_embeddings=False, **special,
        )
    if family == "opt":
        return AutoConfig.for_model(
            "opt",
            vocab_size=VOCAB,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **special,
        )
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2", vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=128, **special
        )
    raise ValueError(f"no tiny config for {family!r}")


def make_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh eval-mode model of ``family``; the same seed gives bit-identical weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.to(dtype).eval()


def word_tokenizer():
    """A word-level tokenizer over w3 … w127 (ids 3 … 127, 0 = <unk>): what tools that save a tokenizer need."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(3, 128)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words, start=3)} | {"<unk>": 0}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>"), words


def token_batch(samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Seeded token ids in [3, VOCAB): never a pad/BOS/EOS token."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (samples, seqlen), generator=generator)


def torch_step_logits(model: nn.Module, ids: torch.Tensor, prefill: int):
    """Logits (numpy) of a ``prefill``-token forward, then one decode step per remaining token, with the cache."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1).numpy()


def ort_step_logits(runtime, ids: torch.Tensor, prefill: int):
    """The same steps through an ``ORTCausalLM``: (logits, the last step's present cache)."""
    import numpy as np

    batch = ids.shape[0]
    mask = np.ones((batch, prefill), dtype=np.int64)
    positions = np.tile(np.arange(prefill), (batch, 1))
    logits, past = runtime.forward(ids[:, :prefill].numpy(), mask, positions, runtime.empty_cache(batch))
    got = [logits]
    for t in range(prefill, ids.shape[1]):
        mask = np.ones((batch, t + 1), dtype=np.int64)
        logits, past = runtime.forward(ids[:, t : t + 1].numpy(), mask, np.full((batch, 1), t), past)
        got.append(logits)
    return np.concatenate(got, axis=1), past


def linear_projections(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of every ``nn.Linear`` / transformers ``Conv1D``, by walking modules."""
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            found[name] = (module.weight.shape[0], module.nf)  # Conv1D stores its weight in × out
    return found


def compute_matmul_nbits_in_float(onnx_dir: Path) -> int:
    """Check every MatMulNBits of the export in ``onnx_dir`` carries the builder's CPU accuracy level (4: int8
    activations), then set level 0 (float compute) and save, so ORT's logits can be compared exactly with the
    PyTorch model that computes with the same dequantized weights. Returns the number of nodes changed."""
    import onnx

    from exporters.onnx_export import MODEL_FILE

    proto = onnx.load(str(Path(onnx_dir) / MODEL_FILE))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    for node in nodes:
        level = next(a for a in node.attribute if a.name == "accuracy_level")
        assert level.i == 4, f"{node.name}: accuracy_level {level.i}"
        level.i = 0
    onnx.save(proto, str(Path(onnx_dir) / MODEL_FILE))
    return len(nodes)


def assert_ort_computes_the_grid(model: nn.Module, onnx_dir: Path, ids: torch.Tensor) -> int:
    """Set the export's MatMulNBits to float compute (:func:`compute_matmul_nbits_in_float`), then check ORT's
    logits on ``ids`` equal the PyTorch model's (which holds the same dequantized weights) within 1e-4 of their
    scale. Returns the number of MatMulNBits nodes."""
    import numpy as np

    from exporters import ORTCausalLM

    nodes = compute_matmul_nbits_in_float(onnx_dir)
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    got = ORTCausalLM(onnx_dir, threads=1).logits(ids.numpy())
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    return nodes

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pytest-xdist processes sharing the cores
REAL_MODEL_THREADS = max(1, CPUS // WORKERS)


def pytest_configure(config):
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already fixed once parallel work ran (only when pytest runs in-process twice)
        pass


# Session fixtures that are expensive to build → the xdist group of every test that uses them (directly or
# through another fixture; the first match wins): under ``--dist loadgroup`` those tests share one worker,
# so each is built once. ``task_dir`` (tests/test_zero_shot.py) stands for lm-eval's per-process index of
# its ~15k built-in tasks and the tiny folders the zero-shot tests evaluate.
SHARED_BUILDS = {"smollm2_09_kv05": "smollm2-09-kv05", "task_dir": "lm-eval"}


# Module fixtures that export one tiny model per family (tests/exporters): a test that takes one runs in the
# group of its ``family`` parameter (llama where it has none), so each family is compressed and exported on
# one worker, and the families spread over the workers.
PER_FAMILY_BUILDS = ("exported", "genai_exported")


def pytest_itemcollected(item):
    names = getattr(item, "fixturenames", ())
    for fixture, group in SHARED_BUILDS.items():
        if fixture in names:
            item.add_marker(pytest.mark.xdist_group(group))
            return
    if any(fixture in names for fixture in PER_FAMILY_BUILDS):
        callspec = getattr(item, "callspec", None)
        family = callspec.params.get("family", "llama") if callspec is not None else "llama"
        item.add_marker(pytest.mark.xdist_group(f"exports-{family}"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Give grouped items their ``@group`` node id suffix, which ``--dist loadgroup`` schedules by.

    pytest-xdist 3.8 sets it through ``item._nodeid``, which pytest 9.2 no longer reads (node ids live in
    ``item._id``), so its groups were silently ignored; without this, every xdist worker built the SmolLM2
    fixture. No-op where xdist already renamed the item or where loadgroup is off.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId  # pytest >= 9.2
    except ImportError:
        return
    for item in items:
        group = item.get_closest_marker("xdist_group")
        if group is not None and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{group.args[0] if group.args else group.kwargs.get('name', 'default')}")


@pytest.fixture(autouse=True)
def frozen_heap():
    """Collect what the previous test left in reference cycles, then freeze every surviving object.

    The sequential pipeline calls ``gc.collect()`` after every block; a full collection walks every object
    of torch, transformers, sympy and the earlier tests, 0.5 s each in a pytest process, which was most of a
    tiny compress run. Frozen objects are skipped by the collector, so a collection walks only what the
    running test made (the product pays the same walk: reported, not changed here).
    """
    gc.collect()  # walks only the objects made since the last freeze
    gc.freeze()
    yield


@pytest.fixture(autouse=True)
def torch_threads(request):
    """Every test runs on one intra-op thread, except real-model tests, which get this process's share of the
    cores (all of them without xdist, one each under ``-n 2`` on 2 cores)."""
    threads = REAL_MODEL_THREADS if request.node.get_closest_marker("real_model") else 1
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(1)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(family, seed=0, dtype=torch.float32)`` → new eval-mode model."""
    return make_tiny_model


class CompressedTinyModels:
    """Session cache of compressed tiny models: each (family, seed, calibration, settings) is compressed once;
    every call hands out a deep copy, so a test may change, move or monkeypatch its model freely.

    ``compressed_tiny(family, calibration=(samples, seqlen, seed), seed=0, **asvd_config)`` →
    ``(model, report)``: ``make_tiny_model(family, seed)`` compressed in memory by ``ASVDCompressor.compress``
    with ``ASVDConfig(**asvd_config)`` on ``token_batch(*calibration)``. Compression is seeded and
    bit-identical run to run (tests/test_ranks.py), so a copy is what a fresh run would give.
    """

    def __init__(self):
        self._built = {}

    def __call__(self, family: str, calibration: tuple[int, int, int] = (4, 16, 9), seed: int = 0, **config):
        from asvd_passes import ASVDCompressor, ASVDConfig

        settings = json.dumps(ASVDConfig(**config).to_dict(), sort_keys=True, default=str)  # defaults filled in
        key = (family, seed, tuple(calibration), settings)
        if key not in self._built:
            model = make_tiny_model(family, seed)
            report = ASVDCompressor(model).compress(ASVDConfig(**config), calibration=token_batch(*calibration),
                                                    progress=False)
            self._built[key] = (model, report)
        model, report = self._built[key]
        return copy.deepcopy(model), copy.deepcopy(report)


@pytest.fixture(scope="session")
def compressed_tiny() -> CompressedTinyModels:
    """See ``CompressedTinyModels``: compressed tiny models built once per session (per xdist worker)."""
    return CompressedTinyModels()


@pytest.fixture
def tokens():
    """Factory: ``tokens(samples, seqlen, seed=0)`` → (samples, seqlen) token ids."""
    return token_batch


@pytest.fixture
def projections_of():
    """Factory: ``projections_of(model)`` → ``{name: (in, out)}`` of its Linear/Conv1D modules."""
    return linear_projections


@pytest.fixture
def step_logits():
    """``(torch_step_logits, ort_step_logits)``: prefill then one-token decode steps, PyTorch and ORT."""
    return torch_step_logits, ort_step_logits


@pytest.fixture(scope="session")
def smollm2_09_kv05(tmp_path_factory):
    """The real SmolLM2 with --param-ratio 0.9 --kv-ratio 0.5 (whiten, 4 calibration windows), compressed once per
    session for every real-model test that needs *a* compressed model: (model, tokenizer, folder)."""
    valid = WIKITEXT / "wiki.valid.tokens"
    if not valid.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"WikiText-2 data missing at {WIKITEXT}")
        pytest.skip(f"WikiText-2 data not found at {WIKITEXT}")
    from asvd_passes import ASVDCompressor, ASVDConfig

    torch.set_num_threads(REAL_MODEL_THREADS)  # session fixtures are set up before the autouse torch_threads
    folder = tmp_path_factory.mktemp("smollm2-09-kv05") / "compressed"
    compressor = ASVDCompressor.from_pretrained(None)
    config = ASVDConfig(method="whiten", param_ratio=0.9, kv_ratio=0.5, calibration=str(valid),
                        calib_samples=4, seqlen=512, seed=0)
    compressor.compress(config, save_dir=folder, progress=False)
    return compressor.model, compressor.tokenizer, folder
