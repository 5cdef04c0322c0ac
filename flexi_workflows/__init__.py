"""flexi-workflows: Flexi-LoRA (input-adaptive LoRA ranks) on Ray, DeepSpeed and MLflow."""

__version__ = "0.1.0"
