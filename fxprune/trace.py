"""The FX front end's names at their old place (``fxprune.capture.fx_trace`` holds them).

Example:
    >>> from fxprune.trace import trace
    >>> trace.__module__
    'fxprune.capture.fx_trace'
"""
from .capture.fx_trace import LeafTracer, check_inputs, structural_copy, trace

__all__ = ["LeafTracer", "check_inputs", "structural_copy", "trace"]
