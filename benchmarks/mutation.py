"""Mutation testing of bnn_keras' core modules: do the tests notice a one-token breakage?

Each mutant changes one thing in one function of a core module (a comparison, a boolean
operator, an arithmetic operator, a constant, a `not`, a unary minus, or one statement
removed), then runs the tests that cover that module in a private copy of the repository.
A mutant is *killed* when those tests fail (or time out). A surviving mutant is either a
gap in the tests or *equivalent* (no input can tell it from the original); equivalent ones
are explained, one line each, in `benchmarks/mutation_equivalent.txt`.

    python benchmarks/mutation.py                      # every target, 1 worker
    python benchmarks/mutation.py --target callbacks   # one target
    python benchmarks/mutation.py --list               # the mutants, nothing run
    python benchmarks/mutation.py --jobs 2             # two copies side by side

Prints one line per mutant and writes `benchmarks/results/mutation.md`. A benchmark, not
part of CI: a full run takes about an hour on a 2-core machine.

Why our own runner: mutmut 3.8 wraps every function in a trampoline that hides `call`'s
`training` argument from Keras (measured), so Keras layers break under it; this runner
edits the source text of one function per mutant, so the modules stay plain Python.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = ROOT / "benchmarks" / "mutation_equivalent.txt"
RESULTS = ROOT / "benchmarks" / "results" / "mutation.md"


@dataclasses.dataclass(frozen=True)
class Target:
    """The functions of one module to mutate, and the tests that must catch it."""

    module: str
    names: tuple[str, ...] | None  # top-level functions / classes; None = every one
    tests: tuple[str, ...]


TARGETS: dict[str, Target] = {
    "quantizers": Target(
        "bnn_keras/quantizers.py", None,
        (
            "tests/test_quantizers.py", "tests/test_stochastic.py", "tests/test_saving.py", "tests/test_make_switchable.py",
            "tests/test_bad_input_boundary.py",
        ),
    ),
    "constraints": Target(
        "bnn_keras/constraints.py", None,
        ("tests/test_constraints.py", "tests/test_saving.py", "tests/test_make_switchable.py", "tests/test_bad_input_boundary.py"),
    ),
    "switch": Target(
        "bnn_keras/_switch.py", None, ("tests/test_switching.py", "tests/test_saving.py", "tests/test_callbacks.py")
    ),
    "callbacks": Target(
        "bnn_keras/callbacks.py",
        ("_improvement_op", "_batch_norm_layers", "ClippingSchedule", "BestValidation"),
        ("tests/test_callbacks.py", "tests/test_schedule_edges.py", "tests/test_bad_input_boundary.py"),
    ),
    "lr_schedules": Target(
        "bnn_keras/lr_schedules.py",
        ("ExponentialDecayPerEpoch", "PiecewiseConstantPerEpoch"),
        ("tests/test_optimizers.py", "tests/test_optimizers_distributed.py"),
    ),
    "layerwise": Target(
        "bnn_keras/layerwise.py", None, ("tests/test_optimizers.py", "tests/test_optimizers_distributed.py")
    ),
    "models": Target(
        "bnn_keras/models.py",
        ("_Binariser", "mlp", "vgg10", "_weighted_layers", "_bn_variables", "copy_weights"),
        ("tests/test_models.py", "tests/test_stochastic.py", "tests/test_bad_input_boundary.py"),
    ),
    "best_epoch": Target(
        "bnn_keras/run_folder.py",
        ("BestKeeper", "RunFolder.promote_best"),
        ("tests/test_training.py", "tests/test_resume.py"),
    ),
    "summary": Target(
        "bnn_keras/training.py", ("_best_row", "_summary"), ("tests/test_training.py",)
    ),
    "export_rewrite": Target(
        "bnn_keras/export/rewrite.py",
        ("_BinaryDenseAsConv", "_dense_rewrite_blocker", "rewrite_binary_dense"),
        ("tests/test_export_verification.py", "tests/test_export.py"),
    ),
    "export_verify": Target(
        "bnn_keras/export/verify.py",
        ("_agreement", "_top_moved", "_flipped_within_rounding", "_failures", "check_flatbuffer"),
        (
            "tests/test_export_agreement.py", "tests/test_export_verification.py", "tests/test_export.py",
            "tests/test_export_reliability.py", "tests/test_export_trust.py",
        ),
    ),
    "export_localise": Target(
        "bnn_keras/export/localise.py", ("_verdict",), ("tests/test_export_trust.py",)
    ),
    "plateau": Target(
        "bnn_keras/plateau.py", None, ("tests/test_plateau.py",)
    ),
    "grid": Target(
        "bnn_keras/grid.py", None, ("tests/test_grid.py",)
    ),
    "own_model": Target(
        "bnn_keras/switchable.py", None, ("tests/test_make_switchable.py", "tests/test_own_model.py")
    ),
    "speed": Target(
        "bnn_keras/speed.py", None, ("tests/test_speed.py",)
    ),
    "non_finite": Target(
        "bnn_keras/callbacks.py", ("StopOnNonFinite",), ("tests/test_bad_input.py", "tests/test_callbacks.py")
    ),
    "stages": Target(
        "bnn_keras/training.py",
        ("_stages", "_finished_by_stage", "_staged", "_hand_over_info"),
        ("tests/test_training.py", "tests/test_resume.py", "tests/test_distill.py"),
    ),
    "background": Target(
        "bnn_keras/run_folder.py",
        ("_copy_quantized_variable_to_cpu", "_async_support", "not_copyable", "Backup", "PromoteBest"),
        ("tests/test_background_writes.py", "tests/test_resume.py", "tests/test_faults.py"),
    ),
    "settle": Target(
        "bnn_keras/training.py", ("_settle",),
        ("tests/test_background_writes.py", "tests/test_resume.py", "tests/test_faults.py", "tests/test_training.py"),
    ),
    "distill": Target("bnn_keras/distill.py", None, ("tests/test_distill.py",)),
    "dead_zone": Target("bnn_keras/dead_zone.py", None, ("tests/test_dead_zone.py",)),
}

# The modules the suite's first mutation target named (the 90% goal): the rest came later.
CORE = frozenset({
    "quantizers", "constraints", "switch", "callbacks", "lr_schedules", "layerwise", "models", "best_epoch", "summary",
    "export_rewrite", "export_verify",
})

_SWAP_COMPARE = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
_SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div, ast.Pow: ast.Mult}
_QUIET_CALLS = {"print", "warn", "debug", "info", "warning", "setLevel"}  # messages, not behaviour


@dataclasses.dataclass(frozen=True)
class Mutant:
    target: str
    path: str
    qualname: str
    start: tuple[int, int]  # (line, column) of the replaced source, 1-based line
    end: tuple[int, int]
    replacement: str
    original: str
    key: str  # stable name: function, original and mutated text (line numbers move)


# --------------------------------------------------------------------------- generating mutants


def _segment(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    (l1, c1), (l2, c2) = start, end
    if l1 == l2:
        return lines[l1 - 1][c1:c2]
    return "".join([lines[l1 - 1][c1:], *lines[l1:l2 - 1], lines[l2 - 1][:c2]])


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """Ids of nodes not to mutate: annotations, docstrings, f-strings and message calls."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mark(node.returns)
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs, node.args.vararg, node.args.kwarg]:
                if arg is not None:
                    mark(arg.annotation)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.JoinedStr):
            mark(node)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _QUIET_CALLS:
                mark(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                mark(body[0])
    return skip


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _expression_mutants(node: ast.AST) -> list[ast.AST]:
    """The mutated copies of one expression node (empty when it has none)."""
    found: list[ast.AST] = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swap = _SWAP_COMPARE.get(type(op))
            if swap is not None:
                new = copy.deepcopy(node)
                new.ops[i] = swap()
                found.append(new)
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        found.append(new)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        found.append(copy.deepcopy(node.operand))
    elif isinstance(node, ast.BinOp) and not (_is_text(node.left) or _is_text(node.right)):
        swap = _SWAP_BINOP.get(type(node.op))
        if swap is not None:
            new = copy.deepcopy(node)
            new.op = swap()
            found.append(new)
    elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) and node.value is not None:
        value = node.value
        if isinstance(value, bool):
            found.append(ast.Constant(not value))
        elif isinstance(value, int):
            found.append(ast.Constant(value + 1))
        elif isinstance(value, float):
            found.append(ast.Constant(value * 2 if value else 1.0))
    return found


