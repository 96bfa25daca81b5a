"""The `dualsft` command line. Each command is a stage module exposing ``CONFIG`` (its config
dataclass), ``HELP`` (one line) and ``main(cfg) -> int``; flags are derived from the dataclass.

Also runnable as ``python -m dualsft`` (so ``torchrun -m dualsft score ...`` works).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dualsft import __version__
from dualsft.config import add_config_args, build_config
from dualsft.errors import DualSFTError

# command words -> module. Order is the order shown in --help (the pipeline's order).
COMMANDS: dict[str, str] = {
    "run": "dualsft.pipeline",
    "data build": "dualsft.data.build",
    "warmup": "dualsft.scoring.warmup",
    "score": "dualsft.scoring.score",
    "select": "dualsft.selection.select",
    "train": "dualsft.training.train",
    "merge": "dualsft.training.merge",
    "export": "dualsft.training.export",
    "eval": "dualsft.evaluation.evaluate",
    "compare": "dualsft.evaluation.compare",
    "estimate": "dualsft.estimate",
    "info": "dualsft.info",
}

log = logging.getLogger("dualsft")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The top-level parser with one sub-parser per command."""
    mods = {words: importlib.import_module(modname) for words, modname in COMMANDS.items()}
    parser = argparse.ArgumentParser(
        prog="dualsft",
        description="Choose which parameters to update and which examples to train on from one set of "
        "gradient statistics (DualSFT), then fine-tune only those. `dualsft run` does it all on the "
        "embedded SmolLM2 and reasoning-gym data.",
    )
    parser.add_argument("--version", action="version", version=f"dualsft {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, mod in mods.items():
        parts = words.split()
        target = sub
        if len(parts) == 2:
            if parts[0] not in groups:
                gp = sub.add_parser(parts[0], help=f"{parts[0]} commands")
                groups[parts[0]] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            target = groups[parts[0]]
        p = target.add_parser(parts[-1], help=mod.HELP, description=mod.HELP,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_config_args(p, mod.CONFIG)
        p.set_defaults(_module=words)
    return parser, mods


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code (2 on a DualSFTError)."""
    parser, mods = build_parser()
    args = parser.parse_args(argv)
    from dualsft.distributed import env_world, shutdown

    main_rank = env_world()[0] == 0  # under torchrun only rank 0 logs INFO; the others warnings and errors
    logging.basicConfig(level=(logging.DEBUG if args.verbose else logging.INFO) if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not hasattr(args, "_module"):
        parser.print_help()
        return 0 if args.command is None else 2
    mod = mods[args._module]
    values = {k: v for k, v in vars(args).items() if k not in ("_module", "command", "subcommand", "verbose")}
    try:
        cfg = build_config(mod.CONFIG, values)
        return int(mod.main(cfg) or 0)
    except DualSFTError as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    finally:
        shutdown()  # leave the torch.distributed group a stage joined (no-op in one process)


if __name__ == "__main__":
    sys.exit(main())
