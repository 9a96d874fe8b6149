"""A DRPO run's settings: :class:`DRPOConfig`, one frozen object that ``auto-model-train`` builds from
its flags and a Python user builds directly (``DRPO(DRPOConfig(...)).run()``, see
:mod:`auto_model.trainer.drpo`).

Each field is the flag of the same name (``depth`` is ``--depth``); the parser takes its defaults
from here, so the two cannot disagree. A config checks itself when made: a bad value is a typed
error naming its flag, before any model loads. What depends on other settings (the judge's models
default to the base model, the log folder to the model's name) is filled in by
:meth:`DRPOConfig.resolved`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from auto_model import constants
from auto_model.constants import is_whole
from auto_model.errors import InvalidRequestError
from auto_model.flags import kebab
from auto_model.logs import redact_url

ORIGINAL_DEFAULT_PROMPT = "You are a helpful assistant."
STAGES = ("prompt", "icl", "router")
LOGGING_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: A parameter is a secret when one of the words of its name is one of these: ``api_key``,
#: ``hf_token``, ``client_secret``; not ``max_new_tokens`` or ``keyword``.
SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credentials"})


@dataclass(frozen=True)
class DRPOConfig:
    """Every setting of a DRPO run (``auto-model-train --help`` says what each does)."""

    #: prompt (stage 2, the system prompt), icl (stage 1, the example pool) or router
    stage: str = "prompt"
    # The models of the four roles (None: the base model; the base model None: the default model).
    base_model_name: str | None = None
    base_model_family: str | None = None  # accepted for compatibility; the family is detected
    eval_model_name: str | None = None
    metrics_model_name: str | None = None
    optimize_model_name: str | None = None
    # The search (the original scripts' parameters).
    initial_system_prompt: str = ORIGINAL_DEFAULT_PROMPT  # text, or a path to a text file
    n_actions: int = 3
    temperature: float = 0.2
    depth: int = 20
    max_depth_increase: int = 10
    beam_size: int = 2
    num_training_examples: int = 180
    ret_icl: bool = True
    k: int | None = None  # None: the route's number in the artifact (with route), else 2
    seed: int = 42
    max_new_tokens: int = 512
    judge_max_new_tokens: int = 512
    route: str | None = None
    reward: str = "llm"
    skip_threshold: float | None = None  # None: 4.5 for llm, 1 for metrics alone, none with a reward model
    moves: tuple[str, ...] | str = "rewrite"
    queries_per_level: int = 1
    token_cost: float = 0.0
    min_examples: int = 0
    example_bank: str | None = None
    guidelines: str | None = None
    num_iters: int = 3  # icl: rewrite rounds per example
    # Where things are.
    log_dir: str | None = None
    data_dir: str | None = None
    metrics_cache_path: str | None = None
    icl_path: str | None = None
    prompt_path: str | None = None
    output: str | None = None
    base_model_download_dir: str | None = None
    # The run.
    disable_log: bool = False
    disable_tqdm: bool = False
    logging_level: str = "INFO"
    resume: bool = False
    max_calls: int | None = None
    batch_size: int = 256
    # The engines.
    is_gpt: bool = False
    backend: str = "auto"
    base_url: str | None = None
    dtype: str = "auto"
    cuda_visible_devices: str | None = None
    num_gpus: int = 1
    replicas: int = 1
    ray_address: str | None = None
    eval_per_aspect: bool = False
    judge_json_schema: bool = False
    # The router stage.
    routing_data: str | None = None
    form_data: str | None = None
    no_form_data: bool = False
    router_c: float = 16.0
    max_false_positive: float = 0.05
    route_threshold: float | None = None
    classifier_weight: float = 0.25
    lexical_weight: float = 0.25
    lexical_c: float = 4.0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InvalidRequestError(f"The stage must be one of {', '.join(STAGES)}, got {self.stage!r}.")
        if self.logging_level not in LOGGING_LEVELS:
            raise InvalidRequestError(f"--logging-level must be one of {', '.join(LOGGING_LEVELS)}.")
        for name in ("num_training_examples", "num_gpus", "num_iters", "batch_size", "replicas"):
            if not is_whole(getattr(self, name), 1):
                raise InvalidRequestError(f"{kebab('--' + name)} must be >= 1, got {getattr(self, name)}.")
        if self.max_calls is not None and not is_whole(self.max_calls, 0):
            raise InvalidRequestError(f"--max-calls must be >= 0, got {self.max_calls}.")
        moves = self.moves.split(",") if isinstance(self.moves, str) else self.moves
        object.__setattr__(self, "moves", tuple(m.strip() for m in moves if m.strip()))
        self.search(0 if self.k is None else self.k)  # the search's settings, checked before anything loads
        if self.example_bank is not None and "examples" not in self.moves:
            raise InvalidRequestError("--example-bank is what the examples move adds from: add examples to --moves.")
        if self.route is not None and self.stage != "prompt":
            raise InvalidRequestError(
                f"--route trains a route's prompt: use it with the prompt stage, not {self.stage}."
            )
        from auto_model.rewards.combine import check_reward_specs

        check_reward_specs(self.reward_specs)

    @cached_property
    def reward_specs(self) -> list[Any]:
        """The parsed ``reward`` (:class:`~auto_model.rewards.combine.RewardSpec` each)."""
        from auto_model.rewards.combine import parse_reward_specs

        return parse_reward_specs(self.reward)

    @property
    def uses_judge(self) -> bool:
        """Whether the reward includes the LLM judge (and so needs the metrics and eval models)."""
        return any(spec.kind == "llm" for spec in self.reward_specs)

    def search(self, k: int) -> Any:
        """The :class:`~auto_model.trainer.tree.SearchConfig` of these settings, with ``k`` examples
        per request (checked when made: a bad setting is a typed error naming its flag)."""
        from auto_model.trainer.tree import SearchConfig

        # Every search setting is the config's field of the same name, but for these two.
        same = {f.name: getattr(self, f.name) for f in fields(SearchConfig) if f.name in _FIELDS}
        return SearchConfig(**{**same, "k": k, "optimizer_max_new_tokens": self.judge_max_new_tokens})

    def resolved(self) -> DRPOConfig:
        """This config with the defaults that depend on other settings filled in: the judge's models
        (the base model's), the log folder (``runs/<stage>-<model>``), the metrics cache, the skip
        threshold (by reward), and the initial prompt read from its file when it names one."""
        base = self.base_model_name or constants.default_model()
        evaluator = self.eval_model_name or base
        log_dir = self.log_dir
        if log_dir is None:
            slug = "".join(c if c.isalnum() else "-" for c in base.lower()).strip("-")
            log_dir = str(Path("runs") / f"{self.stage}-{slug}")
        skip = self.skip_threshold
        if skip is None:
            kinds = {spec.kind for spec in self.reward_specs}
            skip = 4.5 if kinds == {"llm"} else 1.0 if kinds == {"metric"} else None
        prompt = self.initial_system_prompt
        prompt_file = Path(prompt).expanduser()
        if len(prompt) < 4096 and prompt_file.is_file():
            prompt = prompt_file.read_text(encoding="utf-8").strip()
        return replace(
            self,
            base_model_name=base,
            eval_model_name=evaluator,
            metrics_model_name=self.metrics_model_name or evaluator,
            optimize_model_name=self.optimize_model_name or evaluator,
            log_dir=log_dir,
            metrics_cache_path=self.metrics_cache_path or str(Path(log_dir) / "metrics_cache.json"),
            skip_threshold=skip,
            initial_system_prompt=prompt,
        )

    def planned_calls(self, pool_size: int = 0) -> dict[str, int]:
        """Upper bounds on the requests a run sends, before retries of unreadable judge replies
        (``pool_size``: the icl stage's pool)."""
        judged = self.uses_judge
        if self.stage == "icl":
            rewrites = pool_size * self.n_actions * self.num_iters
            return {"metrics": pool_size * judged, "eval": (pool_size + rewrites) * judged, "optimize": rewrites,
                    "base": 0}  # fmt: skip
        levels = min(self.depth + self.max_depth_increase, -(-self.num_training_examples // self.queries_per_level))
        width = self.beam_size * self.n_actions * len(self.moves)
        candidates = 1 + width * (levels - 1)
        rewrites = self.beam_size * self.n_actions * (levels - 1) if "rewrite" in self.moves else 0
        answers = candidates * self.queries_per_level
        return {"base": answers, "metrics": levels * self.queries_per_level * judged, "eval": answers * judged,
                "optimize": rewrites}  # fmt: skip


def field_names() -> list[str]:
    """The settings' names, in order (each is also the parser's destination of its flag)."""
    return [f.name for f in fields(DRPOConfig)]


_FIELDS = frozenset(field_names())


def is_secret_name(name: str) -> bool:
    """Whether a parameter named ``name`` holds a secret (by the words of its name)."""
    return any(word in SECRET_WORDS for word in re.split(r"[^a-z0-9]+", name.lower()))


def redacted(settings: Any) -> dict[str, Any]:
    """A run's settings (a :class:`DRPOConfig`, or parsed arguments) as written to ``args.txt`` and
    ``output.json``: secrets and the credentials in addresses hidden."""
    items = asdict(settings) if is_dataclass(settings) and not isinstance(settings, type) else vars(settings)
    return {k: _shown(k, v) for k, v in sorted(items.items())}


def _shown(name: str, value: Any) -> Any:
    if value and is_secret_name(name):
        return "<redacted>"
    return redact_url(value) if name.endswith("url") and isinstance(value, str) else value
