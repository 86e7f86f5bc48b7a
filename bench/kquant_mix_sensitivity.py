"""Which linears of the model a low-bit GGUF type hurts most: the measurement behind the q3_k mixes.

For each kind of linear (the six per-block linears, and the linears outside the blocks), that
kind alone is stored in TYPE (quantized and decoded by ideoquant's ggml codecs, byte-identical
to ggml), every other tensor stays float32, and the velocity of the model is compared with the
float32 model's on held-out synthetic inputs. Then the whole-model error of every GGUF format
given on --formats (each tensor in the type `gguf_tensor_types` chooses) is measured the same
way, with the bits per block weight it costs.

The model is a synthetic Ideogram-4-shaped checkpoint (tiny widths, activation-outlier
channels); run it with another --seed / --layers than the one the mixes were chosen on to
check that the choice holds on a model it was not made on.

    .venv/bin/python bench/kquant_mix_sensitivity.py --seed 0 --layers 4
    .venv/bin/python bench/kquant_mix_sensitivity.py --seed 7 --layers 6 --input-seed 555
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ideoquant.calibrate.inputs import synthetic_calls
from ideoquant.calibrate.source_model import load_source_transformer
from ideoquant.codecs.ggml.registry import ggml_type
from ideoquant.io.source import open_source
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.recipes.gguf_policy import gguf_tensor_types

IMAGE_INDICATOR = 2
BLOCK_KINDS = (
    "attention.qkv",
    "attention.o",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaln_modulation",
)


def kind_of(name: str) -> str:
    """The linear kind of a tensor name: a per-block kind, or the tensor itself outside the blocks."""
    if name.startswith("layers."):
        return name.split(".", 2)[2].rsplit(".", 1)[0]
    return name.rsplit(".", 1)[0]


class RoundTripSource:
    """A branch source whose chosen tensors read back as decode(encode(tensor)) in a ggml type."""

    def __init__(self, bs, types: dict[str, object]):
        self._bs, self._types = bs, types

    def __getattr__(self, name):
        return getattr(self._bs, name)

    def read_float32(self, name: str) -> torch.Tensor:
        t = self._bs.read_float32(name)
        qtype = self._types.get(name)
        if qtype is None:
            return t
        cls = ggml_type(qtype)
        return cls.dequantize_rows(cls.quantize_tensor(t)).reshape(t.shape)


@torch.no_grad()
def velocity(bs, calls: list[dict]) -> torch.Tensor:
    model = load_source_transformer(bs, keep_fp8=False)
    out = []
    for call in calls:
        v = model(**call, return_dict=False)[0]
        out.append(v[0, call["indicator"][0] == IMAGE_INDICATOR])
    return torch.cat(out)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="Q3_K", help="ggml type of the per-kind measurement")
    parser.add_argument("--formats", default="q3_k_s,q3_k_m,q3_k_l,q4_k_s,q4_k_m")
    parser.add_argument("--skip-kinds", action="store_true", help="only the whole formats")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="synthetic weights")
    parser.add_argument("--input-seed", type=int, default=4242, help="held-out synthetic inputs")
    parser.add_argument("--inputs", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--branch", default="transformer")
    parser.add_argument("--out", type=Path, default=Path("bench_out/kquant_mix_sensitivity"))
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    write_synthetic_pipeline(args.out, layers=args.layers, seed=args.seed)
    bs = open_source(args.out).branches[args.branch]
    calls = [c for i in range(args.inputs)
             for c in synthetic_calls(bs.dims, i, args.input_seed, 4, args.resolution, 32, args.branch)]
    ref = velocity(bs, calls)
    linears = [c for c in gguf_tensor_types(bs.dims, "f32") if len(c.shape) == 2]

    print(f"{args.branch}, {args.layers} blocks, weight seed {args.seed}, input seed {args.input_seed}")
    print(f"\nvelocity error with one kind of linear in {args.type}, the rest float32:")
    print(f"{'kind':<34} {'weights':>9} {'velocity':>9}")
    qtype = ggml_type(args.type).qtype
    outside = tuple(dict.fromkeys(kind_of(c.name) for c in linears if not c.name.startswith("layers.")))
    for kind in () if args.skip_kinds else BLOCK_KINDS + outside:
        chosen = {c.name: qtype for c in linears if kind_of(c.name) == kind and ggml_type(qtype).can_encode(c.shape[-1])}
        if not chosen:
            continue  # rows too short for the type (input_proj): never stored in it
        n = sum(c.shape[0] * c.shape[1] for c in linears if c.name in chosen)
        err = relative(velocity(RoundTripSource(bs, chosen), calls), ref)
        print(f"{kind:<34} {n:9d} {err:9.4f}", flush=True)

    print("\nwhole formats (each tensor in its planned type):")
    print(f"{'format':<8} {'bits/block weight':>18} {'velocity':>9}")
    block = [c for c in linears if c.name.startswith("layers.")]
    for fmt in args.formats.split(","):
        plan = {c.name: c.qtype for c in gguf_tensor_types(bs.dims, fmt) if len(c.shape) == 2}
        bits = sum(ggml_type(plan[c.name]).row_bytes(c.shape[1]) * c.shape[0] * 8 for c in block)
        bits /= sum(c.shape[0] * c.shape[1] for c in block)
        err = relative(velocity(RoundTripSource(bs, plan), calls), ref)
        print(f"{fmt:<8} {bits:18.3f} {err:9.4f}", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
