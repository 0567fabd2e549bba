"""cosytrain: train, fine-tune and export CosyVoice (1, 2, 3) text-to-speech models with PyTorch Lightning.

Layout (``docs/architecture.md``; each room imports only rooms below it): ``utils``, ``data`` (shards,
features, streaming batches), ``models`` (pure PyTorch, upstream state-dict compatible),
``modeldir`` (the upstream model-directory format), ``evaluation`` (FP16 check), ``tasks``
(LightningModules, precision, callbacks) and ``inference``, ``export``; ``cli`` is the thin command
line on top.
"""

__version__ = "0.1.0"
