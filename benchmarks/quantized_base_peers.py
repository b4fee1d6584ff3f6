"""Peer quantizers on CPU with the torch pin, and deltatune's int8 / NF4 against them on the same weights.

Runs in a scratch venv that holds the peers (they are no dependency of deltatune):

    python3 -m venv /work/runs/venv-quant
    /work/runs/venv-quant/bin/pip install torch==2.13.0 -c constraints.txt
    /work/runs/venv-quant/bin/pip install bitsandbytes==0.50.2 torchao==0.18.0 optimum-quanto==0.2.7 -c constraints.txt
    PYTHONPATH=src /work/runs/venv-quant/bin/python benchmarks/quantized_base_peers.py \\
        --json benchmarks/results/quantized_base_peers.json

Part 1 (runs): does each peer's 4-bit and 8-bit Linear run forward and backward on CPU (a 384x384 Linear, batch 8),
and how far is its output from the float32 layer's. Part 2 (same weights): deltatune's NF4 codebook vs
bitsandbytes'; our dequantized NF4 weight (no double quantization) vs bitsandbytes' (equal codes give equal values
up to the codebooks' float rounding, ~2e-7); the relative Frobenius error of NF4 with double quantization (ours:
int8 constants; bitsandbytes: its 8-bit dynamic map; torchao's NF4Tensor); int8 per-row codes vs bitsandbytes'
`int8_vectorwise_quant` (which reads a float16 copy, so a few codes differ by rounding).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from deltatune.functional import quantize as q


def part_runs() -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 384)
    x = torch.randn(8, 384, requires_grad=True)
    reference = linear(x).detach()
    builders = {**_bitsandbytes(linear), **_torchao(linear), **_quanto(linear)}
    return {name: _attempt(build, x, reference) for name, build in builders.items()}


def _attempt(build, x: torch.Tensor, reference: torch.Tensor) -> dict:
    try:
        start = time.perf_counter()
        y = build()(x)
        y.float().sum().backward()
        return {"runs": True, "max_abs_vs_fp32": float((y.float() - reference).abs().max()),
                "seconds_first_call": time.perf_counter() - start}
    except Exception as error:  # a peer that cannot run here is the finding, not a failure of the script
        return {"runs": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    finally:
        x.grad = None


def _bitsandbytes(linear: torch.nn.Linear) -> dict:
    import bitsandbytes as bnb

    def four_bit():
        layer = bnb.nn.Linear4bit(384, 384, quant_type="nf4", compute_dtype=torch.float32)
        layer.load_state_dict(linear.state_dict())
        return layer.to("cpu")

    def eight_bit():
        layer = bnb.nn.Linear8bitLt(384, 384, has_fp16_weights=False)
        layer.load_state_dict(linear.state_dict())
        return layer.to("cpu")

    return {f"bitsandbytes {bnb.__version__} Linear4bit nf4": four_bit,
            f"bitsandbytes {bnb.__version__} Linear8bitLt": eight_bit}


def _torchao(linear: torch.nn.Linear) -> dict:
    import torchao
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

    def with_config(config):
        def build():
            layer = copy.deepcopy(linear)
            quantize_(layer, config)
            return layer
        return build

    class NF4(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = to_nf4(linear.weight.detach()), linear.bias.detach()

        def forward(self, inputs):
            return linear_nf4(inputs, self.weight) + self.bias

    version = torchao.__version__
    return {f"torchao {version} Int8WeightOnly": with_config(Int8WeightOnlyConfig()),
            f"torchao {version} Int4WeightOnly": with_config(Int4WeightOnlyConfig()),
            f"torchao {version} NF4Tensor + linear_nf4": NF4}


def _quanto(linear: torch.nn.Linear) -> dict:
    import optimum.quanto as quanto

    def with_weights(weights):
        def build():
            layer = torch.nn.Sequential(copy.deepcopy(linear))
            quanto.quantize(layer, weights=weights)
            quanto.freeze(layer)
            return layer
        return build

    return {"optimum-quanto qint8": with_weights(quanto.qint8), "optimum-quanto qint4": with_weights(quanto.qint4)}


def part_same_weights() -> dict:
    import bitsandbytes.functional as bf
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    torch.manual_seed(0)
    weights = {"normal 384x1536 (std 0.05)": torch.randn(384, 1536) * 0.05,
               "Student-t(3) 384x384 (x0.02)": torch.distributions.StudentT(3.0).sample((384, 384)) * 0.02}
    codebook = torch.as_tensor(bf.get_4bit_type("nf4", device="cpu")).sort().values
    results = {"codebook max |ours - bitsandbytes|": float((q.nf4_codebook() - codebook).abs().max())}
    for name, weight in weights.items():
        def relative(approx, weight=weight):
            return float((approx.float() - weight).norm() / weight.norm())

        packed, absmax = q.quantize_nf4(weight)
        ours = q.dequantize_nf4(packed, absmax, weight.shape)
        codes, state = bf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
        theirs = bf.dequantize_4bit(codes, state)
        codes_dq, state_dq = bf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        constants = q.quantize_constants(absmax)
        ours_dq = q.dequantize_nf4(packed, q.dequantize_constants(*constants), weight.shape)
        torchao_dq = to_nf4(weight, block_size=64, scaler_block_size=256).get_original_weight()
        int8_codes, int8_scales = q.quantize_int8_rows(weight)
        bnb_int8, _, _ = bf.int8_vectorwise_quant(weight.half())
        results[name] = {
            "nf4 max |ours - bitsandbytes| (no double quant)": float((ours - theirs).abs().max()),
            "nf4 relative error: ours, bitsandbytes": [relative(ours), relative(theirs)],
            "nf4 + double quant relative error: ours, bitsandbytes, torchao":
                [relative(ours_dq), relative(bf.dequantize_4bit(codes_dq, state_dq)), relative(torchao_dq)],
            "int8 share of codes equal to bitsandbytes'": float((int8_codes == bnb_int8).float().mean()),
            "int8 relative error (ours)": relative(q.dequantize_int8_rows(int8_codes, int8_scales)),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="benchmarks/results/quantized_base_peers.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    payload = {"torch": torch.__version__, "runs on CPU": part_runs(), "same weights": part_same_weights()}
    target = Path(args.json)
    temporary = target.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    temporary.replace(target)
    print(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
