"""Converts an official VMamba checkpoint into a clean, mmengine-loadable backbone checkpoint.

Reads official classification checkpoints (weights under "model" / "model_ema", a pickled config
that is never executed), mmdet/mmseg checkpoints and plain state_dicts; renames old official keys;
drops the classifier; writes ``{"state_dict": ..., "meta": ...}`` holding tensors and plain
Python values only, so ``torch.load(..., weights_only=True)`` and mmengine read it.

Usage:
    python tools/model_converters/convert_checkpoint.py official.pth out.pth [--use-ema]
        [--arch tiny] [--add-prefix backbone.]
"""

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from vmamba_mm.checkpoint import (
    convert_official_keys,
    extract_state_dict,
    match_state_dict,
    safe_load,
)
from vmamba_mm.cli import one_line
from vmamba_mm.errors import USER_ERRORS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="official checkpoint (.pth) path or URL")
    parser.add_argument("dst", help="output path")
    parser.add_argument("--use-ema", action="store_true", help="take 'model_ema' weights")
    parser.add_argument("--prefix", default=None,
                        help="backbone key prefix in src (default: detect 'backbone.')")
    parser.add_argument("--arch", default=None,
                        help="check that the weights load strictly into VMamba(arch=...)")
    parser.add_argument("--add-prefix", default="",
                        help="prefix for the written keys, e.g. 'backbone.'")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return convert(args)
    except USER_ERRORS as error:
        sys.exit(f"error: {one_line(error)}")


def convert(args: argparse.Namespace) -> int:
    """Reads, checks and writes the checkpoint; see the module docstring."""
    raw, skipped = safe_load(args.src)
    state = convert_official_keys(extract_state_dict(raw, use_ema=args.use_ema),
                                  prefix=args.prefix)
    dropped = [k for k in state if k.startswith("classifier.")]
    state = OrderedDict((k, v.contiguous()) for k, v in state.items() if k not in dropped)
    if args.arch:
        from vmamba_mm.models import VMamba

        with torch.device("meta"):
            model = VMamba(args.arch)
        match_state_dict(model, state)  # raises listing every mismatch
    out = OrderedDict((args.add_prefix + k, v) for k, v in state.items())
    meta = {"source": str(args.src), "use_ema": bool(args.use_ema),
            "skipped_pickled": list(skipped), "dropped_keys": dropped}
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": out, "meta": meta}, args.dst)
    print(f"wrote {len(out)} tensors to {args.dst}; dropped {len(dropped)} classifier keys; "
          f"skipped pickled objects: {', '.join(skipped) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
