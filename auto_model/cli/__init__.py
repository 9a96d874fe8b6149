"""``auto-model``: the command line; one module per command (:mod:`~auto_model.cli.generate`,
:mod:`~auto_model.cli.serve`, :mod:`~auto_model.cli.rm` for ``auto-model-rm``).

    auto-model generate "How do I brew tea?" "Another question" --temperature 0
    auto-model generate --input queries.jsonl --output answers.jsonl
    auto-model serve --model HuggingFaceTB/SmolLM2-135M-Instruct

Known errors print one readable line (exit 2); set ``AUTO_MODEL_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

from collections.abc import Sequence

from auto_model.cli import generate, serve
from auto_model.flags import ArgumentParser, run_reporting_errors
from auto_model.logs import configure_cli_logging

#: The subcommands: name -> (its module's ``add_parser``, ``run``).
COMMANDS = {"generate": generate, "serve": serve}


def parser() -> ArgumentParser:
    """``auto-model``'s argument parser, every subcommand included."""
    top = ArgumentParser(prog="auto-model", description="Aligned answers from any LLM, without fine-tuning.")
    top.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log to stderr: -v info (engines included), -vv debug; default: warnings only",
    )
    sub = top.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_cli_logging(args.verbose)
    return run_reporting_errors("auto-model", lambda: COMMANDS[args.command].run(args))


__all__ = ["main", "parser"]
