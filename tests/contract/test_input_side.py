"""The contract for input-side deltas (layer kind MODULE: prompts, VPT), driven by declarations only.

The layer matrix (test_matrix.py) runs methods on Linear / Conv / Embedding / Conv1D layers; a method that acts on
whole modules joins here instead: on a tiny ViT, a tiny BERT encoder and a tiny Llama causal LM it either refuses
clearly (one-line deltatune error, at adapt or on the first call) or passes save -> load identical, disable
gives the base, two named adapters coexist, merge is refused and leaves the model untouched, unload restores
the base. Every such method must run on at least one of the models. Nothing here names a method.
"""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from contract.toy_models import tiny_causal_lm, tiny_vit
from deltatune.core.layers import MODULE
from deltatune.errors import DeltatuneError, NotMergeableError

INPUT_METHODS = [e.name for e in dt.list_methods() if MODULE in e.delta_cls.layer_kinds]


class _Encoder(torch.nn.Module):
    """A BERT encoder as deltatune's classifiers hold it: `backbone` (input_ids, attention_mask) -> hidden."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask)


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    ids = torch.randint(1, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return _Encoder(BertModel(config)).double().eval(), {"input_ids": ids, "attention_mask": mask}


def _vit():
    model, x = tiny_vit()
    return model, {"pixel_values": x}


def _llama():
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    return tiny_causal_lm().eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODELS = {"vit": _vit, "bert": tiny_bert, "llama": _llama}


def _out(model, inputs) -> torch.Tensor:
    """The first position's output (VPT's prompts stay in the sequence after CLS, by design)."""
    with torch.no_grad():
        output = model(**inputs)
    return (output.logits if hasattr(output, "logits") else output.last_hidden_state)[:, 0]


def _perturb(model, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model, name):
            for parameter in delta.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def _adapted_or_refusal(method: str, case: str, name: str = "default", base=None):
    model, inputs = MODELS[case]()
    model = base if base is not None else model
    try:
        dt.adapt(model, dt.config_for(method), name)
        _perturb(model, name, seed=len(name))
        _out(model, inputs)
    except DeltatuneError as error:
        assert str(error) and "\n" not in str(error).strip(), str(error)
        return None, inputs, str(error)
    return model, inputs, ""


@pytest.mark.parametrize("method", INPUT_METHODS)
def test_every_input_side_method_runs_on_some_model(method):
    ran = [case for case in MODELS if _adapted_or_refusal(method, case)[0] is not None]
    assert ran, f"{method} refused every model"


@pytest.mark.parametrize("case", list(MODELS))
@pytest.mark.parametrize("method", INPUT_METHODS)
def test_save_load_disable_two_adapters_merge_refused_unload(method, case, tmp_path):
    base, inputs = MODELS[case]()
    reference = _out(base, inputs)
    model, _, refusal = _adapted_or_refusal(method, case, base=copy.deepcopy(base))
    if model is None:
        pytest.skip(f"refused clearly: {refusal}")
    adapted = _out(model, inputs)
    assert not torch.allclose(adapted, reference), "the adapter changes nothing"
    with dt.disabled(model):
        torch.testing.assert_close(_out(model, inputs), reference, rtol=0, atol=0)

    dt.save_adapter(model, tmp_path / "a")
    loaded = dt.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(_out(loaded, inputs), adapted, rtol=0, atol=0)

    dt.adapt(model, dt.config_for(method), "second")
    _perturb(model, "second", seed=11)
    second = _out(model, inputs)
    assert not torch.allclose(second, adapted)
    dt.set_active(model, ["default"])
    torch.testing.assert_close(_out(model, inputs), adapted, rtol=0, atol=0)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotMergeableError):
        dt.merge(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "a refused merge changed the model"
    torch.testing.assert_close(_out(model, inputs), adapted, rtol=0, atol=0)

    dt.unload(model, merge=False)
    torch.testing.assert_close(_out(model, inputs), reference, rtol=0, atol=0)
