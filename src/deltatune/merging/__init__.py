"""deltatune.merging — the delta algebra on finished fine-tunes, and streaming over safetensors checkpoints.

- `ops`: pure tensor functions (task vectors, top-k trim, Bernoulli drop, sign election, disjoint mean, ...);
- `methods/`: one file per merge method, registered by name (`list_merge_methods()`):
  task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, darex, pcb, linear;
- `merge_state_dicts`: run a method on in-memory state dicts;
- `load_config` + `run_merge`: run a mergekit-style YAML over checkpoint folders with bounded memory
  (`deltatune merge CONFIG.yaml --out DIR`);
- `combine_adapters`: the same algebra on the adapters of one model, giving a new LoRA adapter;
- `darex_q`, `importance`, `search`: DAREx's q selection, importance-based delta pruning, coefficient search.
"""
from deltatune.merging.adapters import combine_adapters
from deltatune.merging.config.parse import MergeConfig, config_from_dict, load_config
from deltatune.merging.memory import merge_state_dicts
from deltatune.merging.registry import MergeInputs, list_merge_methods, merge_method, register_merge
from deltatune.merging.io.stream import plan_merge, run_merge

__all__ = ["MergeConfig", "combine_adapters", "MergeInputs", "config_from_dict", "list_merge_methods", "load_config",
           "merge_method", "merge_state_dicts", "plan_merge", "register_merge", "run_merge"]
