"""Audio for the speech task: reading and resampling utterances, and the built-in spoken corpus."""
