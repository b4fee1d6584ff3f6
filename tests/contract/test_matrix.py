"""The delta contract: every registered method × every layer kind, driven only by the methods' declarations.

A new method joins by registering; nothing here names a method.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import deltatune as dt
from contract.toy_models import LAYER_CASES, TokenDataset, build, tiny_causal_lm
from deltatune.core.host import AdaptedLayer
from deltatune.errors import NotMergeableError, UnsupportedLayerError

METHODS = [entry.name for entry in dt.list_methods()]
CASES = [(m, k) for m in METHODS for k in LAYER_CASES]


def _supports(method: str, case: str) -> bool:
    return LAYER_CASES[case] in dt.method_entry(method).delta_cls.layer_kinds


def _config(method: str, case: str, **overrides):
    return dt.config_for(method, targets=None, layer_types=(LAYER_CASES[case],), **overrides)


def _perturb(model, name: str, seed: int = 1, scale: float = 0.1) -> None:
    """Move every floating delta parameter away from its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model, name):
            for parameter in delta.parameters():
                if parameter.is_floating_point():
                    noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                    parameter.add_(scale * noise.to(parameter.device))


def _adapted(method: str, case: str, seed: int = 0):
    base, x = build(case, seed)
    reference = copy.deepcopy(base)
    model = dt.adapt(copy.deepcopy(base), _config(method, case))
    return reference, model, x


supported = pytest.mark.parametrize("method,case", [c for c in CASES if _supports(*c)])


@supported
def test_output_unchanged_at_init_where_the_paper_says_so(method, case):
    reference, model, x = _adapted(method, case)
    if not dt.method_entry(method).delta_cls.preserves_output_at_init:
        pytest.skip("this method changes the output at initialization by design")
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-12)


@supported
def test_gradients_reach_only_trainable_tensors(method, case):
    reference, model, x = _adapted(method, case)
    _perturb(model, "default")
    model(x).square().sum().backward()
    parameters = dict(model.named_parameters())
    # Every parameter outside the deltas is one of the base model's: each must be frozen and grad-free.
    base = [n for n in parameters if ".deltas." not in f".{n}"]
    assert len(base) == len(list(reference.parameters())), base
    base_trainable = [n for n in base if parameters[n].requires_grad]
    base_with_grad = [n for n in base if parameters[n].grad is not None]
    assert not base_trainable and not base_with_grad, (base_trainable, base_with_grad)
    trainable = [n for n, p in parameters.items() if p.requires_grad]
    assert trainable and all(".deltas." in f".{n}" for n in trainable), trainable
    without_grad = [n for n in trainable if parameters[n].grad is None]
    assert not without_grad, f"trainable tensors without a gradient: {without_grad}"
    assert any(bool(parameters[n].grad.ne(0).any()) for n in trainable), "every delta gradient is zero"


@supported
def test_merge_equals_unmerged_and_unmerge_restores_base(method, case):
    reference, model, x = _adapted(method, case)
    _perturb(model, "default")
    expected = model(x).detach()
    base_weights = {k: v.clone() for k, v in reference.state_dict().items()}
    if not dt.method_entry(method).delta_cls.mergeable:
        with pytest.raises(NotMergeableError):
            dt.merge(model)
        return
    dt.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)
    dt.unmerge(model)
    restored = {k: v for k, v in model.state_dict().items() if ".deltas." not in f".{k}"}
    for key, value in base_weights.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)


@supported
def test_merge_in_float32_is_within_float_tolerance(method, case):
    base, x = build(case)
    model = dt.adapt(base.float(), _config(method, case))
    _perturb(model, "default", scale=0.05)
    x = x.float() if x.is_floating_point() else x
    expected = model(x).detach()
    if dt.method_entry(method).delta_cls.mergeable:
        dt.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


@supported
def test_unload_gives_plain_modules_with_the_same_output(method, case):
    _, model, x = _adapted(method, case)
    _perturb(model, "default")
    expected = model(x).detach()
    if not dt.method_entry(method).delta_cls.mergeable:
        pytest.skip("not mergeable")
    plain = dt.unload(model, merge=True)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-10)


@supported
def test_base_state_dict_keys_are_unchanged(method, case):
    reference, model, _ = _adapted(method, case)
    base_keys = {k for k in model.state_dict() if ".deltas." not in f".{k}"}
    assert base_keys == set(reference.state_dict())


