"""Zero-shot accuracy of a (compressed) model through EleutherAI's lm-evaluation-harness.

Why: compression papers (ASVD, SVD-LLM) report lm-eval zero-shot accuracy (PIQA, ARC, HellaSwag,
...) beside perplexity, and perplexity alone hides damage that multiple-choice tasks show. This
module runs lm-eval's own Python API on a folder that ``asvd compress`` wrote (or a dense one),
so the numbers are computed by the reference harness, on the factored model:

* the folder is loaded with :func:`asvd_passes.models.load_model_and_tokenizer`, where the
  registered ``asvd`` quantization config rebuilds the ``LowRankLinear`` modules, and the loaded
  object is handed to ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=...)``; lm-eval
  never re-loads the folder itself;
* tasks are resolved by a ``lm_eval.tasks.TaskManager``: lm-eval's built-in tasks, plus the YAML
  task files under ``include_path`` (e.g. a local multiple-choice set).

Needs the optional extra: ``pip install "asvd-passes[eval]"`` (``lm-eval[hf]>=0.4.13``).

Data: lm-eval's built-in tasks download their datasets from the Hugging Face Hub on first use (then
read them from the ``datasets`` cache), so they need internet once. A local task (``dataset_path:
json`` with ``dataset_kwargs.data_files``) needs none. lm-eval 0.4.13 passes ``data_files`` to
``datasets.load_dataset`` unchanged, so a relative path there is relative to the *current working
directory*, not to the YAML file: use absolute paths in task files meant to run from anywhere.

Side effects of lm-eval worth knowing: ``simple_evaluate`` seeds Python's, NumPy's and torch's
global RNGs (seed 0 / 1234), and shows its own tqdm bars and log lines on stderr.
"""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from pathlib import Path

import torch

from .errors import InvalidInputError, MissingDependencyError, MissingFileError

INSTALL_HINT = 'pip install "asvd-passes[eval]"  (lm-eval[hf]>=0.4.13)'


def _import_lm_eval():
    """``(simple_evaluate, HFLM, TaskManager, make_table)``, or an ImportError that says what to install."""
    try:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError as err:
        raise MissingDependencyError(f"zero-shot accuracy needs lm-evaluation-harness, which is not installed ({err}): {INSTALL_HINT}") from err
    return simple_evaluate, HFLM, TaskManager, make_table


