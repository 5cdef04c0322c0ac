"""The fine-tuning methods of the paper's tables, one class each, behind one interface (methods/base.py)."""

from flexi_workflows.methods.base import Accounting, Method, Trainable
from flexi_workflows.methods.registry import get_method, method_label

__all__ = ["Accounting", "Method", "Trainable", "get_method", "method_label"]
