"""gloss-retrieval: the in-batch loss against a hand-written float64 one (with duplicate answers left out of
the negatives), ranks and MRR@10 on constructed embeddings, and the shipped splits and lemma pool."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from deltatune.data import gloss_retrieval as gr
from deltatune.data.models import load_minilm_tokenizer
from deltatune.errors import ConfigError


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_in_batch_loss_is_cross_entropy_over_the_batch_lemmas():
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(4, 5, generator=generator, dtype=torch.float64), dim=-1)
    documents = F.normalize(torch.randn(4, 5, generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.tensor([3, 1, 7, 2])
    expected = 0.0
    for i in range(4):
        logits = [float(queries[i] @ documents[j]) / 0.05 for j in range(4)]
        expected -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    loss = gr.in_batch_loss(queries, documents, labels, temperature=0.05)
    assert loss.item() == pytest.approx(expected / 4, rel=1e-12)


def test_a_repeated_answer_in_the_batch_is_not_a_negative():
    queries = _unit([1.0, 0.0], [0.0, 1.0])
    documents = _unit([1.0, 0.0], [1.0, 0.0])  # both rows' answers are the same lemma
    same = gr.in_batch_loss(queries, documents, torch.tensor([5, 5]), temperature=0.05)
    different = gr.in_batch_loss(queries, documents, torch.tensor([5, 6]), temperature=0.05)
    assert same.item() == pytest.approx(0.0, abs=1e-12)  # each row is left with its own document only
    assert different.item() == pytest.approx(math.log(2), rel=1e-12)  # two equally scored candidates per row


def test_ranks_and_reciprocal_ranks_on_constructed_embeddings():
    pool = _unit([1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0])
    queries = _unit([1.0, 0.1], [0.0, 1.0], [1.0, 0.0])
    labels = torch.tensor([1, 2, 3])
    ranks = gr.ranks_of_answers(queries, pool, labels)
    assert ranks.tolist() == [2, 1, 4]


class _Fixed(torch.nn.Module):
    """A 'model' whose embedding of token row i is a fixed vector: for the scorer's arithmetic."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.training = True

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids[:, 0]]


def test_pool_scorer_reports_mrr_at_10_and_recalls():
    table = _unit(*[[math.cos(a), math.sin(a)] for a in torch.linspace(0, 3, 14).tolist()])
    pool_ids = torch.arange(12).view(-1, 1)
    scorer = gr.PoolScorer(pool_ids, torch.ones_like(pool_ids))
    queries = torch.tensor([[0], [5], [13]])  # 13 sits beyond the pool's last vector: its answer 0 ranks last
    dataset = gr.TensorDictDataset({"input_ids": queries, "attention_mask": torch.ones_like(queries),
                                    "labels": torch.tensor([0, 5, 0])})
    metrics = scorer.metrics(_Fixed(table), dataset)
    assert metrics == pytest.approx({"mrr@10": (1 + 1 + 0) / 3, "recall@1": 2 / 3, "recall@10": 2 / 3})


@functools.cache
def _task():
    return gr.load_gloss_retrieval_task()


def test_the_shipped_splits_and_pool():
    task = _task()
    assert (len(task.train), len(task.validation), len(task.test)) == (2376, 250, 250)
    pool = task.label_names
    assert len(pool) == len(set(pool)) and list(pool) == sorted(pool)
    rows = gr.read_heldout_rows()
    test_rows = [row for row in rows if row["split"] == "test"]
    assert [pool[i] for i in task.test.labels.tolist()] == [gr.lemma_text(r["lemma"]) for r in test_rows]
    lengths = [len(ids) for ids in load_minilm_tokenizer()(list(pool))["input_ids"]]
    assert max(lengths) <= gr.LEMMA_TOKENS  # no lemma is cut


def test_the_bi_encoder_computes_its_own_loss_from_labels():
    task = _task()
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.collate([task.train[i] for i in range(8)])
    output = model(**batch)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert torch.allclose(output.queries.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert model(batch["input_ids"], batch["attention_mask"]).loss is None
    with pytest.raises(ConfigError, match="temperature"):
        gr.BiEncoder(model.backbone, temperature=0.0)
