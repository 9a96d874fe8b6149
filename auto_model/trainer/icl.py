"""Stage 1 of DRPO: improve the answers of the in-context example pool.

Each example's answer is scored by the reward (any :class:`~auto_model.rewards.base.Reward`; an
example tagged ``harmful`` is a harmful request for the refusal metric); an answer that scores at
least ``skip_threshold`` on every aspect is kept (None: none is). The others get ``n_actions``
rewrites from the optimizer (all examples' rewrites in one batched call), the rewrites are scored
(one batched call), and the best answer so far is kept; this repeats for up to ``num_iters``
rounds. The optimizer reads the reward's reasons, or, for a reward that gives numbers without
reasons, the best and worst versions of the answer scored so far. A failed evaluation never counts
as good and never replaces an answer. The result is a pool in the SDK's format, with each example's
scores in its metadata, written after every round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auto_model.backends.base import Completion
from auto_model.options import GenerationOptions
from auto_model.prompting import format_answer, strip_markers
from auto_model.retrieval import ICLExample, save_icl_pool
from auto_model.rewards.base import Reward, RewardItem, Score, all_at_least, has_rationales, reward_scale, score_record
from auto_model.trainer.tree import action_seed, clip, feedback_lines, parse_prompt_reply, template

logger = logging.getLogger(__name__)


@dataclass
class ExampleState:
    index: int  # position in the pool
    example: ICLExample
    answer: str
    evaluation: Score | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    @property
    def reward(self) -> float:
        r = self.evaluation.reward if self.evaluation and self.evaluation.values is not None else None
        return float("-inf") if r is None else r

    @property
    def harmful(self) -> bool:
        return "harmful" in self.example.tags


def optimize_pool(
    pool: Sequence[ICLExample],
    optimizer: Any,
    reward: Reward,
    output: str | Path,
    *,
    num_iters: int = 3,
    n_actions: int = 2,
    temperature: float = 0.2,
    skip_threshold: float | None = 4.5,
    seed: int = 42,
    max_new_tokens: int = 512,
    progress: Callable[[str], None] | None = None,
) -> list[ExampleState]:
    progress = progress or (lambda message: None)
    states = [ExampleState(i, ex, strip_markers(ex.answer)) for i, ex in enumerate(pool)]
    first = reward.score([RewardItem(s.example.query, s.answer, harmful=s.harmful) for s in states])
    for state, evaluation in zip(states, first, strict=True):
        state.evaluation = evaluation
        state.history.append({"round": 0, "answer": state.answer, "evaluation": score_record(evaluation)})
    scale = reward_scale(reward)
    sampling = GenerationOptions(
        temperature=temperature, top_p=0.95, max_new_tokens=max_new_tokens, stop=("</answer>",)
    )
    for round_ in range(1, num_iters + 1):
        open_ = [s for s in states if not s.done and not (s.evaluation and all_at_least(s.evaluation, skip_threshold))]
        for s in states:
            if s not in open_:
                s.done = True
        if not open_:
            break
        prompts, seeds, owners = [], [], []
        for s in open_:
            text = template("optimize_icl").substitute(
                query=s.example.query,
                answer=s.answer,
                scale=f"from {scale[0]:g} to {scale[1]:g}" if scale else "(higher is better)",
                feedback=icl_feedback(s, scale),
            )
            for j in range(n_actions):
                prompts.append(text)
                seeds.append(action_seed(seed, round_ * 100_003 + s.index, j))
                owners.append(s)
        candidates: list[tuple[ExampleState, str]] = []
        for owner, outcome in zip(owners, optimizer.ask(prompts, sampling, seeds, prefill="<answer>\n"), strict=True):
            if isinstance(outcome, Completion):
                try:
                    candidates.append((owner, parse_prompt_reply(outcome.text, "answer")))
                except ValueError as exc:
                    logger.info("Unusable rewrite for %r: %s", owner.example.query, exc)
        evaluations = reward.score([RewardItem(o.example.query, answer, harmful=o.harmful) for o, answer in candidates])
        improved = 0
        for (owner, answer), evaluation in zip(candidates, evaluations, strict=True):
            owner.history.append({"round": round_, "answer": answer, "evaluation": score_record(evaluation)})
            if evaluation.values is not None and evaluation.reward is not None and evaluation.reward > owner.reward:
                owner.answer, owner.evaluation = answer, evaluation
                improved += 1
        progress(f"round {round_}: {len(open_)} examples rewritten, {improved} improvements")
        write_pool(states, output)
    write_pool(states, output)
    return states


def icl_feedback(state: ExampleState, scale: tuple[float, float] | None) -> str:
    """The optimizer's feedback on an example's answer: the reward's reasons, or, where it gives
    none, its score beside the best and worst versions of this answer scored so far."""
    if state.evaluation is None:
        return "(no review)"
    lines = feedback_lines(state.evaluation, scale)
    if has_rationales(state.evaluation):
        return lines
    scored = [h for h in state.history if h["evaluation"].get("reward") is not None]
    best = max(scored, key=lambda h: h["evaluation"]["reward"], default=None)
    worst = min(scored, key=lambda h: h["evaluation"]["reward"], default=None)
    text = f"{lines}\n(The scorer gives numbers, not reasons; higher is better.)"
    if best is not None and worst is not None and best["answer"] != worst["answer"]:
        high, low = best["evaluation"]["reward"], worst["evaluation"]["reward"]
        text += (
            f"\nOf the {len(scored)} versions of this answer scored so far, the best ({high:.3g}) was:\n<<<\n"
            f"{clip(best['answer'])}\n>>>\nand the worst ({low:.3g}) was:\n<<<\n{clip(worst['answer'])}\n>>>"
        )
    return text


def write_pool(states: Sequence[ExampleState], output: str | Path) -> None:
    examples = [ICLExample(s.example.query, format_answer(s.answer), s.example.tags) for s in states]
    scores = [score_record(s.evaluation) if s.evaluation else None for s in states]
    save_icl_pool(examples, output, provenance={"method": "drpo-icl"}, scores=scores)
