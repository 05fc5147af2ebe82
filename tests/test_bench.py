"""scripts/bench.py keeps working: the whole suite on tiny sizes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
NAMES = [
    "load_vs_http",
    "load_vs_download_then_load",
    "scaling",
    "memory",
    "lookup",
    "rebalance",
    "balance",
    "publish",
]
TIMEOUT = 100.0


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_quick_tiny_run_prints_every_benchmark_and_cleans_up(tmp_path: Path) -> None:
    work, table = tmp_path / "work", tmp_path / "bench.md"
    argv = [sys.executable, str(BENCH), "--quick", "--tiny"]
    argv += ["--data", str(work), "--out-md", str(table)]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its helpers on SIGTERM
        out, err = proc.communicate(timeout=30)
        message = f"bench.py --tiny took over {TIMEOUT} s:\n{err[-3000:]}"
        raise AssertionError(message) from None
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["name"] for line in lines] == NAMES
    for line in lines:
        assert {"name", "value", "target", "met"} <= set(line), line
        if line["met"] is None:
            assert line["value"] is None and line["skipped"], line
        else:
            assert isinstance(line["met"], bool), line
            assert isinstance(line["value"], (int, float)), line
    text = table.read_text()
    assert all(f"| {name} |" in text for name in NAMES)
    assert not work.exists()  # the work folder is removed
    assert not processes_mentioning(str(tmp_path))  # every helper stopped
