"""benchmarks/adaptive_rank.py's backbone table: each backbone's targets, sizes and schedules, and the plan and
report rules that differ between backbones (full fine-tuning's fixed rate vs its tuned grid, starred grid edges)."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "adaptive_rank.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("adaptive_rank_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["minilm", "vit", "vit-long"])
def test_targets_match_the_stated_layers_and_the_split_matches_the_stated_size(bench, name):
    backbone = bench.BACKBONES[name]
    task, _ = bench.task_data(backbone)  # refuses a training split of another size than train_examples
    assert len(task.train) == backbone.train_examples
    model = task.build_model()
    matched = [path for path, module in model.named_modules()
               if isinstance(module, nn.Linear) and re.fullmatch(backbone.targets, path)]
    assert len(matched) == backbone.modules
    assert {bench._layer_of(path) for path in matched} == set(range(backbone.layers))
    kinds = {bench._module_kind(path, backbone) for path in matched}
    assert kinds == {label for _, label in backbone.kinds}  # every kind found, no path left unlabelled


def test_minilm_schedules_are_the_64_step_recipe_unchanged(bench):
    minilm = bench.MINILM
    assert minilm.steps == 64
    assert [minilm.scaled(n) for n in (1, 2, 3)] == [1, 2, 3]
    ada = bench.method_config("adalora", 2, minilm)
    inc = bench.method_config("increlora", 8, minilm)
    assert ada.mask_interval == 2
    assert (inc.initial_warmup, inc.interval, inc.restart_warmup, inc.top_modules) == (3, 1, 2, 6)


def test_schedules_scale_with_the_recipe_length(bench):
    vit = bench.BACKBONES["vit"]
    factor = vit.steps / 64
    inc = bench.method_config("increlora", 2, vit)
    assert inc.initial_warmup == round(3 * factor) and inc.interval == round(factor)
    assert bench.method_config("adalora", 8, vit).mask_interval == round(2 * factor)


def tuning(method, budget, lr, validation):
    return {"method": method, "budget": budget, "seed": 0, "lr": lr, "validation": validation, "test": validation,
            "live_parameters": 1, "train_seconds": 1.0}


def test_full_fine_tuning_is_tuned_on_a_grid_only_where_the_backbone_gives_one(bench):
    vit, minilm = bench.BACKBONES["vit"], bench.MINILM
    full_tuning = [j for j in bench.tuning_jobs(vit) if j["method"] == "full"]
    assert sorted(j["lr"] for j in full_tuning) == sorted(vit.full_lrs)
    assert not [j for j in bench.tuning_jobs(minilm) if j["method"] == "full"]
    records = [tuning("full", 0, lr, v) for lr, v in zip(vit.full_lrs, (0.5, 0.7, 0.6))]
    records += [tuning(m, b, 1e-2, 0.5) for m in bench.ADAPTERS for b in bench.BUDGETS]
    assert bench.chosen_lr(records, "full", 0, vit) == vit.full_lrs[1]
    assert bench.chosen_lr(records, "full", 0, minilm) == minilm.full_lrs[0]
    vit_full = [(j["seed"], j["lr"]) for j in bench.final_jobs(records, vit) if j["method"] == "full"]
    assert vit_full == [(1, vit.full_lrs[1]), (2, vit.full_lrs[1])]  # seed 0 is the tuning run
    minilm_full = [(j["seed"], j["lr"]) for j in bench.final_jobs(records, minilm) if j["method"] == "full"]
    assert minilm_full == [(s, minilm.full_lrs[0]) for s in bench.SEEDS]


def test_tuning_table_stars_a_chosen_rate_at_either_edge_only(bench):
    vit = bench.BACKBONES["vit"]
    records = [tuning("lora", 2, 1e-3, 0.9), tuning("lora", 2, 3e-3, 0.8),  # lowest tried wins: edge
               tuning("adalora", 2, 1e-3, 0.1), tuning("adalora", 2, 3e-3, 0.9), tuning("adalora", 2, 1e-2, 0.2)]
    rows = {line.split(" | ")[0].strip("| "): line for line in bench._tuning_table(records, 2, vit)[2:]}
    assert "90.00*" in rows["lora"] and rows["lora"].endswith("0.001* (grid edge) |")
    assert "*" not in rows["adalora"] and rows["adalora"].endswith("| 0.003 |")
    assert rows["increlora"].endswith("| – |")


def test_a_backbone_limited_to_one_budget_plans_and_reports_that_budget_only(bench):
    long = bench.BACKBONES["vit-long"]
    assert long.budgets == (2,) and long.steps == 298
    assert {j["budget"] for j in bench.tuning_jobs(long)} == {2, 0}  # 0: full fine-tuning's grid
    records = [tuning(m, b, 1e-2, 0.5) for m in bench.ADAPTERS for b in bench.BUDGETS]
    records += [tuning("full", 0, lr, 0.5) for lr in long.full_lrs]
    assert {j["budget"] for j in bench.final_jobs(records, long)} == {2, 0}
    assert {j["budget"] for j in bench.extension_jobs(records, long)} == {2}  # 1e-2 is the highest rate tried
