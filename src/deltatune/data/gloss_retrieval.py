"""The `gloss-retrieval` task: find a WordNet definition's lemma among every lemma, with a MiniLM bi-encoder.

Dense first-stage retrieval at laptop scale (the setting of "Scattered or Connected?", methods/iaa.py): the
query is a definition ("a kind act"), the documents are lemmas ("kindness"), both embedded by one shared
MiniLM (masked mean pooling, L2-normalized, as all-MiniLM-L6-v2 was trained) and ranked by cosine similarity.

Data: the 2,876 held-out noun and verb synsets shipped for WordNet-LM (`wordnet-lm-heldout.jsonl.gz`, Princeton
WordNet 3.0, its fixed train / validation / test splits of 2,376 / 250 / 250). The candidate pool is every
distinct lemma of all three splits (underscores as spaces), so a test query competes with 2.8k lemmas, most of
them seen in training as other queries' answers. `labels` index that pool; `label_names` is the pool.

Training loss (the model's own, from `labels`): in-batch InfoNCE at temperature 0.05 (MiniLM's scale 20),
queries against the batch's lemmas; a batch lemma equal to the query's own answer but in another row is left
out of the negatives. Metric (`score`, higher is better): MRR@10 over the pool; `retrieval_metrics` also gives
recall@1 and recall@10.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from deltatune.data.datasets import LABELS, TensorDictDataset
from deltatune.data.models import load_minilm_backbone, masked_mean
from deltatune.data.task import SPLITS, Task, limit_train_size
from deltatune.data.wordnet import tokenize
from deltatune.data.wordnet_lm import read_heldout_rows
from deltatune.errors import ConfigError

NAME = "gloss-retrieval"
DESCRIPTION = ("WordNet definition -> its lemma among all 2.8k lemmas, MiniLM bi-encoder (in-batch InfoNCE); "
               "metric: MRR@10")
METRIC = "mrr@10"
TEMPERATURE = 0.05
LEMMA_TOKENS = 16  # the longest lemma of the pool: 16 MiniLM tokens with [CLS] and [SEP]
DOC_PREFIX = "doc_"


@dataclass
class RetrievalOutput:
    """What the bi-encoder returns: the in-batch loss (when given lemmas and labels) and the embeddings."""

    loss: Tensor | None
    queries: Tensor
    documents: Tensor | None


class BiEncoder(nn.Module):
    """One encoder for queries and documents: normalized masked-mean embeddings, cosine similarity."""

    def __init__(self, backbone: nn.Module, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature!r} is invalid: expected a number > 0 (MiniLM: 0.05)")
        self.backbone = backbone
        self.temperature = temperature

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(masked_mean(hidden, attention_mask), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, doc_input_ids: Tensor | None = None,
                doc_attention_mask: Tensor | None = None, labels: Tensor | None = None) -> RetrievalOutput:
        queries = self.embed(input_ids, attention_mask)
        if doc_input_ids is None:
            return RetrievalOutput(None, queries, None)
        documents = self.embed(doc_input_ids, doc_attention_mask)
        loss = in_batch_loss(queries, documents, labels, self.temperature) if labels is not None else None
        return RetrievalOutput(loss, queries, documents)


def in_batch_loss(queries: Tensor, documents: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """InfoNCE: row i's positive is document i; documents of another row with the same label are not negatives."""
    logits = queries @ documents.T / temperature
    same_answer = labels.unsqueeze(1) == labels.unsqueeze(0)
    other_rows = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(same_answer & other_rows, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(labels), device=logits.device))


def build_bi_encoder(num_classes: int | None = None) -> BiEncoder:
    """A BiEncoder on a freshly read MiniLM (`num_classes` is accepted for the task-factory signature)."""
    del num_classes
    return BiEncoder(load_minilm_backbone())


def lemma_text(lemma: str) -> str:
    return lemma.replace("_", " ")


def lemma_pool(rows: Sequence[dict]) -> tuple[str, ...]:
    """Every distinct lemma of `rows`, as text, sorted (the candidate documents; labels index it)."""
    return tuple(sorted({lemma_text(row["lemma"]) for row in rows}))


@torch.no_grad()
def embed_texts(model: BiEncoder, ids: Tensor, mask: Tensor, batch_size: int = 256) -> Tensor:
    """Embeddings of tokenized texts in eval mode, batched, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        parts = [model.embed(ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device))
                 for i in range(0, len(ids), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def ranks_of_answers(queries: Tensor, pool: Tensor, labels: Tensor) -> Tensor:
    """1-based rank of each query's answer among the pool (ties count against the answer)."""
    scores = queries @ pool.T
    answer = scores.gather(1, labels.view(-1, 1).to(scores.device))
    return (scores >= answer).sum(dim=1).cpu()


class PoolScorer:
    """`task.scorer`: MRR@10 of a split's queries over the tokenized lemma pool."""

    def __init__(self, pool_ids: Tensor, pool_mask: Tensor) -> None:
        self.pool_ids, self.pool_mask = pool_ids, pool_mask

    def metrics(self, model: BiEncoder, dataset: TensorDictDataset, k: int = 10) -> dict[str, float]:
        queries = embed_texts(model, dataset.tensors["input_ids"], dataset.tensors["attention_mask"])
        pool = embed_texts(model, self.pool_ids, self.pool_mask)
        ranks = ranks_of_answers(queries, pool, dataset.labels).double()
        reciprocal = torch.where(ranks <= k, 1.0 / ranks, torch.zeros_like(ranks))
        return {f"mrr@{k}": float(reciprocal.mean()), "recall@1": float((ranks <= 1).double().mean()),
                f"recall@{k}": float((ranks <= k).double().mean())}

    def __call__(self, model: nn.Module, dataset: Dataset) -> float:
        return self.metrics(model, dataset)[METRIC]


def build_retrieval_splits(rows: Sequence[dict], pool: Sequence[str], max_length: int) -> dict[str, TensorDictDataset]:
    index = {lemma: i for i, lemma in enumerate(pool)}
    splits = {}
    for split in SPLITS:
        chosen = [row for row in rows if row["split"] == split]
        queries = tokenize([row["gloss"] for row in chosen], max_length)
        documents = tokenize([lemma_text(row["lemma"]) for row in chosen], LEMMA_TOKENS)
        labels = torch.tensor([index[lemma_text(row["lemma"])] for row in chosen], dtype=torch.long)
        tensors = {**queries, **{DOC_PREFIX + key: value for key, value in documents.items()}, LABELS: labels}
        splits[split] = TensorDictDataset(tensors, [row["gloss"] for row in chosen])
    return splits


def load_gloss_retrieval_task(*, max_length: int = 32, train_size: int | None = None, seed: int = 0) -> Task:
    """The gloss-retrieval task; `seed` only picks the `train_size` subset (splits and pool are fixed)."""
    rows = read_heldout_rows()
    pool = lemma_pool(rows)
    splits = build_retrieval_splits(rows, pool, max_length)
    encoded_pool = tokenize(list(pool), LEMMA_TOKENS)
    return Task(
        name=NAME, description=DESCRIPTION, label_names=pool,
        train=limit_train_size(splits["train"], train_size, seed), validation=splits["validation"],
        test=splits["test"], model_factory=build_bi_encoder, extra_trainable=(), default_targets=("query", "value"),
        metric=METRIC, scorer=PoolScorer(encoded_pool["input_ids"], encoded_pool["attention_mask"]),
    )