def _statement_mutant(node: ast.stmt) -> bool:
    """Whether removing `node` (replacing it with `pass`) is a mutant worth running."""
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        return getattr(node, "value", None) is not None
    if isinstance(node, ast.Expr):
        return isinstance(node.value, ast.Call)
    return False


def _defs(tree: ast.Module, names: tuple[str, ...] | None) -> list[tuple[str, ast.AST]]:
    """(qualname, node) of the functions to mutate: `names` holds functions, classes (all their
    methods) or ``Class.method``; methods are named ``Class.method``."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                qualname = f"{node.name}.{item.name}" if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
                if qualname and (names is None or node.name in names or qualname in names):
                    found.append((qualname, item))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (names is None or node.name in names):
            found.append((node.name, node))
    return found


def _guards(tree: ast.AST) -> set[int]:
    """Ids of the nodes of input-validation guards: an `if` whose body only raises."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and not node.orelse and all(isinstance(b, ast.Raise) for b in node.body):
            found.update(id(n) for n in ast.walk(node))
    return found


def mutants_of(target_name: str, target: Target, guards: bool = False) -> list[Mutant]:
    """Every mutant of `target`; validation guards only with `guards` (the bad-input tests pin those)."""
    path = ROOT / target.module
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    skip = _skipped_nodes(tree) | (set() if guards else _guards(tree))
    result: list[Mutant] = []
    seen: dict[str, int] = {}

    def add(qualname: str, node: ast.AST, replacement: str) -> None:
        start, end = (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)
        original = _segment(lines, start, end)
        base = f"{qualname}: {' '.join(original.split())} -> {' '.join(replacement.split())}"
        seen[base] = seen.get(base, 0) + 1
        key = base if seen[base] == 1 else f"{base} #{seen[base]}"
        result.append(Mutant(target_name, target.module, qualname, start, end, replacement, original, key))

    for qualname, definition in _defs(tree, target.names):
        for node in ast.walk(definition):
            if id(node) in skip or node is definition:
                continue
            if isinstance(node, ast.stmt) and _statement_mutant(node):
                add(qualname, node, "pass")
            if isinstance(node, (ast.If, ast.While, ast.IfExp)) and isinstance(node.test, (ast.Call, ast.Name, ast.Attribute)):
                add(qualname, node.test, f"(not {ast.unparse(node.test)})")  # a bare condition has no operator to swap
            if isinstance(node, ast.expr):
                for new in _expression_mutants(node):
                    add(qualname, node, f"({ast.unparse(new)})")
    return result


