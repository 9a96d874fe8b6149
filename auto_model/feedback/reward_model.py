"""A reward model trained on synthetic comparisons (ALMoST's RM).

Training is TRL's :class:`~trl.RewardTrainer`: a sequence-classification head with one output on a
causal LM, and the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``. A comparison is
shown to the model as the dialogue the responses were written in::

    Human: {prompt}

    Assistant: {response}<eos>

The held-out split is by prompt (no prompt is in both parts), chosen by a hash of the prompt, so it
does not depend on the order of the file and stays the same when comparisons are added.

An RM folder holds ``model.safetensors``, the model's ``config.json``, the tokenizer and
``reward_model.json`` (:data:`RM_FORMAT`: the base model, the template, the data's SHA-256, the split,
the held-out accuracy). It loads offline and never from a pickle. Checkpoints
(``RM_DIR/checkpoints``) add the optimizer's state in transformers' own files, which it reads back with
``torch.load(weights_only=True)`` (no code runs); the finished folder has none of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auto_model.errors import ArtifactError, InvalidRequestError, MissingDependencyError
from auto_model.files import atomic_write_text, read_jsonl_rows
from auto_model.rewards.reward_model import (
    RM_FILE,
    RM_FORMAT,
    TEMPLATE,
    Comparison,
    RewardModel,
    dialogue,
    quiet_transformers,
)

COMPARISONS_FORMAT = "auto_model.comparisons/v1"


def read_comparisons(path: str | os.PathLike[str]) -> list[Comparison]:
    """The pairs of a ``comparison.json`` (``auto-model-feedback --mode cs``), or of a JSONL file of
    ``{prompt, chosen, rejected}`` rows."""
    path = Path(path)
    fields = ("prompt", "chosen", "rejected")
    if not path.is_file():
        raise InvalidRequestError(
            f"{path} does not exist: make it with auto-model-feedback --mode cs, or pass a JSONL file of "
            "{prompt, chosen, rejected} rows."
        )
    if path.suffix == ".jsonl":
        rows: Any = read_jsonl_rows(path, fields)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != COMPARISONS_FORMAT:
            raise ArtifactError(f"{path} is not a comparisons file ({COMPARISONS_FORMAT}) nor a .jsonl file.")
        rows = data.get("comparisons")
    if not isinstance(rows, list):
        raise ArtifactError(f"{path}: 'comparisons' must be a list.")
    pairs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
            raise ArtifactError(f"{path}: comparison {i} needs 'prompt', 'chosen' and 'rejected' strings.")
        pairs.append(Comparison(row["prompt"], row["chosen"], row["rejected"]))
    if not pairs:
        raise InvalidRequestError(f"{path} holds no comparisons.")
    return pairs


def _prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.strip().encode("utf-8")).hexdigest()


def split(pairs: Sequence[Comparison], heldout_fraction: float) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held-out): the prompts with the smallest hashes, ``heldout_fraction`` of them (at least
    one when the fraction is above 0 and there are two prompts), are held out with all their pairs."""
    if not 0 <= heldout_fraction < 1:
        raise InvalidRequestError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}.")
    prompts = sorted({_prompt_hash(p.prompt) for p in pairs})
    count = math.ceil(heldout_fraction * len(prompts)) if len(prompts) > 1 else 0
    held = set(prompts[: min(count, len(prompts) - 1)])
    train = [p for p in pairs if _prompt_hash(p.prompt) not in held]
    return train, [p for p in pairs if _prompt_hash(p.prompt) in held]


def _require() -> None:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("trl", "feedback", purpose="to train a reward model") from exc


def base_model_folder(name: str) -> str:
    """A Hugging Face folder (or Hub id) for ``name``: packaged GGUF models are materialised once."""
    from auto_model.resolve import materialize_gguf, resolve_model

    source = resolve_model(name)
    if source.kind == "gguf":
        return str(materialize_gguf(source.path))
    return source.path


