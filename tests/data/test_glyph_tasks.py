"""The glyph-backbone tasks: documented sizes, items, heads, the shipped backbones' accuracy, CLI, save/load."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.cli import main as cli_main
from deltatune.data import GlyphCNN, GlyphViT, evaluate_accuracy, list_tasks, load_glyph_cnn, load_glyph_vit, load_task
from deltatune.data.datasets import TensorDictDataset
from deltatune.data.glyph_tasks import glyph_task_names
from deltatune.data.glyphs import FILES_DIR, glyph_subset, read_glyphs
from deltatune.errors import ConfigError

SIZES = {  # train / validation / test, as documented in src/deltatune/data/README.md
    "glyphs": (14632, 3100, 3224), "glyphs-novel": (4752, 720, 1200), "glyphs-rotated": (14632, 3100, 3224),
    "handwritten": (1259, 179, 359),
}
CLASSES = {"glyphs": 62, "glyphs-novel": 24, "glyphs-rotated": 62, "handwritten": 10}
LOADERS = {"vit": load_glyph_vit, "cnn": load_glyph_cnn}


def card_summary(kind: str) -> dict:
    return json.loads((FILES_DIR / f"glyph-{kind}-pretrain.json").read_text(encoding="utf-8"))


def test_every_glyph_task_is_registered():
    assert set(glyph_task_names()) <= set(list_tasks())
    assert len(glyph_task_names()) == 8


@pytest.mark.parametrize("name", sorted(glyph_task_names()))
def test_task_loads_with_the_documented_sizes_and_items(name):
    base, _, backbone = name.rpartition("-")
    task = load_task(name)
    assert (len(task.train), len(task.validation), len(task.test)) == SIZES[base]
    assert task.num_classes == CLASSES[base]
    assert set(task.test.labels.tolist()) == set(range(task.num_classes))
    batch = task.collate([task.train[i] for i in range(4)])
    assert set(batch) == {"pixels", "labels"}
    assert batch["pixels"].shape == (4, 1, 16, 16) and batch["pixels"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    pixels = task.train.tensors["pixels"]
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    assert task.default_targets == (("q_proj", "v_proj") if backbone == "vit" else ("conv",))


def test_few_shot_train_size_and_fixed_corruption():
    few = load_task("handwritten-cnn", train_size=50, seed=1)
    assert len(few.train) == 50 and torch.bincount(few.train.labels).tolist() == [5] * 10
    first, again = load_task("glyphs-rotated-cnn"), load_task("glyphs-rotated-vit")
    assert torch.equal(first.test.tensors["pixels"], again.test.tensors["pixels"])
    plain = load_task("glyphs-cnn")
    assert not torch.equal(first.test.tensors["pixels"], plain.test.tensors["pixels"])


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_heads_start_from_the_pretrained_rows_or_fresh(kind):
    pretrained = LOADERS[kind]().classifier
    handwritten = load_task(f"handwritten-{kind}").build_model()
    assert torch.equal(handwritten.classifier.weight, pretrained.weight[:10])
    torch.manual_seed(0)
    fresh = load_task(f"handwritten-{kind}").build_model(head="fresh")
    assert not torch.equal(fresh.classifier.weight, pretrained.weight[:10])
    with pytest.raises(ConfigError, match="head='fresh'"):
        load_task(f"glyphs-novel-{kind}").build_model(head="pretrained")
    assert load_task(f"glyphs-novel-{kind}").build_model().classifier.out_features == 24


def test_loaders_return_the_documented_architectures():
    vit, cnn = load_glyph_vit(), load_glyph_cnn()
    assert isinstance(vit, GlyphViT) and isinstance(cnn, GlyphCNN)
    names = dict(vit.named_modules())
    assert "backbone.layers.0.attention.q_proj" in names and "backbone.layers.3.attention.v_proj" in names
    assert vit.training and cnn.training  # like a fresh model; callers switch to eval
    pixels = torch.rand(3, 1, 16, 16)
    assert vit.features(pixels).shape == (3, 128) and cnn.features(pixels).shape == (3, 128)
    assert load_glyph_cnn(num_classes=5).classifier.out_features == 5


def test_cnn_batchnorm_statistics_are_the_pretrained_ones():
    from safetensors.torch import load_file

    stored = load_file(str(FILES_DIR / "glyph-cnn.safetensors"))
    norm = load_task("glyphs-cnn").build_model().blocks[0].norm
    assert torch.equal(norm.running_mean, stored["blocks.0.norm.running_mean"])
    assert float(norm.running_var.sub(1).abs().max()) > 0.01  # not the fresh (0, 1) statistics


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_shipped_backbones_reach_their_card_accuracy(kind):
    """Every 4th test-font image (806 of 3,224): the shipped weights must be the trained ones."""
    pixels, labels = glyph_subset(read_glyphs(), "test")
    subset = TensorDictDataset({"pixels": pixels[::4], "labels": labels[::4]})
    accuracy = evaluate_accuracy(LOADERS[kind](), subset, batch_size=512)
    assert accuracy >= card_summary(kind)["test_accuracy"] - 0.03


def test_cli_trains_a_few_steps_on_a_glyph_task(tmp_path, capsys):
    code = cli_main(["train", "--task", "glyphs-novel-vit", "--max-steps", "5", "--out", str(tmp_path / "run")])
    assert code == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (tmp_path / "run" / "adapter").is_dir()


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_lora_save_then_load_gives_identical_outputs(kind, tmp_path):
    task = load_task(f"glyphs-novel-{kind}")
    targets = ("q_proj", "v_proj") if kind == "vit" else ("conv",)
    torch.manual_seed(0)
    model = dt.adapt(task.build_model(), dt.config_for("lora", rank=4, targets=targets,
                                                       extra_trainable=("classifier",)))
    with torch.no_grad():  # move the deltas off their zero init so the check means something
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    dt.save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(1)
    loaded = dt.load_adapter(task.build_model(), tmp_path / "adapter")
    pixels = task.test.tensors["pixels"][:16]
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(pixels), loaded(pixels))
