"""Stage 2 of DRPO: a beam search over system prompts.

Each level of the tree consumes the next training query. Every candidate prompt on the beam has the
base model answer that query (all candidates of a level in one batched call, assembled exactly as
in inference, with retrieved examples when ``ret_icl``), the judge scores the answers on the
aspects chosen for the query (one batched call), and the beam keeps the ``beam_size`` candidates
with the best mean reward along their path. A candidate is then expanded into the next level's
candidates:

* its answer already scored at least ``skip_threshold`` on every aspect: it is kept unchanged
  (``"keep"``), and its path may run one level longer (at most ``max_depth_increase`` in all);
* its evaluation failed after the retries: it is carried unchanged (``"carry"``), without a
  score for that level and without a longer path, since there is no feedback to act on;
* otherwise the optimizer writes ``n_actions`` rewrites from the judge's rationales (``"rewrite"``).

A path ends after ``depth`` levels (plus its extensions) or when the training queries run out. The
result is the last prompt of the best finished path. After every level the whole tree is written
atomically to a checkpoint, so a killed run resumes where it stopped; with the request cache, the
interrupted level costs nothing it already paid for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from auto_model.backends.base import Completion
from auto_model.errors import ArtifactError, EngineOutageError
from auto_model.files import atomic_write_text
from auto_model.options import GenerationOptions
from auto_model.rewards.judge import Evaluation, Judge

logger = logging.getLogger(__name__)

#: The trainer's model roles (each a :class:`~auto_model.rewards.requests.Role`; one model may fill several).
ROLES = ("base", "metrics", "eval", "optimize")


def template(name: str) -> Template:
    """An optimizer meta-prompt from ``auto_model/trainer/templates`` (``$name`` placeholders)."""
    return Template(resources.files("auto_model.trainer").joinpath(f"templates/{name}.txt").read_text(encoding="utf-8"))


CHECKPOINT_FORMAT = "auto_model.drpo_checkpoint/v1"


@dataclass
class SearchConfig:
    depth: int = 20
    beam_size: int = 2
    n_actions: int = 3
    max_depth_increase: int = 10
    temperature: float = 0.2  # the optimizer's sampling temperature
    skip_threshold: float = 4.5  # "already good": every aspect scores at least this
    ret_icl: bool = True
    k: int = 2
    max_new_tokens: int = 512  # the base model's answers
    optimizer_max_new_tokens: int = 512  # the optimizer's rewrites
    seed: int = 42
    route: str | None = None  # the base model's answers go down this route (None: routed as in inference)


@dataclass
class Node:
    id: int
    parent: int | None
    level: int
    action: str  # "init", "rewrite", "keep" or "carry"
    prompt: str
    query: str
    answer: str | None = None
    evaluation: dict[str, Any] | None = None
    reward: float | None = None  # this level's mean aspect score (None: no score)
    path_rewards: list[float] = field(default_factory=list)  # every score along the path, root first
    extensions: int = 0  # levels added to this path by "keep"
    error: str | None = None  # why this node has no answer or no score

    @property
    def path_mean(self) -> float:
        return sum(self.path_rewards) / len(self.path_rewards) if self.path_rewards else float("-inf")


def parse_prompt_reply(text: str, tag: str = "prompt") -> str:
    """The text between ``<tag>`` and ``</tag>`` (a missing closing tag is tolerated)."""
    match = re.search(rf"<{tag}>(.*?)(?:</{tag}>|$)", text, flags=re.S | re.I)
    body = (match.group(1) if match else "").strip()
    if len(body) < 8:  # nothing usable
        raise ValueError(f"no new {tag} between <{tag}> and </{tag}>")
    return body


def action_seed(seed: int, node_id: int, action: int) -> int:
    """A reproducible sampling seed per (run seed, node, action)."""
    digest = hashlib.sha256(f"{seed}:{node_id}:{action}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class BeamSearch:
    """The search. ``base``/``optimizer`` are :class:`~auto_model.rewards.requests.Role` objects."""

    def __init__(
        self,
        base: Any,
        optimizer: Any,
        judge: Judge,
        config: SearchConfig,
        queries: Sequence[str],
        initial_prompt: str,
        checkpoint_path: str | Path,
        *,
        progress: Callable[[str], None] | None = None,
    ):
        self.base, self.optimizer, self.judge, self.config = base, optimizer, judge, config
        self.queries = list(queries)
        self.initial_prompt = initial_prompt
        self.checkpoint_path = Path(checkpoint_path)
        self.nodes: list[Node] = []
        self.beam: list[int] = []  # ids of the open candidates after the last finished level
        self.finished: list[int] = []  # ids of the candidates whose path ended
        self.level = 0  # the next level to run
        self.progress = progress or (lambda message: None)

    # -- checkpoints -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "queries": self.queries,
            "initial_prompt": self.initial_prompt,
            "level": self.level,
            "beam": self.beam,
            "finished": self.finished,
            "nodes": [asdict(n) for n in self.nodes],
        }

    def save(self) -> None:
        atomic_write_text(self.checkpoint_path, json.dumps(self.state(), indent=1, ensure_ascii=False) + "\n")

    def load(self) -> bool:
        """Restore a checkpoint of the same search; False if there is none."""
        if not self.checkpoint_path.exists():
            return False
        data = json.loads(self.checkpoint_path.read_text(encoding="utf-8"))
        if data.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint_path} is not a DRPO checkpoint ({data.get('format')!r}).")
        if (
            data["queries"] != self.queries
            or data["initial_prompt"] != self.initial_prompt
            or {"route": None, **data["config"]} != asdict(self.config)  # older checkpoints have no route
        ):
            raise ValueError(
                f"{self.checkpoint_path} belongs to a run with other settings, training queries or initial prompt; "
                "resume with the same arguments, or use a new --log-dir."
            )
        self.nodes = [Node(**n) for n in data["nodes"]]
        self.beam, self.finished, self.level = data["beam"], data["finished"], data["level"]
        if self.level > 0 and not self.beam and not self.finished:
            self._roll_back_empty_levels()
        return True

    def _roll_back_empty_levels(self) -> None:
        """Undo levels in which no candidate was answered (a checkpoint that older versions wrote
        during an outage): the run goes on from the last level that has answers."""
        while self.level > 0 and not self.beam and not self.finished:
            failed = self.level - 1
            self.nodes = [n for n in self.nodes if n.level < failed]
            self.level = failed
            if failed == 0:
                break
            self._select([n for n in self.nodes if n.level == failed - 1], failed - 1)
            logger.warning(
                "Level %d of %s has no answered candidate; continuing from level %d",
                failed + 1,
                self.checkpoint_path,
                failed,
            )
        self.save()

    # -- the search --------------------------------------------------------------------------

    def done(self) -> bool:
        return self.level > 0 and not self.beam

    def run(self) -> Node:
        while not self.done():
            self.step()
        return self.best()

    def best(self) -> Node:
        candidates = self.finished or self.beam
        if not candidates:
            raise ArtifactError("The search has no scored candidate yet: run at least one level.")
        return max((self.nodes[i] for i in candidates), key=lambda n: (n.path_mean, -n.id))

    def path(self, node: Node) -> list[Node]:
        out = [node]
        while out[-1].parent is not None:
            out.append(self.nodes[out[-1].parent])
        return out[::-1]

    def _limit(self, node: Node) -> int:
        return self.config.depth + min(node.extensions, self.config.max_depth_increase)

    def step(self) -> None:
        """Run one level: propose, answer, judge, select; then checkpoint."""
        level = self.level
        if level >= len(self.queries):
            self.finished.extend(self.beam)
            self.beam = []
            self.save()
            return
        query = self.queries[level]
        proposals = self._proposals(level)
        answers = self._answer([p.prompt for p in proposals], query)
        for node, answer in zip(proposals, answers, strict=True):
            if isinstance(answer, Completion):
                node.answer = answer.text
            else:
                node.error = f"the base model failed: {answer}"
        judged = [n for n in proposals if n.answer is not None]
        if not judged:  # an outage, not a result: the checkpoint keeps the last level that has answers
            raise EngineOutageError(
                f"Level {level + 1}: every base-model request failed ({len(proposals)} of {len(proposals)}; "
                f"{proposals[0].error}). "
                f"Nothing of this level was saved; continue with --resume once the engine answers."
            )
        evaluations = self.judge.evaluate([(query, n.answer or "") for n in judged])
        if all(e.failed and not e.replies for e in evaluations):  # the judge never replied at all
            raise EngineOutageError(
                f"Level {level + 1}: every judge request failed ({evaluations[0].error}). Nothing of this level "
                f"was saved; continue with --resume once the judge's engine answers."
            )
        for node, evaluation in zip(judged, evaluations, strict=True):
            self._score(node, evaluation)
        for node in proposals:
            if node.answer is None:
                node.path_rewards = list(self.nodes[node.parent].path_rewards) if node.parent is not None else []
        self.nodes.extend(proposals)
        self.level = level + 1
        best = self._select(proposals, level)
        self.progress(f"level {level + 1}: {len(proposals)} candidates, best path mean {best.path_mean:.2f}")
        self.save()

    def _select(self, proposals: Sequence[Node], level: int) -> Node:
        """Keep the best answered candidates of a level: in the beam, or finished where their path
        ends. Returns the best."""
        ranked = sorted((n for n in proposals if n.answer is not None), key=lambda n: (-n.path_mean, n.id))
        keep = ranked[: self.config.beam_size]
        self.beam = []
        for node in keep:
            if level + 1 >= self._limit(node) or level + 1 >= len(self.queries):
                self.finished.append(node.id)
            else:
                self.beam.append(node.id)
        return keep[0]

    def _score(self, node: Node, evaluation: Evaluation) -> None:
        parent_rewards = list(self.nodes[node.parent].path_rewards) if node.parent is not None else []
        node.evaluation = evaluation.to_dict()
        node.reward = evaluation.reward
        node.path_rewards = parent_rewards + ([node.reward] if node.reward is not None else [])
        if evaluation.failed:
            node.error = f"the evaluation failed after {evaluation.attempts} attempts: {evaluation.error}"

    def _proposals(self, level: int) -> list[Node]:
        next_id = len(self.nodes)
        if level == 0:
            return [Node(next_id, None, 0, "init", self.initial_prompt, self.queries[0])]
        proposals: list[Node] = []

        def child(parent: Node, action: str, prompt: str, extensions: int) -> None:
            proposals.append(
                Node(
                    next_id + len(proposals),
                    parent.id,
                    level,
                    action,
                    prompt,
                    self.queries[level],
                    extensions=extensions,
                )
            )

        to_rewrite: list[tuple[Node, Evaluation]] = []
        for parent_id in self.beam:
            parent = self.nodes[parent_id]
            evaluation = (
                Evaluation(parent.evaluation["aspects"], parent.evaluation["scores"]) if parent.evaluation else None
            )
            if evaluation is not None and evaluation.all_at_least(self.config.skip_threshold):
                child(parent, "keep", parent.prompt, parent.extensions + 1)
            elif evaluation is None or evaluation.failed:
                child(parent, "carry", parent.prompt, parent.extensions)
            else:
                to_rewrite.append((parent, evaluation))
        # All rewrites of the level in one batched optimizer call, each with its own seed.
        prompts, seeds, owners = [], [], []
        for parent, evaluation in to_rewrite:
            text = template("optimize_prompt").substitute(
                system_prompt=parent.prompt,
                query=parent.query,
                answer=parent.answer or "",
                feedback=evaluation.feedback(),
            )
            for j in range(self.config.n_actions):
                prompts.append(text)
                seeds.append(action_seed(self.config.seed, parent.id, j))
                owners.append(parent)
        outcomes = (
            self.optimizer.ask(prompts, self._optimizer_sampling(), seeds, prefill="<prompt>\n") if prompts else []
        )
        rewrites: dict[int, list[str]] = {p.id: [] for p, _ in to_rewrite}
        for parent, outcome in zip(owners, outcomes, strict=True):
            if not isinstance(outcome, Completion):
                logger.warning("The optimizer failed for node %d: %s", parent.id, outcome)
                continue
            try:
                new = parse_prompt_reply(outcome.text)
            except ValueError as exc:
                logger.info("Unusable rewrite for node %d: %s", parent.id, exc)
                continue
            if new != parent.prompt and new not in rewrites[parent.id]:  # a copy is no rewrite
                rewrites[parent.id].append(new)
        for parent, _ in to_rewrite:
            options = rewrites[parent.id]
            if not options:  # no usable rewrite: the candidate goes on unchanged
                child(parent, "carry", parent.prompt, parent.extensions)
            for new in options:
                child(parent, "rewrite", new, parent.extensions)
        return proposals

    def _optimizer_sampling(self) -> GenerationOptions:
        return GenerationOptions(
            temperature=self.config.temperature,
            top_p=0.95,
            max_new_tokens=self.config.optimizer_max_new_tokens,
            stop=("</prompt>",),
        )

    def _answer(self, prompts: list[str], query: str) -> list[Any]:
        options = GenerationOptions(
            temperature=0.0, top_p=1.0, max_new_tokens=self.config.max_new_tokens, route=self.config.route
        )
        return self.base.answer(prompts, query, k=self.config.k if self.config.ret_icl else 0, options=options)

    # -- reports -----------------------------------------------------------------------------

    def trace(self, node: Node) -> str:
        lines = []
        for n in self.path(node):
            reward = "no score" if n.reward is None else f"reward {n.reward:.2f}"
            lines.append(f"=== level {n.level} · node {n.id} · {n.action} · {reward} · path mean {n.path_mean:.2f}")
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
