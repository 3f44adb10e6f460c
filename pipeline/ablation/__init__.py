"""The paper's ablations (and your own search spaces) as Ray Tune sweeps.

* :mod:`.tables`: the paper's Tables 1-8 as pure data.
* :mod:`.space`: the search-space language (``--space``, ``--values``, field coercion).
* :mod:`.plan`: planning: a :class:`SweepPlan` of fully resolved :class:`TrialConfig` (built once).
* :mod:`.report`: the results frame, the Markdown table, the plot, seed summaries.
* :mod:`.sweep`: running a plan on Ray Tune (Ray and MLflow live only there; import it explicitly);
  torch-free, like everything the driver imports.
* :mod:`.trial`: what a trial runs in its own process (the training; loads torch).
"""
from .plan import (DEFAULT_EXPERIMENT, SweepConfig, SweepPlan, TrialConfig, describe, plan_space, plan_table,
                   trial_device)
from .report import format_table, plot_results, results_frame, summarize_seeds
from .space import SearchSpace, coerce_value, parse_space, parse_values, resolve_field
from .tables import TABLES, AblationRow, AblationTable, get_table

__all__ = ["DEFAULT_EXPERIMENT", "SweepConfig", "SweepPlan", "TrialConfig", "describe", "plan_space", "plan_table",
           "trial_device", "format_table", "plot_results", "results_frame", "summarize_seeds", "SearchSpace",
           "coerce_value", "parse_space", "parse_values", "resolve_field", "TABLES", "AblationRow", "AblationTable",
           "get_table"]
