"""Tiny sharded safetensors checkpoints written into a temporary folder, HF layout (index + config.json)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYERS = 3


def tiny_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(11, 6, generator=generator)}
    for layer in range(LAYERS):
        state[f"model.layers.{layer}.mlp.up_proj.weight"] = torch.randn(8, 6, generator=generator)
        state[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(6, 6, generator=generator)
        norm = torch.ones(6) + 0.1 * torch.randn(6, generator=generator)
        state[f"model.layers.{layer}.input_layernorm.weight"] = norm
    state["model.norm.weight"] = torch.ones(6)
    state = {k: v.to(dtype) for k, v in state.items()}
    state["model.rotary.step"] = torch.tensor([7], dtype=torch.int64)
    return state


def finetuned(base: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v)
            for k, v in base.items()}


def save_checkpoint(state: dict[str, torch.Tensor], folder: Path, shards: int = 2,
                    config: dict | None = None) -> Path:
    """Save `state` as `shards` safetensors files + model.safetensors.index.json + config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = names[index::shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / file_name))
        weight_map.update({k: file_name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"num_hidden_layers": LAYERS, "torch_dtype": "float32", "model_type": "tiny"} if config is None else config
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"tiny": true}')
    return folder


def make_models(root: Path, count: int = 3, dtype: torch.dtype = torch.float32, shards: int = 2):
    """(base folder, [fine-tune folders], base state, [fine-tune states])."""
    base = tiny_state(0, dtype)
    tuned = [finetuned(base, 100 + i, 0.05 * (i + 1)) for i in range(count)]
    base_dir = save_checkpoint(base, root / "base", shards)
    dirs = [save_checkpoint(state, root / f"ft{i}", shards + i % 2) for i, state in enumerate(tuned)]
    return base_dir, dirs, base, tuned


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors
