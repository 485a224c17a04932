"""Pipelines: how calibration data flows through the model (llm-compressor's sense of the word).

* :mod:`.whole`: the whole model traced and observed at once (STRS needs it).
* :mod:`.sequential`: one decoder block at a time, for models larger than memory.

Both use the same graph passes (``graph/``), algorithms (``scaling``, ``decompose``, ``allocation``,
``kv``) and report (``report``); ``ASVDCompressor`` picks one (``memory.choose_pipeline``).
"""
