"""`verl-async-assets`: build the local tiny models (nothing is downloaded)."""

import argparse
import logging

from verl_async.assets.build import ensure_asset
from verl_async.config.model import ASSET_KINDS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build verl_async's local tiny models into a cache folder.")
    p.add_argument("kinds", nargs="*", help="tiny, counter, tiny-vl (default: tiny counter)")
    p.add_argument("--assets-dir", default="~/.cache/verl_async/assets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=1, help="counter: greedy output is prev + STEP")
    args = p.parse_args(argv)
    unknown = sorted(set(args.kinds) - set(ASSET_KINDS))  # nargs="*" with choices rejects an empty list
    if unknown:
        p.error(f"unknown asset kinds {unknown}: choose from {', '.join(ASSET_KINDS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for kind in args.kinds or ["tiny", "counter"]:
        path = ensure_asset(args.assets_dir, kind, seed=args.seed, step=args.step)
        logging.info("%s: %s", kind, path)


if __name__ == "__main__":
    main()
