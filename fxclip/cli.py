"""Command line: `python -m fxclip inspect MODULE:FACTORY --input-shape 8,3,32,32 [...]`.

Exit codes: 0 ok; 1 with --fail-on-fallback when some parameter needed the generic fallback rule
(its per-sample gradient instantiated because no ghost rule fits); 2 usage error, factory that
cannot be imported or called, or the model refused by fxclip (PrivacyError).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

DTYPES = {"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "bfloat16",
          "int64": "int64", "int32": "int32", "long": "int64", "float": "float32"}


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected e.g. 8,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: dimensions must be positive")
    return shape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fxclip", description="fxclip command line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="explain which per-sample clipping rule each parameter gets",
                       description="Build a model from FACTORY, run one privatized forward+backward on random "
                                   "inputs and report what the fxclip pass did. Shows shapes and costs only.")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="importable module and a callable in it returning the nn.Module (e.g. mypkg.models:make_net)")
    p.add_argument("--input-shape", dest="input_shapes", type=_parse_shape, action="append", required=True,
                   metavar="B,D1,...", help="shape of one example input, batch first; repeat for several inputs")
    p.add_argument("--input-dtype", "--dtype", dest="input_dtypes", action="append", choices=sorted(DTYPES),
                   help="dtype of the inputs (one for all, or one per --input-shape); default float32. "
                        "Integer dtypes generate token ids in [0, --vocab-size)")
    p.add_argument("--vocab-size", "--high", dest="high", type=int, default=2,
                   help="exclusive upper bound of generated integer inputs (default 2)")
    p.add_argument("--format", choices=["text", "json", "dot", "html"], default="text")
    p.add_argument("-o", "--output", metavar="FILE", help="write there instead of stdout")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--loss-reduction", choices=["mean", "sum"], default="mean")
    p.add_argument("--seed", type=int, default=0, help="seed for the random example inputs")
    p.add_argument("--fail-on-fallback", action="store_true",
                   help="exit with code 1 if any parameter needed the generic fallback rule")
    return parser


def load_factory(spec: str):
    if ":" not in spec:
        raise ValueError(f"expected MODULE:FACTORY, got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


def make_inputs(shapes, dtypes, high: int, seed: int):
    import torch

    dtypes = dtypes or ["float32"]
    if len(dtypes) not in (1, len(shapes)):
        raise ValueError(f"give one --input-dtype or one per --input-shape ({len(shapes)}), not {len(dtypes)}")
    if len(dtypes) == 1:
        dtypes = dtypes * len(shapes)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, name in zip(shapes, dtypes):
        dtype = getattr(torch, DTYPES[name])
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            out.append(torch.randint(0, max(high, 1), shape, generator=gen, dtype=dtype))
    return out


def inspect_command(args) -> int:
    from torch import nn

    from . import inspect_report as explain_mod
    from .passes import PrivacyError

    try:
        factory = load_factory(args.factory)
        model = factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{args.factory}() returned {type(model).__name__}, not an nn.Module")
        inputs = make_inputs(args.input_shapes, args.input_dtypes, args.high, args.seed)
    except Exception as e:  # noqa: BLE001 - report and exit 2
        print(f"fxclip inspect: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        rep = explain_mod.explain(model, *inputs, max_grad_norm=args.max_grad_norm,
                                  loss_reduction=args.loss_reduction)
    except PrivacyError as e:
        print(f"fxclip inspect: the model was refused: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the model failed on the example inputs
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"fxclip inspect: running the model failed: {type(e).__name__}: {first}", file=sys.stderr)
        return 2
    if args.format == "text":
        text = str(rep) + "\n"
    elif args.format == "json":
        text = json.dumps(rep.to_json(), indent=2) + "\n"
    elif args.format == "dot":
        text = rep.to_dot()
    else:
        text = rep.to_html()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"fxclip inspect: wrote {args.format} to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    fallback = rep.fallback_params
    if fallback:
        print(f"fxclip inspect: {len(fallback)} parameter(s) use the fallback rule (per-sample gradient "
              f"instantiated): {', '.join(fallback)}", file=sys.stderr)
        if args.fail_on_fallback:
            return 1
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return inspect_command(args)
    return 2
