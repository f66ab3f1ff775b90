"""``wsiscan <stage>``: parse the arguments of one stage and call its one function.

Every Snakemake rule calls exactly one of these subcommands; each can also be run by hand.
Errors meant for the user (:class:`~wsiscan.errors.WsiscanError`) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import WsiscanError

log = logging.getLogger("wsiscan")

Handler = Callable[[argparse.Namespace], object]


def _stage(sub: argparse._SubParsersAction, name: str, help_: str, func: Handler):
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(func=func)
    return p


# -- synth ---------------------------------------------------------------------------------------
def _run_synth(a: argparse.Namespace) -> object:
    from .synth import synth_slide

    return synth_slide(
        slide_id=a.slide_id,
        label=a.label,
        seed=a.seed,
        out_slide=a.out_slide,
        out_xml=a.out_xml,
        width_px=a.width_px,
        height_px=a.height_px,
        mpp=a.mpp,
    )


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = _stage(
        sub, "synth", "Write one synthetic H&E-like pyramidal TIFF and its ASAP XML.", _run_synth
    )
    p.add_argument("--slide-id", required=True)
    p.add_argument("--label", choices=["tumor", "normal"], required=True)
    p.add_argument("--seed", type=int, required=True, help="cohort seed (mixed with the slide ID)")
    p.add_argument("--out-slide", type=Path, required=True, help="pyramidal .tif to write")
    p.add_argument("--out-xml", type=Path, required=True, help="ASAP XML of the tumour polygons")
    p.add_argument("--width-px", type=int, required=True, help="level-0 width in pixels")
    p.add_argument("--height-px", type=int, required=True, help="level-0 height in pixels")
    p.add_argument("--mpp", type=float, required=True, help="level-0 microns per pixel")


# -- parser --------------------------------------------------------------------------------------
STAGES = [_add_synth]


def build_parser() -> argparse.ArgumentParser:
    """The ``wsiscan`` argument parser with one subcommand per stage."""
    parser = argparse.ArgumentParser(prog="wsiscan", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wsiscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for add in STAGES:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsiscan`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except WsiscanError as exc:
        print(f"wsiscan {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
