"""Audio helpers: an offline eSpeak NG synthesizer and the built-in spoken corpus (LibriSpeech layout)."""
