"""scripts/chaos.py: a swarm under kills, restarts, joins, leaves and bit rot."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from p2pshard.hashing import hash_bytes, shard_key

ROOT = Path(__file__).resolve().parent.parent
CHAOS = ROOT / "scripts" / "chaos.py"
sys.path.insert(0, str(CHAOS.parent))

from chaos import ChaosPeer, flip_byte, is_good, owners, same_tree  # noqa: E402

RUN_DEADLINE = 120.0

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses POSIX signals"
)


def _run_chaos(tmp_path: Path, *args: str) -> tuple[int, dict[str, object], str]:
    proc = subprocess.Popen(
        [sys.executable, str(CHAOS), "--workdir", str(tmp_path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        out, err = proc.communicate(timeout=RUN_DEADLINE)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the script stop its peers; SIGKILL is the last resort.
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
        pytest.fail(f"chaos.py overran {RUN_DEADLINE:g} s:\n{err[-3000:]}")
    lines = out.strip().splitlines()
    assert len(lines) == 1, (out, err[-3000:])
    return proc.returncode, json.loads(lines[0]), err


@pytest.mark.timeout(180)
def test_tiny_chaos_run_loses_nothing(tmp_path: Path) -> None:
    code, report, err = _run_chaos(
        tmp_path,
        "--peers", "12", "--rounds", "3", "--faults-per-round", "2",
        "--model-mib", "4", "--seed", "5", "--settle-timeout", "60",
        "--schedule", "kill,corrupt,add,remove,restart,corrupt",
    )  # fmt: skip
    detail = f"{report}\n{err[-3000:]}"
    assert report["error"] is None, detail
    assert report["rounds"] == 3
    faults = report["faults"]
    assert isinstance(faults, dict)
    for kind in ("kill", "corrupt", "add", "remove", "restart"):
        assert faults.get(kind, 0) >= 1, detail
    assert report["loads_attempted"] == 4  # one per round and the final one
    assert report["loads_identical"] == report["loads_attempted"], detail
    assert report["shards_acknowledged"] > 4
    assert report["shards_lost"] == 0, detail
    assert report["settled"] is True, detail
    assert report["under_replicated"] == 0, detail
    assert report["under_replicated_on_disk"] == 0, detail
    assert report["leave_timeouts"] == 0, detail
    assert report["repair_flags"] is True and report["scrub_flag"] is True
    assert code == 0 and report["ok"] is True, detail
    # Nothing is left behind: the script's temp dir is gone.
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(CHAOS), "--peers", "2", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "--peers" in result.stderr
    result = subprocess.run(
        [sys.executable, str(CHAOS), "--schedule", "kill,meteor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "meteor" in result.stderr


def test_flipped_byte_is_seen_as_bad(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(5000)
    shard_id = hash_bytes(data)
    path = tmp_path / f"{shard_id}.{len(data)}"
    path.write_bytes(data)
    assert is_good(path, shard_id, len(data))
    assert flip_byte(path, random.Random(2))
    assert not is_good(path, shard_id, len(data))
    changed = [i for i, (a, b) in enumerate(zip(data, path.read_bytes())) if a != b]
    assert len(changed) == 1
    assert not is_good(tmp_path / "missing", shard_id, len(data))
    assert not flip_byte(tmp_path / "missing", random.Random(2))


def test_owners_are_the_k_closest_by_xor(tmp_path: Path) -> None:
    peers = [ChaosPeer(i, tmp_path / str(i), node_id=f"{i:040x}") for i in range(8)]
    shard_id = hash_bytes(b"x")
    chosen = owners(peers, shard_id, 3)
    assert len(chosen) == 3
    key = int.from_bytes(shard_key(shard_id), "big")
    distances = sorted(int(p.node_id, 16) ^ key for p in peers)
    assert [int(p.node_id, 16) ^ key for p in chosen] == distances[:3]


def test_same_tree_compares_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "f").write_bytes(b"abc")
    assert same_tree(a, b)
    (b / "sub" / "f").write_bytes(b"abd")
    assert not same_tree(a, b)
    (b / "sub" / "f").write_bytes(b"abc")
    (b / "extra").write_bytes(b"")
    assert not same_tree(a, b)
