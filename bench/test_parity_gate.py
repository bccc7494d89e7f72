"""bench/parity_gate.py on synthetic JUnit XML: every failure mode fails with its own message, and a
real pass passes. The CUDA and build checks are injected (``probe=``), as is the collect-only run
(``collect=``) except in the tests that run pytest for real, so all of this runs on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from html import escape
from pathlib import Path

import pytest

from bench import parity_gate as gate

GPU = {"cuda_visible": True, "device": "NVIDIA H100", "import_error": None,
       "build_info": {"cuda": True, "backends": ["torch", "cpp", "cuda", "triton"],
                      "cuda_archs": ["9.0"]}}
NO_GPU = {**GPU, "cuda_visible": False, "device": None}
NO_CUDA_BUILD = {**GPU, "build_info": {"cuda": False, "backends": ["torch", "cpp", "triton"],
                                       "cuda_archs": []}}

MODULE = "tests/ops/test_parity.py"
IDS = [f"{MODULE}::test_parity[axpy-{b}-{d}-7]"
       for b in ("cuda", "triton") for d in ("float32", "float16", "bfloat16", "float64")]
IDS += [f"{MODULE}::test_optimize_matches_torch[cuda]",
        "tests/gradients/test_reversible.py::test_bf16_drift_on_cuda_is_measured[reversible_heun]"]
OTHERS = [f"{MODULE}::test_parity[axpy-cpp-float32-7]",
          f"{MODULE}::test_parity[axpy-torch-float64-7]"]


def write_junit(path: Path, results: dict[str, tuple[str, str]]) -> Path:
    """A pytest-style (xunit2) JUnit XML: ``{node id: (status, message)}``."""
    cases = []
    for nodeid, (status, message) in results.items():
        classname, name = (escape(x) for x in gate.junit_key(nodeid))
        message = escape(message)
        child = {"passed": "",
                 "failed": f'<failure message="{message}">assert False</failure>',
                 "error": f'<error message="{message}">boom</error>',
                 "skipped": f'<skipped type="pytest.skip" message="{message}">s</skipped>',
                 }[status]
        cases.append(f'<testcase classname="{classname}" name="{name}" time="0.01">{child}'
                     f'</testcase>')
    n = {s: sum(st == s for st, _ in results.values()) for s in ("failed", "error", "skipped")}
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        f'<testsuite name="pytest" errors="{n["error"]}" failures="{n["failed"]}" '
        f'skipped="{n["skipped"]}" tests="{len(results)}" time="1.0">' + "".join(cases)
        + "</testsuite></testsuites>")
    return path


def all_pass(ids=IDS + OTHERS) -> dict:
    return {i: ("passed", "") for i in ids}


def run(tmp_path, results, *, env=GPU, expected=IDS, extra=("--require-cuda",)):
    xml = write_junit(tmp_path / "parity.xml", results)
    rc = gate.main(["--junit", str(xml), "--expect-collect", "-k 'cuda or triton'", *extra],
                   probe=lambda: env, collect=lambda args: list(expected))
    summary = json.loads((tmp_path / "parity_gate.json").read_text())
    return rc, summary


def test_passes_when_every_expected_gpu_test_passed(tmp_path, capsys):
    rc, s = run(tmp_path, all_pass())
    assert rc == 0, s["reasons"]
    assert s["verdict"] == "pass" and s["reasons"] == []
    assert s["expected"] == s["expected_passed"] == len(IDS)
    assert s["by_backend"]["cuda"]["passed"] == 6 and s["by_backend"]["triton"]["passed"] == 4
    assert s["by_backend"]["cpp"]["passed"] == 1 and s["by_backend"]["torch"]["passed"] == 1
    assert s["by_dtype"]["bfloat16"]["passed"] == 3  # cuda, triton, and the drift test's "bf16"
    assert s["gpu_passed_by_dtype"]["triton"] == {"float32": 1, "float16": 1, "bfloat16": 1,
                                                  "float64": 1, "any": 0}
    out = capsys.readouterr().out
    assert "parity gate: PASS" in out and "FAIL" not in out.replace("PASS", "")


def test_one_failure_fails(tmp_path, capsys):
    results = all_pass()
    results[IDS[1]] = ("failed", "relative error 3e-3 above 1e-6")
    rc, s = run(tmp_path, results)
    assert rc == 1 and s["verdict"] == "fail"
    assert any("1 failed and 0 errored" in r and "axpy-cuda-float16-7" in r for r in s["reasons"])
    assert "FAIL: 1 failed" in capsys.readouterr().out


def test_an_error_fails(tmp_path):
    results = all_pass()
    results[OTHERS[0]] = ("error", "fixture exploded")  # not a GPU test: still fails the gate
    rc, s = run(tmp_path, results)
    assert rc == 1 and any("0 failed and 1 errored" in r for r in s["reasons"])


def test_a_skipped_cuda_test_fails(tmp_path):
    results = all_pass()
    results[IDS[0]] = ("skipped", "no CUDA device here; run bench/gpu_check.sh on a GPU machine")
    rc, s = run(tmp_path, results)
    assert rc == 1
    assert any("1 CUDA/Triton tests were skipped" in r and "no CUDA device here" in r
               for r in s["reasons"])
    # ... and it is not one of the expected tests that passed either
    assert s["expected_passed"] == len(IDS) - 1 and s["missing"] == [IDS[0]]


def test_a_skipped_non_gpu_test_is_allowed(tmp_path):
    results = all_pass()
    results[OTHERS[0]] = ("skipped", "readelf not installed")
    rc, s = run(tmp_path, results)
    assert rc == 0, s["reasons"]


def test_too_few_tests_fails(tmp_path):
    # the XML lacks two of the tests that collect-only finds (e.g. a run cut off by --maxfail
    # or a stage that ran an older file list)
    rc, s = run(tmp_path, all_pass(IDS[:-2] + OTHERS))
    assert rc == 1
    assert s["expected"] == len(IDS) and s["expected_passed"] == len(IDS) - 2
    assert any(f"only {len(IDS) - 2} of the {len(IDS)} expected" in r for r in s["reasons"])
    assert s["missing"] == IDS[-2:]


def test_zero_expected_tests_fails(tmp_path):
    rc, s = run(tmp_path, all_pass(OTHERS), expected=[])
    assert rc == 1 and any("vacuously" in r for r in s["reasons"])


def test_zero_tests_in_the_xml_fails(tmp_path):
    rc, s = run(tmp_path, {})
    assert rc == 1
    assert any("holds no test" in r for r in s["reasons"])
    assert any(f"only 0 of the {len(IDS)}" in r for r in s["reasons"])


def test_no_cuda_device_fails_only_when_required(tmp_path):
    rc, s = run(tmp_path, all_pass(), env=NO_GPU)
    assert rc == 1 and any("no CUDA device is visible" in r for r in s["reasons"])
    rc, s = run(tmp_path, all_pass(), env=NO_GPU, extra=())
    assert rc == 0, s["reasons"]


def test_cuda_backend_not_built_fails(tmp_path):
    rc, s = run(tmp_path, all_pass(), env=NO_CUDA_BUILD)
    assert rc == 1 and any("CUDA backend did not build" in r for r in s["reasons"])
    broken = {**GPU, "build_info": None, "import_error": "dflow_fast: ImportError: no _C"}
    rc, s = run(tmp_path, all_pass(), env=broken)
    assert rc == 1 and any("cannot check the build" in r for r in s["reasons"])


def test_missing_or_truncated_xml_fails(tmp_path):
    rc = gate.main(["--junit", str(tmp_path / "nope.xml"), "--require-cuda"],
                   probe=lambda: GPU, collect=lambda a: IDS)
    s = json.loads((tmp_path / "nope_gate.json").read_text())
    assert rc == 1 and "no JUnit XML" in s["reasons"][0]
    (tmp_path / "cut.xml").write_text('<testsuites><testsuite><testcase classname="a" ')
    assert gate.main(["--junit", str(tmp_path / "cut.xml")], probe=lambda: GPU) == 1
    s = json.loads((tmp_path / "cut_gate.json").read_text())
    assert "not valid XML" in s["reasons"][0]


def test_collect_errors_fail(tmp_path):
    def broken(args):
        raise gate.GateError("collect-only run failed (exit 2): ImportError")
    xml = write_junit(tmp_path / "parity.xml", all_pass())
    assert gate.main(["--junit", str(xml), "--expect-collect", "x"], probe=lambda: GPU,
                     collect=broken) == 1
    s = json.loads((tmp_path / "parity_gate.json").read_text())
    assert any("collect-only run failed" in r for r in s["reasons"])


def test_step_summary_is_written_under_github_actions(tmp_path, monkeypatch):
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    results = all_pass()
    results[IDS[2]] = ("failed", "mismatch")
    run(tmp_path, results)
    md = (tmp_path / "summary.md").read_text()
    assert "Parity gate: ❌ fail" in md and "| cuda |" in md and "**FAIL**" in md


def test_ids_name_their_backend_and_dtype():
    case = gate.Case("tests.ops.test_parity", "test_parity[heun_step-triton-bfloat16-3x341]",
                     "passed")
    assert (gate.backend_of(case), gate.dtype_of(case)) == ("triton", "bfloat16")
    drift = gate.Case("tests.gradients.test_reversible",
                      "test_bf16_drift_on_cuda_is_measured[reversible_euler]", "passed")
    assert (gate.backend_of(drift), gate.dtype_of(drift)) == ("cuda", "bfloat16")
    assert gate.is_gated(drift) and not gate.is_gated(gate.Case("tests.x", "test_y[cpp]", "passed"))
    assert gate.junit_key("tests/a/test_b.py::TestC::test_d[x-cuda-float32-1::2]") == (
        "tests.a.test_b.TestC", "test_d[x-cuda-float32-1::2]")


def test_collect_output_is_counted_strictly():
    text = "a.py::t[1]\na.py::t[2]\n\n2/5 tests collected (3 deselected) in 0.1s\n"
    assert gate.parse_collect_output(text) == ["a.py::t[1]", "a.py::t[2]"]
    with pytest.raises(gate.GateError, match="said 3 tests collected but listed 2"):
        gate.parse_collect_output(text.replace("2/5", "3/5"))
    with pytest.raises(gate.GateError, match="no 'N tests collected'"):
        gate.parse_collect_output("a.py::t[1]\n")


SAMPLE = '''
import pytest

@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_op(backend, dtype):
    pass

class TestOnCuda:
    @pytest.mark.parametrize("case", ["1x7", "a b"])
    def test_kernel(self, case):
        pass

def test_skipped_on_cuda():
    pytest.skip("no CUDA device here")
'''


def test_against_real_pytest_output(tmp_path, monkeypatch):
    """A real pytest run and a real collect-only run: the node ids map onto the XML's testcases
    (classes and odd parameter ids included), the skip is caught, and PYTEST_ADDOPTS (CI's
    --junitxml) does not reach the collect-only run."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(SAMPLE))
    xml = tmp_path / "out" / "parity.xml"
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)  # CI's own --junitxml
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={xml}", "test_sample.py"], cwd=tmp_path, check=True,
                   capture_output=True)
    clobbered = tmp_path / "clobbered.xml"
    monkeypatch.setenv("PYTEST_ADDOPTS", f"--junitxml={clobbered}")
    ids = gate.collect("test_sample.py -k 'cuda or triton'", cwd=tmp_path)
    assert not clobbered.exists()
    assert len(ids) == 7 and "test_sample.py::TestOnCuda::test_kernel[a b]" in ids

    report = gate.evaluate(gate.parse_junit(xml), ids, require_cuda=True, environment=GPU)
    assert report.expected == 7 and report.expected_passed == 6
    assert report.missing == ["test_sample.py::test_skipped_on_cuda"]
    assert any("1 CUDA/Triton tests were skipped" in r for r in report.reasons)
    assert report.by_backend["cuda"] == {"passed": 2, "failed": 0, "error": 0, "skipped": 1}

    ids = gate.collect("test_sample.py -k 'cuda and not skipped'", cwd=tmp_path)
    report = gate.evaluate(gate.parse_junit(xml), ids, require_cuda=True, environment=GPU)
    # the XML's skipped test still counts against the gate, whatever the expectation says
    assert report.expected == report.expected_passed == 4 and len(report.reasons) == 1
    assert gate.collect("test_sample.py -k nothing_matches", cwd=tmp_path) == []
