#!/usr/bin/env python3
"""Benchmarks of p2pshard against the baselines users have today, side by side.

    python scripts/bench.py                  # everything, about 1 GiB; < 10 min
    python scripts/bench.py --quick          # smaller sizes; < 2 min
    python scripts/bench.py --only load_vs_http,memory --out-md bench.md

Each benchmark runs in this process tree (helper processes are this script in
another mode, or ``python -m p2pshard peer``), measures p2pshard and its
baseline in the same run, alternating, and reports the ratio of medians of
``--runs`` runs (at least 3; by default 3, and 7 for the one-second load
benchmarks) because shared machines are noisy. It prints one
JSON line per benchmark (``name``, ``value``, ``target``, ``met`` and the raw
figures) and writes a Markdown table (``--out-md``, default
``bench-results.md``) for the README. A benchmark that cannot run here prints
``"skipped": "<reason>"`` and ``met: null``.

Benchmarks (targets from issue 4):

- ``load_vs_http``: a fresh client loads the model into arrays from a 4-peer
  swarm (k=3), every byte verified, against one aiohttp static server streamed
  into memory unverified. p2pshard / baseline <= 1.0. The baseline is the
  fastest aiohttp client found: ``iter_any`` copied into a buffer the kernel
  populated up front (its ratio against a plain ``bytearray`` is reported
  too; ``await resp.read()`` is about twice as slow as either).
- ``load_vs_download_then_load``: against downloading the file from that server
  to disk, then ``safetensors.numpy.load_file``. p2pshard / baseline <= 0.5.
- ``scaling``: sources in network namespaces, egress capped with tc; load time
  with 1, 2, 4, 8 sources and with caps of 100, 200 and 400 Mbit/s against
  bytes / sum of caps (published with 4 MiB shards, k = min(3, sources)).
  Efficiency >= 0.9 everywhere. Each point also reports the bytes each source
  served; with equal caps, ``placement_bound`` is the efficiency the busiest
  source allows (mean / max of what the sources hold and can serve).
- ``memory``: peak RSS of a load into arrays <= model + 100 MiB over idle; of a
  load to a file <= 200 MiB over idle.
- ``lookup``: 64 peers: owner lookups p50/p95 latency and hops (<= log2 64);
  owners of 1000 shards in < 10x one lookup.
- ``rebalance``: a 17th peer joins 16 holding 2000 shards at k=3: bytes moved
  by one repair pass of every peer / (k/17 of the data) <= 1.3, beside what
  ``hash mod N`` placement would move.
- ``balance``: bytes held per peer, max / mean, at 16 peers, k=3, 2000 shards
  <= 1.5.
- ``publish``: publishing with k=3 against writing the bytes three times to
  local disk with fsync: ratio <= 1.5.

Peers and servers never share an event loop (or a process) with the loader
being measured. Everything binds 127.0.0.1 except the scaling lab, whose
addresses exist only inside the namespaces it creates. Every helper process is
stopped by PID and every file removed on exit (``--keep`` keeps the data).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import math
import mmap
import os
import platform
import random
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from swarm import LocalSwarm  # noqa: E402

from p2pshard import Client, Peer, Settings  # noqa: E402
from p2pshard.dht import Dht, parse_address  # noqa: E402
from p2pshard.formats.safetensors import parse_bytes, tensor_view, write_file  # noqa: E402
from p2pshard.hashing import shard_key  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
NAME = "bench/model"
SCALING_SHARD_MIB = 4  # small enough that 8 sources each serve several shards
READY_TIMEOUT = 120.0
CHILD_TIMEOUT = 600.0
STOP_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
BENCHMARKS = (
    "load_vs_http",
    "load_vs_download_then_load",
    "scaling",
    "memory",
    "lookup",
    "rebalance",
    "balance",
    "publish",
)


@dataclass(frozen=True)
class Profile:
    """Sizes of one run of the suite."""

    model: int  # bytes of the synthetic checkpoint
    publish: int  # bytes published per publish run
    scaling: int  # bytes loaded per scaling point
    scaling_sources: tuple[int, ...]
    scaling_mixed: tuple[float, ...]  # Mbit/s caps of the mixed point
    lookup_peers: int
    lookups: int
    placement_peers: int
    placement_shards: int
    placement_shard_bytes: int
    runs: int
    load_runs: int  # the load benchmarks take about a second a run: more of them


PROFILES = {
    "default": Profile(
        model=GIB,
        publish=512 * MIB,
        scaling=512 * MIB,
        scaling_sources=(1, 2, 4, 8),
        scaling_mixed=(100.0, 200.0, 400.0),
        lookup_peers=64,
        lookups=200,
        placement_peers=16,
        placement_shards=2000,
        placement_shard_bytes=64 * 1024,
        runs=3,
        load_runs=7,
    ),
    "quick": Profile(
        model=256 * MIB,
        publish=128 * MIB,
        scaling=64 * MIB,
        scaling_sources=(1, 2, 4, 8),
        scaling_mixed=(100.0, 200.0, 400.0),
        lookup_peers=64,
        lookups=100,
        placement_peers=16,
        placement_shards=2000,
        placement_shard_bytes=16 * 1024,
        runs=3,
        load_runs=5,
    ),
    "tiny": Profile(  # only to test this script: figures mean nothing
        model=8 * MIB,
        publish=4 * MIB,
        scaling=4 * MIB,
        scaling_sources=(1,),
        scaling_mixed=(100.0, 400.0),
        lookup_peers=8,
        lookups=10,
        placement_peers=16,
        placement_shards=200,
        placement_shard_bytes=4096,
        runs=3,
        load_runs=3,
    ),
}


def log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def result(
    name: str, value: float | None, target: str, met: bool | None, **raw: Any
) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target, "met": met, **raw}


def skipped(name: str, target: str, why: str) -> dict[str, Any]:
    return result(name, None, target, None, skipped=why)


# --- the synthetic checkpoint ---------------------------------------------------


def llm_arrays(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Tensors shaped like a decoder-only LLM, about ``size`` bytes in all:
    BF16 embedding and matrices, F32 norms and biases, random bits."""
    rng = np.random.default_rng(seed)
    hidden = 2048 if size >= 512 * MIB else 1024 if size >= 64 * MIB else 256
    vocab, mlp = 16 * hidden, 11 * hidden // 4

    def tensor(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        count = math.prod(shape) * np.dtype(dtype).itemsize
        return np.frombuffer(rng.bytes(count), dtype=dtype).reshape(shape)

    bf16 = ml_dtypes.bfloat16
    arrays = {"model.embed_tokens.weight": tensor((vocab, hidden), bf16)}
    total = arrays["model.embed_tokens.weight"].nbytes
    layer = 0
    while total < size:
        p = f"model.layers.{layer}"
        layer_arrays = {
            f"{p}.input_layernorm.weight": tensor((hidden,), np.float32),
            f"{p}.self_attn.q_proj.weight": tensor((hidden, hidden), bf16),
            f"{p}.self_attn.q_proj.bias": tensor((hidden,), np.float32),
            f"{p}.self_attn.k_proj.weight": tensor((hidden, hidden), bf16),
            f"{p}.self_attn.k_proj.bias": tensor((hidden,), np.float32),
            f"{p}.self_attn.v_proj.weight": tensor((hidden, hidden), bf16),
            f"{p}.self_attn.v_proj.bias": tensor((hidden,), np.float32),
            f"{p}.self_attn.o_proj.weight": tensor((hidden, hidden), bf16),
            f"{p}.post_attention_layernorm.weight": tensor((hidden,), np.float32),
            f"{p}.mlp.gate_proj.weight": tensor((mlp, hidden), bf16),
            f"{p}.mlp.up_proj.weight": tensor((mlp, hidden), bf16),
            f"{p}.mlp.down_proj.weight": tensor((hidden, mlp), bf16),
        }
        if total + sum(a.nbytes for a in layer_arrays.values()) > size * 1.1:
            # Top up with a smaller last block rather than overshoot.
            rows = max(1, (size - total) // (2 * hidden))
            layer_arrays = {f"{p}.mlp.up_proj.weight": tensor((rows, hidden), bf16)}
        arrays.update(layer_arrays)
        total += sum(a.nbytes for a in layer_arrays.values())
        layer += 1
    arrays["model.norm.weight"] = tensor((hidden,), np.float32)
    arrays["lm_head.bias"] = tensor((vocab,), np.float32)
    return arrays


def write_model(path: Path, size: int, seed: int = 0) -> Path:
    if not path.exists():
        log(f"writing a {size / MIB:.0f} MiB synthetic checkpoint to {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_file(tmp, llm_arrays(size, seed), {"format": "pt"})
        os.replace(tmp, path)
    return path


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as handle:
        while block := handle.read(16 * MIB):
            digest.update(block)
    return digest.hexdigest()


def anonymous(size: int) -> np.ndarray:
    """Fresh zeroed memory populated by the kernel, as the loader allocates it."""
    if size == 0:
        return np.empty(0, np.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), np.uint8)


# --- helper processes -------------------------------------------------------------


class Child:
    """This script in a helper mode, in its own session; stopped by PID.

    A helper prints one JSON line when ready (or when done) and runs until its
    stdin closes.
    """

    def __init__(
        self, argv: list[str], popen: Callable[..., Any] | None = None
    ) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
        start = popen or (lambda c, **kw: subprocess.Popen(c, **kw))
        self.proc: subprocess.Popen[bytes] = start(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )

    def line(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """The next JSON line the helper prints."""
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise RuntimeError(
                    f"helper {self.proc.args[2:4]} silent for {timeout} s"
                )
        text = self.proc.stdout.readline()
        if not text:
            code = self.proc.wait(timeout=KILL_TIMEOUT)
            raise RuntimeError(f"helper {self.proc.args[2:4]} exited with {code}")
        return json.loads(text)

    def stop(self) -> None:
        proc = self.proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=KILL_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def until_stdin_closes() -> None:
    sys.stdin.buffer.read()


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def child_static(args: argparse.Namespace) -> int:
    """The baseline: one aiohttp static file server (sendfile)."""
    from aiohttp import web

    async def serve() -> None:
        app = web.Application()
        app.router.add_static("/", args.root)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        emit({"port": port})
        try:
            await asyncio.to_thread(until_stdin_closes)
        finally:
            await runner.cleanup()

    asyncio.run(serve())
    return 0


def child_peers(args: argparse.Namespace) -> int:
    """``--count`` peers in this one process (for DHT figures)."""

    async def serve() -> None:
        settings = Settings(repair_interval=3600.0, repair_delay=3600.0)
        peers: list[Peer] = []
        try:
            for index in range(args.count):
                bootstrap = [p.address for p in peers[:2]]
                peer = Peer(
                    Path(args.data) / f"peer-{index}", bootstrap=bootstrap,
                    settings=settings,
                )  # fmt: skip
                await peer.start()
                peers.append(peer)
            # Every peer looks itself up once more, so early peers learn late ones.
            await asyncio.gather(
                *(p.dht.closest(p.node_id, settings.dht_ksize) for p in peers)
            )
            emit({"addresses": [p.address for p in peers]})
            await asyncio.to_thread(until_stdin_closes)
        finally:
            await asyncio.gather(*(p.stop(handoff=False) for p in peers))

    asyncio.run(serve())
    return 0


def child_placement(args: argparse.Namespace) -> int:
    """16 peers, shards published at k=3, then a 17th joins: bytes per peer and
    bytes one repair pass of every peer moves. Peers and client share this
    process: only bytes are measured here, not time."""

    async def run() -> dict[str, Any]:
        settings = Settings(
            replicas=args.replicas,
            shard_size=args.shard_bytes,
            repair_interval=3600.0,
            repair_delay=3600.0,
            rpc_timeout=1.0,
        )
        root = Path(args.data)
        peers: list[Peer] = []
        try:
            for index in range(args.peers + 1):
                if index == args.peers:
                    balance = [p.store.total_bytes for p in peers]
                await _add_peer(peers, root / f"peer-{index}", settings)
                if index == args.peers - 1:
                    await _publish_blob(peers, settings, args.shards)
            stats = await asyncio.gather(*(p.repair_once() for p in peers))
            again = await asyncio.gather(*(p.repair_once() for p in peers))
            shard_ids = [i for i, _ in peers[0].store.items()]
            for p in peers[1:]:
                shard_ids += [i for i, _ in p.store.items()]
            return {
                "bytes_per_peer": balance,
                "moved_bytes": sum(s.bytes_pushed for s in stats),
                "moved_copies": sum(s.pushed for s in stats),
                "second_pass_bytes": sum(s.bytes_pushed for s in again),
                "newcomer_bytes": peers[-1].store.total_bytes,
                "shard_ids": sorted(set(shard_ids)),
            }
        finally:
            await asyncio.gather(*(p.stop(handoff=False) for p in peers))

    emit(asyncio.run(run()))
    return 0


async def _add_peer(peers: list[Peer], data: Path, settings: Settings) -> None:
    peer = Peer(data, bootstrap=[p.address for p in peers[:2]], settings=settings)
    await peer.start()
    peers.append(peer)
    await asyncio.gather(*(p.dht.closest(p.node_id, settings.dht_ksize) for p in peers))


async def _publish_blob(peers: list[Peer], settings: Settings, shards: int) -> None:
    data = np.frombuffer(
        np.random.default_rng(3).bytes(shards * settings.shard_size), np.uint8
    )
    async with Client([p.address for p in peers[:2]], settings) as client:
        result = await client.publish({"blob": data}, "bench/placement")
    log(f"placement: published {result.shards} shards to {len(peers)} peers")


def child_memload(args: argparse.Namespace) -> int:
    """One load in a fresh process: its idle and peak resident memory."""

    async def run() -> dict[str, Any]:
        async with Client(args.bootstrap, Settings()) as client:
            idle = _status_kib("VmRSS")
            began = time.perf_counter()
            if args.mode == "arrays":
                arrays = await client.load(args.name)
                nbytes = sum(a.nbytes for a in arrays.values())
                del arrays
            else:
                stats = await client.load_to(args.name, args.out, overwrite=True)
                nbytes = stats.bytes
            seconds = time.perf_counter() - began
        return {
            "idle_mib": idle / 1024,
            "peak_mib": _status_kib("VmHWM") / 1024,
            "bytes": nbytes,
            "seconds": seconds,
        }

    emit(asyncio.run(run()))
    return 0


def child_netload(args: argparse.Namespace) -> int:
    """Loads inside the scaling lab: one warm-up, then ``--runs`` timed loads."""

    served: list[int] = []

    async def one() -> float:
        began = time.perf_counter()
        async with Client(args.bootstrap, Settings()) as client:
            arrays = await client.load(args.name)
            served[:] = sorted(client.transfer.served.values())
        seconds = time.perf_counter() - began
        del arrays
        return seconds

    times = [asyncio.run(one()) for _ in range(args.runs + 1)][1:]
    emit({"times": times, "served": served})
    return 0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --- the measured operations --------------------------------------------------------


def p2p_load(
    bootstrap: str, name: str, check: dict[str, np.ndarray] | None = None
) -> float:
    """A fresh client loads every tensor into arrays: seconds, all included."""

    async def run() -> float:
        began = time.perf_counter()
        async with Client(bootstrap, Settings()) as client:
            arrays = await client.load(name)
        seconds = time.perf_counter() - began
        if check is not None:
            assert set(arrays) == set(check), "tensor names differ"
            for key, want in check.items():
                assert arrays[key].tobytes() == want.tobytes(), key
        return seconds

    return asyncio.run(run())


def http_load(url: str, size: int, populated: bool = True) -> float:
    """One aiohttp stream into fresh memory, then array views: no verification.

    The fastest way found to stream into memory with aiohttp: ``iter_any``
    copied into a preallocated buffer. ``populated``: the buffer is populated
    by the kernel up front, as the loader's is (so the comparison is about the
    transfer alone); else a plain ``bytearray`` (zero-filled by Python). Both
    beat ``await resp.read()`` (about 2x slower here) and a lazily faulted
    buffer.
    """
    import aiohttp

    async def run() -> float:
        began = time.perf_counter()
        buffer = (
            anonymous(size) if populated else np.frombuffer(bytearray(size), np.uint8)
        )
        view = memoryview(buffer)
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.get(url) as resp:
                resp.raise_for_status()
                position = 0
                async for piece in resp.content.iter_any():
                    view[position : position + len(piece)] = piece
                    position += len(piece)
        assert position == size, f"short download: {position} of {size}"
        header = parse_bytes(view)
        arrays = {
            t.name: tensor_view(buffer, header.data_offset + t.start, t)
            for t in header.tensors
        }
        assert len(arrays) == len(header.tensors)
        return time.perf_counter() - began

    return asyncio.run(run())


def http_download_then_load(url: str, out: Path) -> float:
    """Download to a file (as a model hub client does), then load_file it."""
    import aiohttp
    from safetensors.numpy import load_file

    async def download() -> None:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.get(url) as resp:
                resp.raise_for_status()
                with open(out, "wb") as handle:
                    async for piece in resp.content.iter_chunked(4 * MIB):
                        handle.write(piece)

    began = time.perf_counter()
    asyncio.run(download())
    arrays = load_file(out)
    seconds = time.perf_counter() - began
    assert arrays
    out.unlink()
    return seconds


def write_three_times(source: Path, folder: Path) -> float:
    """The publish baseline: the same bytes written three times, fsynced."""
    began = time.perf_counter()
    for copy in range(3):
        target = folder / f"copy-{copy}"
        with open(source, "rb") as src, open(target, "wb") as dst:
            while block := src.read(16 * MIB):
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
    seconds = time.perf_counter() - began
    for copy in range(3):
        (folder / f"copy-{copy}").unlink()
    return seconds


def p2p_publish(bootstrap: str, source: Path, run: int = 0) -> float:
    async def publish() -> float:
        began = time.perf_counter()
        async with Client(bootstrap, Settings()) as client:
            await client.publish(source, NAME if not run else f"{NAME}-{run}")
        return time.perf_counter() - began

    return asyncio.run(publish())


def alternate(
    runs: int, first: Callable[[], float], second: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Time two operations side by side, alternating which goes first."""
    a, b = [], []
    for index in range(runs):
        if index % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


# --- the suite --------------------------------------------------------------------


class Bench:
    """Shared set-up of one run: the checkpoint, a swarm holding it, a server."""

    def __init__(self, args: argparse.Namespace, profile: Profile, root: Path) -> None:
        self.args = args
        self.profile = profile
        self.root = root
        self.stack = contextlib.ExitStack()
        self._model: Path | None = None
        self._swarm: LocalSwarm | None = None
        self._server_port: int | None = None
        self._peer_log: IO[Any] | None = None

    def close(self) -> None:
        self.stack.close()

    def peer_log(self) -> IO[Any]:
        """Where helper peers' stderr goes (a file in the work folder)."""
        if self._peer_log is None:
            self._peer_log = self.stack.enter_context(
                open(self.root / "peers.log", "ab")
            )
        return self._peer_log

    @property
    def runs(self) -> int:
        return max(3, self.args.runs or self.profile.runs)

    @property
    def load_runs(self) -> int:
        return max(3, self.args.runs or self.profile.load_runs)

    def model(self) -> Path:
        if self._model is None:
            self._model = write_model(
                self.root / "model.safetensors", self.profile.model
            )
        return self._model

    def swarm(self) -> LocalSwarm:
        """Four peers (processes) holding the model at k=3."""
        if self._swarm is None:
            model = self.model()
            swarm = LocalSwarm(
                4, data=self.root / "swarm", log=None, stderr=self.peer_log()
            )
            self.stack.enter_context(swarm)
            self._swarm = swarm
            log("publishing the checkpoint to 4 peers, k=3")
            seconds = p2p_publish(swarm.bootstrap, model)
            log(f"published in {seconds:.1f} s")
            p2p_load(swarm.bootstrap, NAME, check=_arrays_of(model))  # verify once
        return self._swarm

    def server(self) -> str:
        """URL of the model on one aiohttp static server."""
        if self._server_port is None:
            model = self.model()
            child = self.stack.enter_context(
                Child(["_static", "--root", str(model.parent)])
            )
            self._server_port = int(child.line()["port"])
        return f"http://127.0.0.1:{self._server_port}/{self.model().name}"


def _arrays_of(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def bench_load_vs_http(bench: Bench) -> dict[str, Any]:
    swarm, url = bench.swarm(), bench.server()
    size = bench.model().stat().st_size
    p2p_load(swarm.bootstrap, NAME)  # warm up all three
    http_load(url, size)
    http_load(url, size, populated=False)
    mine, theirs, plain = [], [], []
    for index in range(bench.load_runs):  # rotate the order: no one always goes first
        steps = [
            lambda: mine.append(p2p_load(swarm.bootstrap, NAME)),
            lambda: theirs.append(http_load(url, size)),
            lambda: plain.append(http_load(url, size, populated=False)),
        ]
        for step in steps[index % 3 :] + steps[: index % 3]:
            step()
    ratio = median(mine) / median(theirs)
    return result(
        "load_vs_http",
        round(ratio, 3),
        "<= 1.0",
        ratio <= 1.0,
        bytes=size,
        p2pshard_s=_round(mine),
        baseline_s=_round(theirs),
        p2pshard_gb_s=round(size / median(mine) / 1e9, 2),
        baseline_gb_s=round(size / median(theirs) / 1e9, 2),
        baseline_bytearray_s=_round(plain),
        ratio_vs_bytearray=round(median(mine) / median(plain), 3),
    )


def bench_load_vs_download(bench: Bench) -> dict[str, Any]:
    swarm, url = bench.swarm(), bench.server()
    size = bench.model().stat().st_size
    out = bench.root / "downloaded.safetensors"
    p2p_load(swarm.bootstrap, NAME)
    mine, theirs = alternate(
        bench.load_runs,
        lambda: p2p_load(swarm.bootstrap, NAME),
        lambda: http_download_then_load(url, out),
    )
    ratio = median(mine) / median(theirs)
    return result(
        "load_vs_download_then_load",
        round(ratio, 3),
        "<= 0.5 (2x faster)",
        ratio <= 0.5,
        bytes=size,
        p2pshard_s=_round(mine),
        baseline_s=_round(theirs),
        speedup=round(1 / ratio, 2),
    )


def bench_memory(bench: Bench) -> dict[str, Any]:
    swarm = bench.swarm()
    size = bench.model().stat().st_size
    out = bench.root / "memory-out.safetensors"
    figures: dict[str, list[dict[str, Any]]] = {"arrays": [], "file": []}
    for _ in range(bench.runs):
        for mode in ("arrays", "file"):
            argv = ["_memload", "--bootstrap", swarm.bootstrap, "--name", NAME]
            argv += ["--mode", mode, "--out", str(out)]
            with Child(argv) as child:
                figures[mode].append(child.line(CHILD_TIMEOUT))
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    over = {
        mode: median([f["peak_mib"] - f["idle_mib"] for f in runs])
        for mode, runs in figures.items()
    }
    arrays_limit = size / MIB + 100
    met = over["arrays"] <= arrays_limit and over["file"] <= 200
    return result(
        "memory",
        round(over["file"], 1),
        f"file <= 200 MiB over idle; arrays <= model + 100 ({arrays_limit:.0f}) MiB",
        met,
        model_mib=round(size / MIB, 1),
        arrays_over_idle_mib=round(over["arrays"], 1),
        file_over_idle_mib=round(over["file"], 1),
        idle_mib=round(median([f["idle_mib"] for f in figures["file"]]), 1),
        file_peak_mib=round(median([f["peak_mib"] for f in figures["file"]]), 1),
    )


def bench_publish(bench: Bench) -> dict[str, Any]:
    size = bench.profile.publish
    sources = [
        write_model(bench.root / f"publish-{run}.safetensors", size, 10 + run)
        for run in range(bench.runs)
    ]
    folder = bench.root / "publish-baseline"
    folder.mkdir(exist_ok=True)
    mine: list[float] = []
    theirs: list[float] = []
    # Each run publishes a model of its own (random bytes: no shard is held
    # already) to one swarm of 4 peers; the baseline writes that model's bytes.
    with LocalSwarm(
        4, data=bench.root / "publish-swarm", log=None, stderr=bench.peer_log()
    ) as swarm:
        for run, source in enumerate(sources):
            if run % 2:
                theirs.append(write_three_times(source, folder))
            mine.append(p2p_publish(swarm.bootstrap, source, run))
            if not run % 2:
                theirs.append(write_three_times(source, folder))
    ratio = median(mine) / median(theirs)
    nbytes = sources[0].stat().st_size
    return result(
        "publish",
        round(ratio, 3),
        "<= 1.5",
        ratio <= 1.5,
        bytes=nbytes,
        p2pshard_s=_round(mine),
        baseline_s=_round(theirs),
        p2pshard_mb_s=round(nbytes / median(mine) / 1e6, 1),
    )


def bench_lookup(bench: Bench) -> dict[str, Any]:
    count = bench.profile.lookup_peers
    data = bench.root / "lookup-peers"
    with Child(["_peers", "--count", str(count), "--data", str(data)]) as child:
        addresses = child.line(CHILD_TIMEOUT)["addresses"]
        figures = asyncio.run(_lookups(addresses, bench.profile.lookups, bench.runs))
    shutil.rmtree(data, ignore_errors=True)
    limit = math.ceil(math.log2(count))
    ratio = figures["many_s"] / figures["one_p50_s"]
    met = figures["hops_max"] <= limit and ratio < 10
    return result(
        "lookup",
        round(ratio, 2),
        f"1000 owners < 10x one lookup; hops <= {limit}",
        met,
        peers=count,
        **figures,
    )


async def _lookups(addresses: list[str], lookups: int, runs: int) -> dict[str, Any]:
    settings = Settings()
    dht = Dht(settings)
    host, _ = parse_address(addresses[0])
    await dht.start(host, 0)
    try:
        await dht.bootstrap([parse_address(a) for a in addresses[:2]])
        rng = random.Random(7)
        times, hops = [], []
        for _ in range(lookups):
            key = rng.randbytes(20)
            began = time.perf_counter()
            _, rounds = await dht.lookup(key, settings.replicas)
            times.append(time.perf_counter() - began)
            hops.append(rounds)
        many = []
        for _ in range(runs):
            keys = [shard_key(rng.randbytes(32).hex()) for _ in range(1000)]
            began = time.perf_counter()
            owners = await dht.closest_many(keys, settings.replicas)
            many.append(time.perf_counter() - began)
            assert len(owners) == len(set(keys))
    finally:
        await dht.stop()
    times.sort()
    return {
        "one_p50_s": round(times[len(times) // 2], 5),
        "one_p95_s": round(times[int(len(times) * 0.95)], 5),
        "hops_p50": sorted(hops)[len(hops) // 2],
        "hops_p95": sorted(hops)[int(len(hops) * 0.95)],
        "hops_max": max(hops),
        "many_s": round(median(many), 4),
        "many_runs_s": _round(many),
    }


class Placement:
    """One run of the placement helper, shared by rebalance and balance."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self._figures: dict[str, Any] | None = None

    def figures(self) -> dict[str, Any]:
        if self._figures is None:
            p = self.bench.profile
            data = self.bench.root / "placement"
            argv = ["_placement", "--peers", str(p.placement_peers)]
            argv += ["--shards", str(p.placement_shards), "--replicas", "3"]
            argv += ["--shard-bytes", str(p.placement_shard_bytes), "--data", str(data)]
            with Child(argv) as child:
                self._figures = child.line(CHILD_TIMEOUT)
            shutil.rmtree(data, ignore_errors=True)
        return self._figures


def bench_rebalance(bench: Bench, placement: Placement) -> dict[str, Any]:
    f = placement.figures()
    p = bench.profile
    k, n = 3, p.placement_peers
    unique = len(f["shard_ids"]) * p.placement_shard_bytes
    ideal = k * unique / (n + 1)
    ratio = f["moved_bytes"] / ideal
    modn = _mod_n_moved(f["shard_ids"], n, k) * p.placement_shard_bytes
    return result(
        "rebalance",
        round(ratio, 3),
        "<= 1.3",
        ratio <= 1.3,
        moved_bytes=f["moved_bytes"],
        ideal_bytes=round(ideal),
        hash_mod_n_bytes=modn,
        hash_mod_n_over_ideal=round(modn / ideal, 2),
        newcomer_bytes=f["newcomer_bytes"],
        second_pass_bytes=f["second_pass_bytes"],
    )


def _mod_n_moved(shard_ids: list[str], n: int, k: int) -> int:
    """Copies that move when ``hash mod N`` placement goes from n to n+1 peers."""
    moved = 0
    for shard_id in shard_ids:
        h = int.from_bytes(shard_key(shard_id), "big")
        before = {(h + i) % n for i in range(k)}
        after = {(h + i) % (n + 1) for i in range(k)}
        moved += len(after - before)
    return moved


def bench_balance(bench: Bench, placement: Placement) -> dict[str, Any]:
    held = placement.figures()["bytes_per_peer"]
    mean = sum(held) / len(held)
    spread = max(held) / mean
    return result(
        "balance",
        round(spread, 3),
        "<= 1.5",
        spread <= 1.5,
        peers=len(held),
        max_bytes=max(held),
        min_bytes=min(held),
        mean_bytes=round(mean),
    )


def bench_scaling(bench: Bench) -> dict[str, Any]:
    target = ">= 0.9 at every point"
    try:
        from netns import available
    except ImportError:
        return skipped("scaling", target, "scripts/netns.py is missing")
    ok, why = available()
    if not ok:
        return skipped("scaling", target, why)
    if shutil.which("tc") is None:
        return skipped("scaling", target, "`tc` is not installed")
    p = bench.profile
    model = write_model(bench.root / "scaling.safetensors", p.scaling, 2)
    points: list[dict[str, Any]] = []
    for sources in p.scaling_sources:
        points.append(_scaling_point(bench, model, [400.0] * sources))
    points.append(_scaling_point(bench, model, list(p.scaling_mixed)))
    worst = min(pt["efficiency"] for pt in points)
    return result(
        "scaling",
        round(worst, 3),
        target,
        worst >= 0.9,
        bytes=model.stat().st_size,
        points=points,
    )


def _scaling_point(bench: Bench, model: Path, caps: list[float]) -> dict[str, Any]:
    from netns import NetnsLab

    size = model.stat().st_size
    data = bench.root / f"scaling-{len(caps)}-{int(sum(caps))}"
    k = min(3, len(caps))
    with NetnsLab() as lab:
        loader = lab.add_host("loader")
        peers = []
        for index, cap in enumerate(caps):
            host = lab.add_host(f"s{index}", egress_mbit=cap)
            argv = [sys.executable, "-m", "p2pshard", "peer", "--json"]
            argv += ["--host", host.address, "--port", "7000"]
            argv += ["--data", str(data / f"peer-{index}"), "--replicas", str(k)]
            for other in peers[:2]:
                argv += ["--bootstrap", f"{other.address}:7000"]
            proc = lab.popen(
                host, argv, stdout=subprocess.PIPE, stderr=bench.peer_log()
            )
            _wait_ready_line(proc)
            peers.append(host)
        bootstrap = f"{peers[0].address}:7000"
        publish = [sys.executable, "-m", "p2pshard", "publish", str(model)]
        publish += ["--name", NAME, "--bootstrap", bootstrap, "--replicas", str(k)]
        publish += ["--shard-size", str(SCALING_SHARD_MIB)]
        published = lab.run(loader, publish, timeout=CHILD_TIMEOUT)
        if published.returncode != 0:
            raise RuntimeError(f"publish in the lab failed: {published.stderr.strip()}")
        argv = ["_netload", "--bootstrap", bootstrap, "--name", NAME]
        argv += ["--runs", str(bench.runs)]
        child = Child(argv, popen=lambda cmd, **kw: lab.popen(loader, cmd, **kw))
        try:
            figures = child.line(CHILD_TIMEOUT)
        finally:
            child.stop()
    shutil.rmtree(data, ignore_errors=True)
    times, served = figures["times"], figures["served"]
    ideal = size * 8 / (sum(caps) * 1e6)
    measured = median(times)
    point = {
        "caps_mbit": caps,
        "ideal_s": round(ideal, 3),
        "measured_s": round(measured, 3),
        "runs_s": _round(times),
        "efficiency": round(ideal / measured, 3),
        "served_bytes": served,
    }
    if len(set(caps)) == 1:
        # Only a shard's k owners hold it: the busiest source bounds the load.
        point["placement_bound"] = round(sum(served) / len(caps) / max(served), 3)
    return point


def _wait_ready_line(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if selector.select(max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError("a lab peer exited before it was ready")
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("event") == "ready":
                        return
    raise RuntimeError("a lab peer was not ready in time")


def _round(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


# --- report ---------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Linux {platform.release()}"
    )


def markdown(results: list[dict[str, Any]], profile: str, when: str) -> str:
    lines = [
        f"Measured {when} on {machine()}; profile `{profile}`; ratios are medians "
        "of runs measured side by side in one run of `scripts/bench.py`.",
        "",
        "| benchmark | measured | target | met | figures |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        met = {True: "yes", False: "**no**", None: "skipped"}[r["met"]]
        value = "-" if r["value"] is None else r["value"]
        lines.append(
            f"| {r['name']} | {value} | {r['target']} | {met} | {_figures(r)} |"
        )
    return "\n".join(lines) + "\n"


def _figures(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return str(r["skipped"])
    keys = {
        "load_vs_http": ("p2pshard_gb_s", "baseline_gb_s", "ratio_vs_bytearray"),
        "load_vs_download_then_load": ("p2pshard_s", "baseline_s", "speedup"),
        "memory": ("arrays_over_idle_mib", "file_over_idle_mib", "model_mib"),
        "lookup": ("one_p50_s", "one_p95_s", "hops_p95", "hops_max", "many_s"),
        "rebalance": ("hash_mod_n_over_ideal", "second_pass_bytes"),
        "balance": ("max_bytes", "mean_bytes"),
        "publish": ("p2pshard_mb_s",),
    }.get(r["name"], ())
    parts = [f"{k}={_short(r[k])}" for k in keys if k in r]
    if r["name"] == "scaling":
        parts = [_point(pt) for pt in r.get("points", [])]
    return "; ".join(parts)


def _point(pt: dict[str, Any]) -> str:
    caps = pt["caps_mbit"]
    if len(set(caps)) == 1:
        where = f"{len(caps)} x {int(caps[0])} Mbit"
    else:
        where = " + ".join(str(int(c)) for c in caps) + " Mbit"
    bound = pt.get("placement_bound")
    return f"{where}: {pt['efficiency']}" + (
        f" (busiest source: {bound})" if bound else ""
    )


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return str(value)


# --- main -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 2 min)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes, to test the script"
    )
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--runs", type=int, default=0, help="timed runs (>= 3)")
    parser.add_argument(
        "--size-mib", type=int, default=0, help="checkpoint size (default by profile)"
    )
    parser.add_argument("--out-md", default="bench-results.md", help="Markdown table")
    parser.add_argument("--data", default="", help="work folder (default: a temp one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    sub = parser.add_subparsers(dest="helper")
    static = sub.add_parser("_static")
    static.add_argument("--root", required=True)
    peers = sub.add_parser("_peers")
    peers.add_argument("--count", type=int, required=True)
    peers.add_argument("--data", required=True)
    placement = sub.add_parser("_placement")
    placement.add_argument("--peers", type=int, required=True)
    placement.add_argument("--shards", type=int, required=True)
    placement.add_argument("--replicas", type=int, required=True)
    placement.add_argument("--shard-bytes", type=int, required=True)
    placement.add_argument("--data", required=True)
    for name in ("_memload", "_netload"):
        load = sub.add_parser(name)
        load.add_argument("--bootstrap", required=True)
        load.add_argument("--name", required=True)
        load.add_argument("--mode", choices=("arrays", "file"), default="arrays")
        load.add_argument("--out", default="")
        load.add_argument("--runs", type=int, default=1)
    return parser


HELPERS = {
    "_static": child_static,
    "_peers": child_peers,
    "_placement": child_placement,
    "_memload": child_memload,
    "_netload": child_netload,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.helper:
        return HELPERS[args.helper](args)
    # SIGTERM unwinds like Ctrl-C, so every helper process is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    profile_name = "tiny" if args.tiny else "quick" if args.quick else "default"
    profile = PROFILES[profile_name]
    if args.size_mib:
        profile = replace(profile, model=args.size_mib * MIB)
    chosen = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        print(
            f"bench: unknown benchmark(s): {', '.join(sorted(unknown))}",
            file=sys.stderr,
        )
        return 2
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    with _workdir(args) as root:
        bench = Bench(args, profile, root)
        placement = Placement(bench)
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "load_vs_http": lambda: bench_load_vs_http(bench),
            "load_vs_download_then_load": lambda: bench_load_vs_download(bench),
            "scaling": lambda: bench_scaling(bench),
            "memory": lambda: bench_memory(bench),
            "lookup": lambda: bench_lookup(bench),
            "rebalance": lambda: bench_rebalance(bench, placement),
            "balance": lambda: bench_balance(bench, placement),
            "publish": lambda: bench_publish(bench),
        }
        try:
            for name in BENCHMARKS:
                if name not in chosen:
                    continue
                log(f"{name} ...")
                began = time.perf_counter()
                record = runners[name]()
                record["seconds"] = round(time.perf_counter() - began, 1)
                print(json.dumps(record), flush=True)
                results.append(record)
        finally:
            bench.close()
    Path(args.out_md).write_text(markdown(results, profile_name, when))
    return 0


@contextlib.contextmanager
def _workdir(args: argparse.Namespace) -> Iterator[Path]:
    if args.data:
        root = Path(args.data)
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="p2pshard-bench-"))
    try:
        yield root
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
