"""cosytrain: train, fine-tune and export CosyVoice (1, 2, 3) text-to-speech models with PyTorch Lightning.

Layout: ``data`` (shards, features, streaming batches) -> ``models`` (pure PyTorch, upstream
state-dict compatible) -> ``tasks`` (LightningModules, precision, callbacks) -> ``export`` ->
``inference``; ``cli`` is the thin command line on top.
"""

__version__ = "0.1.0"