def apply(mutant: Mutant, source: str) -> str:
    lines = source.splitlines(keepends=True)
    (l1, c1), (l2, c2) = mutant.start, mutant.end
    assert _segment(lines, mutant.start, mutant.end) == mutant.original, mutant.key
    before = "".join(lines[: l1 - 1]) + lines[l1 - 1][:c1]
    after = lines[l2 - 1][c2:] + "".join(lines[l2:])
    return before + mutant.replacement + after


# --------------------------------------------------------------------------- running them


def _copy_repo(destination: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache", "*.tflite")
    shutil.copytree(ROOT, destination, ignore=ignore)


def serve(workdir: str) -> None:
    """A test server for one copy: import TensorFlow once, then fork a pytest run per request.

    Reads one JSON request a line (``{"tests": [...], "timeout": s}``) and answers
    ``{"rc": exit code or null on time-out, "seconds": s}``. The children import bnn_keras
    afresh from `workdir`, so each sees the mutated file the parent wrote there.
    """
    os.environ.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=workdir)
    sys.dont_write_bytecode = True
    import larq  # noqa: F401  (what every child needs, imported once; never bnn_keras itself)
    import larq_compute_engine  # noqa: F401
    import pytest
    import tensorflow  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: quiet, its own process group (killed whole on time-out)
            os.setpgid(0, 0)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(workdir)
            sys.path.insert(0, workdir)
            os.environ.update(request.get("env", {}))
            options = request.get("options", ["-x"])
            os._exit(int(pytest.main([*options, "-q", "-p", "no:cacheprovider", *request["tests"]])))
        rc = None
        while time.perf_counter() - started < request["timeout"]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        print(json.dumps({"rc": rc, "seconds": time.perf_counter() - started}), flush=True)


