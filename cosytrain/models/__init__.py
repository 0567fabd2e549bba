"""Pure PyTorch CosyVoice parts (no Lightning). Each part's ``state_dict()`` is exactly upstream's."""
