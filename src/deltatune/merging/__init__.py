"""deltatune.merging — the delta algebra on finished fine-tunes, and streaming over safetensors checkpoints.

Laid out by concern; each part imports only from the parts above it in this list (the registry alone imports
`methods/`, at lookup time, to register the built-in methods):

- `params`: checks the parameter dataclasses of every method share (field types, weight sums);
- `algebra/`: pure tensor functions — `ops` (task vectors, top-k trim, Bernoulli drop, sign election, ...),
  `family` (sparsify × consensus × combine), `statistics` (exact whole-model order statistics), `importance`;
- `registry`: the merge-method registry (`register_merge`, `MergeInputs`, declared capabilities);
- `methods/`: one file per merge method, registered by name (`list_merge_methods()`);
- `memory.merge_state_dicts`: run a method on in-memory state dicts;
- `config/`: the mergekit-style YAML — `parse` (YAML → `MergeConfig`), `resolve` (per-tensor parameters);
- `io/`: safetensors checkpoints tensor by tensor, pre-merge checks, `slices` (the `slices:` form's layer
  routing) and `stream` (`plan_merge`, `run_merge`: `deltatune merge CONFIG.yaml --out DIR` with bounded memory);
- `adapters.combine_adapters`: the same algebra on the adapters of one model, giving a new LoRA adapter;
- `extract.extract_lora` / `resize.resize_lora`: a LoRA from a full fine-tune by truncated SVD per layer, and an
  existing LoRA re-ranked exactly (`algebra.lowrank`: rank rules, √σ split, QR + core SVD);
- `search/`: DAREx's q selection, PCB's coefficient search, M2N2 evolutionary merging;
- `editing/`: direct parameter edits of one model (Model Surgery).
"""
from deltatune.merging.adapters import combine_adapters
from deltatune.merging.config.parse import MergeConfig, config_from_dict, load_config
from deltatune.merging.extract import extract_lora
from deltatune.merging.io.stream import plan_merge, run_merge
from deltatune.merging.memory import merge_state_dicts
from deltatune.merging.registry import MergeInputs, list_merge_methods, merge_method, register_merge
from deltatune.merging.resize import resize_lora

__all__ = ["MergeConfig", "combine_adapters", "MergeInputs", "config_from_dict", "extract_lora", "list_merge_methods",
           "load_config", "merge_method", "merge_state_dicts", "plan_merge", "register_merge", "resize_lora",
           "run_merge"]
