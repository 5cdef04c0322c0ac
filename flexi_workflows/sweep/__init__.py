"""`flexi sweep`: trials of one recipe over a search space on Ray Tune, sharing every stage they can."""

from flexi_workflows.sweep.space import Trial, expand_space
from flexi_workflows.sweep.run import run_sweep

__all__ = ["Trial", "expand_space", "run_sweep"]
