"""Evaluation runs: answer an eval set under several configurations, then judge every answer.

A *configuration* (:mod:`auto_model.evaluation.configs`) is a model and how it is asked.
Configurations that share a model share one engine. Every answer and every judge reply goes
through an on-disk request cache (the trainer's), so rerunning a finished run sends nothing and an
interrupted one resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from auto_model.backends.base import Completion
from auto_model.evaluation.configs import EvalConfig, check_configs, engine_key
from auto_model.evaluation.eval_set import EvalItem
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

logger = logging.getLogger(__name__)

#: The just-eval aspects: five for regular queries, one for harmful requests.
REGULAR_ASPECTS = ("Helpfulness", "Clarity", "Factuality", "Depth", "Engagement")
SAFETY_ASPECTS = ("Safety",)


def judge_template(kind: str) -> Template:
    """The judge prompt for ``"regular"`` or ``"safety"`` items. The fixed instructions come before
    the query and the answer, so engines with prefix caching process them once for a whole batch."""
    text = resources.files("auto_model.evaluation").joinpath(f"templates/judge_{kind}.txt").read_text(encoding="utf-8")
    return Template(text)


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
        else engine_key(judge.model, judge.backend, judge.base_url, judge.dtype, "auto")
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
