"""libespeak-ng from the ``espeakng-loader`` wheel, opened through ctypes (no system package, no download).

Why one module: the demo corpus speaks with it (``demo_corpus.py``: audio and the phone events) and the
``phoneme`` text tokenizer reads with it (``phonemes.py``); both need the same C signatures declared and
the same start-up checks. No Python package exposes espeak-ng without a system library (``phonemizer``
shells out to an installed espeak), hence this small binding.
"""

from __future__ import annotations

import ctypes

AUDIO_OUTPUT_SYNCHRONOUS = 2


class EspeakUnavailable(RuntimeError):
    """libespeak-ng could not be loaded, initialised or given a voice; the message names the fix."""


def open_espeak(options: int = 0) -> tuple[ctypes.CDLL, int]:
    """The library, its signatures declared and initialised for synchronous output, and its sample rate.

    ``options``: espeak_Initialize's flags (1 = report phoneme events to the synth callback).
    """
    try:
        import espeakng_loader
    except ImportError as ex:
        raise EspeakUnavailable("espeak-ng needs espeakng-loader: pip install espeakng-loader (a cosytrain "
                                "dependency)") from ex
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), options)
    if rate <= 0:
        raise EspeakUnavailable(f"libespeak-ng from espeakng-loader failed to initialise (code {rate}); "
                                "reinstall espeakng-loader")
    return lib, int(rate)


def set_voice(lib: ctypes.CDLL, name: str) -> None:
    """Select an espeak-ng voice (with its variant, e.g. ``en-us+m3``)."""
    if lib.espeak_SetVoiceByName(name.encode()) != 0:
        raise EspeakUnavailable(f"espeak-ng voice {name!r} not found in the espeakng-loader data")
