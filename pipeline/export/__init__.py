"""Leaving the pipeline: the offline inference bundle (bundle, bundle_predict) and ONNX export (onnx_export)."""
