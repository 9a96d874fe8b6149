"""The search tree's parts: its settings (:class:`SearchConfig`), its nodes (:class:`Node`), the
optimizer's replies read back (:func:`parse_prompt_reply`), scores as the optimizer reads them,
per-node seeds, and the tree summed up per level (:func:`level_summary`) and along a path
(:func:`trace`). The search itself is :class:`~auto_model.trainer.search.BeamSearch`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from string import Template
from typing import Any

from auto_model.constants import is_whole
from auto_model.errors import InvalidRequestError
from auto_model.rewards.base import ItemScore, Score, has_rationales
from auto_model.routing import check_route
from auto_model.trainer.moves import MAX_EXAMPLES, MOVES

#: The trainer's model roles (each a :class:`~auto_model.rewards.requests.Role`; one model may fill several).
ROLES = ("base", "metrics", "eval", "optimize")


def template(name: str) -> Template:
    """An optimizer meta-prompt from ``auto_model/trainer/templates`` (``$name`` placeholders)."""
    return Template(resources.files("auto_model.trainer").joinpath(f"templates/{name}.txt").read_text(encoding="utf-8"))


#: The command-line flag of each search setting whose flag is not its name in kebab-case.
_FLAGS = {"optimizer_max_new_tokens": "--judge-max-new-tokens"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class SearchConfig:
    """The beam search's settings, checked when made (a typed error naming the setting and its
    ``auto-model-train`` flag): the CLI builds one from its flags before any model loads, and a
    Python user builds one to run :class:`BeamSearch` directly."""

    depth: int = 20
    beam_size: int = 2
    n_actions: int = 3
    max_depth_increase: int = 10
    temperature: float = 0.2  # the optimizer's sampling temperature
    skip_threshold: float | None = 4.5  # "already good": every aspect scores at least this (None: never)
    ret_icl: bool = True
    k: int = 2
    max_new_tokens: int = 512  # the base model's answers
    optimizer_max_new_tokens: int = 512  # the optimizer's rewrites
    seed: int = 42
    route: str | None = None  # the base model's answers go down this route (None: routed as in inference)
    moves: tuple[str, ...] = ("rewrite",)  # how candidates change (auto_model.trainer.moves.MOVES)
    queries_per_level: int = 1  # training queries each candidate answers per level
    token_cost: float = 0.0  # reward taken per 1,000 prompt tokens a request pays
    min_examples: int = 0  # the fewest examples per request the examples move goes down to

    def __post_init__(self) -> None:
        object.__setattr__(self, "moves", tuple(self.moves))
        for name in ("depth", "beam_size", "n_actions", "max_new_tokens", "optimizer_max_new_tokens",
                     "queries_per_level"):  # fmt: skip
            if not is_whole(getattr(self, name), 1):
                self._refuse(name, "must be >= 1")
        for name in ("max_depth_increase", "k"):
            if not is_whole(getattr(self, name), 0):
                self._refuse(name, "must be >= 0")
        if not is_whole(self.min_examples, 0, MAX_EXAMPLES):
            self._refuse("min_examples", f"must be in [0, {MAX_EXAMPLES}]")
        if not is_whole(self.seed):
            self._refuse("seed", "must be an integer")
        for name in ("temperature", "token_cost"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                self._refuse(name, "must be >= 0")
        threshold = self.skip_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):  # fmt: skip
            self._refuse("skip_threshold", "must be a number or None")
        unknown = [m for m in self.moves if m not in MOVES]
        if unknown or not self.moves:
            raise InvalidRequestError(
                f"--moves takes some of {', '.join(MOVES)}, comma-separated; got {unknown or 'none'} "
                "(SearchConfig.moves)."
            )
        if set(self.moves) - {"rewrite"} and self.route is None:
            raise InvalidRequestError(
                "--moves decoding, examples, sentences and shorten change a route's settings: "
                "pass --route everyday (or safety) (SearchConfig.route)."
            )
        check_route(self.route)

    def _refuse(self, name: str, rule: str) -> None:
        raise InvalidRequestError(f"{_flag(name)} {rule}, got {getattr(self, name)!r} (SearchConfig.{name}).")


@dataclass
class Node:
    id: int
    parent: int | None
    level: int
    action: str  # "init", "rewrite", "keep" or "carry"
    prompt: str
    query: str
    answer: str | None = None
    finish_reason: str | None = None  # how the answer ended ("stop" or "length")
    evaluation: dict[str, Any] | None = None
    reward: float | None = None  # this level's mean aspect score (None: no score)
    path_rewards: list[float] = field(default_factory=list)  # every score along the path, root first
    extensions: int = 0  # levels added to this path by "keep"
    error: str | None = None  # why this node has no answer or no score
    rejected: list[str] = field(default_factory=list)  # why the optimizer's other rewrites of the parent were dropped
    decoding: dict[str, float] = field(default_factory=dict)  # the candidate's decoding settings
    examples: int | None = None  # examples per request (None: the search's k)
    pool_drop: list[str] = field(default_factory=list)  # queries of pool examples left out
    pool_add: list[str] = field(default_factory=list)  # queries of bank examples added
    note: str | None = None  # what a move changed
    answers: list[dict[str, Any]] = field(default_factory=list)  # every query of the level: answer, reward, tokens
    prompt_tokens: float | None = None  # mean prompt tokens of its requests

    @property
    def path_mean(self) -> float:
        return sum(self.path_rewards) / len(self.path_rewards) if self.path_rewards else float("-inf")


#: Text of the optimizer's own requests (``templates/``): a reply that repeats it has copied its
#: request instead of writing a prompt or an answer.
SCAFFOLDING = ("<prompt>", "</prompt>", "<answer>", "</answer>", "A user asked:", "The assistant, using that system "
               "prompt", "The current system prompt:", "The current example answer:", "A reviewer scored",
               "A scorer rated", "Reply with only")  # fmt: skip
#: The most repetition (share of repeated word 3-grams) a usable reply may have: a looping one is not.
MAX_REPETITION = 0.35
#: The most words a new system prompt may have (the optimizer is asked for fewer than 300).
MAX_PROMPT_WORDS = 450


def parse_prompt_reply(text: str, tag: str = "prompt") -> str:
    """The text between ``<tag>`` and ``</tag>`` (a missing closing tag is tolerated). A reply that
    copies its request's own text (:data:`SCAFFOLDING`), loops (:data:`MAX_REPETITION`) or, for a
    prompt, runs past :data:`MAX_PROMPT_WORDS` words is unusable (``ValueError``)."""
    from auto_model.rewards.proxies import length_words, repetition

    match = re.search(rf"<{tag}>(.*?)(?:</{tag}>|$)", text, flags=re.S | re.I)
    body = (match.group(1) if match else "").strip()
    if len(body) < 8:  # nothing usable
        raise ValueError(f"no new {tag} between <{tag}> and </{tag}>")
    copied = [s for s in SCAFFOLDING if s.lower() in body.lower()]
    if copied:
        raise ValueError(f"the {tag} copies its request's text ({copied[0]!r})")
    if repetition(body) > MAX_REPETITION:
        raise ValueError(f"the {tag} loops ({repetition(body):.0%} of its 3-word phrases repeat)")
    if tag == "prompt" and length_words(body) > MAX_PROMPT_WORDS:
        raise ValueError(f"the prompt runs to {length_words(body)} words")
    return body


def feedback_lines(score: Score, scale: tuple[float, float] | None = None) -> str:
    """A score as the optimizer reads it: ``- Aspect: 4/5. Reason`` per aspect (the reason where the
    reward gives one; ``/5`` where its scale has a top)."""
    rationales = score.rationales or {}
    top = f"/{scale[1]:g}" if scale else ""
    lines = []
    for aspect, value in (score.values or {}).items():
        reason = rationales.get(aspect)
        lines.append(f"- {aspect}: {value:g}{top}." + (f" {reason}" if reason else ""))
    return "\n".join(lines) or "(no review)"


def mean_score(scores: Sequence[Score]) -> Score:
    """Scores of one candidate's answers to several queries as one: each aspect's mean over the
    answers that have it (the first one's reasons); a failure if none was scored."""
    scored = [s for s in scores if s.values]
    if not scored:
        return scores[0]
    aspects = list(dict.fromkeys(a for s in scored for a in s.values or {}))
    values = {a: sum(s.values[a] for s in scored if s.values and a in s.values)
              / sum(1 for s in scored if s.values and a in s.values) for a in aspects}  # fmt: skip
    return ItemScore(values, scored[0].rationales)


def clip(text: str, limit: int = 1200) -> str:
    """``text`` cut to ``limit`` characters (marked), so that long answers do not crowd a request."""
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " [...]"


#: The format of a search's checkpoint (the whole tree, written after every level).
CHECKPOINT_FORMAT = "auto_model.drpo_checkpoint/v1"


def as_saved(data: Any) -> Any:
    """``data`` as it comes back from JSON (tuples as lists): what a checkpoint is compared with."""
    return json.loads(json.dumps(data))


def action_seed(seed: int, node_id: int, action: int) -> int:
    """A reproducible sampling seed per (run seed, node, action)."""
    digest = hashlib.sha256(f"{seed}:{node_id}:{action}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def rewrite_request(parent: Node, score: Score, level: Sequence[Node], scale: tuple[float, float] | None) -> str:
    """The optimizer's request for rewrites of ``parent``'s prompt: the reward's reasons, or, where it
    gives none, a contrast with the best- and worst-scoring answers of its ``level`` (the level's
    scored, answered nodes); ``scale``: the reward's range, where it has one."""
    if has_rationales(score):
        return template("optimize_prompt").substitute(
            system_prompt=parent.prompt,
            query=parent.query,
            answer=parent.answer or "",
            scale=f"from {scale[0]:g} to {scale[1]:g}" if scale else "(higher is better)",
            feedback=feedback_lines(score, scale),
        )
    best = max(level, key=lambda n: (n.reward or 0.0, -n.id))
    worst = min(level, key=lambda n: (n.reward or 0.0, n.id))
    if best.answer == worst.answer:
        comparison = "No other answer to this query has been scored yet."
    else:
        comparison = (
            f"The same query was answered under {len(level)} system prompts. The best-scoring answer "
            f"({best.reward:.3g}):\n<answer>\n{clip(best.answer or '')}\n</answer>\n\nThe worst-scoring answer "
            f"({worst.reward:.3g}):\n<answer>\n{clip(worst.answer or '')}\n</answer>"
        )
    return template("optimize_prompt_contrastive").substitute(
        system_prompt=parent.prompt,
        query=parent.query,
        answer=parent.answer or "",
        score=f"{score.reward:.3g}",
        feedback=feedback_lines(score, scale),
        comparison=comparison,
    )


def level_summary(nodes: Sequence[Node], levels: int, kept: set[int]) -> list[dict[str, Any]]:
    """Per level of ``levels``: how many candidates were made and scored, what their rewards were,
    and how many rewrites the beam took (``accepted``: in ``kept``, the beam, the finished paths and
    the parents): whether the search moved."""
    rows = []
    for level in range(levels):
        made = [n for n in nodes if n.level == level]
        rewards = [n.reward for n in made if n.reward is not None]
        rewrites = [n for n in made if n.action in MOVES]  # the rewrites and the other moves
        rows.append(
            {
                "level": level + 1,
                "candidates": len(made),
                "scored": len(rewards),
                "best": max(rewards) if rewards else None,
                "mean": sum(rewards) / len(rewards) if rewards else None,
                "worst": min(rewards) if rewards else None,
                "rewrites": len(rewrites),
                "accepted": sum(n.id in kept for n in rewrites),
                "rejected": sum(len(n.rejected) for n in made),  # unusable rewrites of the parents
                "actions": {
                    a: sum(n.action == a for n in made)
                    for a in ("init", *MOVES, "keep", "carry")
                    if any(n.action == a for n in made)
                },  # fmt: skip
                "accepted_by_kind": {
                    a: sum(n.id in kept for n in rewrites if n.action == a)
                    for a in MOVES
                    if any(n.action == a for n in rewrites)
                },  # fmt: skip
            }
        )
    return rows


def summary_table(rows: list[dict[str, Any]], nodes: Sequence[Node]) -> str:
    """:func:`level_summary` as a table for the terminal (with why the search did not move, if it did not)."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    lines = ["level  candidates  scored  best    mean    worst   rewrites accepted rejected"]
    for row in rows:
        lines.append(
            f"{row['level']:>5}  {row['candidates']:>10}  {row['scored']:>6}  {fmt(row['best']):<6}  "
            f"{fmt(row['mean']):<6}  {fmt(row['worst']):<6}  {row['rewrites']:>8} {row['accepted']:>8} "
            f"{row['rejected']:>8}"
        )
    if rows and not any(row["rewrites"] for row in rows) and any(row["rejected"] for row in rows):
        reasons = Counter(r.split(" (")[0] for n in nodes for r in n.rejected)
        lines.append(
            "The search did not move: no rewrite was usable ("
            + "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
            + "). A stronger --optimize-model-name writes usable prompts."
        )
    return "\n".join(lines)


def trace(path: Sequence[Node]) -> str:
    """A path of the tree, root first, as text: each level's move, query, prompt, answer and scores."""
    lines = []
    for n in path:
        reward = "no score" if n.reward is None else f"reward {n.reward:.2f}"
        lines.append(f"=== level {n.level} · node {n.id} · {n.action} · {reward} · path mean {n.path_mean:.2f}")
        if n.note:
            lines.append(f"move: {n.note}")
        if n.decoding or n.examples is not None:
            lines.append(f"decoding: {n.decoding or 'none'} · examples per request: {n.examples}")
        lines.append(f"query: {n.query}")
        lines.append("prompt:")
        lines.append(n.prompt)
        lines.append("answer:")
        lines.append((n.answer or f"({n.error})").strip())
        if n.evaluation and n.evaluation.get("scores"):
            for aspect, s in n.evaluation["scores"].items():
                lines.append(f"  {aspect}: {s['score']:g} - {s['rationale']}")
        lines.append("")
    return "\n".join(lines)
