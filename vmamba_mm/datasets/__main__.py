"""Command line: ``python -m vmamba_mm.datasets --out DIR [--layout shapes|coco|ade] [--seed 0]``.

``--out data/shapes`` feeds configs/demo, ``--out data/coco --layout coco`` and
``--out data/ade --layout ade`` give the COCO and ADE20K configs their default data roots.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .layouts import LAYOUTS
from .shapes import ShapesConfig, generate_shapes_dataset


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parses the command line; the defaults are those of ``ShapesConfig``."""
    defaults = ShapesConfig()
    parser = argparse.ArgumentParser(
        prog="python -m vmamba_mm.datasets",
        description="Write the synthetic shapes dataset (COCO instances + ADE-style label maps).",
    )
    parser.add_argument("--out", required=True, help="output directory, e.g. data/shapes")
    parser.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="shapes",
        help="shapes: the demo's layout (configs/demo, --out data/shapes); coco: COCO 2017's "
        "(configs/mask_rcnn, --out data/coco); ade: ADE20K's (configs/upernet, --out data/ade)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-val", type=int, default=defaults.num_val)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--min-shapes", type=int, default=defaults.min_shapes)
    parser.add_argument("--max-shapes", type=int, default=defaults.max_shapes)
    parser.add_argument("--min-scale", type=float, default=defaults.min_scale)
    parser.add_argument("--max-scale", type=float, default=defaults.max_scale)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="regenerate a dataset in --out that was made with other parameters",
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Writes the dataset and prints its summary as JSON. Returns the exit status."""
    args = parse_args(argv)
    try:
        summary = generate_shapes_dataset(
            args.out,
            seed=args.seed,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            min_shapes=args.min_shapes,
            max_shapes=args.max_shapes,
            min_scale=args.min_scale,
            max_scale=args.max_scale,
            overwrite=args.overwrite,
            layout=args.layout,
        )
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
