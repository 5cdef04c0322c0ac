"""Reading one utterance as Whisper hears it: mono float32 at 16 kHz.

An utterance arrives as a file path (a LibriSpeech folder) or as encoded bytes (a hub dataset's
`audio.bytes`); either is decoded with libsndfile (soundfile: FLAC, WAV, OGG) and resampled with
soxr when its rate differs. A file that cannot be decoded, or holds no samples, is an error that
names it — a silent empty input would become a confident empty transcript and a wrong WER.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from flexi_workflows.errors import DataError

SAMPLE_RATE = 16_000  # Whisper's feature extractor expects 16 kHz


def read_audio(value: str | bytes | Path, *, where: str | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at `sample_rate`; `where` names the utterance in errors."""
    import soundfile as sf

    label = where or (str(value) if not isinstance(value, bytes) else "audio bytes")
    try:
        source = io.BytesIO(value) if isinstance(value, bytes) else str(value)
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise DataError(f"{label}: cannot decode the audio ({str(exc).splitlines()[0][:160]})") from None
    except FileNotFoundError:
        raise DataError(f"{label}: no such audio file") from None
    if data.shape[0] == 0:
        raise DataError(f"{label}: the audio file holds no samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        import soxr

        mono = soxr.resample(mono, rate, sample_rate).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_seconds(value: str | bytes | Path) -> float:
    """The duration of an encoded utterance from its header (no decoding)."""
    import soundfile as sf

    info = sf.info(io.BytesIO(value) if isinstance(value, bytes) else str(value))
    return info.frames / info.samplerate
