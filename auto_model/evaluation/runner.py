"""Evaluation runs: answer an eval set under several configurations, then judge every answer.

A *configuration* is a model and how it is asked: its engine, the optimized prompt on or off (or a
prompt file, or a system prompt of your own), and how many retrieved examples go with each query.
Configurations that share a model share one engine. Every answer and every judge reply goes
through an on-disk request cache (the trainer's), so rerunning a finished run sends nothing and an
interrupted one resumes where it stopped.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from auto_model.artifacts import PromptArtifact, load_prompt_artifact
from auto_model.backends.base import Completion
from auto_model.constants import is_whole
from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.evaluation.eval_set import EvalItem
from auto_model.files import read_config_file
from auto_model.flags import parse_bool
from auto_model.options import GenerationOptions
from auto_model.retrieval import ICLRetriever, load_icl_pool
from auto_model.rewards.base import RewardItem
from auto_model.rewards.judge import Judge
from auto_model.rewards.proxies import (
    ended_cleanly,
    length_words,
    loops,
    refusal_kind,
    repetition,
)
from auto_model.rewards.requests import RequestCache, Role, RoleUsage, Usage
from auto_model.routing import ROUTES

logger = logging.getLogger(__name__)

#: The just-eval aspects: five for regular queries, one for harmful requests.
REGULAR_ASPECTS = ("Helpfulness", "Clarity", "Factuality", "Depth", "Engagement")
SAFETY_ASPECTS = ("Safety",)
PACKAGED_PREFIX = "packaged:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def judge_template(kind: str) -> Template:
    """The judge prompt for ``"regular"`` or ``"safety"`` items. The fixed instructions come before
    the query and the answer, so engines with prefix caching process them once for a whole batch."""
    text = resources.files("auto_model.evaluation").joinpath(f"templates/judge_{kind}.txt").read_text(encoding="utf-8")
    return Template(text)


def _engine_key(model: str, backend: str, base_url: str | None, dtype: str, prompt_format: str) -> tuple[Any, ...]:
    """What makes two engines the same: (model, backend, base_url, dtype, prompt_format)."""
    return (model, backend, base_url, dtype, prompt_format)


@dataclass(frozen=True)
class EvalConfig:
    """One way of asking a model.

    Attributes:
        name: how the configuration is called in the report (letters, digits, ``_.+-``).
        model: the model (default: the embedded default model).
        backend, base_url, dtype, prompt_format: as for :class:`~auto_model.AutoModel`.
        optimized_prompt: inject the model's optimized prompt (ignored when ``system_prompt`` or
            ``prompt_path`` is given).
        prompt_path: a prompt file: a ``.json`` artifact replaces the model's own artifact whole
            (its prompts, routes and routing); any other file is the system prompt;
            ``packaged:candidates/<file>`` names one shipped in ``optimized_prompts/``.
        system_prompt: a system prompt of your own.
        num_optimized_icl: retrieved examples per query (0: none; None, ``icl = "auto"`` in a spec: as
            many as the artifact gives each request's route).
        route: send every request down this route (``everyday`` or ``safety``); None: routed.
        icl_path: the example pool to retrieve from (default: the model's own).
        best_of: answer each item with the best of this many samples by ``reward_model`` (1: one
            greedy answer).
        reward_model: the reward model folder (``auto-model-rm train``) that chooses, for ``best_of``.
        temperature: the sampling temperature (default: 0, greedy; 0.7 with ``best_of`` > 1); sampled
            answers are seeded (seed 0), so a rerun is the same.
        optimized_decoding: apply the artifact's decoding settings (``decoding`` in a spec).
        cut_loops: cut answers where they start to loop (``cut_loops`` in a spec).
        check_answers: check answers with the artifact's answer check (``check_answers`` in a spec;
            a replaced answer is its refusal, ``finish_reason`` ``content_filter``). "The model alone"
            turns the three off.
    """

    name: str
    model: str | None = None
    backend: str = "auto"
    optimized_prompt: bool = True
    prompt_path: str | None = None
    system_prompt: str | None = None
    num_optimized_icl: int | None = 0
    base_url: str | None = None
    dtype: str = "auto"
    prompt_format: str = "auto"
    route: str | None = None
    icl_path: str | None = None
    best_of: int = 1
    reward_model: str | None = None
    temperature: float | None = None
    optimized_decoding: bool = True
    cut_loops: bool = True
    check_answers: bool = True

    def __post_init__(self) -> None:
        if self.route is not None and self.route not in ROUTES:
            raise InvalidRequestError(
                f"Configuration {self.name!r}: route must be one of {', '.join(ROUTES)}, got {self.route!r}."
            )
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidRequestError(f"Configuration name {self.name!r}: use letters, digits and _.+- only.")
        k = self.num_optimized_icl
        if k is not None and not is_whole(k, 0):
            raise InvalidRequestError(f"Configuration {self.name!r}: icl must be an integer >= 0 or auto, got {k!r}.")
        if self.system_prompt is not None and self.prompt_path is not None:
            raise InvalidRequestError(f"Configuration {self.name!r}: give system or prompt_path, not both.")
        if self.best_of > 1 and not self.reward_model:
            raise InvalidRequestError(f"Configuration {self.name!r}: best_of needs reward_model=PATH.")
        try:
            self.sampling(512)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"Configuration {self.name!r}: {exc}") from None
        if self.reward_model:
            from auto_model.rewards.reward_model import check_reward_model_folder

            check_reward_model_folder(self.reward_model, f"Configuration {self.name!r}: reward_model")

    def sampling(self, max_new_tokens: int) -> GenerationOptions:
        """How this configuration samples (the prompt and example fields are set per configuration)."""
        temperature = self.temperature if self.temperature is not None else 0.7 if self.best_of > 1 else 0.0
        sampled = temperature > 0
        return GenerationOptions(temperature=temperature, top_p=0.95 if sampled else 1.0,
                                 max_new_tokens=max_new_tokens, seed=0 if sampled else None,
                                 best_of=self.best_of)  # fmt: skip

    def engine_key(self, default_model: str) -> tuple[Any, ...]:
        return _engine_key(self.model or default_model, self.backend, self.base_url, self.dtype, self.prompt_format)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SPEC_KEYS = {
    "model": "model",
    "backend": "backend",
    "prompt": "optimized_prompt",
    "prompt_path": "prompt_path",
    "system": "system_prompt",
    "icl": "num_optimized_icl",
    "base_url": "base_url",
    "dtype": "dtype",
    "prompt_format": "prompt_format",
    "route": "route",
    "icl_path": "icl_path",
    "best_of": "best_of",
    "reward_model": "reward_model",
    "temperature": "temperature",
    "decoding": "optimized_decoding",
    "cut_loops": "cut_loops",
    "check_answers": "check_answers",
}


def _coerce(name: str, key: str, value: Any) -> Any:
    field_name = _SPEC_KEYS.get(key, key)
    if field_name not in {f.name for f in fields(EvalConfig)} or field_name == "name":
        raise InvalidRequestError(f"Configuration {name!r}: unknown key {key!r}; use {', '.join(_SPEC_KEYS)}.")
    if field_name in ("optimized_prompt", "optimized_decoding", "cut_loops", "check_answers") and isinstance(
        value, str
    ):
        try:
            value = parse_bool(value)
        except ValueError:
            raise InvalidRequestError(f"Configuration {name!r}: {key} must be on or off, got {value!r}.") from None
    if field_name == "num_optimized_icl" and value == "auto":
        return field_name, None
    if field_name in ("num_optimized_icl", "best_of", "temperature") and isinstance(value, str):
        kind, what = (float, "a number") if field_name == "temperature" else (int, "an integer")
        try:
            value = kind(value)
        except ValueError:
            raise InvalidRequestError(f"Configuration {name!r}: {key} must be {what}, got {value!r}.") from None
    return field_name, value


def parse_config_spec(spec: str) -> EvalConfig:
    """``"name: model=...; prompt=off; icl=3"`` -> :class:`EvalConfig` (keys: model, backend,
    prompt, prompt_path, system, icl, base_url, dtype, prompt_format, route, icl_path, best_of,
    reward_model, temperature, decoding, cut_loops, check_answers)."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not sep or not name:
        raise InvalidRequestError(
            f"--config {spec!r}: write NAME: key=value; key=value (e.g. 'alone: prompt=off; icl=0')."
        )
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = part.partition("=")
        if not eq:
            raise InvalidRequestError(f"--config {name!r}: {part!r} is not key=value.")
        field_name, coerced = _coerce(name, key.strip(), value.strip())
        values[field_name] = coerced
    return EvalConfig(name, **values)


def load_config_file(path: str | Path) -> list[EvalConfig]:
    """Configurations from a JSON list, or a TOML/JSON ``{"config": [{name: ..., ...}, ...]}``."""
    data = read_config_file(path, "--configs")
    rows = data.get("config") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise InvalidRequestError(f"--configs {path}: expected a list of configurations (TOML: [[config]] tables).")
    configs = []
    for row in rows:
        name = row.get("name")
        values = dict(_coerce(str(name), k, v) for k, v in row.items() if k != "name")
        configs.append(EvalConfig(name, **values))
    return configs


def default_configs(model: str | None = None, backend: str = "auto") -> list[EvalConfig]:
    """The comparison a user usually wants: the model alone (no prompt, no decoding settings, no loop
    cut, no answer check), with its optimized prompt, and with the prompt and 3 retrieved examples."""
    return [
        EvalConfig(
            "alone",
            model,
            backend,
            optimized_prompt=False,
            optimized_decoding=False,
            cut_loops=False,
            check_answers=False,
        ),
        EvalConfig("prompt", model, backend),
        EvalConfig("prompt+3icl", model, backend, num_optimized_icl=3),
    ]


def _prompt_file(path: str) -> str:
    if path.startswith(PACKAGED_PREFIX):
        inner = path[len(PACKAGED_PREFIX) :]
        resolved = Path(str(resources.files("auto_model").joinpath(f"optimized_prompts/{inner}")))
        if not resolved.is_file():
            raise ArtifactError(f"No packaged prompt {inner!r} in auto_model/optimized_prompts.")
        return str(resolved)
    return path


@dataclass
class JudgeSettings:
    """The judge model and how it is asked. ``model=None``: no judge (proxies only)."""

    model: str | None
    backend: str = "auto"
    base_url: str | None = None
    dtype: str = "auto"
    attempts: int = 3
    max_new_tokens: int = 256
    per_aspect: bool = False
    json_schema: bool = False


@dataclass
class Answer:
    config: str
    item: EvalItem
    system_prompt: str | None
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    judgement: dict[str, Any] | None = None
    route: str | None = None
    #: the SDK cut the answer where it started to loop
    looped: bool = False
    #: the reward model's score (``--reward-model``)
    reward: float | None = None

    def record(self) -> dict[str, Any]:
        proxies = None
        if self.text is not None:
            proxies = {
                "refusal": refusal_kind(self.text),
                "ended_cleanly": ended_cleanly(self.finish_reason or "") and not self.looped,
                "repetition": round(repetition(self.text), 6),
                "words": length_words(self.text),
                "loops": self.looped or loops(self.text),
            }
        return {
            "config": self.config,
            **self.item.to_dict(),
            "answer": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "generation_error": self.error,
            "proxies": proxies,
            "judge": self.judgement,
            "route": self.route,
            "looped": self.looped,
            "reward": None if self.reward is None else round(self.reward, 6),
        }


@dataclass
class EvalRun:
    """Everything a finished run produced: per-item records plus usage."""

    configs: list[EvalConfig]
    items: list[EvalItem]
    answers: list[Answer]
    system_prompts: dict[str, str | None]
    judge: JudgeSettings | None
    usage: dict[str, Any]
    seconds: float
    engines: dict[str, str] = field(default_factory=dict)
    reward_model: str | None = None


@dataclass
class AnsweredConfigs:
    """What :func:`answer_configs` produced: an answer per (configuration, item), configuration by
    configuration in item order; the system prompt and the engine of each configuration."""

    answers: list[Answer]
    system_prompts: dict[str, str | None]
    engines: dict[str, str]
    #: the engine asked to stay loaded (``keep_engine``), for the caller to use and close
    kept: Any = None


def check_configs(configs: Sequence[EvalConfig], max_new_tokens: int) -> dict[str, PromptArtifact]:
    """Check configurations before any engine loads; the prompt file of each that names one, loaded."""
    if not configs:
        raise InvalidRequestError("No configurations to evaluate; pass --config NAME: key=value; ...")
    names = [c.name for c in configs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InvalidRequestError(f"Configuration names must differ; repeated: {', '.join(duplicated)}.")
    if max_new_tokens < 1:
        raise InvalidRequestError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
    for config in configs:
        if config.icl_path:
            load_icl_pool(config.icl_path)  # a missing or bad pool fails here, before any engine loads
    return {c.name: load_prompt_artifact(_prompt_file(c.prompt_path)) for c in configs if c.prompt_path}


def answer_configs(
    configs: Sequence[EvalConfig],
    items: Sequence[EvalItem],
    cache: RequestCache,
    usage: Usage,
    *,
    max_new_tokens: int = 512,
    model_factory: Callable[..., Any] | None = None,
    progress: Callable[[str], None] = print,
    keep_engine: tuple[Any, ...] | None = None,
) -> AnsweredConfigs:
    """Answer every item under every configuration (greedily, unless it says how to sample), through
    the request cache (a rerun sends nothing it already has). Configurations that share an engine
    share one load; the engine whose key is ``keep_engine`` is loaded last and left open (``.kept``)."""
    from auto_model import AutoModel, constants

    prompt_files = check_configs(configs, max_new_tokens)
    factory = model_factory or AutoModel
    default_model = constants.default_model()
    groups: dict[tuple[Any, ...], list[EvalConfig]] = {}
    for config in configs:
        groups.setdefault(config.engine_key(default_model), []).append(config)
    queries = [item.query for item in items]
    done = AnsweredConfigs([], {}, {})
    for key in sorted(groups, key=lambda k: k == keep_engine):
        model_name, backend, base_url, dtype, prompt_format = key
        progress(f"loading {model_name} ({backend})")
        model = factory(model_name, dtype=dtype, backend=backend, base_url=base_url, prompt_format=prompt_format)
        own_artifact, own_retriever = model.prompt_artifact, None
        try:
            role = Role("answer", model, cache, usage)
            for config in groups[key]:
                done.engines[config.name] = f"{model.backend_name}:{model.backend.model_id}"
                custom = config.system_prompt
                artifact = prompt_files.get(config.name)
                if artifact is not None and not str(config.prompt_path).lower().endswith(".json"):  # a text prompt
                    custom = artifact.system_prompt
                # A .json artifact is the model's artifact for this configuration, routes and routing included.
                model.prompt_artifact = artifact if artifact is not None and custom is None else own_artifact
                k = config.num_optimized_icl
                model.reward = config.reward_model
                if config.icl_path or own_retriever is not None:  # this configuration's pool, or the model's own
                    own_retriever = own_retriever or model.retriever
                    model.retriever = (ICLRetriever(load_icl_pool(config.icl_path), model.aligner.embedding_model)
                                       if config.icl_path else own_retriever)  # fmt: skip
                asked = replace(config.sampling(max_new_tokens), user_specified_system_prompt=custom,
                                optimized_prompt=config.optimized_prompt, optimized_icl=k != 0, num_optimized_icl=k,
                                route=config.route, optimized_decoding=config.optimized_decoding,
                                cut_loops=config.cut_loops, check_answers=config.check_answers)  # fmt: skip
                # Routed and assembled exactly as generate() does it.
                requests = _requests(model, items, queries, asked)
                done.system_prompts[config.name] = model.aligner.system_prompt(custom, config.optimized_prompt)
                t0 = time.perf_counter()
                outcomes = role.run(requests)  # cached chunk by chunk (Role.chunk_size)
                progress(f"{config.name}: {len(items)} answers in {time.perf_counter() - t0:.1f} s")
                for item, outcome, request in zip(items, outcomes, requests, strict=True):
                    route = request.route.name if request.route else None
                    system = custom
                    if custom is None and config.optimized_prompt:
                        system = model.prompt_artifact.prompt_for(route)
                    answer = Answer(config.name, item, system, route=route)
                    if isinstance(outcome, Completion):
                        answer.text, answer.finish_reason = outcome.text, outcome.finish_reason
                        answer.looped = outcome.looped
                        answer.prompt_tokens = outcome.prompt_tokens
                        answer.completion_tokens = outcome.completion_tokens
                    else:
                        answer.error = f"{type(outcome).__name__}: {outcome}"
                    done.answers.append(answer)
            model.prompt_artifact = own_artifact
        except BaseException:
            model.close()
            raise
        if key == keep_engine:
            done.kept = model
        else:
            model.close()
    return done


def _requests(model: Any, items: Sequence[EvalItem], queries: list[str], options: Any) -> list[Any]:
    """The engine requests for the items, in order: single requests as ``generate`` sends them,
    conversations as ``chat`` does."""
    talks = {i: item.conversation for i, item in enumerate(items) if item.conversation is not None}
    single = [i for i in range(len(items)) if i not in talks]
    out: dict[int, Any] = {}
    if single:
        out.update(zip(single, model.aligner.requests([queries[i] for i in single], options), strict=True))
    if talks:
        out.update(zip(talks, model.aligner.chat_requests(list(talks.values()), options), strict=True))
    return [out[i] for i in range(len(items))]


def run_evaluation(
    configs: Sequence[EvalConfig],
    items: Sequence[EvalItem],
    *,
    output_dir: str | Path,
    judge: JudgeSettings | None,
    max_new_tokens: int = 512,
    model_factory: Callable[..., Any] | None = None,
    progress: Callable[[str], None] = print,
    reward_model: str | None = None,
) -> EvalRun:
    """Answer every item under every configuration (:func:`answer_configs`), then judge the answers
    (:func:`judge_answers`); everything through the request cache in ``output_dir``. With
    ``reward_model``, every answer is also scored by it (:mod:`auto_model.evaluation.preference`)."""
    from auto_model import AutoModel

    check_configs(configs, max_new_tokens)  # before anything is created
    if reward_model is not None:
        from auto_model.rewards.reward_model import check_reward_model_folder

        check_reward_model_folder(reward_model, "--reward-model")
    factory = model_factory or AutoModel
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    cache = RequestCache(output / "cache.sqlite")
    usage = Usage(roles={"answer": RoleUsage(), "judge": RoleUsage()})
    started = time.perf_counter()
    judge_key = (
        None
        if judge is None or judge.model is None
        else _engine_key(judge.model, judge.backend, judge.base_url, judge.dtype, "auto")
    )
    kept: Any = None
    try:
        done = answer_configs(configs, items, cache, usage, max_new_tokens=max_new_tokens, model_factory=factory,
                              progress=progress, keep_engine=judge_key)  # fmt: skip
        kept = done.kept
        if judge is not None and judge.model is not None:
            kept = kept or factory(judge.model, dtype=judge.dtype, backend=judge.backend, base_url=judge.base_url)
            judge_answers(done.answers, judge, Role("judge", kept, cache, usage), progress)
        if reward_model is not None:
            from auto_model.evaluation.preference import score_answers

            t0 = time.perf_counter()
            score_answers(done.answers, reward_model)
            progress(f"scored {len(done.answers)} answers with the reward model in {time.perf_counter() - t0:.1f} s")
    finally:
        if kept is not None:
            kept.close()
        cache.close()
    return EvalRun(
        list(configs),
        list(items),
        done.answers,
        done.system_prompts,
        judge,
        usage.snapshot()["process"],
        time.perf_counter() - started,
        done.engines,
        reward_model,
    )


def judge_answers(
    answers: list[Answer], settings: JudgeSettings, role: Role, progress: Callable[[str], None] = print
) -> None:
    """Score each answer that has text with the LLM judge on its kind's aspects (``.judgement``)."""
    for kind, aspects in (("regular", REGULAR_ASPECTS), ("safety", SAFETY_ASPECTS)):
        todo = [a for a in answers if a.item.kind == kind and a.text is not None]
        if not todo:
            continue
        judge = Judge(
            role,
            prompt=judge_template(kind),
            attempts=settings.attempts,
            max_new_tokens=settings.max_new_tokens,
            per_aspect=settings.per_aspect,
            json_schema=settings.json_schema,
        )
        t0 = time.perf_counter()
        evaluations = judge.score([RewardItem(a.item.query, a.text or "", tuple(aspects)) for a in todo])
        for answer, evaluation in zip(todo, evaluations, strict=True):
            answer.judgement = {
                "scores": evaluation.scores,
                "error": evaluation.error,
                "attempts": evaluation.attempts,
                "replies": evaluation.replies,
            }
        failed = sum(e.failed for e in evaluations)
        progress(f"judged {len(todo)} {kind} answers in {time.perf_counter() - t0:.1f} s ({failed} unreadable)")
