import json
import subprocess
import sys

from conftest import HEAVY_MODULES


def _loaded_after(code: str) -> list[str]:
    script = code + f"\nimport sys, json\nprint(json.dumps([m for m in {list(HEAVY_MODULES)!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_auto_model_loads_no_engine():
    assert _loaded_after("import auto_model; from auto_model import AutoModel") == []


def test_cli_and_registry_import_light():
    code = "import auto_model.cli, auto_model.backends, auto_model.retrieval, auto_model.artifacts, auto_model.resolve"
    assert _loaded_after(code) == []


def test_heavy_check_can_fail():
    # The probe itself must see a heavy import when one happens.
    assert _loaded_after("import auto_model, faiss") == ["faiss"]


def test_public_names():
    import auto_model

    for name in ("AutoModel", "AutoModelError", "InvalidRequestError", "MissingDependencyError", "UnknownBackendError"):
        assert hasattr(auto_model, name)
    assert issubclass(auto_model.InvalidRequestError, ValueError)
    assert issubclass(auto_model.MissingDependencyError, ImportError)
    assert issubclass(auto_model.UnknownBackendError, auto_model.AutoModelError)


def test_every_backend_capability_flag_is_read_outside_the_backends():
    # A flag nothing reads is dead code: each class-level flag of Backend must be read by the SDK above it.
    from pathlib import Path

    from auto_model.backends.base import Backend

    root = Path(__file__).resolve().parent.parent / "auto_model"
    flags = [name for name, value in vars(Backend).items() if isinstance(value, bool)]
    assert "supports_json_schema" in flags and "thread_safe" in flags
    readers = "\n".join(p.read_text() for p in root.rglob("*.py") if "backends" not in p.parts)
    assert [flag for flag in flags if f".{flag}" not in readers] == []