@supported
def test_save_then_load_gives_identical_outputs(method, case, tmp_path):
    reference, model, x = _adapted(method, case)
    _perturb(model, "default")
    expected = model(x).detach()
    dt.save_adapter(model, tmp_path / "adapter")
    loaded = dt.load_adapter(copy.deepcopy(reference), tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    original = dt.adapter_state_dict(model)
    for key, tensor in dt.adapter_state_dict(loaded).items():
        torch.testing.assert_close(tensor, original[key], rtol=0, atol=0)


@supported
def test_disabled_gives_the_base_output(method, case):
    reference, model, x = _adapted(method, case)
    _perturb(model, "default")
    with dt.disabled(model):
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert not torch.allclose(model(x), reference(x))


@supported
def test_two_named_adapters_coexist(method, case, tmp_path):
    reference, model, x = _adapted(method, case)
    _perturb(model, "default", seed=1)
    first = model(x).detach()
    dt.adapt(model, _config(method, case), name="second")
    _perturb(model, "second", seed=2)
    second = model(x).detach()
    assert dt.active_adapters(model) == ("second",)
    dt.set_active(model, "default")
    torch.testing.assert_close(model(x), first, rtol=0, atol=0)
    dt.set_active(model, ["default", "second"])
    both = model(x).detach()
    if dt.method_entry(method).delta_cls.replaces_base_weight:  # the later weight replaces the earlier one
        torch.testing.assert_close(both, second, rtol=0, atol=0)
    else:
        assert not torch.allclose(both, first) and not torch.allclose(both, second)
    if dt.method_entry(method).delta_cls.mergeable:
        dt.merge(model)
        torch.testing.assert_close(model(x), both, rtol=0, atol=1e-10)
        dt.unmerge(model)
    dt.set_active(model, "second")
    dt.save_adapter(model, tmp_path / "second", name="second")
    reloaded = dt.load_adapter(copy.deepcopy(reference), tmp_path / "second", name="again")
    torch.testing.assert_close(reloaded(x), second, rtol=0, atol=0)


@pytest.mark.parametrize("method,case", [c for c in CASES if not _supports(*c)])
def test_unsupported_layer_kind_raises_a_clear_error(method, case):
    base, _ = build(case)
    with pytest.raises(UnsupportedLayerError, match="cannot adapt 'first'"):
        # layer_types=(): a method's own default type filter (SaRA's) must not hide the layer it cannot adapt
        dt.adapt(base, dt.config_for(method, targets=["first"], layer_types=()))
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())


@pytest.mark.parametrize("method", [m for m in METHODS if _supports(m, "linear")])
def test_compiled_forward_and_backward_match_eager(method):
    torch._dynamo.reset()
    _, model, x = _adapted(method, "linear")
    _perturb(model, "default")
    expected = model(x).detach()
    eager = copy.deepcopy(model)
    eager(x).square().sum().backward()
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-12, atol=1e-12)
    compiled(x).square().sum().backward()
    eager_grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    compiled_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert eager_grads.keys() == compiled_grads.keys()
    assert any(g is not None for g in eager_grads.values()), "no trainable tensor got an eager gradient"
    for name, grad in eager_grads.items():
        if grad is None:
            assert compiled_grads[name] is None, name
        else:
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


# --- real model shapes (issue 9): ViT patch conv, GPT-2's tied head and embedding, ResNet BatchNorm in train mode.
# Each row asks only the methods' declarations (layer_kinds, mergeable); a method either passes or refuses with
# a one-line deltatune error.
from contract.toy_models import output_of, tiny_gpt2, tiny_resnet, tiny_vit  # noqa: E402
from deltatune.core.layers import CONV, EMBEDDING, LINEAR  # noqa: E402
from deltatune.errors import ConfigError, TargetError  # noqa: E402

CLEAR_REFUSALS = (UnsupportedLayerError, TargetError, ConfigError)


def _refuses_clearly(error: BaseException) -> None:
    assert isinstance(error, CLEAR_REFUSALS), repr(error)
    assert "\n" not in str(error).strip() and str(error), str(error)


def _kind_supported(method: str, kind: str) -> bool:
    return kind in dt.method_entry(method).delta_cls.layer_kinds


@pytest.mark.parametrize("method", METHODS)
def test_vit_with_its_patch_conv_adapted_runs_merges_and_reloads(method, tmp_path):
    base, x = tiny_vit()
    config = dt.config_for(method, targets=["projection"])
    if not _kind_supported(method, CONV):
        with pytest.raises(UnsupportedLayerError) as caught:
            dt.adapt(copy.deepcopy(base), config)
        return _refuses_clearly(caught.value)
    model = dt.adapt(copy.deepcopy(base), config)
    _perturb(model, "default")
    expected = output_of(model(x)).detach()  # the model reads projection.weight.dtype: must not crash
    assert not torch.allclose(expected, output_of(base(x)))
    dt.save_adapter(model, tmp_path / "adapter")
    loaded = dt.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(output_of(loaded(x)), expected, rtol=0, atol=0)
    if dt.method_entry(method).delta_cls.mergeable:
        dt.merge(model)
        torch.testing.assert_close(output_of(model(x)), expected, rtol=0, atol=1e-10)


