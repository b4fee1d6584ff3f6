"""deltatune.merge — the delta algebra on finished fine-tunes.

- `ops`: pure tensor functions (task vectors, top-k trim, Bernoulli drop, sign election, disjoint mean, ...);
- `methods/`: one file per merge method, registered by name (`list_merge_methods()`):
  task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, darex, pcb, linear;
- `merge_state_dicts`: run a method on in-memory state dicts;
- `darex_q`, `importance`, `search`: DAREx's q selection, importance-based delta pruning, coefficient search.
"""
from deltatune.merge.memory import merge_state_dicts
from deltatune.merge.registry import MergeInputs, list_merge_methods, merge_method, register_merge

__all__ = ["MergeInputs", "list_merge_methods", "merge_method", "merge_state_dicts", "register_merge"]
