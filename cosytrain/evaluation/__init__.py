"""Evaluation of trained parts: FP16-vs-FP32 agreement of a model's parts, and its metrics.

``fp16_check`` runs the check (``fp16_stages`` compares each stage, ``fp16_batches`` makes the
utterances), ``fp16_figures`` judges and reports the figures, ``fp16_cli`` is ``cosytrain check-fp16``,
``metrics`` defines the distances. Submodules are imported on use so that ``import
cosytrain.evaluation`` stays cheap.
"""

__all__ = ["metrics", "fp16_batches", "fp16_stages", "fp16_check", "fp16_figures", "fp16_cli"]
