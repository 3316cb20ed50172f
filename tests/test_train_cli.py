"""Tests of the asteria-train command line (asteria.train.cli)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from asteria.train.cli import build_parser, main, plan_runs
from helpers import default_signal_dispositions, stop

FAST = ["--steps", "6", "--batch-size", "2", "--context", "32", "--eval-every", "3",
        "--eval-batches", "1", "--corpus-bytes", "200000", "--warmup", "2", "--threads", "1",
        "--quiet"]
FILES = ("metrics.jsonl", "summary.json", "summary.txt", "loss_vs_step.png",
         "loss_vs_wallclock.png", "step_time.png", "memory.png")


def test_adamw_run_writes_a_complete_report(tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["--optimizer", "adamw", "--report", str(report), *FAST]) == 0
    for name in FILES:
        assert (report / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (report / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"config", "step", "loss", "step_time", "wall", "refresh"} <= set(rows[0])
    assert "val_loss" in rows[2] and "val_loss" in rows[5]
    summary = json.loads((report / "summary.json").read_text())
    run = summary["runs"][0]
    assert run["name"] == "adamw" and run["steps"] == 6 and run["status"] == "ok"
    assert run["optimizer_state_bytes"] > 0 and run["step_time_p99_s"] > 0
    out = capsys.readouterr().out
    assert "adamw" in out and "step med" in out and "report written to" in out


def test_compare_with_an_unavailable_configuration(tmp_path, capsys, monkeypatch):
    import asteria.train.optimizers as opt_mod

    def unavailable():
        raise opt_mod.OptimizerUnavailable("the asteria library could not be imported (test)")

    monkeypatch.setattr(opt_mod, "_import_asteria", unavailable)
    report = tmp_path / "cmp"
    code = main(["--compare", "adamw,soap:async", "--report", str(report), *FAST])
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    assert [(r["name"], r["status"]) for r in summary["runs"]] == [
        ("adamw", "ok"), ("soap:async", "unavailable")]
    assert "soap:async: unavailable" in capsys.readouterr().out


def test_single_unavailable_optimizer_fails(tmp_path, monkeypatch, capsys):
    import asteria.train.optimizers as opt_mod

    def unavailable():
        raise opt_mod.OptimizerUnavailable("the asteria library could not be imported (test)")

    monkeypatch.setattr(opt_mod, "_import_asteria", unavailable)
    assert main(["--optimizer", "soap", "--report", str(tmp_path / "r"), *FAST]) == 1
    assert "could not be imported" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compare", "adamw,sop"], "unknown optimizer 'sop'"),
        (["--compare", "adamw:async"], "adamw has no preconditioner refresh"),
        (["--compare", "soap:later"], "unknown refresh mode 'later'"),
        (["--compare", "adamw,soap", "--save", "x.pt"], "--save checkpoints one run"),
        (["--optimizer", "adamw", "--refresh", "async"], "only to"),
        (["--resume", "/nonexistent/ckpt.pt"], "No such file"),
        (["--optimizer", "adamw", "--save-every", "5"], "--save-every needs --save PATH"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--optimizer", "adamw", "--compare", "soap"],
                                  ["--model", "huge"], ["--steps", "0"], ["--lr", "-1"],
                                  ["--save-every", "-1"]])
def test_argparse_rejects(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2


def test_default_is_the_demo_comparison():
    args = build_parser().parse_args([])
    runs = plan_runs(args, "cpu")
    assert [r.name for r in runs] == ["adamw", "muon", "soap:sync", "soap:async", "kl-soap", "shampoo"]
    assert [r.refresh for r in runs] == ["sync", "sync", "sync", "async", "sync", "sync"]
    assert len({(r.seed, r.steps, r.batch_size, r.model, r.threads) for r in runs}) == 1
    assert runs[0].threads == max(1, len(os.sched_getaffinity(0)) - 1)  # the refresh runtime keeps a core


def test_threads_are_the_same_for_every_configuration_and_can_be_set():
    runs = plan_runs(build_parser().parse_args(["--compare", "adamw,muon,soap", "--threads", "3"]), "cpu")
    assert [r.threads for r in runs] == [3, 3, 3]


def test_refresh_default_applies_to_unsuffixed_entries():
    args = build_parser().parse_args(["--compare", "adamw,soap,shampoo:sync", "--refresh", "async"])
    runs = plan_runs(args, "cpu")
    assert [(r.name, r.refresh) for r in runs] == [
        ("adamw", "sync"), ("soap:async", "async"), ("shampoo:sync", "sync")]


def test_time_budget_without_steps():
    runs = plan_runs(build_parser().parse_args(["--optimizer", "adamw", "--time-budget", "5"]), "cpu")
    assert runs[0].steps is None and runs[0].time_budget == 5.0


def test_help_and_module_entry_point():
    help_text = build_parser().format_help()
    assert "--compare" in help_text and "tiny" in help_text and "0.84M" in help_text
    proc = subprocess.run([sys.executable, "-m", "asteria.train", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "asteria-train" in proc.stdout


def test_save_and_resume_from_the_command_line(tmp_path):
    ckpt = tmp_path / "run.pt"
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["--optimizer", "adamw", "--report", str(full), *FAST]) == 0
    assert main(["--optimizer", "adamw", "--report", str(part), "--stop-at", "3",
                 "--save", str(ckpt), *FAST]) == 0
    assert main(["--resume", str(ckpt), "--report", str(part), "--quiet", "--threads", "1"]) == 0
    losses = [[json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (full, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    with pytest.raises(SystemExit):
        main(["--resume", str(ckpt), "--lr", "0.5", "--quiet"])


def test_second_order_compare_runs(tmp_path):
    report = tmp_path / "so"
    assert main(["--compare", "adamw,soap", "--report", str(report),
                 "--precondition-frequency", "2", *FAST]) == 0
    summary = json.loads((report / "summary.json").read_text())
    soap = summary["runs"][1]
    assert soap["status"] == "ok" and soap["refresh_steps"] >= 1


def test_staleness_goes_to_async_configurations_only():
    args = build_parser().parse_args(["--compare", "soap:sync,soap:async", "--staleness", "3"])
    runs = plan_runs(args, "cpu")
    assert [(r.name, r.staleness) for r in runs] == [("soap:sync", None), ("soap:async", 3)]
    with pytest.raises(ValueError, match="applies only to async"):
        plan_runs(build_parser().parse_args(["--optimizer", "soap", "--staleness", "3"]), "cpu")


def test_resume_from_a_torn_checkpoint_is_a_clear_error(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    assert main(["--optimizer", "adamw", "--report", str(tmp_path / "r"), "--save", str(ckpt), *FAST]) == 0
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(ckpt), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is torn" in err and str(ckpt) in err and "resume from an earlier checkpoint" in err


def _start(tmp_path, *extra):
    """asteria-train in a subprocess on a run long enough to be stopped from outside."""
    report = tmp_path / "report"
    cmd = [sys.executable, "-m", "asteria.train", "--optimizer", "adamw", "--report", str(report),
           "--no-plots", *FAST, "--steps", "5000", "--eval-every", "0", *extra]
    with default_signal_dispositions():  # the run must take the signals the tests send, however pytest was started
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, report / "metrics.jsonl"


def _wait_for_steps(proc, metrics, n, timeout=60.0):
    """Returns once the run has logged `n` steps; otherwise the test fails and the process is killed and reaped."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"asteria-train ended early ({proc.returncode}): {proc.stderr.read()}")
            if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
                return
            time.sleep(0.02)
        _, err, _ = stop(proc, signal.SIGKILL)
        pytest.fail(f"asteria-train did not reach step {n} in {timeout} s: {err[-2000:]}")
    except BaseException:
        if proc.poll() is None:
            stop(proc, signal.SIGKILL)
        raise