TIED_SIDES = {"lm_head": (LINEAR, "transformer.wte"), "wte": (EMBEDDING, "lm_head")}


@pytest.mark.parametrize("side", sorted(TIED_SIDES))
@pytest.mark.parametrize("method", METHODS)
def test_gpt2_tied_weights_are_refused_by_default_and_merge_exactly_when_untied(method, side):
    base, ids = tiny_gpt2()
    kind, other = TIED_SIDES[side]
    if not _kind_supported(method, kind):
        with pytest.raises(UnsupportedLayerError) as caught:
            dt.adapt(base, dt.config_for(method, targets=[side], layer_types=(kind,)))
        return _refuses_clearly(caught.value)
    with pytest.raises(TargetError) as caught:
        dt.adapt(base, dt.config_for(method, targets=[side], layer_types=(kind,)))
    _refuses_clearly(caught.value)
    assert "lm_head.weight" in str(caught.value) and "transformer.wte.weight" in str(caught.value)
    assert "untie=True" in str(caught.value)
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    try:  # a method may still refuse this layer for its own reason (BitFit: GPT-2's head has no bias)
        model = dt.adapt(base, dt.config_for(method, targets=[side], layer_types=(kind,), untie=True))
    except CLEAR_REFUSALS as error:
        assert base.lm_head.weight is base.transformer.wte.weight, "a refused adapt must leave the tie alone"
        return _refuses_clearly(error)
    assert model.lm_head.weight is not model.transformer.wte.weight
    _perturb(model, "default")
    expected = model(ids).logits.detach()
    untouched = model.get_submodule(other).weight.detach().clone()
    if not dt.method_entry(method).delta_cls.mergeable or _changes_a_missing_bias(model):
        with pytest.raises(NotMergeableError):  # GPT-2's head has no bias to fold SSF's shift into
            dt.merge(model)
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
        return
    dt.merge(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-10)
    assert torch.equal(model.get_submodule(other).weight, untouched)


def _changes_a_missing_bias(model: torch.nn.Module) -> bool:
    """Some delta states a bias change (Δb) for a layer that has no bias: no (W', b') of that layer folds it."""
    return any(getattr(model.get_submodule(path), "bias", None) is None and delta.delta_bias(None) is not None
               for path, _, delta in dt.iter_deltas(model))


@pytest.mark.parametrize("method", METHODS)
def test_default_targets_never_include_gpt2s_tied_head(method):
    base, _ = tiny_gpt2()
    try:
        model = dt.adapt(base, dt.config_for(method))
    except CLEAR_REFUSALS as error:
        assert "tied" not in str(error), str(error)
        return _refuses_clearly(error)
    adapted = {path for path, _, _ in dt.iter_deltas(model)}
    assert adapted and "lm_head" not in adapted and "transformer.wte" not in adapted


@pytest.mark.parametrize("method", METHODS)
def test_resnet_trained_in_train_mode_reloads_with_its_batchnorm_statistics(method, tmp_path):
    base, x = tiny_resnet()
    config = dt.config_for(method, targets=None, layer_types=(CONV,))
    if not _kind_supported(method, CONV):
        with pytest.raises(UnsupportedLayerError) as caught:
            dt.adapt(copy.deepcopy(base), config)
        return _refuses_clearly(caught.value)
    try:  # a method may refuse these layers for its own reason (BitFit: ResNet convs have no bias)
        model = dt.adapt(copy.deepcopy(base), config)
    except CLEAR_REFUSALS as error:
        return _refuses_clearly(error)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # train-mode forwards move every BatchNorm's running statistics
        model(x).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = model(x).logits.detach()
    dt.save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base).eval()
    assert not torch.allclose(dt.load_adapter(copy.deepcopy(fresh), tmp_path / "adapter")(x).logits,
                              _without_statistics(model, fresh, x)), "the statistics make no difference"
    loaded = dt.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)


def _without_statistics(model, fresh, x):
    """The trained adapter on the base's own statistics: what a reload gave before they were saved."""
    copied = copy.deepcopy(model)
    base_buffers = dict(fresh.named_buffers())
    with torch.no_grad():
        for name, buffer in copied.named_buffers():
            if name in base_buffers and "running" in name:
                buffer.copy_(base_buffers[name])
    return copied(x).logits


