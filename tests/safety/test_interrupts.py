"""Ctrl-C, full disks and bad output paths on the command line: one line, a clear exit code,
and never a half-written file."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import fxprune
from fxprune import cli_io
from fxprune.cli import main

NETS = """
import torch.nn as nn

def small():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))
"""
INTERRUPTED = "fxprune: interrupted; nothing was written"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding ``irnets/nets.py`` (factory ``small``), made the current folder."""
    (tmp_path / "irnets").mkdir()
    (tmp_path / "irnets" / "__init__.py").write_text("")
    (tmp_path / "irnets" / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    sys.modules.pop("irnets.nets", None)
    sys.modules.pop("irnets", None)


def _prune_args(out):
    return ["prune", "irnets.nets:small", "--input-size", "16", "--out", str(out)]


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_ctrl_c_during_the_prune_prints_one_line_exits_130_and_writes_nothing(workdir, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fxprune, "transform", interrupted)
    out = workdir / "pruned.pt"
    assert main(_prune_args(out)) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [INTERRUPTED]
    assert not out.exists() and _leftovers(workdir) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new file", "old file kept"])
def test_ctrl_c_while_saving_leaves_no_half_written_file(workdir, monkeypatch, capsys, existing):
    out = workdir / "pruned.pt"
    if existing:
        out.write_bytes(b"old model")

    def half_then_interrupt(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", half_then_interrupt)
    assert main(_prune_args(out)) == 130
    assert capsys.readouterr().err.splitlines() == [INTERRUPTED]
    assert (out.read_bytes() == b"old model") if existing else not out.exists()
    assert _leftovers(workdir) == []


def test_a_full_disk_while_saving_is_one_line_and_a_non_zero_exit(workdir, monkeypatch, capsys):
    out = workdir / "pruned.pt"

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", disk_full)
    assert main(_prune_args(out)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fxprune: error: --out {out}: writing failed: ")
    assert os.strerror(errno.ENOSPC) in lines[0] and "free some space" in lines[0]
    assert "nothing was written" in lines[0]
    assert not out.exists() and _leftovers(workdir) == []


def _never_prune(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the output path must be checked before pruning")
    monkeypatch.setattr(fxprune, "transform", fail)


def test_out_in_a_missing_folder_fails_before_pruning(workdir, monkeypatch, capsys):
    _never_prune(monkeypatch)
    out = workdir / "no_such_folder" / "pruned.pt"
    assert main(_prune_args(out)) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"fxprune: error: --out {out}: the folder {out.parent} does not exist; "
                                f"create it first (mkdir -p {out.parent}) or choose another path"]


def test_out_that_is_a_folder_fails_before_pruning(workdir, monkeypatch, capsys):
    _never_prune(monkeypatch)
    assert main(_prune_args(workdir)) == 2
    err = capsys.readouterr().err
    assert f"--out {workdir}: is a folder; give a file name" in err and len(err.splitlines()) == 1


def test_out_in_a_folder_that_refuses_new_files_fails_before_pruning(workdir, monkeypatch, capsys):
    _never_prune(monkeypatch)

    def refused(*args, **kwargs):  # what a read-only folder does (chmod is no test when run as root)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(cli_io.tempfile, "mkstemp", refused)
    assert main(_prune_args(workdir / "pruned.pt")) == 2
    err = capsys.readouterr().err
    assert f"cannot create a file in {workdir}" in err and "choose a folder you can write to" in err


def test_bench_json_path_is_checked_before_the_work(workdir, monkeypatch, capsys):
    _never_prune(monkeypatch)
    assert main(["bench", "irnets.nets:small", "--input-size", "16", "--json", str(workdir)]) == 2
    assert f"--json {workdir}: is a folder" in capsys.readouterr().err


def test_ctrl_c_during_bench_writes_no_json(workdir, monkeypatch, capsys):
    from fxprune import bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "compare", interrupted)
    out = workdir / "results" / "bench.json"
    assert main(["bench", "irnets.nets:small", "--input-size", "16", "--runs", "1", "--json", str(out)]) == 130
    assert capsys.readouterr().err.splitlines() == [INTERRUPTED]
    assert not out.exists()


SLOW_PRUNE = """
import sys, time
import fxprune
from fxprune.cli import main

def slow(*args, **kwargs):
    print("pruning", flush=True)
    time.sleep(120)

fxprune.transform = slow
sys.exit(main(sys.argv[1:]))
"""


def _sigint_as_at_a_terminal() -> None:
    """The child starts with SIGINT's default action, as a command typed at a terminal does: a
    test run launched in the background by a non-interactive shell has SIGINT ignored, and
    Python keeps an inherited ignore (then no Ctrl-C can reach the CLI, by design)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_a_real_sigint_gives_exit_130_and_no_traceback(workdir):
    (workdir / "slow_prune.py").write_text(textwrap.dedent(SLOW_PRUNE))
    out = workdir / "pruned.pt"
    proc = subprocess.Popen([sys.executable, "slow_prune.py", *_prune_args(out)], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)
    try:
        assert proc.stdout.readline().strip() == "pruning"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip() == INTERRUPTED and "Traceback" not in stderr
    assert not out.exists() and _leftovers(workdir) == []


# --- Ctrl-C while the command is still starting (importing torch) ------------------------------

INTERRUPT_ON_TORCH = """
import sys

class InterruptOnTorch:  # what a Ctrl-C while torch is being imported does
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, InterruptOnTorch())
from fxprune.launcher import main  # what the console script does
sys.exit(main(sys.argv[1:]))
"""

SAY_WHEN_TORCH_STARTS = """
import sys

class SayWhenTorchStarts:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", flush=True)
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, SayWhenTorchStarts())
from fxprune.launcher import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_console_script_is_the_light_launcher():
    import tomllib
    with open(os.path.join(os.path.dirname(fxprune.__file__), os.pardir, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["fxprune"] == "fxprune.launcher:main"
    code = "import sys, fxprune.launcher; print(sorted(m for m in ('torch', 'fxprune.cli') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


def test_ctrl_c_while_importing_torch_is_one_line_and_exit_130(workdir):
    out = workdir / "pruned.pt"
    res = subprocess.run([sys.executable, "-c", INTERRUPT_ON_TORCH, *_prune_args(out)], cwd=workdir,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 130, res.stderr
    assert res.stderr.splitlines() == [INTERRUPTED] and res.stdout == ""
    assert not out.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_a_real_sigint_during_start_up_gives_exit_130_and_no_traceback(workdir):
    out = workdir / "pruned.pt"
    proc = subprocess.Popen([sys.executable, "-c", SAY_WHEN_TORCH_STARTS, *_prune_args(out)], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)
    try:
        assert proc.stdout.readline().strip() == "importing torch"
        proc.send_signal(signal.SIGINT)  # torch takes a second or more to import: this lands in it
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip() == INTERRUPTED and "Traceback" not in stderr
    assert not out.exists()


def test_python_dash_m_fxprune_runs_the_launcher(workdir):
    res = subprocess.run([sys.executable, "-m", "fxprune", "prune", "no_such_net"], cwd=workdir,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("fxprune: error: unknown model 'no_such_net'")
