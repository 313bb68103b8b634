"""A plausible mistake gets one clear line and a non-zero exit, never a traceback (issue 13's list,
tried as a new user would). Real scans from ../shared/data/sxm; everything written goes under tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stm_agent.agent import cli_service
from stm_agent.agent.cli import app

REPO = Path(__file__).resolve().parents[1]
SMALL = "porphyrin_dimer_96_up_7ch.sxm"
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV)


def one_error_line(res, code: int = 2) -> str:
    """The run failed with ``code`` and printed ``error: ...`` on one line, without a traceback."""
    out = res.output
    assert res.exit_code == code, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


def test_version():
    from importlib.metadata import version

    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"stm-agent {version('stm-agent')}"


def test_flags_are_shown_as_flags_and_brackets_survive_help():
    res = invoke("refs", "add", "--help")
    assert res.exit_code == 0
    assert "<bool>" not in res.output
    px = next(ln for ln in res.output.splitlines() if ln.strip().startswith("--px "))
    assert px.split()[1] == "--at", px  # "--px  --at is in pixels ...", no type after the flag
    res = invoke("models", "export", "--help")
    assert res.exit_code == 0 and "--fp16 " in res.output and "<bool>" not in res.output


def test_recognize_folder_without_scans_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    res = invoke("recognize", str(tmp_path))
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"no scan (.sxm) in folder {tmp_path}" in res.output


def test_recognize_missing_file(tmp_path):
    res = invoke("recognize", str(tmp_path / "nope.sxm"))
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "nope.sxm" in res.output and "skipped" in res.output


@pytest.mark.parametrize("how", ["under a file", "read-only"])
def test_recognize_out_not_writable(sxm_dir, tmp_path, how):
    if how == "under a file":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "out"
    else:
        if os.geteuid() == 0:  # root writes into read-only folders: check the write error instead
            out = tmp_path / "ro"
            out.mkdir()

            def refuse(*a, **k):
                raise PermissionError(13, "Permission denied", str(out / "x.stm-agent.json"))

            import stm_agent.adapters.outputs as outputs

            mp = pytest.MonkeyPatch()
            mp.setattr(outputs, "write_result_files", refuse)
            try:
                res = invoke("recognize", str(sxm_dir / SMALL), "--out", str(out))
            finally:
                mp.undo()
            # one unwritable result does not stop the rest of the list: exit 1, one line, no traceback
            assert res.exit_code == 1 and "Traceback" not in res.output, res.output
            assert "not written " + str(out / "x.stm-agent.json") + ": Permission denied" in res.output
            return
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    line = one_error_line(invoke("recognize", str(sxm_dir / SMALL), "--out", str(out)))
    assert "--out is not a writable folder" in line


def test_threshold_out_of_range_names_the_option(sxm_dir):
    line = one_error_line(invoke("recognize", str(sxm_dir / SMALL), "--threshold", "5"))
    assert line.startswith("error: --threshold: match.threshold:") and "default.yaml" not in line


def test_config_file_error_names_the_file(tmp_path, sxm_dir):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("match:\n  threshold: 7\n")
    line = one_error_line(invoke("recognize", str(sxm_dir / SMALL), "--config", str(cfg)))
    assert f"{cfg}: match.threshold:" in line


def test_brackets_in_file_names_are_printed(sxm_dir, tmp_path):
    scan = tmp_path / "Image [red].sxm"
    shutil.copy(sxm_dir / SMALL, scan)
    res = invoke("recognize", str(scan), "--out", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert "Image [red].sxm" in res.output
    assert (tmp_path / "out" / "Image [red].stm-agent.json").is_file()


def test_brackets_in_error_messages_are_printed(tmp_path, monkeypatch):
    from stm_agent.adapters.store import ResultStore

    store = tmp_path / "results.sqlite"
    with ResultStore(store) as s:
        s.record_error("a" * 64, tmp_path / "x.sxm", "broken", name="x.sxm")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    line = one_error_line(invoke("results", "export", "--store", str(store), "--format", "parquet",
                                 "--out", str(tmp_path / "x.parquet")))
    assert 'pip install "stm-agent[parquet]"' in line


def test_listen_endpoint_without_scheme():
    line = one_error_line(invoke("listen", "--endpoint", "localhost:5556"))
    assert "did you mean tcp://localhost:5556?" in line


def test_listen_uses_the_configured_endpoint_and_says_so(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("publish:\n  endpoint: tcp://127.0.0.1:45999\n")
    res = invoke("listen", "--config", str(cfg), "--timeout", "0.3", "--count", "1")
    assert res.exit_code == 1
    assert "listening on tcp://127.0.0.1:45999" in res.output.splitlines()[0]
    assert "no frame from tcp://127.0.0.1:45999 in 0.3 s" in res.output


def test_models_export_without_the_export_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # find_spec() -> None: as if not installed
    line = one_error_line(invoke("models", "export", "--pretrained", "none", "--out", str(tmp_path / "m")))
    assert 'pip install "stm-agent[export]"' in line and "open_clip_torch" in line
    assert not (tmp_path / "m").exists()


def test_run_folder_that_does_not_exist(tmp_path):
    line = one_error_line(invoke("run", "--folder", str(tmp_path / "typo")))
    assert "--folder does not exist" in line
    assert not (tmp_path / "typo").exists()


def test_run_endpoint_without_scheme(tmp_path):
    line = one_error_line(invoke("run", "--folder", str(tmp_path), "--endpoint", "127.0.0.1:5556"))
    assert "did you mean tcp://127.0.0.1:5556?" in line


def test_results_export_into_a_closed_pipe_is_quiet(tmp_path):
    """``stm-agent results export | head``: the reader goes away; no error, no traceback."""
    from stm_agent.adapters.store import ResultStore

    store = tmp_path / "results.sqlite"
    with ResultStore(store) as s:
        for i in range(200):
            s.record_error(f"{i:064x}", tmp_path / f"scan{i}.sxm", "broken " * 20, name=f"scan{i}.sxm")
    p = subprocess.Popen([sys.executable, "-m", "stm_agent.agent.cli", "results", "export", "--store", str(store)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    p.stdout.read(100)  # `head -c 100`
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0, err
    assert err == "", err


def test_status_names_the_last_frame_the_pending_files_and_the_provider(capsys):
    reply = {"agent_id": "stm-1", "status": {
        "uptime_s": 5, "frames_done": 1, "errors": 0, "queue_depth": 0, "pending": 2,
        "pending_files": ["scan [1].sxm", "scan2.sxm"], "last_frame_id": "f" * 64,
        "last_frame_name": "Image [red].sxm", "last_frame_at": "2026-12-01T12:00:00+00:00",
        "model": {"encoder": "clip", "id": "clip-onnx/ViT-B-32/abc", "provider": "CPUExecutionProvider"},
        "reference_set": {"species": ["TCNE"]}, "sources": {}}}
    cli_service.console.width = 200
    cli_service._print_agent(reply, "tcp://127.0.0.1:5557")
    out = capsys.readouterr().out
    assert "Image [red].sxm at 2026-12-01" in out and "f" * 12 not in out
    assert "scan [1].sxm, scan2.sxm" in out
    assert "CPUExecutionProvider" in out


def test_ci_uses_its_own_venv_and_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "rm -rf .venv" not in ci and ".venv-ci" in ci
    cmd = next(ln for ln in ci.splitlines() if ln.startswith("python3 -m venv"))
    assert cmd in readme, "keep .ci/run's command equal to the README's test command"


def test_export_has_no_float_noise():
    from stm_agent.adapters.tables import _clean

    assert _clean(9.999996999999999) == 9.999997
    assert _clean(9.999997 * 9.999997) == 99.99994  # 99.999940000009 before
    assert _clean(float("nan")) is None and _clean(3) == 3 and _clean("a") == "a"


def test_evaluate_without_the_plots_extra(labelled_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    line = one_error_line(invoke("evaluate", str(labelled_dir / "sparse"), "--out", str(tmp_path / "ev")))
    assert 'pip install "stm-agent[plots]"' in line


def test_truncated_file_is_reported_at_once_and_named_as_pending(sxm_dir, tmp_path, caplog):
    """A scan that stops growing short of its size is logged when it stops (after settle_s), not
    after complete_timeout_s (600 s by default); the folder source names it as pending."""
    import logging
    import time

    from stm_agent.adapters.folder import FolderSource
    from stm_agent.agent.config import AcquisitionConfig

    caplog.set_level(logging.WARNING, logger="stm_agent.adapters.folder")
    acq = tmp_path / "acq"
    acq.mkdir()
    data = (sxm_dir / SMALL).read_bytes()
    src = FolderSource(AcquisitionConfig(folder=acq, settle_s=0.3, complete_timeout_s=600), check_interval_s=0.05)
    src.start()
    try:
        (acq / "cut [1].sxm").write_bytes(data[: len(data) // 2])
        end = time.monotonic() + 10
        while "waiting up to 600 s" not in caplog.text and time.monotonic() < end:
            time.sleep(0.05)
        assert f"cut [1].sxm: incomplete ({len(data) // 2} of the {len(data)} bytes its header announces)" \
            in caplog.text, caplog.text
        assert [p.name for p in src.pending()] == ["cut [1].sxm"]
        assert caplog.text.count("incomplete (") == 1  # once, not at every check
    finally:
        src.stop()


def test_run_start_line_names_the_folder_the_endpoint_and_where_the_encoder_runs(tmp_path, monkeypatch):
    from stm_agent.agent.daemon import Agent

    monkeypatch.setattr(Agent, "run", lambda self: None)  # the start line only, no service loop
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"results:\n  store: {tmp_path / 'r.sqlite'}\n"
                   "publish:\n  endpoint: tcp://127.0.0.1:*\n  query_endpoint: null\n")
    res = invoke("run", "--config", str(cfg), "--folder", str(tmp_path))
    assert res.exit_code == 0, res.output
    line = res.output.splitlines()[0]
    assert f"watching {tmp_path.resolve()}" in line and "publishing on tcp://127.0.0.1:*" in line
    assert "encoder pixel" in line and "on the CPU (numpy; no onnxruntime model)" in line, line
