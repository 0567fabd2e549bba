"""Build one model part from its ``class_path``/``init_args`` mapping, the way LightningCLI builds it.

For code that needs a part outside a ``fit`` run: a vocoder named by a run's ``config.yaml``
(:func:`cosytrain.tasks.hift_weights.load_hift_checkpoint`) and the benchmarks' ``conf/model/*.yaml``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch


def instantiate_part(conf: Mapping[str, Any]) -> torch.nn.Module:
    """The ``torch.nn.Module`` that ``conf`` (``class_path`` + ``init_args``, nested parts included) describes."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_argument("--part", type=torch.nn.Module)
    return parser.instantiate(parser.parse_object({"part": dict(conf)})).part
