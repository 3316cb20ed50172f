"""scripts/gpu-check on a machine without a GPU: its stage logic, its report writer and a dry run."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from helpers import default_signal_dispositions

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check"


def _load():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


gc = _load()


def test_exit_status_tells_failed_from_skipped():
    R = gc.Result
    assert gc.exit_status([R("a", "ok"), R("b", "ok")]) == 0
    assert gc.exit_status([R("a", "ok"), R("b", "skipped")]) == 2
    assert gc.exit_status([R("a", "skipped"), R("b", "failed")]) == 1
    assert gc.exit_status([R("a", "timeout")]) == 1


def test_a_stage_records_failure_timeout_and_a_missing_program(tmp_path):
    ok = gc.run_stage(gc.Stage("ok", [sys.executable, "-c", "print('hello')"]), tmp_path, 30)
    assert ok.status == "ok" and "hello" in Path(ok.log).read_text()
    bad = gc.run_stage(gc.Stage("bad", [sys.executable, "-c", "import sys; sys.exit(3)"]), tmp_path, 30)
    assert (bad.status, bad.rc, bad.reason) == ("failed", 3, "exit status 3")
    slow = gc.run_stage(gc.Stage("slow", [sys.executable, "-c", "import time; time.sleep(30)"]), tmp_path, 0.5)
    assert slow.status == "timeout" and slow.reason.startswith("ran past") and slow.seconds < 20
    missing = gc.run_stage(gc.Stage("missing", ["/nonexistent/nvidia-smi"]), tmp_path, 5)
    assert missing.status == "failed" and "could not start" in missing.reason
    after = gc.run_stage(gc.Stage("after", [sys.executable, "-c", "pass"], after=lambda: "no _core*.so"), tmp_path, 5)
    assert (after.status, after.reason) == ("failed", "no _core*.so")


def _fake_plan(stages):
    def plan(args, build, out):
        return stages
    return plan


def test_a_failed_stage_skips_what_needs_it_and_the_run_goes_on(tmp_path, monkeypatch):
    py = sys.executable
    monkeypatch.setattr(gc, "plan", _fake_plan([
        gc.Stage("configure", [py, "-c", "import sys; sys.exit(1)"]),
        gc.Stage("build", [py, "-c", "pass"]),  # needs configure: skipped
        gc.Stage("overhead", [py, "-c", "pass"]),  # needs build: skipped
        gc.Stage("wheels", [py, "-c", "print('still runs')"]),  # needs nothing: runs
    ]))
    rc = gc.main(["--out", str(tmp_path), "--budget-s", "120"])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert rc == report["exit_status"] == 1
    got = {s["name"]: (s["status"], s["reason"]) for s in report["stages"]}
    assert got["configure"] == ("failed", "exit status 1")
    assert got["build"] == ("skipped", "configure did not pass")
    assert got["overhead"] == ("skipped", "build did not pass")
    assert got["wheels"][0] == "ok"
    assert "| build | skipped | 0 | configure did not pass |" in (tmp_path / "gpu-check.md").read_text()


def test_a_stage_that_cannot_start_in_the_budget_is_skipped(tmp_path, monkeypatch):
    py = sys.executable
    monkeypatch.setattr(gc, "plan", _fake_plan([
        gc.Stage("wheels", [py, "-c", "import time; time.sleep(1.5)"], timeout=60),
        gc.Stage("gpu", [py, "-c", "pass"]),
    ]))
    monkeypatch.setattr(gc, "MIN_START_S", 1.0)
    rc = gc.main(["--out", str(tmp_path), "--budget-s", "2"])
    stages = json.loads((tmp_path / "gpu-check.json").read_text())["stages"]
    assert stages[0]["status"] == "ok"
    assert stages[1]["status"] == "skipped" and stages[1]["reason"].startswith("out of time")
    assert rc == 2


def test_markdown_writes_every_table_and_survives_gaps():
    report = {
        "mode": "quick", "dry_run": False, "device": "GPU 0: NVIDIA H100", "seconds": 181.0, "exit_status": 1,
        "stages": [{"name": "build", "status": "ok", "seconds": 95.2, "reason": ""},
                   {"name": "transfer", "status": "failed", "seconds": 3.0, "reason": "exit status 1"}],
        "measurements": {
            "overhead": {"device": "NVIDIA H100", "args": {"layers": 2, "d_model": 1024, "context": 128, "batch": 16,
                                                           "steps": 30, "warmup": 5, "frequency": 10, "staleness": 5},
                         "table": {"adamw:-": {"median": 0.009, "p99": 0.025, "mean": 0.010, "target": 2.5,
                                               "target_time_s": 0.3, "val_loss": [2.4]},
                                   "soap:async-gpu": {"median": 0.023, "p99": 0.075, "mean": 0.034,
                                                      "hidden_fraction": 0.91, "target": 2.5, "target_time_s": None}}},
            "memory": {"results": [
                {"config": "adamw", "median_step_s": 0.01, "peak_rss_bytes": 2 << 30, "optimizer_bytes": 1 << 20,
                 "gpu_peak_allocated_bytes": 3 << 30, "gpu_over_adamw_bytes": 0, "rss_over_adamw_bytes": 0},
                {"config": "soap:async-gpu@device_budget=64MiB", "error": "BudgetError: ..."},
            ]},
        },
    }
    md = gc.markdown(report)
    assert "Device: GPU 0: NVIDIA H100" in md
    assert "| transfer | failed | 3 | exit status 1 |" in md
    assert "| adamw | 9.0 ms | 25.0 ms | 10.0 ms |  | 0.30 s | 2.400 |" in md
    assert "| soap:async-gpu | 23.0 ms | 75.0 ms | 34.0 ms | 91% | never |  |" in md
    assert "| adamw | 10.0 ms |  | 3072 MiB | 0 MiB | 2048 MiB | 0 MiB | 1 MiB |" in md
    assert "| soap:async-gpu@device_budget=64MiB | failed: BudgetError: ... |" in md


def test_plan_covers_the_measurements_the_gpu_run_needs(tmp_path):
    args = gc.argparse.Namespace(quick=False, dry_run=False, only=None)
    stages = {s.name: s for s in gc.plan(args, tmp_path / "build", tmp_path / "out")}
    assert [n for n in gc.STAGES if n in stages] == [n for n in stages]  # in order
    assert {"gpu", "configure", "build", "ctest", "pytest", "overhead", "memory", "transfer"} <= set(stages)
    assert "-DASTERIA_ENABLE_CUDA=ON" in stages["configure"].command
    assert stages["pytest"].command[-3:] == ["-m", "gpu", "tests"]
    over = stages["overhead"].command
    assert over[over.index("--device") + 1] == "cuda" and over[over.index("--d-model") + 1] == "1024"
    assert set(over[over.index("--modes") + 1].split(",")) == {"sync", "async", "async-gpu", "async-gpu+bf16", "floor"}
    assert over[over.index("--baselines") + 1] == "adamw,muon"
    mem = stages["memory"].command
    assert "--device-budget" in mem and mem[mem.index("--device") + 1] == "cuda"
    quick = {s.name for s in gc.plan(gc.argparse.Namespace(quick=True, dry_run=False, only=None), tmp_path, tmp_path)}
    assert "transfer" not in quick
    only = [s.name for s in gc.plan(gc.argparse.Namespace(quick=False, dry_run=False, only="pytest,memory"),
                                    tmp_path, tmp_path)]
    assert only == ["pytest", "memory"]


def test_dry_run_skips_the_cuda_stages_and_measures_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=280, preexec_fn=default_signal_dispositions)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert all(status[n] == "skipped" for n in gc.CUDA_STAGES if n in status)
    assert status["overhead"] == status["memory"] == "ok", report["stages"]
    table = report["measurements"]["overhead"]["table"]
    assert {"adamw:-", "muon:-", "soap:sync", "soap:async", "soap:async+bf16", "soap:floor"} <= set(table)
    assert table["adamw:-"]["target_time_s"] is not None  # AdamW reaches its own final loss
    assert table["soap:async"]["hidden_fraction"] is not None or table["soap:sync"]["mean"] <= table["soap:floor"]["mean"]
    mem = {r["config"]: r for r in report["measurements"]["memory"]["results"]}
    assert set(mem) == {"adamw", "muon", "soap:async", "soap:async@device_budget=64KiB"}
    assert all("error" not in r for r in mem.values()), mem
    assert mem["soap:async@device_budget=64KiB"]["step_vs_no_budget"] > 0
    md = (tmp_path / "gpu-check.md").read_text()
    assert "**Training loop**" in md and "**Memory**" in md and "| soap:async+bf16 |" in md
