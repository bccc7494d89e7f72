"""The GPU parity gate: pass only when the CUDA and Triton parity tests ran on a GPU and passed.

A green pytest run proves little on its own: without a GPU every CUDA case skips ("no CUDA device
here") and pytest still exits 0. The gate reads the parity stage's JUnit XML
(``bench/gpu_check.sh parity`` writes ``$RESULTS/parity.xml``) and fails, each with its own message,
when

1. ``--require-cuda`` is given and no CUDA device is visible (``torch.cuda.is_available()``);
2. ``dflow_fast.build_info()["cuda"]`` is not True: the CUDA backend did not build (or dflow_fast
   does not import);
3. the XML is missing, unreadable or holds no test, or any test failed or errored;
4. a test whose id names ``cuda`` or ``triton`` was skipped (or xfailed);
5. a collect-only run of ``--expect-collect``'s pytest arguments on this checkout finds no test, or
   fails, or fewer of the tests it finds passed in the XML than it found (every one of them must
   be there and have passed): the expected count is taken from the suite at gate time, so the
   gate grows with it.

It prints a one-screen summary, writes a JSON summary next to the XML (``parity.xml`` ->
``parity_gate.json``: verdict, reasons, counts per status, per backend cpp/cuda/triton/torch and
per dtype, parsed from the test ids) and, under GitHub Actions, appends a Markdown table to the
job summary. Exit status 0 on a pass, 1 on any failure mode, 2 on bad arguments.

    python -m bench.parity_gate --junit bench/results/gpu/parity.xml --require-cuda \\
        --expect-collect "tests/ops/test_parity.py tests/gradients -k 'cuda or triton'"

Run it from the repository root with the interpreter (and PYTHONPATH) that ran the tests: the
collect-only run and the CUDA checks must see the same checkout and build.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("cpp", "cuda", "triton", "torch")
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: words that mark a test as one of the GPU backends': such a test must never be skipped
GATED = ("cuda", "triton")
STATUSES = ("passed", "failed", "error", "skipped")
#: how many ids a message lists before "and N more"
SHOW = 8


class GateError(Exception):
    """A failure mode that stops the gate before it can count anything (unreadable XML, ...)."""


@dataclass(frozen=True)
class Case:
    """One <testcase> of the JUnit XML."""

    classname: str
    name: str
    status: str  # one of STATUSES
    message: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.classname, self.name)

    @property
    def label(self) -> str:
        return f"{self.classname}::{self.name}" if self.classname else self.name


# ---- reading ---------------------------------------------------------------------------------

def parse_junit(path: Path) -> list[Case]:
    """The test cases of a JUnit XML file (pytest's xunit1/xunit2, one or more <testsuite>)."""
    path = Path(path)
    if not path.is_file():
        raise GateError(f"no JUnit XML at {path}: the parity stage did not run (see the build "
                        f"stage's log) or wrote elsewhere")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise GateError(f"{path} is not valid XML ({e}): the parity run was cut off?") from e
    if root.tag not in ("testsuites", "testsuite"):
        raise GateError(f"{path} is not JUnit XML (root element <{root.tag}>)")
    cases = []
    for tc in root.iter("testcase"):
        status, message = "passed", ""
        for tag, st in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            el = tc.find(tag)
            if el is not None:  # error outranks failure outranks skipped (a teardown error...)
                status, message = st, (el.get("message") or (el.text or "")).strip()
        cases.append(Case(tc.get("classname", ""), tc.get("name", ""), status, message))
    return cases


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) that pytest's junitxml writes for a node id (its mangle_test_address):
    ``tests/ops/test_parity.py::test_parity[axpy-cuda-float32-7]`` ->
    ``("tests.ops.test_parity", "test_parity[axpy-cuda-float32-7]")``."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def parse_collect_output(text: str) -> list[str]:
    """Node ids from ``pytest --collect-only -q`` output: the lines before the first blank one,
    checked against pytest's "N tests collected" / "N/M tests collected" line."""
    ids = []
    lines = text.splitlines()
    i = 0
    while i < len(lines) and lines[i].strip():
        if "::" in lines[i]:
            ids.append(lines[i].strip())
        i += 1
    m = None
    for line in lines:
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", line) or m
    if m is not None and int(m.group(1)) != len(ids):
        raise GateError(f"collect-only said {m.group(1)} tests collected but listed {len(ids)} "
                        f"node ids: cannot count the expected tests")
    if m is None and not re.search(r"no tests (collected|ran)", text):
        raise GateError("collect-only printed no 'N tests collected' line:\n" + text[-2000:])
    return ids


def collect(args: str, cwd: Path = ROOT, python: str = sys.executable) -> list[str]:
    """The node ids that ``pytest --collect-only -q ARGS`` finds on this checkout."""
    cmd = [python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           *shlex.split(args)]
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)  # e.g. a --junitxml meant for the real run would be clobbered
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise GateError(f"collect-only run timed out: {shlex.join(cmd)}") from e
    out = proc.stdout + proc.stderr
    if proc.returncode == 5:  # pytest: no tests collected
        return []
    if proc.returncode != 0:
        raise GateError(f"collect-only run failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
                        + out[-3000:])
    return parse_collect_output(proc.stdout)


