"""SPT: Taylor sensitivity, global budget, sparse-or-LoRA allocation, sparse optimizer state, files."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.allocate.selection import global_top_counts, resolve_budget
from deltatune.errors import ConfigError
from deltatune.methods.spt import SPTConfig, SPTDelta, plan_spt


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batches(seed=0, count=3):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=generator)) for _ in range(count)]


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _task_loss(outputs, labels):
    """The same loss in the Trainer's form, loss_fn(outputs, labels), as plan_spt takes it."""
    return F.cross_entropy(outputs, labels)


def _plan(model, **overrides):
    config = SPTConfig(**{"targets": ["0", "2"], "budget": 0.1, "lora_rank": 2, **overrides})
    return plan_spt(model, config, _batches(), _task_loss)


def _manual_sensitivity(model, names):
    weights = [model.get_submodule(n).weight for n in names]
    scores = [torch.zeros_like(w) for w in weights]
    for batch in _batches():
        grads = torch.autograd.grad(_loss(model, batch), weights)
        for score, grad in zip(scores, grads):
            score += grad.square()
    return dict(zip(names, scores))


def test_plan_follows_the_taylor_scores_the_global_budget_and_the_structured_rule():
    model = _model()
    planned = _plan(model, structured_ratio=5.0)
    expected = _manual_sensitivity(model, ["0", "2"])
    for name, score in expected.items():
        torch.testing.assert_close(planned.sensitivity[name].double(), score, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None and p.requires_grad for p in model.parameters()), "flags and grads are restored"
    everything = torch.cat([s.reshape(-1) for s in expected.values()])
    cut = everything.topk(resolve_budget(0.1, everything.numel())).values[-1]
    counts = {name: int((s >= cut).sum()) for name, s in expected.items()}
    for name, count in counts.items():
        lora_size = 2 * sum(model.get_submodule(name).weight.shape)
        if count >= lora_size / 5.0:
            assert name in planned.structured and name not in planned.allocation
        else:
            assert planned.allocation[name] == count and name not in planned.structured
    assert planned.structured, "this budget is meant to give one matrix LoRA"


def test_a_custom_loss_fn_is_the_loss_whose_sensitivity_is_measured():
    """loss_fn(outputs, labels) replaces cross-entropy: the scores are the squared gradients of that loss."""
    def margin(outputs, labels):
        return (outputs.gather(1, labels[:, None]) - outputs.logsumexp(1, keepdim=True)).square().mean()

    planned = SPTConfig(targets=["0", "2"], budget=0.1, lora_rank=2).plan(_model(), _batches(), loss_fn=margin)
    model = _model()
    weights = [model.get_submodule(n).weight for n in ("0", "2")]
    expected = [torch.zeros_like(w) for w in weights]
    for x, y in _batches():
        for score, grad in zip(expected, torch.autograd.grad(margin(model(x), y), weights)):
            score += grad.square()
    for name, score in zip(("0", "2"), expected):
        torch.testing.assert_close(planned.sensitivity[name].double(), score, rtol=1e-5, atol=1e-12)
    default = SPTConfig(targets=["0", "2"], budget=0.1, lora_rank=2).plan(_model(), _batches())
    assert not torch.allclose(default.sensitivity["0"], planned.sensitivity["0"])


