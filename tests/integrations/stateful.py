"""A stateful training callback shared by the host tests: resuming must bring its state back."""
from __future__ import annotations


class FreezeAfter:
    """Zeroes the gradients once it has counted 6 steps of its own; a resume that loses its count would train
    two steps more than the uninterrupted run."""

    def __init__(self) -> None:
        self.count = 0

    def on_backward_end(self, model, **_):
        self.count += 1
        if self.count > 6:
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.grad.zero_()

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]