def probe() -> dict:
    """What this machine and build offer: CUDA visible, device name, dflow_fast's build_info."""
    info: dict = {"cuda_visible": False, "device": None, "build_info": None, "import_error": None}
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda_visible"] = bool(torch.cuda.is_available())
        if info["cuda_visible"]:
            info["device"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001 - reported, and the gate fails on it
        info["import_error"] = f"torch: {type(e).__name__}: {e}"
        return info
    try:
        import dflow_fast
        info["build_info"] = dflow_fast.build_info()
    except Exception as e:  # noqa: BLE001
        info["import_error"] = f"dflow_fast: {type(e).__name__}: {e}"
    return info


# ---- counting --------------------------------------------------------------------------------

def _words(case: Case) -> tuple[list[str], list[str]]:
    """(the parameter id's '-' tokens, the test name's '_' words)."""
    base, _, params = case.name.partition("[")
    return params.rstrip("]").split("-") if params else [], base.lower().split("_")


def backend_of(case: Case) -> str:
    """cpp/cuda/triton/torch from the id (``test_parity[axpy-cuda-float32-7]``,
    ``test_bf16_drift_on_cuda...``), else "other"."""
    params, words = _words(case)
    for tokens in (params, words):
        for t in tokens:
            if t in BACKENDS:
                return t
    return "other"


def dtype_of(case: Case) -> str:
    params, words = _words(case)
    for t in params:
        if t in DTYPES:
            return t
    alias = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
    for w in words:
        if w in alias:
            return alias[w]
    return "any"


def is_gated(case: Case) -> bool:
    text = case.label.lower()
    return any(w in text for w in GATED)


@dataclass
class Report:
    """The gate's verdict and the numbers behind it."""

    junit: str
    expect_collect: str | None
    reasons: list[str] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    by_backend: dict = field(default_factory=dict)
    by_dtype: dict = field(default_factory=dict)
    gpu_matrix: dict = field(default_factory=dict)
    expected: int | None = None
    expected_passed: int | None = None
    missing: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict:
        return {"verdict": "pass" if self.ok else "fail", "reasons": self.reasons,
                "junit": self.junit, "expect_collect": self.expect_collect,
                "totals": self.totals, "expected": self.expected,
                "expected_passed": self.expected_passed, "missing": self.missing[:200],
                "missing_count": len(self.missing), "by_backend": self.by_backend,
                "by_dtype": self.by_dtype, "gpu_passed_by_dtype": self.gpu_matrix,
                "environment": self.environment}


def _listing(labels: list[str]) -> str:
    more = f"\n    ... and {len(labels) - SHOW} more" if len(labels) > SHOW else ""
    return "".join(f"\n    {s}" for s in labels[:SHOW]) + more


def _count(cases: Iterable[Case], key: Callable[[Case], str], order) -> dict:
    table: dict = {}
    for c in cases:
        row = table.setdefault(key(c), Counter())
        row[c.status] += 1
    names = [k for k in order if k in table] + sorted(k for k in table if k not in order)
    return {k: {s: table[k][s] for s in STATUSES} for k in names}


def evaluate(cases: list[Case], expected_ids: list[str] | None, *, require_cuda: bool,
             environment: dict, junit: str = "", expect_collect: str | None = None) -> Report:
    """Every check on parsed cases, the collect-only node ids (None: not asked for) and
    ``environment`` (:func:`probe`'s dict: ``cuda_visible``, ``build_info``, ``import_error``)."""
    r = Report(junit=str(junit), expect_collect=expect_collect, environment=environment)
    if require_cuda and not environment.get("cuda_visible"):
        r.reasons.append("no CUDA device is visible (torch.cuda.is_available() is False): the "
                         "GPU job ran on a machine or container without a usable GPU")
    info = environment.get("build_info")
    if environment.get("import_error"):
        r.reasons.append(f"cannot check the build: {environment['import_error']}")
    elif not info or info.get("cuda") is not True:
        r.reasons.append("the CUDA backend did not build: dflow_fast.build_info()['cuda'] is "
                         f"{None if not info else info.get('cuda')!r} (backends "
                         f"{None if not info else info.get('backends')}); see the build log")

    r.totals = {s: sum(c.status == s for c in cases) for s in STATUSES}
    r.totals["tests"] = len(cases)
    r.by_backend = _count(cases, backend_of, BACKENDS)
    r.by_dtype = _count(cases, dtype_of, DTYPES)
    for c in cases:
        if c.status == "passed" and backend_of(c) in GATED:
            row = r.gpu_matrix.setdefault(backend_of(c), {d: 0 for d in DTYPES + ("any",)})
            row[dtype_of(c)] += 1

    if not cases:
        r.reasons.append(f"the JUnit XML {junit} holds no test at all")
    bad = [c for c in cases if c.status in ("failed", "error")]
    if bad:
        r.reasons.append(f"{r.totals['failed']} failed and {r.totals['error']} errored tests:"
                         + _listing([f"{c.label}: {c.message.splitlines()[0] if c.message else ''}"
                                     for c in bad]))
    skipped = [c for c in cases if c.status == "skipped" and is_gated(c)]
    if skipped:
        reasons = Counter(c.message.splitlines()[0] if c.message else "(no reason)"
                          for c in skipped)
        r.reasons.append(f"{len(skipped)} CUDA/Triton tests were skipped, which the GPU job "
                         f"forbids; reasons: "
                         + "; ".join(f"{n}x {m!r}" for m, n in reasons.most_common(3))
                         + _listing([c.label for c in skipped]))

    if expected_ids is not None:
        r.expected = len(expected_ids)
        passed = {c.key for c in cases if c.status == "passed"}
        r.missing = [i for i in expected_ids if junit_key(i) not in passed]
        r.expected_passed = r.expected - len(r.missing)
        if r.expected == 0:
            r.reasons.append(f"the suite defines no test for --expect-collect {expect_collect!r} "
                             f"(collect-only found 0): a gate over nothing passes vacuously")
        elif r.missing:
            r.reasons.append(f"only {r.expected_passed} of the {r.expected} expected tests "
                             f"(collect-only of {expect_collect!r}) ran and passed; "
                             f"{len(r.missing)} did not:" + _listing(r.missing))
    return r


# ---- reporting -------------------------------------------------------------------------------

def render(r: Report) -> str:
    env = r.environment
    info = env.get("build_info") or {}
    lines = [f"parity gate: {'PASS' if r.ok else 'FAIL'}  ({r.junit})",
             f"  device: {env.get('device') or 'none visible'};  build: backends "
             f"{info.get('backends')}, cuda {info.get('cuda')}, archs {info.get('cuda_archs')}",
             "  tests: " + ", ".join(f"{r.totals.get(s, 0)} {s}" for s in STATUSES)]
    if r.expected is not None:
        lines.append(f"  expected (collect-only {r.expect_collect!r}): {r.expected}, "
                     f"passed {r.expected_passed}")
    lines.append(f"  {'backend':<8} " + " ".join(f"{s:>8}" for s in STATUSES))
    for b, row in r.by_backend.items():
        lines.append(f"  {b:<8} " + " ".join(f"{row[s]:>8}" for s in STATUSES))
    if r.gpu_matrix:
        lines.append("  passed   " + " ".join(f"{d:>8}" for d in DTYPES))
        for b, row in r.gpu_matrix.items():
            lines.append(f"  {b:<8} " + " ".join(f"{row[d]:>8}" for d in DTYPES))
    for reason in r.reasons:
        lines.append("FAIL: " + reason)
    return "\n".join(lines)


def markdown(r: Report) -> str:
    out = [f"### Parity gate: {'✅ pass' if r.ok else '❌ fail'}", "",
           "| backend | " + " | ".join(STATUSES) + " |", "|---" * (len(STATUSES) + 1) + "|"]
    out += [f"| {b} | " + " | ".join(str(row[s]) for s in STATUSES) + " |"
            for b, row in r.by_backend.items()]
    if r.expected is not None:
        out += ["", f"Expected (collect-only `{r.expect_collect}`): {r.expected}, "
                    f"passed: {r.expected_passed}"]
    out += [""] + [f"- **FAIL**: {reason.splitlines()[0]}" for reason in r.reasons]
    return "\n".join(out) + "\n"


def summary_path(junit: Path) -> Path:
    return junit.with_name(junit.stem + "_gate.json")


def main(argv=None, *, probe: Callable[[], dict] = probe,
         collect: Callable[[str], list[str]] = collect) -> int:
    """The CLI. ``probe`` and ``collect`` are injectable so that the checks run without a GPU."""
    p = argparse.ArgumentParser(prog="python -m bench.parity_gate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--junit", type=Path, required=True, help="the parity run's JUnit XML")
    p.add_argument("--expect-collect", metavar="PYTEST_ARGS",
                   help="pytest arguments (one string) whose collect-only node ids must all have "
                        "passed in the XML, e.g. \"tests/ops/test_parity.py -k 'cuda or triton'\"")
    p.add_argument("--require-cuda", action="store_true",
                   help="fail when torch sees no CUDA device")
    p.add_argument("--json", type=Path, help="summary path (default: <junit stem>_gate.json "
                                             "next to the XML)")
    a = p.parse_args(argv)

    environment = probe()
    try:
        cases = parse_junit(a.junit)
        read_error = None
    except GateError as e:
        cases, read_error = [], str(e)
    expected = None
    collect_error = None
    if a.expect_collect is not None:
        try:
            expected = collect(a.expect_collect)
        except GateError as e:
            collect_error = str(e)
    report = evaluate(cases, expected, require_cuda=a.require_cuda, environment=environment,
                      junit=str(a.junit), expect_collect=a.expect_collect)
    if read_error:
        report.reasons.insert(0, read_error)
        report.reasons = [x for x in report.reasons if "holds no test" not in x]
    if collect_error:
        report.reasons.append(collect_error)

    print(render(report))
    out = a.json or summary_path(a.junit)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
        print(f"summary: {out}")
    except OSError as e:
        print(f"could not write {out}: {e}", file=sys.stderr)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as f:
            f.write(markdown(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
