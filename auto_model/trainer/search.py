"""Stage 2 of DRPO: a beam search over system prompts.

Each level of the tree consumes the next training query. Every candidate prompt on the beam has the
base model answer that query (all candidates of a level in one batched call, assembled exactly as
in inference, with retrieved examples when ``ret_icl``), the reward scores the answers (one batched
call; any :class:`~auto_model.rewards.base.Reward`: the LLM judge on the aspects its metrics model
picks, a reward model, metrics, or a weighted mix), and the beam keeps the ``beam_size`` candidates
with the best mean reward along their path. A candidate is then expanded into the next level's
candidates:

* its answer already scored at least ``skip_threshold`` on every aspect: it is kept unchanged
  (``"keep"``), and its path may run one level longer (at most ``max_depth_increase`` in all);
  a ``skip_threshold`` of None never keeps (a reward model's logits have no top);
* its evaluation failed after the retries: it is carried unchanged (``"carry"``), without a
  score for that level and without a longer path, since there is no feedback to act on;
* otherwise the optimizer writes ``n_actions`` rewrites (``"rewrite"``) from the reward's
  rationales, or, where the reward gives numbers without reasons, from a contrast: the answer's
  score beside the best- and worst-scoring answers of its level, with their scores.

Besides the rewrite, ``moves`` may let a candidate change without a writer model
(:mod:`auto_model.trainer.moves`): its decoding settings, its examples (how many, and which: the
pool's or a bank's; or a shorter version of a pool example's answer) and its prompt's sentences. A
candidate is then a route's whole state (:class:`~auto_model.trainer.moves.Candidate`), answered
with its own settings and examples. A level may answer ``queries_per_level`` training queries (the
reward is the mean over them), and ``token_cost`` takes that much reward per 1,000 prompt tokens a
request pays, so that the injected context earns its cost.

A path ends after ``depth`` levels (plus its extensions) or when the training queries run out. The
result is the last candidate of the best finished path. After every level the whole tree is written
atomically to a checkpoint, so a killed run resumes where it stopped; with the request cache, the
interrupted level costs nothing it already paid for. The tree's parts (settings, nodes, summaries)
are :mod:`auto_model.trainer.tree`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from auto_model.backends.base import Completion
from auto_model.errors import ArtifactError, EngineOutageError
from auto_model.files import atomic_write_text
from auto_model.options import GenerationOptions
from auto_model.rewards.base import (
    Reward,
    RewardItem,
    Score,
    all_at_least,
    reward_scale,
    score_from_record,
    score_record,
)
from auto_model.trainer.moves import (
    Candidate,
    ExampleSources,
    Move,
    decoding_moves,
    example_moves,
    pick,
    sentence_moves,
    shorten_moves,
)
from auto_model.trainer.tree import (
    CHECKPOINT_FORMAT,
    Node,
    SearchConfig,
    action_seed,
    as_saved,
    level_summary,
    mean_score,
    parse_prompt_reply,
    rewrite_request,
    summary_table,
    trace,
)

logger = logging.getLogger(__name__)


class BeamSearch:
    """The search. ``base``/``optimizer`` are :class:`~auto_model.rewards.requests.Role` objects;
    ``reward`` any :class:`~auto_model.rewards.base.Reward`. ``harmful`` says, per training query,
    whether it is a harmful request (the refusal metric needs it; None: unknown)."""

    def __init__(
        self,
        base: Any,
        optimizer: Any,
        reward: Reward,
        config: SearchConfig,
        queries: Sequence[str],
        initial_prompt: str,
        checkpoint_path: str | Path,
        *,
        harmful: Sequence[bool | None] | None = None,
        progress: Callable[[str], None] | None = None,
        initial: Candidate | None = None,
        bank: Sequence[Any] = (),
        guidelines: Sequence[str] = (),
    ):
        """``initial``: the root candidate (default: ``initial_prompt`` with no decoding settings,
        ``config.k`` examples and the model's pool); ``bank``: examples the ``examples`` move may
        add; ``guidelines``: sentences the ``sentences`` move may add."""
        self.base, self.optimizer, self.reward, self.config = base, optimizer, reward, config  # checked when made
        self.initial = initial or Candidate(initial_prompt, examples=config.k)
        if self.initial.prompt != initial_prompt:
            raise ValueError("the initial candidate's prompt must be the initial prompt.")
        self.sources = ExampleSources(bank, config.route, "shorten" in config.moves, lambda: base.model)
        self.guidelines = list(guidelines)
        self._routers: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}
        self.queries = list(queries)
        self.harmful = list(harmful) if harmful is not None else [None] * len(self.queries)
        if len(self.harmful) != len(self.queries):
            raise ValueError(f"harmful has {len(self.harmful)} flags for {len(self.queries)} queries.")
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
            "config": as_saved(asdict(self.config)),
            "queries": self.queries,
            "initial_prompt": self.initial_prompt,
            "initial": as_saved(asdict(self.initial)),
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
            or data.get("initial", as_saved(asdict(self.initial))) != as_saved(asdict(self.initial))
            or as_saved({**asdict(SearchConfig()), **data["config"]}) != as_saved(asdict(self.config))
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
        indices = self._level_queries(level)
        if not indices:
            self.finished.extend(self.beam)
            self.beam = []
            self.save()
            return
        proposals = self._proposals(level)
        for node, outcomes in zip(proposals, self._answer(proposals, indices), strict=True):
            for i, (answer, examples) in zip(indices, outcomes, strict=True):
                if isinstance(answer, Completion):
                    node.answers.append({"query": self.queries[i], "answer": answer.text, "examples": examples,
                                         "finish_reason": answer.finish_reason, "looped": answer.looped,
                                         "prompt_tokens": answer.prompt_tokens})  # fmt: skip
                elif node.error is None:
                    node.error = f"the base model failed: {answer}"
            if node.answers:
                node.answer, node.finish_reason = node.answers[0]["answer"], node.answers[0]["finish_reason"]
                node.prompt_tokens = sum(a["prompt_tokens"] for a in node.answers) / len(node.answers)
                node.error = None
        judged = [n for n in proposals if n.answers]
        if not judged:  # an outage, not a result: the checkpoint keeps the last level that has answers
            raise EngineOutageError(
                f"Level {level + 1}: every base-model request failed ({len(proposals)} of {len(proposals)}; "
                f"{proposals[0].error}). "
                f"Nothing of this level was saved; continue with --resume once the engine answers."
            )
        harmful = {self.queries[i]: self.harmful[i] for i in indices}
        items = [RewardItem(a["query"], a["answer"], harmful=harmful[a["query"]], finish_reason=a["finish_reason"],
                            looped=a.get("looped", False)) for n in judged for a in n.answers]  # fmt: skip
        scores = iter(self.reward.score(items))
        per_node = [[next(scores) for _ in n.answers] for n in judged]
        if all(s.unanswered for node_scores in per_node for s in node_scores):  # the judge never replied at all
            raise EngineOutageError(
                f"Level {level + 1}: every judge request failed ({per_node[0][0].error}). Nothing of this level "
                f"was saved; continue with --resume once the judge's engine answers."
            )
        for node, node_scores in zip(judged, per_node, strict=True):
            for answer, score in zip(node.answers, node_scores, strict=True):
                answer["reward"] = score.reward if score.values is not None else None
            self._score(node, node_scores[0] if len(node_scores) == 1 else mean_score(node_scores))
        for node in proposals:
            if not node.answers:
                node.path_rewards = list(self.nodes[node.parent].path_rewards) if node.parent is not None else []
        self.nodes.extend(proposals)
        self.level = level + 1
        best = self._select(proposals, level)
        self.progress(f"level {level + 1}: {len(proposals)} candidates, best path mean {best.path_mean:.2f}")
        self.save()

    def _level_queries(self, level: int) -> list[int]:
        """The training queries (indices) that level ``level`` answers."""
        q = self.config.queries_per_level
        return list(range(level * q, min((level + 1) * q, len(self.queries))))

    def _levels(self) -> int:
        """How many levels the training queries make."""
        return -(-len(self.queries) // self.config.queries_per_level)

    def _select(self, proposals: Sequence[Node], level: int) -> Node:
        """Keep the best answered candidates of a level: in the beam, or finished where their path
        ends. Returns the best."""
        ranked = sorted((n for n in proposals if n.answer is not None), key=lambda n: (-n.path_mean, n.id))
        keep = ranked[: self.config.beam_size]
        self.beam = []
        for node in keep:
            if level + 1 >= self._limit(node) or level + 1 >= self._levels():
                self.finished.append(node.id)
            else:
                self.beam.append(node.id)
        return keep[0]

    def _score(self, node: Node, score: Score) -> None:
        parent_rewards = list(self.nodes[node.parent].path_rewards) if node.parent is not None else []
        node.evaluation = score_record(score)
        node.reward = score.reward if score.values is not None else None
        if node.reward is not None and self.config.token_cost and node.prompt_tokens is not None:
            node.reward -= self.config.token_cost * node.prompt_tokens / 1000  # what the injected context costs
        node.path_rewards = parent_rewards + ([node.reward] if node.reward is not None else [])
        if node.reward is None:
            attempts = node.evaluation.get("attempts", 1)
            node.error = f"the evaluation failed after {attempts} attempt{'s' * (attempts != 1)}: {score.error}"

    def candidate(self, node: Node) -> Candidate:
        """The state a node stands for."""
        k = self.config.k if node.examples is None else node.examples
        return Candidate(node.prompt, tuple(sorted(node.decoding.items())), k, tuple(node.pool_drop),
                         tuple(node.pool_add))  # fmt: skip

    def _proposals(self, level: int) -> list[Node]:
        next_id = len(self.nodes)
        first_query = self.queries[self._level_queries(level)[0]]

        def node(parent: Node | None, action: str, state: Candidate, extensions: int, note: str | None = None) -> Node:
            return Node(next_id + len(proposals), None if parent is None else parent.id, level, action, state.prompt,
                        first_query, extensions=extensions, decoding=state.settings, examples=state.examples,
                        pool_drop=list(state.drop), pool_add=list(state.add), note=note)  # fmt: skip

        proposals: list[Node] = []
        if level == 0:
            return [node(None, "init", self.initial, 0)]

        def child(parent: Node, action: str, state: Candidate, extensions: int, note: str | None = None) -> None:
            proposals.append(node(parent, action, state, extensions, note))

        to_rewrite: list[tuple[Node, Score]] = []
        to_move: list[Node] = []
        for parent_id in self.beam:
            parent = self.nodes[parent_id]
            score: Score | None = score_from_record(parent.evaluation) if parent.evaluation else None
            if score is not None and all_at_least(score, self.config.skip_threshold):
                child(parent, "keep", self.candidate(parent), parent.extensions + 1)
            elif score is None or score.values is None:
                child(parent, "carry", self.candidate(parent), parent.extensions)
            else:
                to_move.append(parent)
                if "rewrite" in self.config.moves:
                    to_rewrite.append((parent, score))
        rewrites, rejected = self._rewrites(to_rewrite)
        for parent in to_move:
            first, state = len(proposals), self.candidate(parent)
            seen = {state}
            for new in rewrites.get(parent.id, []):
                seen.add(replace(state, prompt=new))
                child(parent, "rewrite", replace(state, prompt=new), parent.extensions)
            for move in self._moves(parent, state):
                if move.candidate not in seen:
                    seen.add(move.candidate)
                    child(parent, move.kind, move.candidate, parent.extensions, move.note)
            if len(proposals) == first:  # nothing usable: the candidate goes on unchanged
                child(parent, "carry", state, parent.extensions)
            proposals[first].rejected = rejected.get(parent.id, [])
        return proposals

    def _moves(self, parent: Node, state: Candidate) -> list[Move]:
        """The parent's moves that need no writer model, ``n_actions`` of each kind (seeded)."""
        made: list[Move] = []
        # what the level's requests would get: the examples they retrieve now (for both example moves)
        queries = [self.queries[i] for i in self._level_queries(parent.level + 1)]
        retrieved: list[str] | None = None
        for number, kind in enumerate(self.config.moves):
            rng = random.Random(action_seed(self.config.seed, parent.id, 1000 + number))
            if kind == "decoding":
                options = decoding_moves(state, self.base.decoding_settings)
            elif kind in ("examples", "shorten"):
                if retrieved is None:
                    retrieved = [ex.query for q in queries for ex in self._examples(state, q)]
                if kind == "examples":  # and the bank's examples nearest to the level's queries
                    options = example_moves(state, retrieved, self.sources.near(queries), self.config.min_examples)
                else:
                    options = shorten_moves(state, retrieved, self.sources.short())
            elif kind == "sentences":
                options = sentence_moves(state, self.guidelines)
            else:
                continue
            made += pick(options, self.config.n_actions, rng)
        return made

    def added(self, state: Candidate) -> tuple[Any, ...]:
        """The examples ``state`` adds to the pool: shorter versions of pool examples and the bank's."""
        return self.sources.added(state)

    def _rewrites(self, to_rewrite: list[tuple[Node, Score]]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
        """The optimizer's usable rewrites of each parent's prompt, and why the others were dropped;
        all of the level's in one batched optimizer call, each with its own seed."""
        prompts, seeds, owners = [], [], []
        for parent, score in to_rewrite:
            text = self.rewrite_request(parent, score)
            for j in range(self.config.n_actions):
                prompts.append(text)
                seeds.append(action_seed(self.config.seed, parent.id, j))
                owners.append(parent)
        outcomes = (
            self.optimizer.ask(prompts, self._optimizer_sampling(), seeds, prefill="<prompt>\n") if prompts else []
        )
        rewrites: dict[int, list[str]] = {p.id: [] for p, _ in to_rewrite}
        rejected: dict[int, list[str]] = {p.id: [] for p, _ in to_rewrite}
        for parent, outcome in zip(owners, outcomes, strict=True):
            if not isinstance(outcome, Completion):
                logger.warning("The optimizer failed for node %d: %s", parent.id, outcome)
                rejected[parent.id].append(f"the optimizer failed: {outcome}")
                continue
            try:
                new = parse_prompt_reply(outcome.text)
            except ValueError as exc:
                logger.info("Unusable rewrite for node %d: %s", parent.id, exc)
                rejected[parent.id].append(str(exc))
                continue
            if new == parent.prompt or new in rewrites[parent.id]:  # a copy is no rewrite
                rejected[parent.id].append("a copy of the prompt or of another rewrite")
            else:
                rewrites[parent.id].append(new)
        return rewrites, rejected

    def rewrite_request(self, parent: Node, score: Score) -> str:
        """The optimizer's request for rewrites of ``parent``'s prompt (:func:`.tree.rewrite_request`)."""
        level = [n for n in self.nodes if n.level == parent.level and n.reward is not None and n.answer is not None]
        return rewrite_request(parent, score, level, reward_scale(self.reward))

    def _optimizer_sampling(self) -> GenerationOptions:
        return GenerationOptions(
            temperature=self.config.temperature,
            top_p=0.95,
            max_new_tokens=self.config.optimizer_max_new_tokens,
            stop=("</prompt>",),
        )

    def _answer(self, nodes: Sequence[Node], indices: Sequence[int]) -> list[list[tuple[Any, list[str]]]]:
        """Each node's answers to the level's queries, with the queries of the examples each request
        got: every request of the level in one batched call (through the request cache)."""
        items, examples = [], []
        for node in nodes:
            state = self.candidate(node)
            for i in indices:
                found = self._examples(state, self.queries[i])
                examples.append([ex.query for ex in found])
                items.append((node.prompt, self.queries[i], found, self._options(state)))
        outcomes = iter(zip(self.base.answer_each(items), examples, strict=True))
        return [[next(outcomes) for _ in indices] for _ in nodes]

    def _options(self, state: Candidate) -> GenerationOptions:
        """How the base model answers for a candidate: greedy, with the candidate's decoding settings,
        unchecked (the reward measures what the candidate makes the model write)."""
        return GenerationOptions(temperature=0.0, top_p=1.0, max_new_tokens=self.config.max_new_tokens,
                                 route=self.config.route, optimized_decoding=False, extra=state.settings,
                                 check_answers=False)  # fmt: skip

    def _examples(self, state: Candidate, query: str) -> list[Any]:
        """The examples a request for ``query`` gets under ``state``, retrieved as in inference: from
        the model's pool with the candidate's edits, down the search's route (or the query's own)."""
        k = state.examples if self.config.ret_icl else 0
        if k <= 0:
            return []
        if not state.drop and not state.add:
            return self.base.examples(query, k, self.config.route)
        model = self.base.model
        key = (state.drop, state.add)
        if key not in self._routers:
            from auto_model.retrieval import ICLRetriever
            from auto_model.router import RoutedRetriever
            from auto_model.routing import RoutingSettings

            edited = replace(model.prompt_artifact, pool_drop=state.drop, pool_add=self.added(state))
            settings = model.prompt_artifact.routing
            pool = ICLRetriever(edited.edit_pool(model.icl_pool), model.aligner.embedding_model)
            self._routers[key] = RoutedRetriever(pool, RoutingSettings.from_dict(settings) if settings else None)
        return self._routers[key].search([query], k, self.config.route)[1][0]

    # -- reports -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The search as JSON: levels done, the best result so far (its path), the beam, the finished
        candidates, :meth:`summary` and every node (what ``output.json`` and its page show)."""
        try:
            best = self.best()
            result: dict[str, Any] | None = {
                "node": best.id,
                "prompt": best.prompt,
                "path_mean": best.path_mean if best.path_rewards else None,
                "path": [n.id for n in self.path(best)],
            }
        except ArtifactError:  # no level finished yet
            result = None
        return {
            "levels_done": self.level,
            "result": result,
            "beam": self.beam,
            "finished": self.finished,
            "levels": self.summary(),
            "nodes": [asdict(n) for n in self.nodes],
        }

    def summary(self) -> list[dict[str, Any]]:
        """Per level: candidates made and scored, their rewards, rewrites the beam took (:func:`level_summary`)."""
        kept = set(self.beam) | set(self.finished) | {n.parent for n in self.nodes if n.parent is not None}
        return level_summary(self.nodes, self.level, kept)

    def summary_table(self) -> str:
        """:meth:`summary` as a table for the terminal."""
        return summary_table(self.summary(), self.nodes)

    def trace(self, node: Node) -> str:
        """The path to ``node`` as text (:func:`~auto_model.trainer.tree.trace`)."""
        return trace(self.path(node))
