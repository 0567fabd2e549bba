"""Preference data for DPO: sample candidates from a model, score them, write chosen/rejected pairs.

``python -m cosytrain dpo-pairs`` (:mod:`cosytrain.preference.pairs`) with the scorers of
:mod:`cosytrain.preference.scorers`. A room of its own: it runs the inference engines (sampling,
synthesis) and scores with the evaluation metrics, and writes data shards; tasks train on them.
"""
