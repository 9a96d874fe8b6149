"""How every command line of the project reads its arguments: one convention, one boolean parser,
one way to merge a config file.

- Flags are kebab-case (``--max-new-tokens``). A parser built with ``snake_case_aliases=True``
  (``auto-model-train``, whose parameters keep the names of the original DRPO scripts) also accepts
  each flag spelled with underscores (``--max_new_tokens``, ``--is_GPT``).
- A boolean value is ``true``/``false``, ``yes``/``no``, ``on``/``off`` or ``1``/``0``, in any case
  (:func:`parse_bool`; the environment variables read the same way).
- ``--config FILE`` (JSON or TOML) gives defaults for any parameter, by its name with underscores
  or hyphens; flags on the command line win; an unknown name is an error that lists it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from auto_model import constants
from auto_model.constants import FALSE_WORDS, TRUE_WORDS, parse_bool
from auto_model.errors import AutoModelError, InvalidRequestError


def bool_arg(value: str) -> bool:
    """:func:`parse_bool` as an argparse ``type``."""
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions (see the module docstring)."""

    def __init__(self, *args: Any, snake_case_aliases: bool = False, **kwargs: Any):
        #: destination -> the flag that sets it, for every option added
        self.options: dict[str, str] = {}
        self.snake_case_aliases = snake_case_aliases
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        for name in names:
            if isinstance(name, str) and name.startswith("--") and ("_" in name or name != name.lower()):
                raise ValueError(f"{name}: flags are kebab-case ({kebab(name)})")
        action = super().add_argument(*names, **kwargs)
        long = [s for s in action.option_strings if s.startswith("--")]
        if long:
            self.options[action.dest] = long[0]
        return action

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        return super().parse_args(self.normalise(args), namespace)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        return super().parse_known_args(self.normalise(args), namespace)

    def normalise(self, args: Sequence[str] | None) -> list[str] | None:
        """The arguments with every snake_case spelling of a known flag made kebab-case (only for
        parsers with ``snake_case_aliases``); everything else unchanged."""
        if args is None:
            args = sys.argv[1:]  # as argparse reads them
        if not self.snake_case_aliases:
            return list(args)
        known = set(self.options.values())
        out = []
        for arg in args:
            flag, sep, value = arg.partition("=")
            if flag.startswith("--") and flag not in known and kebab(flag) in known:
                arg = kebab(flag) + sep + value
            out.append(arg)
        return out

    def with_config(self, args: Sequence[str], config_option: str = "config") -> argparse.Namespace:
        """Parse ``args``, taking defaults from the file named by ``--config`` (when given)."""
        first, _ = self.parse_known_args(args)
        path = getattr(first, config_option, None)
        if path:
            from auto_model.files import read_config_file

            flag = self.options.get(config_option, f"--{config_option}")
            data = read_config_file(path, flag)
            self.set_defaults(**self.config_defaults(data, f"{flag} {path}"))
        return self.parse_args(args)

    def config_defaults(self, config: Any, where: str) -> dict[str, Any]:
        """A config file's values as parser defaults: keys by parameter name (underscores or
        hyphens); an unknown key raises InvalidRequestError naming it."""
        if not isinstance(config, Mapping):
            raise InvalidRequestError(f"{where} must hold an object of parameter names to values.")
        defaults, unknown = {}, []
        by_name = {dest.lower(): dest for dest in self.options}
        for key, value in config.items():
            dest = by_name.get(str(key).replace("-", "_").lower())
            if dest is None:
                unknown.append(key)
            else:
                defaults[dest] = value
        if unknown:
            raise InvalidRequestError(f"{where}: unknown parameters {sorted(unknown)}; see {self.prog} --help.")
        return defaults


def add_replica_flags(parser: argparse.ArgumentParser, what: str = "the local engine") -> None:
    """``--replicas N`` and ``--ray-address``: data parallelism for a batch command (see :func:`replica_options`)."""
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help=f"spread {what}'s requests over N replicas: Ray actors, one engine each, across the Ray cluster's "
        "nodes (pip install 'auto-model[ray]'); with a comma-separated --base-url, one server per URL",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="the Ray cluster for --replicas, e.g. 10.0.0.1:6379 or 'auto' (default: RAY_ADDRESS, else a new "
        "cluster on this machine)",
    )


def replica_options(args: Any, backend: str | None = None) -> dict[str, Any]:
    """The ``AutoModel`` arguments of :func:`add_replica_flags` (none for one replica) from parsed
    arguments or a config with ``replicas`` and ``ray_address``; ``backend``
    ``"openai"``: a served model, whose replicas are its URLs (``--ray-address`` does not apply)."""
    if args.replicas < 1:
        raise InvalidRequestError(f"--replicas must be >= 1, got {args.replicas}.")
    options: dict[str, Any] = {}
    if args.replicas > 1:
        options["replicas"] = args.replicas
    if args.ray_address and backend != "openai":
        options["ray_address"] = args.ray_address
    return options


def with_replicas(factory: Callable[..., Any], args: argparse.Namespace) -> Callable[..., Any]:
    """``factory`` (``AutoModel``, or a test's) with :func:`replica_options` added to every engine it builds."""
    from auto_model.backends import resolve_backend_name

    if args.replicas == 1 and not args.ray_address:
        return factory

    def build(model_name: str, **kwargs: Any) -> Any:
        backend = resolve_backend_name(kwargs.get("backend") or "auto", model_name, base_url=kwargs.get("base_url"))
        return factory(model_name, **kwargs, **replica_options(args, backend))

    return build


def kebab(flag: str) -> str:
    """``--max_new_tokens`` -> ``--max-new-tokens``; ``--is_GPT`` -> ``--is-gpt``."""
    return re.sub(r"_", "-", flag).lower()


__all__ = [
    "ArgumentParser",
    "FALSE_WORDS",
    "TRUE_WORDS",
    "add_replica_flags",
    "bool_arg",
    "kebab",
    "parse_bool",
    "replica_options",
    "with_replicas",
]


def add_best_of(parser: argparse.ArgumentParser, what: str) -> None:
    """``--best-of N`` (``what`` it does here) and the ``--reward-model`` that chooses."""
    parser.add_argument("--best-of", type=int, default=1, metavar="N", help=f"{what} (default 1)")
    parser.add_argument("--reward-model", default=None, help="reward model folder (auto-model-rm train) for --best-of")


def check_best_of(best_of: int, reward_model: str | None) -> None:
    """``--best-of`` and ``--reward-model``, checked before any engine loads."""
    if best_of < 1:
        raise InvalidRequestError(f"--best-of must be >= 1, got {best_of}.")
    if best_of > 1 and not reward_model:
        raise InvalidRequestError(f"--best-of {best_of} needs --reward-model PATH (a folder from auto-model-rm train).")
    if reward_model:
        from auto_model.rewards.reward_model import check_reward_model_folder

        check_reward_model_folder(reward_model, "--reward-model")


def run_reporting_errors(
    prog: str,
    body: Callable[[], int],
    *,
    expected: tuple[type[BaseException], ...] = (AutoModelError,),
    interrupted: str = "interrupted",
) -> int:
    """Run a command; known errors print one line and exit 2 (``AUTO_MODEL_DEBUG=1``: the traceback)."""
    debug = constants.debug()
    try:
        return body()
    except expected as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
