"""The claims of the repository's documents are backed: tables have data, the tests RELIABILITY.md cites exist,
its counts match the test suite, and no file cites a document the repository does not have."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "BENCHMARKS.md", "RELIABILITY.md")
CTEST = Path(sys.executable).parent / "ctest"
BUILD = ROOT / "build" / "py"


def _tables(text: str) -> list[tuple[int, list[str]]]:
    """Markdown tables as (line number of the header, data rows)."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines) - 1:
        if lines[i].lstrip().startswith("|") and re.fullmatch(r"\s*\|(\s*:?-+:?\s*\|)+\s*", lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append((i + 1, lines[i + 2 : j]))
            i = j
        else:
            i += 1
    return out


@pytest.mark.parametrize("name", DOCS)
def test_every_table_has_data(name):
    empty = [line for line, rows in _tables((ROOT / name).read_text()) if not rows]
    assert not empty, f"{name}: tables without a row at lines {empty}"


def _ctest_names(*args: str) -> list[str]:
    out = subprocess.run([str(CTEST), "-N", "--test-dir", str(BUILD), *args], capture_output=True, text=True, check=True)
    return re.findall(r"^\s*Test\s+#\d+: (\S+)", out.stdout, flags=re.M)


def _makefile_tsan_regex() -> str:
    match = re.search(r'\$\(CTEST\) --test-dir \$\(TSAN_DIR\) -R "([^"]+)"', (ROOT / "Makefile").read_text())
    assert match, "the Makefile's tsan-test stage no longer selects its tests with -R"
    return match.group(1)


def test_reliability_counts_match_the_test_suite():
    """RELIABILITY.md's numbers: the rows of its fault tables, and the C++ tests the sanitizer builds run (the ASan
    build runs every C++ core test, the TSan build those the Makefile selects), counted from ctest's own list."""
    text = (ROOT / "RELIABILITY.md").read_text()
    rows = sum(len(r) for line, r in _tables(text) if "| test |" in text.splitlines()[line - 1])
    claimed = re.search(r"faults and hostile inputs in the tables below \| (\d+) rows", text)
    assert claimed and int(claimed.group(1)) == rows, f"the fault tables have {rows} rows"
    every = _ctest_names("-LE", "bench")
    tsan = _ctest_names("-LE", "bench", "-R", _makefile_tsan_regex())
    asan_claim = re.search(r"UndefinedBehaviorSanitizer on every C\+\+ core test \((\d+) tests\b", text)
    tsan_claim = re.search(r"ThreadSanitizer on [^(]*\((\d+) tests\b", text)
    assert asan_claim and int(asan_claim.group(1)) == len(every), f"ctest lists {len(every)} C++ core tests"
    assert tsan_claim and int(tsan_claim.group(1)) == len(tsan), f"the TSan stage selects {len(tsan)} tests"


def test_the_tests_reliability_cites_exist():
    """Every test named in RELIABILITY.md's tables is a pytest test, a C++ test (listed by ctest, or in a test source
    of a build ctest does not list here, such as the CUDA backend's) or a fuzzer of the tree."""
    text = (ROOT / "RELIABILITY.md").read_text()
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    cpp = set(_ctest_names())
    # tests of builds ctest does not list here (the CUDA backend's cuda_test): from the sources
    for src in (ROOT / "cpp" / "tests").glob("*_test.cc"):
        cpp.update(f"{a}.{b}" for a, b in re.findall(r"^TEST(?:_P|_F)?\((\w+), (\w+)\)", src.read_text(), flags=re.M))
    fuzzers = {p.stem for p in (ROOT / "cpp" / "fuzz").glob("*_fuzzer.cc")}
    missing = []
    for cell in re.findall(r"`([^`]+)`", text):
        name = cell.split("[")[0]
        if name.startswith("test_"):
            if not re.search(rf"def {re.escape(name)}\(", sources):
                missing.append(cell)
        elif re.fullmatch(r"[A-Z][A-Za-z]+\.[A-Za-z0-9_*]+", name):
            suite, case = name.split(".")
            pattern = re.compile(rf"(\w+/)?{suite}\.{case.replace('*', '.*')}(/\w+)?$")
            if not any(pattern.match(t) for t in cpp):
                missing.append(cell)
        elif name.endswith("_fuzzer") and name not in fuzzers:
            missing.append(cell)
    assert not missing, f"RELIABILITY.md cites tests that do not exist: {missing}"


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an unpacked archive): every file under the root
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and "build" not in p.parts]
    return [ROOT / line for line in out.stdout.splitlines()]


#: Markdown files the repository's scripts write (not documents it holds): ``scripts/gpu-check``'s report.
WRITTEN_BY_SCRIPTS = {"gpu-check.md"}


def test_no_file_cites_a_document_the_repository_lacks():
    """A citation such as ``docs/algorithms.md §3`` or ``BENCHMARKS.md`` names a file of the repository."""
    names = {p.name for p in _tracked_files()} | WRITTEN_BY_SCRIPTS
    paths = {str(p.relative_to(ROOT)) for p in _tracked_files()}
    missing = []
    for path in _tracked_files():
        if path.suffix not in (".py", ".md", ".cc", ".h", ".cu", ".cuh", ".toml", ".txt") and path.name != "Makefile":
            continue
        for match in re.finditer(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.md)\b", path.read_text(errors="replace")):
            cited = match.group(1)
            if cited not in paths and cited not in names and str((path.parent / cited).relative_to(ROOT)) not in paths:
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
    assert not missing, f"citations of documents that are not in the repository: {sorted(set(missing))}"
