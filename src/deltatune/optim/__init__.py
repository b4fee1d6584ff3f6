"""Update rules: how gradients become updates (LoRA+, LoRA-Pro, SAM, LoRA-MGPO; AdamR for DAREx).

Rules reach deltas only through declared capabilities (`core.capabilities.HasLowRankPair` for the (A, B)
rules), so each works on every method that declares them. See README.md in this folder.
"""
from deltatune.optim.lora_pro import LoRAPro, adjusted_gradients, equivalent_gradient, solve_sylvester
from deltatune.optim.loraplus import create_loraplus_optimizer, loraplus_param_groups
from deltatune.optim.mgpo import MGPO
from deltatune.optim.pairs import FactorPair, factor_pairs
from deltatune.optim.rules import UPDATE_RULES, NeedsClosure, PerturbsForward, available_update_rules, build_update_rule
from deltatune.optim.sam import SAM

__all__ = ["MGPO", "SAM", "UPDATE_RULES", "FactorPair", "LoRAPro", "NeedsClosure", "PerturbsForward",
           "adjusted_gradients",
           "available_update_rules", "build_update_rule", "create_loraplus_optimizer", "equivalent_gradient",
           "factor_pairs", "loraplus_param_groups", "solve_sylvester"]
