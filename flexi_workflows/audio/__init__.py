"""Audio for the speech task: reading and resampling utterances (io), an offline eSpeak NG synthesizer
and the built-in spoken corpus in the LibriSpeech layout."""
