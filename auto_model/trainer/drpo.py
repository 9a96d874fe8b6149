"""DRPO as a Python object: ``DRPO(DRPOConfig(...)).run()`` runs a stage and writes what
``auto-model-train`` writes (the command line only builds the :class:`DRPOConfig`).

    from auto_model.trainer import DRPO, DRPOConfig

    result = DRPO(DRPOConfig(route="safety", moves="decoding,examples", reward="metric:refusal",
                             depth=4, log_dir="runs/safety")).run()
    print(result.output)  # the artifact, loaded with AutoModel(model, prompt_path=result.output)

A run keeps its state in its log folder (``algo_output/``: the checkpoint, ``usage.json``, the tree
and its page; ``cache/``: every engine request answered) and resumes from it with ``resume=True``.
A run stopped by its call budget raises :class:`~auto_model.rewards.requests.BudgetExhausted`, one
stopped by an engine outage :class:`~auto_model.errors.EngineOutageError`; both leave it resumable.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from auto_model.artifacts import PromptArtifact, save_prompt_artifact
from auto_model.errors import EngineOutageError, InvalidRequestError
from auto_model.files import atomic_write_text
from auto_model.flags import replica_options
from auto_model.rewards.base import reward_failures
from auto_model.trainer.config import ORIGINAL_DEFAULT_PROMPT, DRPOConfig, redacted

logger = logging.getLogger("auto_model.trainer")


@dataclass(frozen=True)
class TrainResult:
    """What a stage wrote: ``output`` (the artifact, or the icl stage's pool), a one-line
    ``summary`` of it, and the search's level table (the prompt stage; else None)."""

    output: Path
    summary: str
    table: str | None = None


class DRPO:
    """One DRPO run of ``config``'s stage (its settings resolved: see :meth:`DRPOConfig.resolved`).
    ``usage`` holds the calls sent to each role's engine once :meth:`run` has started."""

    def __init__(self, config: DRPOConfig):
        self.config = config.resolved()
        self.usage: Any = None

    @property
    def log_dir(self) -> Path:
        return Path(str(self.config.log_dir))

    @property
    def checkpoint(self) -> Path:
        name = "checkpoint.json" if self.config.stage == "prompt" else "icl_checkpoint.json"
        return self.log_dir / "algo_output" / name

    def plan(self) -> dict[str, int]:
        """The calls the run would send at most, per role (no engine loads)."""
        pool_size = 0
        if self.config.stage == "icl":
            from auto_model.retrieval import load_icl_pool

            pool_size = len(load_icl_pool(self.config.icl_path))
        return self.config.planned_calls(pool_size)

    def run(self) -> TrainResult:
        """Run the stage; a log folder holding a run is continued only with ``resume``."""
        from auto_model.rewards.combine import build_reward
        from auto_model.rewards.judge import Judge
        from auto_model.rewards.requests import BudgetExhausted, RequestCache, RoleUsage, Usage
        from auto_model.trainer.tree import ROLES

        c = self.config
        if c.stage == "router":
            from auto_model.trainer.router import train_router

            return train_router(c)
        out_dir = self.log_dir / "algo_output"
        if self.checkpoint.exists() and not c.resume:
            raise InvalidRequestError(
                f"{self.log_dir} already holds a run; pass --resume to continue it, or choose a new --log-dir."
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        handler = self._log_file()
        atomic_write_text(self.log_dir / "args.txt", json.dumps({"command": c.stage, **redacted(c)}, indent=2) + "\n")
        started = time.perf_counter()
        cache = RequestCache(self.log_dir / "cache" / "requests.sqlite")
        self.usage = usage = Usage(roles={r: RoleUsage() for r in ROLES}, max_calls=c.max_calls)
        usage_path = out_dir / "usage.json"
        if c.resume and usage_path.exists():  # totals are for the whole run, across resumes
            usage.load(json.loads(usage_path.read_text(encoding="utf-8"))["run"])
        try:
            roles = self._roles(cache, usage)
            reward = build_reward(
                c.reward_specs,
                lambda: Judge(
                    roles["eval"],
                    roles["metrics"],
                    metrics_cache_path=c.metrics_cache_path,
                    max_new_tokens=c.judge_max_new_tokens,
                    per_aspect=c.eval_per_aspect,
                    json_schema=c.judge_json_schema,
                ),
            )
            if c.stage == "icl":
                return self._icl(roles, reward, out_dir)
            return self._prompt(roles, reward, out_dir, started)
        except BudgetExhausted as exc:  # in log.txt too: why the run stopped
            logger.warning("%s", exc)
            raise
        except EngineOutageError as exc:
            logger.error("%s", exc)
            raise
        finally:
            atomic_write_text(usage_path, json.dumps(usage.snapshot(), indent=2) + "\n")
            cache.close()
            if handler is not None:
                logging.getLogger("auto_model").removeHandler(handler)
                handler.close()

    def _log_file(self) -> logging.Handler | None:
        root = logging.getLogger("auto_model")
        root.setLevel(getattr(logging, self.config.logging_level))
        if self.config.disable_log:
            return None
        handler = logging.FileHandler(self.log_dir / "log.txt", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        return handler

    def _roles(self, cache: Any, usage: Any) -> dict[str, Any]:
        """A :class:`~auto_model.rewards.requests.Role` per model role, one engine per model and backend."""
        from auto_model import AutoModel
        from auto_model.backends import resolve_backend_name
        from auto_model.rewards.requests import Role

        c = self.config
        models: dict[tuple[str, str], Any] = {}
        names = {"base": c.base_model_name, "metrics": c.metrics_model_name, "eval": c.eval_model_name,
                 "optimize": c.optimize_model_name}  # fmt: skip
        if not c.uses_judge:  # no judge: its models are not loaded
            del names["metrics"], names["eval"]
        roles = {}
        for role, name in names.items():
            assert name is not None  # resolved
            # The judge roles use the server at base_url when one is given; the base model only with is_gpt.
            url = c.base_url if role != "base" or c.is_gpt else None
            backend = resolve_backend_name("openai" if role == "base" and c.is_gpt else c.backend, name, base_url=url)
            key = (name, backend)
            if key not in models:
                kwargs: dict[str, Any] = {"backend": backend}
                if backend == "openai":
                    if url:
                        kwargs["base_url"] = url
                else:
                    kwargs.update(num_gpus=c.num_gpus, cuda_visible_devices=c.cuda_visible_devices, dtype=c.dtype)
                    kwargs.update(replica_options(c, backend))
                    if c.base_model_download_dir and role == "base":  # vLLM: download_dir, transformers: cache_dir
                        kwargs["download_dir" if backend == "vllm" else "cache_dir"] = c.base_model_download_dir
                logger.info("Loading %s for %s (%s)", name, role, backend)
                models[key] = AutoModel(name, **kwargs)
            roles[role] = Role(role, models[key], cache, usage, chunk_size=c.batch_size)
        return roles

    def _prompt(self, roles: dict[str, Any], reward: Any, out_dir: Path, started: float) -> TrainResult:
        from auto_model.trainer.data import load_training_queries, sample_training_queries
        from auto_model.trainer.moves import Candidate, guideline_bank, load_example_bank
        from auto_model.trainer.search import BeamSearch

        c = self.config
        rows = load_training_queries(c.data_dir)
        base_artifact = None
        bank = load_example_bank(c.example_bank, cast(str, c.route)) if c.example_bank else []  # checked before loading
        guidelines = guideline_bank(c.guidelines) if "sentences" in c.moves else []
        prompt = c.initial_system_prompt
        if c.route is not None:
            from auto_model.artifacts import prompt_for_model

            base_artifact = prompt_for_model(str(c.base_model_name), c.prompt_path)
            rows = [r for r in rows if (r.get("category") == "harmful") == (c.route == "safety")]
            if not rows:
                raise InvalidRequestError(
                    f"No training queries of the {c.route} route (category 'harmful' is safety, any other everyday)."
                )
            if prompt == ORIGINAL_DEFAULT_PROMPT:  # not given: the route's current prompt
                prompt = base_artifact.prompt_for(c.route)
            # The base model answers with that artifact: its routing, and its pool with the artifact's edits.
            roles["base"].model.prompt_artifact = base_artifact
        k = c.k if c.k is not None else base_artifact.examples_for(c.route) if base_artifact is not None else 2
        self.config = c = replace(c, initial_system_prompt=prompt, k=k)  # what the run used, as its files say
        rows = sample_training_queries(rows, c.num_training_examples, c.seed)
        # The search starts from what the route holds now: its prompt, decoding settings and examples.
        initial = Candidate(prompt, examples=k)
        if base_artifact is not None:
            initial = initial.with_decoding(base_artifact.decoding_for(c.route))
        bar = None
        if not c.disable_tqdm:
            from tqdm import tqdm

            levels = min(c.depth + c.max_depth_increase, -(-len(rows) // c.queries_per_level))
            bar = tqdm(total=levels, desc="DRPO levels", unit="level", file=sys.stderr)

        def level_done(message: str) -> None:
            logger.info(message)
            atomic_write_text(out_dir / "usage.json", json.dumps(self.usage.snapshot(), indent=2) + "\n")
            if bar is not None:
                bar.update(1)
            self._write_tree(search, reward, out_dir, started, "running")  # the tree and its page, to watch

        search = BeamSearch(
            roles["base"],
            roles["optimize"],
            reward,
            c.search(k),
            [r["query"] for r in rows],
            prompt,
            self.checkpoint,
            harmful=[r["category"] == "harmful" if r.get("category") else None for r in rows],
            progress=level_done,
            initial=initial,
            bank=bank,
            guidelines=guidelines,
        )
        if c.resume and search.load():
            logger.info("Resumed from %s at level %d", self.checkpoint, search.level)
            if bar:
                bar.update(search.level)
        try:
            best = search.run()
        finally:
            if bar:
                bar.close()
            self._write_tree(search, reward, out_dir, started)
        (out_dir / "trace.txt").write_text(search.trace(best), encoding="utf-8")
        state = search.candidate(best)
        provenance = self._provenance(best, len(rows), search.summary())
        artifact = self._artifact(state, provenance, base_artifact, search.added(state))
        output = Path(c.output) if c.output else out_dir / "optimized_prompt.json"
        save_prompt_artifact(artifact, output)
        mean = f"path mean {best.path_mean:.2f}" if best.path_rewards else "no scored level"
        summary = f"best prompt ({mean} over {len(best.path_rewards)} scored levels) -> {output}"
        return TrainResult(output, summary, search.summary_table())

    def _provenance(self, best: Any, training_queries: int, levels: Any) -> dict[str, Any]:
        c = self.config
        judge_is_base = c.uses_judge and {c.eval_model_name, c.metrics_model_name,
                                          c.optimize_model_name} == {c.base_model_name}  # fmt: skip
        return {
            "created": datetime.now(timezone.utc).date().isoformat(),
            "base_model": c.base_model_name,
            "eval_model": c.eval_model_name,
            "metrics_model": c.metrics_model_name,
            "optimize_model": c.optimize_model_name,
            "judged_by_itself": judge_is_base,
            "reward": [str(spec) for spec in c.reward_specs],
            "search": {
                "depth": c.depth,
                "beam_size": c.beam_size,
                "n_actions": c.n_actions,
                "max_depth_increase": c.max_depth_increase,
                "training_queries": training_queries,
                "ret_icl": c.ret_icl,
                "k": c.k,
                "seed": c.seed,
                "moves": list(c.moves),
                "queries_per_level": c.queries_per_level,
                "token_cost": c.token_cost,
                "min_examples": c.min_examples,
            },
            "best_node": best.id,
            "best": {
                "decoding": best.decoding,
                "examples": best.examples,
                "pool_drop": best.pool_drop,
                "pool_add": best.pool_add,
                "prompt_tokens": best.prompt_tokens,
            },  # fmt: skip
            "path_rewards": best.path_rewards,
            "path_mean": best.path_mean if best.path_rewards else None,  # None: no level was scored
            "levels": levels,
        }

    def _artifact(
        self, best: Any, provenance: dict[str, Any], base: PromptArtifact | None, added: Any = ()
    ) -> PromptArtifact:
        """The artifact a run writes: its prompt alone (v1), or, with a route, the model's artifact with
        that route's state replaced: its prompt, and what the moves changed (its decoding settings, its
        examples per request, the pool's edits); the other route, the routing and the aliases kept."""
        c = self.config
        prompt = best.prompt
        if base is None or c.route is None:
            return PromptArtifact(
                model_id=c.base_model_name, system_prompt=prompt, method="drpo", provenance=provenance
            )
        made = {"method": "drpo", "route": c.route, **provenance}
        model_id = base.model_id if base.model_id not in (None, "default") else c.base_model_name
        state: dict[str, Any] = {}
        if best.settings != base.decoding_for(c.route):
            state["route_decoding"] = {**base.route_decoding, c.route: best.settings}
        if best.examples != base.examples_for(c.route):
            state["route_examples"] = {**base.route_examples, c.route: best.examples}
        if best.drop or best.add:
            state["pool_drop"] = (*base.pool_drop, *best.drop)
            state["pool_add"] = (*base.pool_add, *added)
        if c.route == "everyday":  # the artifact's main prompt is the everyday route's (no prompt of its own)
            routes = {name: text for name, text in base.routes.items() if name != c.route}
            return replace(base, model_id=model_id, system_prompt=prompt, routes=routes, method="drpo", source=None,
                           provenance={**made, "previous": base.provenance}, **state)  # fmt: skip
        return replace(
            base,
            model_id=model_id,
            source=None,
            routes={**base.routes, c.route: prompt},
            route_provenance={**base.route_provenance, c.route: made},
            **state,
        )

    def _write_tree(self, search: Any, reward: Any, out_dir: Path, started: float, status: str | None = None) -> None:
        """``output.json`` (the whole tree, the run's settings and usage) and its page, ``tree.html``."""
        from auto_model.viewer import tree_html

        tree = {
            "format": "auto_model.drpo_run/v1",
            "status": status or ("finished" if search.done() else "stopped"),
            "config": {"command": self.config.stage, **redacted(self.config)},
            **search.report(),
            "judge_failures": reward_failures(reward),
            "usage": self.usage.snapshot(),
            "wall_clock_s": round(time.perf_counter() - started, 2),
        }
        atomic_write_text(out_dir / "output.json", json.dumps(tree, indent=1, ensure_ascii=False) + "\n")
        atomic_write_text(out_dir / "tree.html", tree_html(tree))

    def _icl(self, roles: dict[str, Any], reward: Any, out_dir: Path) -> TrainResult:
        from auto_model.retrieval import load_icl_pool
        from auto_model.trainer.icl import optimize_pool

        c = self.config
        pool = load_icl_pool(c.icl_path)
        output = Path(c.output) if c.output else out_dir / "ICL_examples.json"
        states = optimize_pool(
            pool,
            roles["optimize"],
            reward,
            output,
            num_iters=c.num_iters,
            n_actions=c.n_actions,
            temperature=c.temperature,
            skip_threshold=c.skip_threshold,
            seed=c.seed,
            max_new_tokens=c.judge_max_new_tokens,
            progress=logger.info,
        )
        history = [{"query": s.example.query, "history": s.history} for s in states]
        report = {"examples": history, "judge_failures": reward_failures(reward)}
        atomic_write_text(out_dir / "icl_output.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        return TrainResult(output, f"new pool ({len(states)} examples) -> {output}")