class _Server:
    """A running `serve` process for one copy of the repository."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.process = subprocess.Popen(
            [sys.executable, os.fspath(Path(__file__).resolve()), "--serve", os.fspath(workdir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=workdir,
        )
        if not json.loads(self.process.stdout.readline()).get("ready"):
            raise RuntimeError("mutation: the test server did not start")

    def run_tests(
        self, tests: Sequence[str], timeout: float, options: Sequence[str] = ("-x",), env: Mapping[str, str] | None = None
    ) -> tuple[str, float]:
        request = {"tests": list(tests), "timeout": timeout, "options": list(options), "env": dict(env or {})}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        rc = answer["rc"]
        if rc is None:
            outcome = "timeout"
        elif rc in (0, 1):
            outcome = "survived" if rc == 0 else "killed"
        else:  # 2-4: collection / internal error (an import-time failure), 5: no tests
            outcome = f"killed (pytest exit {rc})"
        return outcome, answer["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def read_equivalent() -> dict[str, str]:
    """key -> one-line reason, from benchmarks/mutation_equivalent.txt (`key<TAB>reason`)."""
    if not EQUIVALENT_FILE.exists():
        return {}
    reasons = {}
    for line in EQUIVALENT_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, reason = line.partition("\t")
            reasons[key.strip()] = reason.strip()
    return reasons


def _durations(junit_xml: Path) -> dict[str, float]:
    """Test id -> seconds, from a pytest JUnit XML report."""
    import xml.etree.ElementTree as ElementTree

    durations = {}
    for case in ElementTree.parse(junit_xml).iter("testcase"):
        module, _, _ = case.get("classname", "").rpartition(".")  # tests.test_x[.Class]
        path = case.get("classname", "").replace(".", "/") + ".py"
        if case.get("classname", "").count(".") > 1:  # a test class: tests/test_x.py::Class::name
            path = module.replace(".", "/") + ".py::" + case.get("classname").rpartition(".")[2]
        durations[f"{path}::{case.get('name')}"] = float(case.get("time", 0.0))
    return durations


def covering_tests(server: _Server, target: Target) -> tuple[dict[int, list[str]], dict[str, float], float]:
    """Run `target`'s tests once under coverage: line of its module -> the tests that run it.

    The tests of a line come fastest first, so that with ``-x`` a killed mutant costs its
    quickest failing test. Lines run only in a subprocess (the CLI tests) have no entry;
    their mutants run every test.
    """
    data_file = server.workdir / f".coverage-{Path(target.module).stem}"
    junit = server.workdir / f".durations-{Path(target.module).stem}.xml"
    options = [
        "--cov=bnn_keras", "--cov-context=test", "--cov-report=", f"--cov-config={os.devnull}", f"--junitxml={junit}",
    ]
    environment = {"COVERAGE_FILE": os.fspath(data_file)}
    outcome, seconds = server.run_tests(target.tests, timeout=7200, options=options, env=environment)
    if outcome != "survived":
        raise SystemExit(f"mutation: the tests of {target.module} fail without any mutant: fix them first")
    durations = _durations(junit)
    import coverage

    data = coverage.CoverageData(basename=os.fspath(data_file))
    data.read()
    lines: dict[int, set[str]] = {}
    for measured in data.measured_files():
        if Path(measured).resolve() == (server.workdir / target.module).resolve():
            for line, contexts in data.contexts_by_lineno(measured).items():
                tests = {c.rsplit("|", 1)[0] for c in contexts if c}
                lines[line] = sorted((t for t in tests if "::" in t), key=lambda t: (durations.get(t, 1e9), t))
    if not lines:
        raise SystemExit(f"mutation: coverage recorded no line of {target.module}: is the copy the code under test?")
    return lines, durations, seconds


def run(mutants: list[Mutant], jobs: int, timeout_factor: float) -> dict[Mutant, str]:
    """Each mutant against the tests that run its lines; a survivor then against all its target's tests."""
    scratch = Path(tempfile.mkdtemp(prefix="bnn_keras_mutation_"))
    servers = []
    for j in range(jobs):
        _copy_repo(scratch / f"w{j}")
        servers.append(_Server(scratch / f"w{j}"))
    coverage_of: dict[str, dict[int, list[str]]] = {}
    durations: dict[str, float] = {}
    baseline: dict[str, float] = {}
    free = list(servers)
    lock = threading.Lock()

    def measure(name: str) -> None:  # one clean coverage run per target, on whichever copy is free
        with lock:
            server = free.pop()
        try:
            lines, seconds_of, seconds = covering_tests(server, TARGETS[name])
        finally:
            with lock:
                free.append(server)
        with lock:
            coverage_of[name], baseline[name] = lines, seconds
            durations.update(seconds_of)
            print(f"baseline {name}: {', '.join(TARGETS[name].tests)} pass in {seconds:.0f} s (with coverage)", flush=True)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(measure, sorted({m.target for m in mutants})))
    outcomes: dict[Mutant, str] = {}
    done = [0]

    def one(mutant: Mutant) -> None:
        target = TARGETS[mutant.target]
        lines = range(mutant.start[0], mutant.end[0] + 1)
        covering = sorted(
            {t for line in lines for t in coverage_of[mutant.target].get(line, [])},
            key=lambda t: (durations.get(t, 1e9), t),
        )
        timeout = timeout_factor * baseline[mutant.target] + 60
        with lock:
            server = free.pop()
        path = server.workdir / mutant.path
        original = path.read_text(encoding="utf-8")
        try:
            path.write_text(apply(mutant, original), encoding="utf-8")
            outcome, seconds = server.run_tests(covering or target.tests, timeout=timeout)
            if outcome == "survived" and covering:  # a fixture may run the line for other tests too
                outcome, more = server.run_tests(target.tests, timeout=timeout)
                seconds += more
        finally:
            path.write_text(original, encoding="utf-8")
            with lock:
                free.append(server)
        with lock:
            outcomes[mutant] = outcome
            done[0] += 1
            print(
                f"[{done[0]}/{len(mutants)}] {outcome:<9} {seconds:5.0f} s {len(covering):3d} tests  "
                f"{mutant.path}:{mutant.start[0]}  {mutant.key}",
                flush=True,
            )

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, mutants))
    for server in servers:
        server.close()
    shutil.rmtree(scratch, ignore_errors=True)
    return outcomes