def test_the_default_loss_reads_tuple_and_dict_batches_alike():
    """Without a loss_fn, plan_spt takes (inputs, labels) tuples as well as {"x", "labels"} dicts."""

    class Keyword(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    config = SPTConfig(targets=["0", "2"], budget=0.1, lora_rank=2)
    from_tuples = plan_spt(_model(), config, _batches())
    from_dicts = plan_spt(Keyword(_model()), SPTConfig(targets=["inner.0", "inner.2"], budget=0.1, lora_rank=2),
                          [{"x": x, "labels": y} for x, y in _batches()])
    expected = _manual_sensitivity(_model(), ["0", "2"])
    for name in ("0", "2"):
        torch.testing.assert_close(from_tuples.sensitivity[name].double(), expected[name], rtol=1e-5, atol=1e-12)
        assert torch.equal(from_tuples.sensitivity[name], from_dicts.sensitivity["inner." + name])


def test_adapted_positions_are_the_most_sensitive_entries_and_output_is_unchanged():
    model = _model()
    reference = copy.deepcopy(model)
    planned = _plan(model, structured_ratio=1.0)  # a high bar: everything stays sparse
    assert not planned.structured
    dt.adapt(model, planned)
    x = _batches(1)[0][0]
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    for path, _, delta in dt.iter_deltas(model):
        score = planned.sensitivity[path].reshape(-1)
        chosen = torch.zeros_like(score, dtype=torch.bool)
        chosen[delta.indices] = True
        assert int(chosen.sum()) == planned.allocation[path]
        assert score[chosen].min() >= score[~chosen].max()


def test_gradients_and_optimizer_state_exist_only_for_the_planned_entries():
    model = _model()
    planned = _plan(model, structured_ratio=5.0)
    dt.adapt(model, planned)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _loss(model, _batches(2)[0]).backward()
    optimizer.step()
    sizes = sorted(state["exp_avg"].numel() for state in optimizer.state.values())
    expected = sorted(list(planned.allocation.values()) + [
        t.numel() for name in planned.structured for t in (
            model.get_submodule(name).deltas["default"].lora_A, model.get_submodule(name).deltas["default"].lora_B)
    ])
    assert sizes == expected
    assert all(p.grad is None for n, p in model.named_parameters() if ".deltas." not in f".{n}")


def test_save_and_load_keep_positions_without_the_scores(tmp_path):
    model = _model()
    reference = copy.deepcopy(model)
    planned = _plan(model, structured_ratio=5.0)
    dt.adapt(model, planned)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for p in delta.parameters():
                p.normal_()
    x = _batches(3)[0][0]
    expected = model.eval()(x).detach()
    dt.save_adapter(model, tmp_path / "spt")
    saved = json.loads((tmp_path / "spt" / "deltatune_config.json").read_text())["config"]
    assert saved["sensitivity"] is None and saved["allocation"] == planned.allocation
    loaded = dt.load_adapter(copy.deepcopy(reference), tmp_path / "spt")
    torch.testing.assert_close(loaded.eval()(x), expected, rtol=0, atol=0)
    originals = {p: d for p, _, d in dt.iter_deltas(model)}
    for path, _, delta in dt.iter_deltas(loaded):
        assert isinstance(delta, SPTDelta) and delta.is_structured == originals[path].is_structured
        if not delta.is_structured:
            assert torch.equal(delta.indices, originals[path].indices)


def test_global_top_counts_split_ties_deterministically():
    scores = {"a": torch.tensor([1.0, 3.0, 3.0]), "b": torch.tensor([3.0, 0.5])}
    assert global_top_counts(scores, 2) == {"a": 2, "b": 0}
    assert global_top_counts(scores, 4) == {"a": 3, "b": 1}


@pytest.mark.parametrize("field,value", [("budget", 0), ("budget", -0.5), ("budget", 2.5), ("lora_rank", 0),
                                         ("structured_ratio", 0.0), ("sensitivity_batches", 0), ("dropout", 1.0)])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SPTConfig(**{field: value})


def test_budgets_that_select_nothing_or_too_much_are_refused():
    with pytest.raises(ConfigError, match="selects nothing"):
        _plan(_model(), budget=1e-6)
    with pytest.raises(ConfigError, match="only 448 exist"):
        _plan(_model(), budget=10_000)
    with pytest.raises(ConfigError, match="only plan_spt can split"):
        dt.adapt(_model(), SPTConfig(budget=50))
    with pytest.raises(ConfigError, match="batches is empty"):
        plan_spt(_model(), SPTConfig(), [], _task_loss)


def test_config_plan_is_plan_spt_once_and_then_the_identity():
    config = SPTConfig(targets=["0", "2"], budget=0.1, lora_rank=2)
    planned = config.plan(_model(), _batches())
    assert planned.allocation == plan_spt(_model(), config, _batches()).allocation
    assert planned.plan(_model(seed=1), _batches(seed=1)) is planned
    assert dt.LoRAConfig().plan(_model(), _batches()) == dt.LoRAConfig()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lora_branch_output_gets_per_sample_drop_path_in_training_only(kind):
    """The official structured module returns DropPath(0.1)(B A x): per sample, dropped with probability p or
    kept and scaled by 1/(1 - p); eval mode runs the plain branch. Sparse deltas are never dropped."""
    torch.manual_seed(0)
    layer = (nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(3, 5, 3)).double()
    model = dt.adapt(nn.Sequential(layer), SPTConfig(targets=("0",), structured=("0",), allocation={},
                                                     lora_rank=2, drop_path=0.5))
    (delta,) = [d for _, _, d in dt.iter_deltas(model)]
    with torch.no_grad():
        delta.lora_B.normal_()
    x = torch.randn(64, 3, 8, dtype=torch.float64) if kind == "linear" else torch.randn(64, 3, 6, 6).double()
    if kind == "linear":
        base, branch = F.linear(x, layer.weight, layer.bias), F.linear(F.linear(x, delta.lora_A), delta.lora_B)
    else:
        update = (delta.lora_B @ delta.lora_A).view(5, 3, 3, 3)
        base, branch = F.conv2d(x, layer.weight, layer.bias), F.conv2d(x, update)
    torch.testing.assert_close(model.eval()(x), base + branch, rtol=1e-12, atol=1e-12)
    torch.manual_seed(1)
    dropped = model.train()(x) - base
    kept = [bool(torch.allclose(d, 2.0 * b, rtol=1e-10, atol=1e-12)) for d, b in zip(dropped, branch)]
    zero = [bool(torch.all(d.abs() < 1e-12)) for d in dropped]
    assert all(k != z for k, z in zip(kept, zero)), "a sample neither dropped whole nor kept x 1/(1 - p)"
    assert 16 < sum(kept) < 48  # p = 0.5 over 64 samples
    assert SPTConfig().drop_path == 0.1
    with pytest.raises(ConfigError, match="drop_path"):
        SPTConfig(drop_path=1.0)


def test_sparse_deltas_are_not_dropped_in_training():
    torch.manual_seed(0)
    model = dt.adapt(nn.Sequential(nn.Linear(8, 6).double()), SPTConfig(targets=("0",), allocation={"0": 10},
                                                                        drop_path=0.5))
    (delta,) = [d for _, _, d in dt.iter_deltas(model)]
    with torch.no_grad():
        delta.values.normal_()
    x = torch.randn(32, 8, dtype=torch.float64)
    torch.testing.assert_close(model.train()(x), model.eval()(x), rtol=0, atol=0)
