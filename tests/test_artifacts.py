import json
import logging

import pytest

from auto_model.artifacts import (
    PROMPT_FORMAT,
    PROMPT_FORMAT_V1,
    PromptArtifact,
    default_artifact,
    find_prompt_artifact,
    load_prompt_artifact,
    packaged_artifacts,
    prompt_for_model,
    save_prompt_artifact,
)
from auto_model.errors import ArtifactError

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_every_packaged_artifact_is_valid_and_versioned():
    artifacts = packaged_artifacts()
    assert {a.model_id for a in artifacts} >= {"default", SMOL}
    for a in artifacts:
        assert a.system_prompt.strip()
        assert a.method in {"curated", "drpo"}
        assert a.source and a.source.endswith(".json")


def test_the_packaged_artifacts_are_read_once_and_again_when_a_file_changes():
    import os
    from importlib import resources

    first, second = packaged_artifacts(), packaged_artifacts()
    assert first is not second and all(a is b for a, b in zip(first, second, strict=True))
    first.clear()  # the caller's list: the next call still has them all
    assert [a.model_id for a in packaged_artifacts()] == [a.model_id for a in second]
    path = resources.files("auto_model").joinpath("optimized_prompts", "default.json")
    stat = os.stat(path)
    try:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        again = packaged_artifacts()
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert all(a is not b and a == b for a, b in zip(again, second, strict=True))


def test_default_is_curated():
    d = default_artifact()
    assert d.model_id == "default" and d.method == "curated"


@pytest.mark.parametrize(
    "name",
    [
        SMOL,
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct",
        "huggingfacetb/smollm2_135m_instruct",
        "someorg/SmolLM2-135M-Instruct",
    ],
)
def test_lookup_by_id_alias_and_normalised_name(name):
    found = find_prompt_artifact(name)
    assert found is not None and found.model_id == SMOL


def test_unknown_model_gets_default_with_warning(caplog):
    assert find_prompt_artifact("mistralai/Mistral-7B-v0.1") is None
    with caplog.at_level(logging.WARNING, logger="auto_model.artifacts"):
        artifact = prompt_for_model("mistralai/Mistral-7B-v0.1")
    assert artifact.model_id == "default"
    assert "No optimized prompt ships for 'mistralai/Mistral-7B-v0.1'" in caplog.text


def test_user_json_and_txt_files(tmp_path):
    art = PromptArtifact("my/model", "Be brief.", "drpo", aliases=("mine",), provenance={"depth": 3})
    path = save_prompt_artifact(art, tmp_path / "mine.json")
    data = json.loads(path.read_text())
    assert data["format"] == PROMPT_FORMAT_V1 and data["provenance"] == {"method": "drpo", "depth": 3}  # no routes: v1
    loaded = prompt_for_model("anything", prompt_path=path)
    assert (loaded.model_id, loaded.text, loaded.method, loaded.aliases) == ("my/model", "Be brief.", "drpo", ("mine",))

    txt = tmp_path / "p.txt"
    txt.write_text("  Answer in French.\n")
    plain = load_prompt_artifact(txt)
    assert (plain.model_id, plain.text, plain.method) == (None, "Answer in French.", "user")


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps({"format": "auto_model.prompt/v9", "system_prompt": "x"}), "unknown prompt artifact format"),
        (json.dumps({"format": PROMPT_FORMAT, "system_prompt": "  "}), "'system_prompt' must be"),
        (json.dumps({"format": PROMPT_FORMAT, "system_prompt": "x", "aliases": "a"}), "'aliases' must be"),
        (json.dumps([1, 2]), "a JSON object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_artifacts_fail_loudly(tmp_path, content, message):
    path = tmp_path / "a.json"
    path.write_text(content)
    with pytest.raises(ArtifactError, match=message):
        load_prompt_artifact(path)


def test_missing_or_empty_prompt_file(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_prompt_artifact(tmp_path / "nope.json")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ArtifactError, match="empty"):
        load_prompt_artifact(empty)
