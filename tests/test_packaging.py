"""The built wheel carries the prompts and the ICL pool, and reads them without the source tree."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_artifacts_and_loads_them_from_site_packages(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("auto_model-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "auto_model/data/ICL_examples.json" in names
    assert "auto_model/optimized_prompts/default.json" in names
    for data in (
        "auto_model/rewards/templates/eval.txt",
        "auto_model/rewards/templates/metrics.txt",
        "auto_model/trainer/templates/optimize_prompt.txt",
        "auto_model/trainer/templates/optimize_icl.txt",
        "auto_model/data/train/train.jsonl",
        "auto_model/data/eval/eval.jsonl",
        "auto_model/optimized_prompts/candidates/smollm2-135m-instruct.drpo.json",
        "auto_model/evaluation/templates/judge_regular.txt",
        "auto_model/evaluation/templates/judge_safety.txt",
        "auto_model/server/playground.html",
        "auto_model/feedback/demos/careful.txt",
        "auto_model/feedback/seeds/general.txt",
    ):
        assert data in names, data
    entry_points = next(n for n in names if n.startswith("auto_model-") and n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in (
        "auto-model = auto_model.cli:main",
        "auto-model-train = auto_model.trainer.cli:main",
        "auto-model-eval = auto_model.evaluation.cli:main",
        "auto-model-feedback = auto_model.feedback.cli:main",
        "auto-model-rm = auto_model.cli.rm:main",
    ):
        assert script in scripts, script

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    script = (
        "import json, auto_model.artifacts as a, auto_model.retrieval as r, auto_model.trainer.data as d\n"
        "from auto_model.rewards.judge import template\n"
        "from auto_model.evaluation.runner import judge_template\n"
        "print(json.dumps([a.__file__, len(r.load_icl_pool()), sorted(x.model_id for x in a.packaged_artifacts()),\n"
        "                  len(d.load_training_queries()), '$answer' in template('eval').template\n"
        "                  and '$query' in template('metrics').template\n"
        "                  and all('$form' in judge_template(k).template for k in ('regular', 'safety'))]))"
    )
    # Run from an empty folder with only the unpacked wheel on the path: no source tree to fall back on.
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r})\n" + script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    module_file, pool_size, ids, train_size, template_ok = json.loads(out.stdout)
    assert module_file.startswith(str(target))
    assert pool_size >= 32 and "default" in ids and train_size == 180 and template_ok
    # the candidates folder is shipped, but a candidate is not a default
    assert ids == ["HuggingFaceTB/SmolLM2-135M-Instruct", "default", "google/gemma-3-270m"]


def test_top_level_folders_point_at_the_package_data():
    assert (ROOT / "optimized_prompts").resolve() == (ROOT / "auto_model" / "optimized_prompts").resolve()
    assert (ROOT / "data" / "ICL_examples.json").resolve() == (
        ROOT / "auto_model" / "data" / "ICL_examples.json"
    ).resolve()
