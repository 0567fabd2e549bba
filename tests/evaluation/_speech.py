"""Known speech for the metric tests: espeak-ng utterances that differ in one controlled way each."""

from __future__ import annotations

from pathlib import Path

import soundfile as sf
import torch

from cosytrain.data.demo_corpus import DemoVoice, synthesise

SENTENCE = "The morning train left the station exactly on time."
OTHER = "She painted the small wooden door a bright shade of blue."
MALE = DemoVoice("m", "en-us+m3", 35, 165)
VARIANTS = {
    "ref": (MALE, SENTENCE),
    "fast": (DemoVoice("m", "en-us+m3", 35, 240), SENTENCE),  # same voice and text, 45 % faster
    "high": (DemoVoice("m", "en-us+m3", 75, 165), SENTENCE),  # same, higher pitch
    "other_text": (MALE, OTHER),
    "other_text2": (MALE, "Please remember to water the plants before you leave."),
    "female": (DemoVoice("f", "en-gb-x-rp+f4", 75, 160), SENTENCE),  # another speaker, same text
    "female_other": (DemoVoice("f", "en-gb-x-rp+f4", 75, 160), OTHER),
}


def make_speech(folder: Path) -> dict[str, torch.Tensor]:
    """All variants, synthesised in one espeak process (22.05 kHz float tensors)."""
    items = [(name, voice, text) for name, (voice, text) in VARIANTS.items()]
    paths = synthesise(items, folder)
    out = {}
    for (name, _, _), path in zip(items, paths):
        audio, rate = sf.read(path, dtype="float32")
        assert rate == 22050
        out[name] = torch.from_numpy(audio)
    return out
