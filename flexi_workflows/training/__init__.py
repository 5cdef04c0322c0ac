"""Training components (data encoding, method builders, DeepSpeed config) and the Ray Train worker loop."""