@pytest.mark.signals
def test_sigterm_stops_the_run_and_writes_the_checkpoint(tmp_path):
    """SIGTERM (a job scheduler's stop) is a first Ctrl-C: the run ends at the next step boundary,
    the --save checkpoint holds exactly the steps that ran, and the process exits 143 promptly."""
    from asteria.train.loop import load_checkpoint

    ckpt = tmp_path / "run.pt"
    proc, metrics = _start(tmp_path, "--save", str(ckpt))
    _wait_for_steps(proc, metrics, 3)
    _, err, took = stop(proc, signal.SIGTERM)
    assert proc.returncode == 143, err
    assert took < 15, f"{took:.1f} s from SIGTERM to exit"
    assert "SIGTERM: stopping after this step" in err
    steps = len(metrics.read_text().splitlines())
    ck = load_checkpoint(ckpt)
    assert 3 <= ck["step"] == steps < 5000
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["runs"][0]["status"] == "interrupted"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.signals
def test_a_run_started_with_sigint_ignored_keeps_ignoring_it_and_stops_on_sigterm(tmp_path):
    """A background job of a non-interactive shell (or ``nohup``) starts with SIGINT ignored: asteria-train leaves it
    ignored, as Python does, and SIGTERM still stops the run at a step boundary."""
    report = tmp_path / "report"
    metrics = report / "metrics.jsonl"
    cmd = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
           "import os; os.execv(sys.executable, [sys.executable, '-m', 'asteria.train', *sys.argv[1:]])",
           "--optimizer", "adamw", "--report", str(report), "--no-plots", *FAST, "--steps", "5000", "--eval-every", "0"]
    with default_signal_dispositions():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, metrics, 3)
    try:
        proc.send_signal(signal.SIGINT)
        before = len(metrics.read_text().splitlines())
        _wait_for_steps(proc, metrics, before + 3)  # still training
    except BaseException:
        stop(proc, signal.SIGKILL)
        raise
    _, err, took = stop(proc, signal.SIGTERM)
    assert proc.returncode == 143, err
    assert "Ctrl-C" not in err and "SIGTERM: stopping after this step" in err


@pytest.mark.signals
def test_a_second_sigterm_aborts_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """The second SIGTERM is sent as soon as the first is acknowledged. Wherever it lands (the rest of
    the step, the final checkpoint write, the report), the process ends at once and the checkpoint on
    disk is a complete one: the last periodic checkpoint or the final one, never torn."""
    from asteria.train.loop import load_checkpoint

    ckpt = tmp_path / "run.pt"
    proc, metrics = _start(tmp_path, "--save", str(ckpt), "--save-every", "2")
    try:
        _wait_for_steps(proc, metrics, 5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        err = []
        for line in proc.stderr:  # the first signal is acknowledged on stderr
            err.append(line)
            if "SIGTERM: stopping after this step" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=30)[1]
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(err) + rest
    assert proc.returncode in (130, 143, -signal.SIGTERM), err
    assert took < 15, f"{took:.1f} s from SIGTERM to exit"
    ck = load_checkpoint(ckpt)  # complete and verified
    assert ck["step"] >= 4
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
