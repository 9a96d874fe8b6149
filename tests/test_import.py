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
    code = (
        "import auto_model.cli, auto_model.backends, auto_model.retrieval, auto_model.artifacts, auto_model.resolve, "
        "auto_model.flags, auto_model.backends.replicas"
    )
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


def _imports(path):
    """The auto_model modules a file imports (absolute names)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name.startswith("auto_model")}


#: The package's layers, lowest first: a module imports from its own layer or a lower one, never a higher
#: one (lazy imports inside functions included). A unit is a top-level module or a subpackage;
#: ``__init__`` is ``from auto_model import ...`` (the facade).
LAYERS = (
    ("errors",),
    ("constants", "files", "logs"),
    ("resolve", "prompting", "loops", "rewording", "classifiers", "viewer"),
    ("conversations", "results"),
    ("backends",),
    ("retrieval",),
    ("routing",),
    ("router",),
    ("options",),
    ("rewards",),
    ("engine",),
    ("answer_check",),
    ("artifacts",),
    ("aligner",),
    ("model", "__init__"),
    ("server",),
    ("flags",),
    ("feedback",),
    ("evaluation",),
    ("trainer",),
    ("cli",),
)


def _unit(name, package):
    """The layer unit of an ``auto_model...`` import name."""
    parts = name.split(".")
    if (package / parts[1]).is_dir() or (package / f"{parts[1]}.py").is_file():
        return parts[1]
    return "__init__"  # ``from auto_model import AutoModel``


def _upward_imports(package, layers):
    level = {unit: i for i, units in enumerate(layers) for unit in units}
    found = []
    for p in package.rglob("*.py"):
        unit = p.relative_to(package).with_suffix("").parts[0]
        assert unit in level, f"{unit} is in no layer: add it to LAYERS"
        for name in _imports(p) - {"auto_model"}:  # ``from auto_model import x`` also names x
            target = _unit(name, package)
            if level[target] > level[unit]:
                found.append((str(p.relative_to(package)), name))
    return sorted(set(found))


def test_layers_point_down_and_nothing_reaches_into_privates():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    package = repo / "auto_model"
    assert _upward_imports(package, LAYERS) == []
    # The check can fail: with rewards put below backends, its imports of backends point up.
    lowered = tuple(units for units in (tuple(u for u in units if u != "rewards") for units in LAYERS) if units)
    lowered = (*lowered[:3], ("rewards",), *lowered[3:])
    assert any(
        f.startswith("rewards/") and n.startswith("auto_model.backends") for f, n in _upward_imports(package, lowered)
    )
    # The SDK's tools and the benchmarks use the public request path only: no private member of
    # another module, and no private module.
    private = re.compile(r"model\._|\._complete|\._sampling|\._retriever|\._embedder")
    files = [
        *(package / "cli").rglob("*.py"),
        *(package / "evaluation").rglob("*.py"),
        *(package / "trainer").rglob("*.py"),
        *(package / "server").rglob("*.py"),
        *(package / "feedback").rglob("*.py"),
        *(repo / "bench").rglob("*.py"),
    ]
    hits = [
        f"{p.relative_to(repo)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert hits == []
    private_imports = [
        (str(p.relative_to(repo)), name)
        for p in [*package.rglob("*.py"), *(repo / "bench").rglob("*.py")]
        for name in _imports(p)
        if any(part.startswith("_") and part != "__future__" for part in name.split("."))
    ]
    assert private_imports == []


def test_the_facade_is_an_aligner_and_an_engine_small_enough_to_read():
    """AutoModel delegates to its aligner and its engine: its class stays within 400 lines, and it
    no longer carries the aligner's request builders twice (singular and plural)."""
    import inspect

    from auto_model import AutoModel
    from auto_model.aligner import Aligner
    from auto_model.engine import Engine
    from auto_model.rewards.best_of import BestOf

    lines, _ = inspect.getsourcelines(AutoModel)
    assert len(lines) <= 400, f"AutoModel is {len(lines)} lines"
    twins = {"build_request", "build_requests", "build_chat_request", "build_chat_requests", "format_chats"}
    assert twins.isdisjoint(vars(AutoModel))
    assert {"requests", "chat_requests", "build_request", "check_stream"} <= set(vars(Aligner))
    assert {"answers", "stream", "result"} <= set(vars(Engine)) and {"check", "rerank"} <= set(vars(BestOf))


def test_no_module_holds_more_than_500_lines():
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "auto_model"
    sizes = {str(p.relative_to(package)): len(p.read_text().splitlines()) for p in package.rglob("*.py")}
    assert {name for name, lines in sizes.items() if lines > 500} == set()
