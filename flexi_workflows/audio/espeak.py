"""A small eSpeak NG synthesizer, driven through ctypes.

Why ctypes: the `espeakng-loader` wheel ships the eSpeak NG 1.52 shared library and its voice data, so
speech synthesis works from a plain `pip install` — no system package (apt `espeak-ng`), no
subprocess, no network. We call the C API directly (`espeak_Initialize` in synchronous mode, a PCM
callback, `espeak_Synth` + `espeak_Synchronize`); 1.4 s of speech takes a few milliseconds.

eSpeak keeps global state (one voice, one set of parameters, one callback per process), so the library
is initialised once per process and every synthesis runs under a module-level lock. Its random
generators are reseeded on every call, but its wave generator keeps some state between calls that no
API call resets: the same call can come out a few samples different depending on what was spoken
before it in the process. Byte-reproducible audio therefore needs a fresh process and a fixed call
order (flexi_workflows/audio/corpus.py does that).
"""

from __future__ import annotations

import ctypes
import os
import threading
from ctypes import POINTER, c_char_p, c_int, c_short, c_size_t, c_uint, c_void_p

import numpy as np

from flexi_workflows.errors import ConfigError, DataError

# espeak_AUDIO_OUTPUT: synthesize into our callback, return when done.
AUDIO_OUTPUT_SYNCHRONOUS = 2
# espeakINITIALIZE_DONT_EXIT: return an error instead of calling exit() on a bad data path.
INITIALIZE_DONT_EXIT = 0x8000
# espeak_PARAMETER (speak_lib.h)
espeakRATE, espeakVOLUME, espeakPITCH, espeakRANGE = 1, 2, 3, 4
espeakCHARS_UTF8 = 1
EE_OK = 0

_CALLBACK = ctypes.CFUNCTYPE(c_int, POINTER(c_short), c_int, c_void_p)
_LOCK = threading.Lock()
_STATE: dict = {}  # "lib", "rate", "callback", "chunks": the per-process eSpeak


def _load():
    """Load and initialise the library once per process (call with _LOCK held)."""
    if "lib" in _STATE:
        return _STATE["lib"]
    try:
        import espeakng_loader

        lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        data_path = espeakng_loader.get_data_path()
    except (ImportError, OSError) as e:
        raise DataError(f"eSpeak NG could not be loaded ({e}); "
                        "install it with `pip install espeakng-loader`") from e
    lib.espeak_Initialize.argtypes = [c_int, c_int, c_char_p, c_int]
    lib.espeak_Initialize.restype = c_int
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [c_char_p]
    lib.espeak_SetVoiceByName.restype = c_int
    lib.espeak_SetParameter.argtypes = [c_int, c_int, c_int]
    lib.espeak_SetParameter.restype = c_int
    lib.espeak_Synth.argtypes = [c_void_p, c_size_t, c_uint, c_int, c_uint, c_uint, POINTER(c_uint), c_void_p]
    lib.espeak_Synth.restype = c_int
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_Synchronize.restype = c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None
    libc = ctypes.CDLL(None)
    libc.srand.argtypes = [c_uint]
    libc.srand.restype = None

    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_path).encode(), INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise DataError(f"eSpeak NG failed to initialise with data at {data_path} (code {rate})")
    chunks: list[np.ndarray] = []

    def on_audio(wav, n, _events):
        if n > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    callback = _CALLBACK(on_audio)  # kept referenced in _STATE: the library holds a raw pointer to it
    lib.espeak_SetSynthCallback(callback)
    _STATE.update(lib=lib, libc=libc, data_path=str(data_path), rate=rate, callback=callback, chunks=chunks)
    return lib


class Espeak:
    """Text → 16-bit mono PCM with eSpeak NG. Instances share the one per-process engine."""

    def __init__(self) -> None:
        with _LOCK:
            _load()
        self.sample_rate: int = _STATE["rate"]

    def synthesize(self, text: str, *, voice: str = "en", rate: int = 175, pitch: int = 50,
                   pitch_range: int = 50, seed: int = 1) -> tuple[np.ndarray, int]:
        """Speak `text` with `voice` (e.g. "en", "en-us", "en+f3") at `rate` words per minute and
        `pitch` (0–100, 50 normal); returns (int16 samples, sample rate).

        Raises ConfigError for an unknown voice or a bad parameter, DataError if synthesis fails.
        """
        with _LOCK:
            lib = _load()
            _, _, variant = voice.partition("+")
            # eSpeak silently ignores an unknown "+variant"; check the variant file exists.
            variant_file = os.path.join(_STATE["data_path"], "voices", "!v", variant)
            unknown_variant = variant and not os.path.isfile(variant_file)
            if unknown_variant or lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
                raise ConfigError(f"eSpeak voice {voice!r} is unknown (try 'en', 'en-us', 'en+f3', 'en+m3')")
            for name, param, value, lo, hi in (("rate", espeakRATE, rate, 80, 450),
                                               ("pitch", espeakPITCH, pitch, 0, 100),
                                               ("pitch_range", espeakRANGE, pitch_range, 0, 100)):
                if not lo <= int(value) <= hi:
                    raise ConfigError(f"eSpeak {name}={value} is outside [{lo}, {hi}]")
                if lib.espeak_SetParameter(param, int(value), 0) != EE_OK:
                    raise ConfigError(f"eSpeak rejected {name}={value}")
            # Reseed every generator eSpeak draws from (its own for breath/roughness voices, libc's rand
            # for the Klatt noise source), so one call's audio depends on its arguments only.
            lib.espeak_ng_SetRandSeed(seed)
            _STATE["libc"].srand(seed)
            chunks = _STATE["chunks"]
            chunks.clear()
            data = text.encode("utf-8") + b"\0"
            code = lib.espeak_Synth(data, len(data), 0, 0, 0, espeakCHARS_UTF8, None, None)
            if code != EE_OK:
                raise DataError(f"eSpeak failed to synthesize {text!r} (code {code})")
            lib.espeak_Synchronize()
            audio = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
            chunks.clear()
        return audio.astype(np.int16, copy=False), self.sample_rate