# --- a causal LM through the Trainer (issue 9, training part) ----------------------------------------------------
# Every registered method, from its declarations alone: plan (if it has a planning stage) with the LM's own loss,
# adapt, train a few steps with its training callbacks, save -> load -> the same logits. A method may refuse the
# model clearly (one-line DeltatuneError) while it is set up; once training starts, nothing may fail.

LM_STEPS = 20  # the shortest run every growth schedule's defaults fit in


def _lm_setup(method: str, data):
    """(model, config, callbacks), or the one-line refusal of the method's set-up."""
    from deltatune.errors import DeltatuneError

    model = tiny_causal_lm()
    try:
        config = dt.config_for(method).plan(model, data.batches(4))  # default loss: the model's own .loss
        model = dt.adapt(model, config)
        return model, config, config.training_callbacks(model, LM_STEPS)
    except DeltatuneError as error:
        message = str(error)
        assert message and "\n" not in message.strip(), message
        return None, None, message


def _lm_logits(model, data) -> torch.Tensor:
    batch = data.batches(len(data))[0]
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", METHODS)
def test_a_causal_lm_trains_through_the_trainer_saves_and_reloads(method, tmp_path):
    from deltatune.recipe import DEFAULT_LR, DEFAULT_METHOD_LR
    from deltatune.train import TrainConfig, Trainer

    data = TokenDataset()
    model, config, callbacks = _lm_setup(method, data)
    if model is None:
        pytest.skip(f"refused clearly: {callbacks}")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    settings = TrainConfig(max_steps=LM_STEPS, batch_size=4, lr=DEFAULT_LR.get(method, DEFAULT_METHOD_LR),
                           log_every=1, progress=False, seed=0)
    result = Trainer(model, settings, data, data, callbacks=callbacks).train()
    losses = [record["loss"] for record in result.history if "loss" in record]
    assert len(losses) == LM_STEPS and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] or len(set(losses)) > 1, losses
    assert math.isfinite(result.metrics["eval_loss"]) and "eval_accuracy" not in result.metrics  # token labels
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in frozen.items()), "a frozen tensor changed"
    assert any(not torch.equal(after[n], value) for n, value in trainable.items() if n in after)
    expected = _lm_logits(model, data)
    dt.save_adapter(model, tmp_path / "adapter")
    loaded = dt.load_adapter(tiny_causal_lm(), tmp_path / "adapter")
    torch.testing.assert_close(_lm_logits(loaded, data), expected, rtol=0, atol=0)


@pytest.mark.usefixtures("one_thread")
def test_the_causal_lm_row_covers_every_method_and_most_train():
    """The row is not vacuous: set-up refusals stay the exception."""
    data = TokenDataset()
    refused = [m for m in METHODS if _lm_setup(m, data)[0] is None]
    assert len(refused) <= len(METHODS) // 4, refused


# --- bfloat16 rows: the same adapted values in float64 are the reference ----------------------------------------
# bfloat16 keeps 8 significant bits (one rounding: 2^-9 relative); through two layers, a few roundings of each
# product and sum add up to about 0.6% of the output scale. Merging rounds W + ΔW to bfloat16 once more.
BF16_TOLERANCE = 1.5e-2  # measured worst: 0.58% (id3 on transformers Conv1D), forward and merged


def _bf16_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Worst absolute difference, as a share of the reference's scale (at least 1)."""
    return float((output.detach().double() - reference).abs().max()) / max(1.0, float(reference.abs().max()))


@supported
def test_bfloat16_forward_merge_and_unmerge_stay_within_bfloat16_tolerance(method, case):
    base, x = build(case)
    try:
        model = dt.adapt(base.to(torch.bfloat16), _config(method, case))
    except CLEAR_REFUSALS as error:
        return _refuses_clearly(error)
    _perturb(model, "default", scale=0.05)
    reference = copy.deepcopy(model).double()(x).detach()  # float64 on the very same bfloat16 values
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    output = model(x).detach()
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()
    assert _bf16_error(output, reference) <= BF16_TOLERANCE
    if not dt.method_entry(method).delta_cls.mergeable:
        with pytest.raises(NotMergeableError):
            dt.merge(model)
        return
    dt.merge(model)
    assert _bf16_error(model(x), reference) <= BF16_TOLERANCE
    dt.unmerge(model)
    assert _bf16_error(model(x), reference) <= BF16_TOLERANCE

