"""Merge methods as small pure tensor functions, looked up by recipe name in ``registry.METHODS``.

Run: python -m pytest tests/merge/test_methods.py -q
"""
from mergeline.merge.methods.registry import METHODS, MergeMethod, get_method
from mergeline.merge.methods.stats import MethodResult, ModelStats, TensorStats

__all__ = ["METHODS", "MergeMethod", "MethodResult", "ModelStats", "TensorStats", "get_method"]