def _score(row: Sequence[int]) -> float:
    """Percent killed of a (mutants, killed, equivalent, unexplained) row's non-equivalent mutants."""
    mutants, killed, equivalent, _ = row
    return 100 * killed / max(mutants - equivalent, 1)


def report(outcomes: dict[Mutant, str], command: str, minutes: float) -> str:
    equivalent = read_equivalent()
    lines = [
        "# Mutation testing",
        "",
        f"`{command}`" + (f" ({minutes:.0f} min)" if minutes == minutes else "") + ". Killed: the covering tests failed or timed out.",
        "Equivalent: survivors no input can tell from the original, explained in",
        "`benchmarks/mutation_equivalent.txt`. Score = killed / (mutants - equivalent).",
        "",
        "| target | module | tests | mutants | killed | equivalent | unexplained survivors | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    survivors: list[tuple[Mutant, str]] = []
    totals, core = [0, 0, 0, 0], [0, 0, 0, 0]
    for name in sorted({m.target for m in outcomes}):
        mine = [m for m in outcomes if m.target == name]
        killed = [m for m in mine if outcomes[m] != "survived"]
        alive = [m for m in mine if outcomes[m] == "survived"]
        explained = [m for m in alive if m.key in equivalent]
        survivors += [(m, equivalent.get(m.key, "UNEXPLAINED")) for m in alive]
        row = [len(mine), len(killed), len(explained), len(alive) - len(explained)]
        totals = [t + r for t, r in zip(totals, row)]
        if name in CORE:
            core = [t + r for t, r in zip(core, row)]
        target = TARGETS[name]
        lines.append(
            f"| {name} | `{target.module}` | {', '.join(Path(t).name for t in target.tests)} | "
            + " | ".join(map(str, row)) + f" | {_score(row):.1f}% |"
        )
    if core != totals and core[0]:
        lines.append(f"| **core** ({len(CORE)} first targets) | | | {' | '.join(map(str, core))} | **{_score(core):.1f}%** |")
    lines.append(f"| **all** | | | {' | '.join(map(str, totals))} | **{_score(totals):.1f}%** |")
    lines += ["", "## Survivors", ""]
    if not survivors:
        lines.append("None.")
    for mutant, reason in survivors:
        lines.append(f"- `{mutant.path}:{mutant.start[0]}` `{mutant.key}`: {reason}")
    return "\n".join(lines) + "\n"


_LOG_LINE = re.compile(r"\[\d+/(\d+)\] (\S+(?: \(pytest exit \d+\))?)\s+\d+ s\s+\d+ tests  (\S+):\d+  (.+)")


def _logged_outcomes(log: Path) -> dict[str, str]:
    """Mutant key -> outcome, from the lines a run printed."""
    found = {}
    for text in log.read_text(encoding="utf-8").splitlines():
        match = _LOG_LINE.fullmatch(text.strip())
        if match:
            found[match.group(4)] = match.group(2)
    return found


def _report_from_log(log: Path, mutants: list[Mutant], args: argparse.Namespace) -> int:
    """The report of the mutants a stopped run finished, read from the lines it printed."""
    by_key = {(m.target, m.key): m for m in mutants}
    outcomes: dict[Mutant, str] = {}
    total = 0
    for text in log.read_text(encoding="utf-8").splitlines():
        match = _LOG_LINE.fullmatch(text.strip())
        if match:
            total = int(match.group(1))
            # Two targets may share a module (callbacks, non_finite): the key names the function.
            found = (by_key.get((n, match.group(4))) for n, t in TARGETS.items() if t.module == match.group(3))
            mutant = next((m for m in found if m is not None), None)
            if mutant is not None:
                outcomes[mutant] = match.group(2)
    command = f"python benchmarks/mutation.py --jobs {args.jobs}, stopped after {len(outcomes)} of {total} mutants"
    text = report(outcomes, command, float("nan"))
    print(text)
    if not args.no_write:
        RESULTS.write_text(text, encoding="utf-8")
    return 0


def _sample(mutants: list[Mutant], count: int, seed: int) -> list[Mutant]:
    """A seeded random `count` of `mutants`, each target's share as in the whole (at least one each)."""
    import random

    rng = random.Random(seed)
    by_target: dict[str, list[Mutant]] = {}
    for mutant in mutants:
        by_target.setdefault(mutant.target, []).append(mutant)
    chosen = []
    for name, group in sorted(by_target.items()):
        share = max(1, round(count * len(group) / len(mutants)))
        chosen.extend(rng.sample(group, min(share, len(group))))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", nargs="+", choices=sorted(TARGETS), help="targets to mutate (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="copies of the repository run side by side")
    parser.add_argument("--timeout-factor", type=float, default=3.0, help="a mutant's limit: this x the clean run + 60 s")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--match", help="only mutants whose key contains this text")
    parser.add_argument("--guards", action="store_true", help="also mutate input-validation guards (an if that only raises)")
    parser.add_argument(
        "--sample", type=int, metavar="N",
        help="a seeded random N of the mutants, the same share of every target (a full run takes hours here)",
    )
    parser.add_argument("--sample-seed", type=int, default=0, metavar="S", help="seed of --sample (default 0)")
    parser.add_argument("--survivors-of", metavar="LOG", help="only the mutants that survived in a run's printed lines (after new tests: are they killed now?)")
    parser.add_argument("--no-write", action="store_true", help=f"do not rewrite {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--from-log", metavar="LOG", help="write the report from a run's printed lines (a run stopped early)")
    parser.add_argument("--serve", metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs: expected an integer >= 1, got {args.jobs}")
    names = args.target or sorted(TARGETS)
    mutants = [m for name in names for m in mutants_of(name, TARGETS[name], args.guards)]
    if args.match:
        mutants = [m for m in mutants if args.match in m.key]
    if args.sample is not None and not args.from_log:
        mutants = _sample(mutants, args.sample, args.sample_seed)
    if args.survivors_of:
        survived = {key for key, outcome in _logged_outcomes(Path(args.survivors_of)).items() if outcome == "survived"}
        mutants = [m for m in mutants if m.key in survived]
    if args.from_log:
        return _report_from_log(Path(args.from_log), mutants, args)
    if args.list:
        for mutant in mutants:
            print(f"{mutant.target:<11} {mutant.path}:{mutant.start[0]}  {mutant.key}")
        print(f"{len(mutants)} mutants")
        return 0
    if importlib.util.find_spec("pytest_cov") is None:
        parser.error('expected pytest-cov installed (it maps lines to tests), got none: pip install -e ".[mutation]"')
    started = time.perf_counter()
    outcomes = run(mutants, args.jobs, args.timeout_factor)
    command = "python benchmarks/mutation.py" + (f" --target {' '.join(args.target)}" if args.target else "")
    command += " --guards" if args.guards else ""
    command += f" --sample {args.sample} --sample-seed {args.sample_seed}" if args.sample is not None else ""
    command += f" --survivors-of {args.survivors_of}" if args.survivors_of else ""
    command += f" --jobs {args.jobs}" if args.jobs > 1 else ""
    text = report(outcomes, command, (time.perf_counter() - started) / 60)
    print(text)
    if not args.no_write and not args.match and not args.survivors_of:
        RESULTS.write_text(text, encoding="utf-8")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