def _freeze_below(model: Any, train_layers: int | None) -> None:
    """Train only the top ``train_layers`` decoder layers and the score head (None: everything)."""
    if train_layers is None:
        return
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise InvalidRequestError(f"--train-layers {train_layers}: this model's decoder layers cannot be chosen.")
    model.requires_grad_(False)
    trained = [*list(layers)[-train_layers:], getattr(model.model, "norm", None), model.score]  # the final norm too
    for module in trained:
        if module is not None:
            module.requires_grad_(True)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (its trainer state is written last), or None."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists() and p.name[11:].isdigit()]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def data_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_reward_model(
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    max_steps: int | None = None,
    epochs: float = 1.0,
    batch_size: int = 8,
    learning_rate: float = 2e-5,
    max_length: int = 512,
    heldout_fraction: float = 0.1,
    train_layers: int | None = None,
    save_steps: int = 50,
    seed: int = 0,
    resume: bool = False,
) -> dict[str, Any] | None:
    """Train a reward model on ``data`` and save it to ``output``; the summary written to
    ``output/reward_model.json`` (None in the other processes of a multi-process run). Everything is
    checked before the model loads."""
    from auto_model.constants import default_model

    data = Path(data)
    output = Path(output)
    pairs = read_comparisons(data)
    train, heldout = split(pairs, heldout_fraction)
    if max_steps is not None and max_steps < 1:
        raise InvalidRequestError(f"--max-steps must be at least 1, got {max_steps}.")
    sizes = [("--batch-size", batch_size), ("--max-length", max_length), ("--save-steps", save_steps)]
    for flag, value in [*sizes, *([("--train-layers", train_layers)] if train_layers is not None else [])]:
        if value < 1:
            raise InvalidRequestError(f"{flag} must be at least 1, got {value}.")
    if epochs <= 0 or learning_rate <= 0:
        raise InvalidRequestError("--epochs and --learning-rate must be positive.")
    checkpoints = output / "checkpoints"
    if not resume and (last_checkpoint(checkpoints) is not None or (output / RM_FILE).exists()):
        raise InvalidRequestError(
            f"{output} already holds a reward model or its checkpoints: pass --resume to continue that run, or "
            "choose another --output."
        )
    data_sha = data_sha256(data)
    run_file = output / "run.json"
    if resume and run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if previous.get("data_sha256") != data_sha:
            raise InvalidRequestError(
                f"--resume: {data} is not the file this run was started on; choose another --output."
            )
    _require()
    base = base_model or default_model()
    folder = base_model_folder(base)
    output.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RANK", "0") == "0":  # one writer when several processes train together
        atomic_write_text(run_file, json.dumps({"data": str(data), "data_sha256": data_sha, "base_model": base}) + "\n")

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        _freeze_below(model, train_layers)

        def rows(part: Sequence[Comparison]) -> Any:
            return Dataset.from_list(
                [{"chosen": dialogue(p.prompt, p.chosen), "rejected": dialogue(p.prompt, p.rejected)} for p in part]
            )

        config = RewardConfig(
            output_dir=str(checkpoints),
            max_steps=max_steps if max_steps is not None else -1,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            learning_rate=learning_rate,
            max_length=max_length,
            gradient_checkpointing=False,  # recomputing activations costs more than it saves on a small model
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
            save_strategy="steps",
            save_steps=save_steps,
            save_total_limit=2,
            eval_strategy="no",
            logging_steps=max(1, min(10, save_steps)),
            report_to=[],
            seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=not sys.stderr.isatty(),  # the bar on a terminal; the log lines otherwise
        )
        trainer = RewardTrainer(model=model, args=config, train_dataset=rows(train), processing_class=tokenizer)
        last = last_checkpoint(checkpoints)
        trainer.train(resume_from_checkpoint=str(last) if resume and last is not None else None)
        steps = trainer.state.global_step
        trainer.save_model(str(output))  # model.safetensors + config.json (by the main process)
        if not trainer.is_world_process_zero():
            return None  # under accelerate launch / torchrun: the main process writes the rest
        tokenizer.save_pretrained(str(output))
    for stray in ("training_args.bin",):  # a pickle transformers writes beside the model
        (output / stray).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    del trainer, model
    reward_model = RewardModel.load(output)
    summary: dict[str, Any] = {
        "format": RM_FORMAT,
        "base_model": base,
        "template": TEMPLATE,
        "max_length": max_length,
        "data": {"path": str(data), "sha256": data_sha, "pairs": len(pairs)},
        "split": {"train": len(train), "heldout": len(heldout), "heldout_fraction": heldout_fraction},
        "training": {
            "max_steps": max_steps,
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "train_layers": train_layers,
            "seed": seed,
            "steps": steps,
            "resumed_from": last.name if resume and last is not None else None,
            "seconds": round(seconds, 1),
        },
        "heldout_accuracy": reward_model.accuracy(heldout) if heldout else None,
        "train_accuracy": reward_model.accuracy(train),
    }
    atomic_write_text(output / RM_FILE, json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run is done: the folder holds the model alone
    return summary


__all__ = [
    "COMPARISONS_FORMAT",
    "RM_FILE",
    "RM_FORMAT",
    "Comparison",
    "RewardModel",
    "base_model_folder",
    "data_sha256",
    "last_checkpoint",
    "read_comparisons",
    "split",
    "train_reward_model",
]
