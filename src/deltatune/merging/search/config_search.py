"""`deltatune merge CONFIG --search`: a merge config with search blocks, searched on a validation objective.

Each evaluation puts one setting into the config (`space.config_at`), merges the checkpoints in memory
(`io.stream.merge_to_memory`, the same tensors `run_merge` writes) and scores the merged state dict. The best
setting is then merged again and written with `run_merge`, with the record of every evaluation
(`merge_search.json`, `merge_search.md`) inside the same atomic folder swap.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from deltatune.merging.config.parse import MergeConfig, config_from_dict
from deltatune.merging.search.settings import SettingEvaluation, SettingsRecord, search_settings
from deltatune.merging.search.space import SearchSpace, config_at

RECORD_JSON, RECORD_MARKDOWN = "merge_search.json", "merge_search.md"
StateScore = Callable[[Mapping[str, Tensor]], "float | tuple[float, Mapping[str, float]]"]


def config_for(raw: Mapping[str, Any], setting: Mapping[str, float], config_dir: Path | None) -> MergeConfig:
    """The validated merge config at one setting; its source text (saved as deltatune_merge.yml) is that YAML."""
    filled = config_at(raw, setting)
    return config_from_dict(filled, config_dir, yaml.safe_dump(filled, sort_keys=False))


def check_searchable(raw: Mapping[str, Any], config_dir: Path | None, out_dir: str | Path | None = None,
                     overwrite: bool = False) -> SearchSpace:
    """The search space, after checking that the config is valid at the space's centre, that its checkpoints'
    headers fit together and (given `out_dir`) that the output may be written — before any evaluation is spent."""
    from deltatune.merging.io.stream import plan_merge

    space = SearchSpace.from_config(raw)
    out = Path(out_dir) if out_dir is not None else None
    plan_merge(config_for(raw, space.centre(), config_dir), out, overwrite).close()
    return space


def search_merge_config(raw: Mapping[str, Any], score_state: StateScore, *, budget: int, seed: int = 0,
                        strategy: str = "cmaes", config_dir: Path | None = None,
                        report: Callable[[SettingEvaluation], None] | None = None) -> SettingsRecord:
    """Search the config's search blocks: each of the `budget` evaluations merges in memory and scores it."""
    from deltatune.merging.io.stream import merge_to_memory

    space = check_searchable(raw, config_dir)
    return search_settings(space, lambda setting: score_state(merge_to_memory(config_for(raw, setting, config_dir))),
                           budget=budget, seed=seed, strategy=strategy, report=report)


def write_best(raw: Mapping[str, Any], record: SettingsRecord, out_dir: str | Path, *,
               config_dir: Path | None = None, **run_options: Any):
    """Merge at the record's best setting into `out_dir` (atomically, with the record files); run_merge's report."""
    from deltatune.merging.io.stream import run_merge

    config = config_for(raw, record.best.setting, config_dir)
    files = {RECORD_JSON: record.to_json(), RECORD_MARKDOWN: record.to_markdown()}
    return run_merge(config, out_dir, side_files=files, **run_options)