def parse_tasks(tasks) -> list[str]:
    """A list of task names from a list or a comma-separated string; ValueError when none is left."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [str(name).strip() for name in (tasks or [])]
    names = [name for name in names if name]
    if not names:
        raise InvalidInputError("no lm-eval task given: pass one or more task names (e.g. --tasks piqa,arc_easy)")
    return names


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """One TaskManager per include folder and process: indexing lm-eval's ~15k built-in tasks takes seconds.

    The index holds names and file paths; YAML contents are read when a task is loaded. Task files
    *added* to the folder after the first call in a process are not seen by later calls.
    """
    _, _, TaskManager, _ = _import_lm_eval()
    return TaskManager(include_path=include_path)


def resolve_tasks(tasks, include_path: str | os.PathLike | None = None):
    """``(names, task_manager)`` after checking every name is an lm-eval task (or a task YAML file)."""
    names = parse_tasks(tasks)
    _import_lm_eval()
    if include_path is not None:
        include = Path(include_path).expanduser()
        if not include.is_dir():
            raise MissingFileError(f"include path {include} is not a folder of lm-eval task YAML files")
        include_path = str(include.resolve())
    manager = _task_manager(include_path)
    known = set(manager.all_tasks)
    for name in names:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        where = f" or under {include_path}" if include_path else " (local task YAMLs: pass include_path / --include-path)"
        raise InvalidInputError(f"unknown lm-eval task {name!r}: not among lm-eval's {len(known)} tasks{where}{hint}")
    return names, manager


def _metrics(task_result: dict) -> dict:
    """lm-eval's ``{"alias", "acc,none", "acc_stderr,none", ...}`` → ``{"acc", "acc_stderr", ...}``.

    A metric under a filter other than ``none`` keeps it after a comma (``"exact_match,strict-match"``).
    """
    metrics = {}
    for key, value in task_result.items():
        if key in ("alias", "name", "sample_len", "sample_count") or "," not in key:
            continue
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name == "none" else key] = value
    return metrics


def zero_shot(
    model=None,
    tasks=(),
    limit: int | None = None,
    include_path: str | os.PathLike | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    tokenizer=None,
    device: str | None = None,
    log_samples: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Run lm-eval ``tasks`` on ``model`` and return the metrics.

    Args:
        model: a model folder (compressed by ``asvd compress`` or dense) or hub id, ``None`` for the
            embedded SmolLM2-135M, or a loaded transformers ``PreTrainedModel`` (then ``tokenizer``
            is required).
        tasks: lm-eval task/group names (list, or one comma-separated string).
        limit: at most this many documents per task (``None``: all).
        include_path: a folder of extra task YAML files.
        batch_size: lm-eval's batch size (loglikelihood requests per forward).
        num_fewshot: few-shot examples; ``None`` keeps the task's default (0 for most tasks).
        tokenizer: the tokenizer of a model object (folders bring their own).
        device: where to run. ``None``: a loaded folder runs on the CPU, a model object stays where it is.
        log_samples: also return lm-eval's per-document records (prompts, per-choice
            ``(loglikelihood, is_greedy)`` responses, target, per-sample metrics).
        dtype: dtype a folder is loaded in.

    Returns:
        ``{"model", "tasks": {task: {metric: value}}, "n_samples": {task: documents evaluated},
        "limit", "num_fewshot", "table"}`` (``"table"``: lm-eval's markdown table) and, with
        ``log_samples``, ``"samples": {task: [record, ...]}``.

    Raises:
        ValueError: empty task list, unknown task name, model object without tokenizer.
        ImportError: lm-eval is not installed.
        FileNotFoundError: ``include_path`` or the model folder does not exist.
    """
    names, manager = resolve_tasks(tasks, include_path)
    simple_evaluate, HFLM, _, make_table = _import_lm_eval()

    if model is None or isinstance(model, (str, os.PathLike)):
        from .models import load_model_and_tokenizer, resolve_model_path

        label = resolve_model_path(model)
        model_obj, folder_tokenizer = load_model_and_tokenizer(model, dtype=dtype)
        tokenizer = tokenizer or folder_tokenizer
        model_obj = model_obj.to(device or "cpu")
    elif isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise InvalidInputError("zero_shot on a model object needs its tokenizer: zero_shot(model, tasks, tokenizer=...)")
        if not hasattr(model, "config"):
            raise InvalidInputError(f"{type(model).__name__} is not a transformers model (no .config); lm-eval's HFLM needs one")
        model_obj = model if device is None else model.to(device)
        label = getattr(model.config, "_name_or_path", None) or type(model).__name__
    else:
        raise TypeError(f"model must be a folder, a hub id, None or a transformers model, not {type(model).__name__}")

    model_obj.eval()
    lm = HFLM(pretrained=model_obj, tokenizer=tokenizer, batch_size=batch_size)
    with torch.no_grad():
        results = simple_evaluate(
            model=lm,
            tasks=names,
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=manager,
            log_samples=log_samples,
        )
    out = {
        "model": str(label),
        "tasks": {task: _metrics(values) for task, values in results["results"].items()},
        "n_samples": {task: counts.get("effective") for task, counts in results.get("n-samples", {}).items()},
        "limit": limit,
        "num_fewshot": num_fewshot,
        "table": make_table(results),
    }
    if results.get("groups"):
        out["table"] += "\n" + make_table(results, "groups")
    if log_samples:
        out["samples"] = results["samples"]
    return out
