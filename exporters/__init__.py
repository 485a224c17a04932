"""ONNX export and ONNX Runtime generation for asvd-passes models (built by a later issue)."""
