"""Evaluation of trained parts: FP16-vs-FP32 agreement (``fp16_check``) and its metrics (``metrics``).

Submodules are imported on use so that ``import cosytrain.evaluation`` stays cheap.
"""

__all__ = ["metrics", "fp16_check"]
