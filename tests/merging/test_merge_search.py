"""`deltatune merge --search`: the search space, the budgeted search, the objectives, the CLI end to end."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from deltatune.cli import main
from deltatune.errors import ConfigError, DeltatuneError, MergeError
from deltatune.merging.config.parse import config_from_dict, load_config
from deltatune.merging.io.stream import merge_to_memory, run_merge
from deltatune.merging.search.objectives import TaskObjective, parse_eval
from deltatune.merging.search.settings import grid_settings, search_settings
from deltatune.merging.search.space import Dimension, SearchSpace, add_search_options, config_at
from merging.tiny_checkpoints import load_folder, make_models

pytestmark = pytest.mark.usefixtures("one_thread")


def _space(*ranges: tuple[float, float]) -> SearchSpace:
    return SearchSpace(tuple(Dimension(("models", i, "parameters", "weight"), lo, hi) for i, (lo, hi) in
                             enumerate(ranges)))


def _bowl(target: dict[str, float]):
    return lambda setting: -sum((setting[name] - value) ** 2 for name, value in target.items())


# --- the search ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmaes_finds_a_known_optimum_within_its_budget(seed):
    space = _space((0.0, 1.0), (0.0, 2.0))
    target = {"models[0].parameters.weight": 0.3, "models[1].parameters.weight": 1.2}
    record = search_settings(space, _bowl(target), budget=100, seed=seed)
    distance = sum((record.best.setting[k] - v) ** 2 for k, v in target.items()) ** 0.5
    assert distance < 0.03
    assert record.best.score == max(e.score for e in record.evaluations)


def test_one_dimension_is_an_even_sweep_through_the_optimum():
    record = search_settings(_space((0.0, 2.0)), _bowl({"models[0].parameters.weight": 0.5}), budget=5)
    assert [e.setting["models[0].parameters.weight"] for e in record.evaluations] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert record.best.setting == {"models[0].parameters.weight": 0.5} and record.best.score == 0.0


@pytest.mark.parametrize("dimensions, budget", [(1, 1), (1, 7), (2, 1), (2, 5), (2, 13), (3, 29)])
def test_the_budget_is_honoured_exactly(dimensions, budget):
    calls = []
    space = _space(*[(0.0, 1.0)] * dimensions)
    record = search_settings(space, lambda s: calls.append(s) or -sum(s.values()), budget=budget, seed=4)
    assert len(calls) == budget == len(record.evaluations) == record.to_dict()["evaluations_used"]


def test_a_shorter_budget_is_a_prefix_of_a_longer_one():
    """What lets one budget-32 run stand for the budget-8 and -16 runs (benchmarks/merge_search.py)."""
    space, objective = _space((0.0, 1.0), (0.0, 2.0)), _bowl({"models[0].parameters.weight": 0.7})
    long = search_settings(space, objective, budget=32, seed=5)
    for budget in (8, 16):
        short = search_settings(space, objective, budget=budget, seed=5)
        assert [e.setting for e in short.evaluations] == [e.setting for e in long.evaluations[:budget]]
        assert short.best.setting == long.best_within(budget).setting


def test_seeded_and_seed_dependent():
    space, objective = _space((0.0, 1.0), (0.0, 1.0)), _bowl({"models[0].parameters.weight": 0.2})
    first, again = (search_settings(space, objective, budget=12, seed=3) for _ in range(2))
    other = search_settings(space, objective, budget=12, seed=4)
    assert [e.setting for e in first.evaluations] == [e.setting for e in again.evaluations]
    assert [e.setting for e in first.evaluations] != [e.setting for e in other.evaluations]


def test_the_record_is_complete():
    space = _space((0.0, 1.0), (-1.0, 1.0))
    record = search_settings(space, lambda s: (-abs(s["models[0].parameters.weight"] - 0.4), {"task a": 0.5}),
                             budget=9, seed=0)
    data = json.loads(record.to_json())
    assert data["strategy"] == "cmaes" and data["budget"] == 9 and data["seed"] == 0
    assert data["ranges"] == {"models[0].parameters.weight": [0.0, 1.0], "models[1].parameters.weight": [-1.0, 1.0]}
    assert [e["index"] for e in data["evaluations"]] == list(range(1, 10))
    for entry in data["evaluations"]:
        assert set(entry["setting"]) == set(space.names) and entry["parts"] == {"task a": 0.5}
        assert entry["seconds"] >= 0
        low, high = data["ranges"]["models[1].parameters.weight"]
        assert low <= entry["setting"]["models[1].parameters.weight"] <= high
    assert data["best"]["score"] == max(e["score"] for e in data["evaluations"])
    markdown = record.to_markdown()
    assert markdown.count("\n| ") == 4 + 2 + 9 and "**best**" in markdown and "task a" in markdown


def test_grid_strategy_and_explicit_grid():
    space = _space((0.0, 1.0), (0.0, 2.0))
    record = search_settings(space, _bowl({"models[0].parameters.weight": 0.5}), budget=10, strategy="grid")
    assert len(record.evaluations) == 9 and record.best.setting["models[0].parameters.weight"] == 0.5
    explicit = grid_settings(space, lambda s: 0.0, {"models[0].parameters.weight": [0.1, 0.2],
                                                    "models[1].parameters.weight": [1.0, 1.5, 2.0]})
    assert [tuple(e.setting.values()) for e in explicit.evaluations][:3] == [(0.1, 1.0), (0.1, 1.5), (0.1, 2.0)]
    with pytest.raises(ConfigError, match="too small for a grid"):
        search_settings(space, lambda s: 0.0, budget=3, strategy="grid")
    with pytest.raises(ConfigError, match="outside its search range"):
        grid_settings(space, lambda s: 0.0, {"models[0].parameters.weight": [1.5],
                                             "models[1].parameters.weight": [1.0]})


def test_search_refusals():
    space = _space((0.0, 1.0), (0.0, 1.0))
    for budget in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="budget"):
            search_settings(space, lambda s: 0.0, budget=budget)
    with pytest.raises(ConfigError, match="strategy"):
        search_settings(space, lambda s: 0.0, budget=4, strategy="random")
    with pytest.raises(ConfigError, match="NaN"):
        search_settings(space, lambda s: float("nan"), budget=4)


# --- the space in a config -----------------------------------------------------------------------------------
RAW = {"merge_method": "ties", "base_model": "./base",
       "models": [{"model": "./a", "parameters": {"weight": {"search": [0.5, 1.5]}}}, "./b"],
       "parameters": {"density": {"search": [0.1, 0.9]}, "lambda": 1.0}}


def test_space_from_config_and_config_at_leave_the_input_alone():
    space = SearchSpace.from_config(RAW)
    assert space.names == ["models[0].parameters.weight", "parameters.density"]
    before = json.dumps(RAW)
    filled = config_at(RAW, {"models[0].parameters.weight": 0.75, "parameters.density": 0.3})
    assert filled["models"][0]["parameters"]["weight"] == 0.75 and filled["parameters"]["density"] == 0.3
    assert json.dumps(RAW) == before
    with pytest.raises(ConfigError, match="misses the search dimension parameters.density"):
        config_at(RAW, {"models[0].parameters.weight": 0.75})
    with pytest.raises(ConfigError, match="outside its search range"):
        config_at(RAW, {"models[0].parameters.weight": 2.0, "parameters.density": 0.3})


def test_command_line_ranges_become_search_blocks():
    raw = add_search_options(RAW, ["lambda=0.2:2", "models[1].weight = 0 : 1"])
    assert raw["parameters"]["lambda"] == {"search": [0.2, 2.0]}
    assert raw["models"][1] == {"model": "./b", "parameters": {"weight": {"search": [0.0, 1.0]}}}
    assert len(SearchSpace.from_config(raw).dimensions) == 4
    for option, message in [("lambda", "NAME=LOW:HIGH"), ("lambda=a:b", "must be numbers"),
                            ("models[5].weight=0:1", "no models\\[5\\]"), ("density=0:1", "already has a search"),
                            ("base_model.x=0:1", "NAME=LOW:HIGH with NAME")]:
        with pytest.raises(ConfigError, match=message):
            add_search_options(RAW, [option])


@pytest.mark.parametrize("block, message", [
    ({"search": [0.9, 0.1]}, "low < high"), ({"search": [0.1, 0.5, 0.9]}, "two numbers"),
    ({"search": ["a", 1]}, "two numbers"), ({"search": [0, 1], "scale": "log"}, "unknown key 'scale'")])
def test_bad_search_blocks_are_refused_by_name(block, message):
    raw = {**RAW, "parameters": {"lambda": block}}
    with pytest.raises(ConfigError, match=f"parameters.lambda: .*{message}"):
        SearchSpace.from_config(raw)


def test_search_blocks_outside_parameters_and_empty_spaces_are_refused():
    with pytest.raises(ConfigError, match="base_model: a search block may only stand under a parameters"):
        SearchSpace.from_config({**RAW, "base_model": {"search": [0, 1]}})
    with pytest.raises(ConfigError, match="search space is empty"):
        SearchSpace.from_config({"merge_method": "ties", "parameters": {"lambda": 1.0}})


def test_a_plain_merge_refuses_a_search_block(tmp_path):
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.weight is a search block .*--search"):
        config_from_dict(RAW, tmp_path)


# --- in-memory merge -----------------------------------------------------------------------------------------
def test_merge_to_memory_equals_the_written_merge(tmp_path):
    base_dir, dirs, _, _ = make_models(tmp_path, count=2)
    raw = {"merge_method": "ties", "base_model": str(base_dir), "semantics": "paper",
           "models": [{"model": str(d), "parameters": {"density": 0.4}} for d in dirs], "parameters": {"lambda": 0.8}}
    config = config_from_dict(raw, tmp_path)
    in_memory = merge_to_memory(config)
    run_merge(config, tmp_path / "out", progress=False)
    written = load_folder(tmp_path / "out")
    assert set(in_memory) == set(written)
    for name, tensor in written.items():
        assert torch.equal(in_memory[name], tensor), name


# --- objectives on a built-in task, and the CLI end to end ---------------------------------------------------
@pytest.fixture(scope="module")
def digits_checkpoints(tmp_path_factory):
    """base = a fresh digits ConvNet, expert = it after 60 seeded SGD steps; both as single .safetensors files."""
    from deltatune.data import load_task

    folder = tmp_path_factory.mktemp("digits")
    task = load_task("digits")
    torch.manual_seed(0)
    model = task.build_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        index = torch.randint(len(task.train), (64,), generator=generator)
        batch = task.train.subset(index.tolist()).tensors
        loss = torch.nn.functional.cross_entropy(model(pixels=batch["pixels"]), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expert = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base, str(folder / "base.safetensors"))
    save_file(expert, str(folder / "expert.safetensors"))
    save_file({k.removeprefix("classifier."): v for k, v in expert.items() if k.startswith("classifier")},
              str(folder / "head.safetensors"))
    return folder, base, expert


def test_metrics_against_hand_computation(digits_checkpoints):
    folder, base, expert = digits_checkpoints
    accuracy = TaskObjective(parse_eval("digits,size=100"))
    model = accuracy.model
    model.load_state_dict(expert)
    pixels, labels = accuracy.data.tensors["pixels"], accuracy.data.tensors["labels"]
    with torch.no_grad():
        logits = model.eval()(pixels=pixels).double()
    assert len(accuracy.data) == 100
    assert accuracy.score(expert) == (float((logits.argmax(-1) == labels).double().mean()),) * 2
    loss = TaskObjective(parse_eval("digits:loss,size=100")).score(expert)
    assert loss[0] == -loss[1] and loss[1] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)),
                                                            rel=1e-5)
    p = logits.softmax(-1)
    entropy = TaskObjective(parse_eval("digits:entropy,size=100")).value(expert)
    assert entropy == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    change = TaskObjective(parse_eval(f"digits:output_change,size=100,reference={folder / 'expert.safetensors'}"))
    assert change.value(expert) == 0.0 and change.score(base)[0] < 0
    with torch.no_grad():
        base_logits = accuracy._load(base).eval()(pixels=pixels).double()
    assert change.value(base) == pytest.approx(float((logits - base_logits).abs().mean()), rel=1e-5)


def test_prefix_and_head_options(digits_checkpoints):
    folder, base, expert = digits_checkpoints
    body = {k: v for k, v in expert.items() if not k.startswith("classifier")}
    with_head = TaskObjective(parse_eval(f"digits,head={folder / 'head.safetensors'}"))
    assert with_head.value(body) == TaskObjective(parse_eval("digits")).value(expert)
    full_head = TaskObjective(parse_eval(f"digits,head={folder / 'expert.safetensors'}"))
    assert full_head.value(body) == with_head.value(body)
    with pytest.raises(ConfigError, match="'classifier.weight' comes from neither the merge nor head="):
        TaskObjective(parse_eval("digits")).value(body)
    with pytest.raises(ConfigError, match="tensor 'net.conv1.weight' is not in the digits model.*prefix="):
        TaskObjective(parse_eval("digits,prefix=net.")).value(expert)


@pytest.mark.parametrize("text, message", [
    ("digits:f1", "unknown metric 'f1'"), ("digits,split=test", "option 'split=test' is not one of"),
    ("digits,size=0", "size='0' is invalid"), ("digits:output_change", "reference=PATH goes with"),
    ("digits,reference=x.safetensors", "reference=PATH goes with"), ("digitz", "unknown task 'digitz'"),
    (":accuracy", "expected TASK"), ("digits,head=/no/such/file", "no safetensors file")])
def test_bad_evaluations_are_refused_by_name(text, message):
    with pytest.raises(DeltatuneError, match=message):  # ConfigError; an unknown task: UnknownTaskError
        TaskObjective(parse_eval(text))


def _write_config(folder, tmp_path, **parameters):
    raw = {"merge_method": "task_arithmetic", "base_model": str(folder / "base.safetensors"),
           "models": [{"model": str(folder / "expert.safetensors")}],
           "parameters": parameters or {"lambda": {"search": [0.0, 2.0]}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_search_end_to_end(digits_checkpoints, tmp_path, capsys):
    folder, base, expert = digits_checkpoints
    config = _write_config(folder, tmp_path)
    out = tmp_path / "merged"
    assert main(["merge", str(config), "--search", "--eval", "digits", "--eval", "digits:loss", "--budget", "6",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("evaluation ") == 6 and "best of 6 evaluations" in printed
    record = json.loads((out / "merge_search.json").read_text())
    lambdas = [e["setting"]["parameters.lambda"] for e in record["evaluations"]]
    assert lambdas == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6, 2.0])  # one dimension: an even sweep
    assert record["evaluations_used"] == 6 and (out / "merge_search.md").is_file()
    for entry in record["evaluations"]:
        accuracy, loss = entry["parts"]["digits"], entry["parts"]["digits:loss"]
        assert entry["score"] == pytest.approx((accuracy - loss) / 2)
    best = record["best"]["setting"]["parameters.lambda"]
    assert record["best"]["score"] == max(e["score"] for e in record["evaluations"])
    merged = load_file(str(out / "model.safetensors"))
    for name in base:
        torch.testing.assert_close(merged[name], base[name] + best * (expert[name] - base[name]))
    written = yaml.safe_load((out / "deltatune_merge.yml").read_text())
    assert written["parameters"]["lambda"] == best
    assert TaskObjective(parse_eval("digits")).value(merged) == record["best"]["parts"]["digits"]
    load_config(out / "deltatune_merge.yml")  # the saved config is a plain merge config again


def test_cli_search_from_command_line_ranges(digits_checkpoints, tmp_path, capsys):
    folder, _, _ = digits_checkpoints
    config = _write_config(folder, tmp_path, **{"lambda": 1.0})
    assert main(["merge", str(config), "--search", "models[0].weight=0.2:1.8", "lambda=0.5:1.5", "--eval",
                 "digits,size=50", "--budget", "7", "--search-seed", "3", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    record = json.loads((tmp_path / "o" / "merge_search.json").read_text())
    assert record["seed"] == 3 and len(record["evaluations"]) == 7
    assert set(record["ranges"]) == {"models[0].parameters.weight", "parameters.lambda"}


def test_cli_refusals_come_before_any_evaluation(digits_checkpoints, tmp_path, capsys):
    folder, _, _ = digits_checkpoints
    config = _write_config(folder, tmp_path)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    common = ["merge", str(config), "--no-progress"]
    cases = [
        ([*common, "--out", str(tmp_path / "a")], ConfigError, "is a search block"),
        ([*common, "--search", "--eval", "digits", "--out", str(tmp_path / "a")], ConfigError, "needs --budget"),
        ([*common, "--eval", "digits", "--budget", "4", "--out", str(tmp_path / "a")], ConfigError, "add --search"),
        ([*common, "--search", "--budget", "4", "--out", str(tmp_path / "a")], ConfigError, "at least one --eval"),
        ([*common, "--search", "--eval", "digits", "--budget", "4", "--out", str(out)], MergeError, "not empty"),
        ([*common, "--search", "--eval", "digits", "--budget", "0", "--out", str(tmp_path / "a")], ConfigError,
         "budget=0"),
    ]
    for argv, error, message in cases:
        with pytest.raises(error, match=message):
            _raising_main(argv)
        assert "evaluation 1/" not in capsys.readouterr().out
    assert (out / "keep.txt").read_text() == "x" and not (tmp_path / "a").exists()


def _raising_main(argv):
    """The main CLI prints DeltatuneErrors as one line; call the merge command directly to see the error."""
    import argparse

    from deltatune.merging.cli import add_merge_commands

    parser = argparse.ArgumentParser()
    add_merge_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_help_teaches_the_search(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    for phrase in ("{search: [0.1, 0.9]}", "--search lambda=0.2:2.0", "output_change", "--budget N", "never test",
                   "merge_search.json"):
        assert phrase in text


def test_a_misspelt_searched_parameter_is_refused_before_any_evaluation(digits_checkpoints, tmp_path):
    from deltatune.merging.search.config_search import search_merge_config

    folder, _, _ = digits_checkpoints
    raw = yaml.safe_load(_write_config(folder, tmp_path, lambd={"search": [0.0, 1.0]}).read_text())
    calls = []
    with pytest.raises(ConfigError, match="unknown parameter 'lambd'"):
        search_merge_config(raw, lambda state: calls.append(1) or 0.0, budget=4)
    assert calls == []
