"""The training loop: `Trainer` + `TrainConfig`, callbacks, schedules, checkpoints, seeding.

    from deltatune.train import Trainer, TrainConfig
    result = Trainer(model, TrainConfig(epochs=2, lr=1e-3, output_dir="runs/a"), train, valid).train()

Runs unchanged as one process or under `torchrun --nproc_per_node=N` (DistributedDataParallel).
"""
from deltatune.train.callbacks import Callback
from deltatune.train.checkpoint import latest_checkpoint, list_checkpoints
from deltatune.train.config import TrainConfig
from deltatune.train.high_frequency import HighFrequencyLoss
from deltatune.train.landscape import ConnectivityCurve, linear_cka, lmc_barrier
from deltatune.train.long_tail import LogitAdjustedLoss, logit_ensemble
from deltatune.train.losses import causal_lm_loss, cross_entropy
from deltatune.train.progress import TrainingProgress
from deltatune.train.prunability import PrunabilityTask, SweepCell, label_regimes, prunability_sweep, recommend
from deltatune.train.pruning import PrunedWeights, magnitude_masks
from deltatune.train.pskd import ProgressiveSelfKnowledgeDistillation
from deltatune.train.remax import ReMax, ReMaxConfig
from deltatune.train.sample_index import with_sample_index
from deltatune.train.schedules import build_scheduler, lr_multiplier
from deltatune.train.seeding import set_seed
from deltatune.train.trainer import Trainer, TrainResult
from deltatune.train.unfreezing import ProgressiveUnfreezing

__all__ = [
    "Callback", "HighFrequencyLoss", "LogitAdjustedLoss", "TrainConfig", "TrainResult", "Trainer", "build_scheduler",
    "causal_lm_loss",
    "cross_entropy", "TrainingProgress", "latest_checkpoint", "list_checkpoints", "lr_multiplier", "set_seed",
    "ProgressiveSelfKnowledgeDistillation", "ProgressiveUnfreezing", "ReMax", "ReMaxConfig", "with_sample_index",
    "logit_ensemble",
    "ConnectivityCurve", "lmc_barrier", "linear_cka", "PrunedWeights", "magnitude_masks", "PrunabilityTask",
    "SweepCell", "label_regimes", "prunability_sweep", "recommend",
]
