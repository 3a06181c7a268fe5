"""The daemon's side of daemon-driven GPU copies: shares, lent blocks, and copy workers.

The block-ownership protocol (docs/vllm.md, "Daemon-driven copies"), as the daemon keeps it:

- ``share_gpu_kv``: the engine's tensors are kept and sent to the copy worker of their GPU,
  started on first use (its own process: this loop never touches CUDA).
- ``gpu_copy``: the engine lends blocks for one copy. Refused unless the engine holds every
  slot (reserved for an offload, pinned by ``load_begin`` for an upload) and no block or
  slot is in another copy of the engine's still running: a block is in at most one copy.
- ``gpu_copy_status``: each copy is "running" until the worker reports it; then "done" or
  "failed" once, and forgotten. The engine reuses a block only after that.
- The worker dies (a device fault, an overrun of ``deadline_s``, a crash): every copy it had
  fails; the next copy starts a new worker, which opens the engines' tensors again.
- An engine goes away (unregisters, times out, re-registers) with copies in flight: its
  worker is killed and reaped before the daemon frees the engine's slots, so no slot is
  reused while a copy may still write it. The engine's other copies on that worker fail.
- The daemon dies: the worker sees its stdin close and exits. An engine that loses the
  daemon keeps lent blocks until the worker's process is gone, or ``deadline_s`` passed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from tokencake import protocol as p
from tokencake.daemon.gpu import wire
from tokencake.protocol import ErrorCode, ProtocolError

logger = logging.getLogger(__name__)

MAX_TENSORS = 4096
OVERRUN = 1.5
"""A copy running this many deadlines is killed with its worker (the worker itself exits
at one); the deadline is half the lease, so this comes before the slots' lease expires."""
RESPAWN_S = 1.0
"""A worker that died (not one the daemon stopped) is not started again sooner for its GPU;
copies meanwhile fail at once."""


class SlotHolder(Protocol):
    """What the copy checks against the store: the engine holds these slots."""

    def check_held(self, owner: int, slots: list[int], *, writing: bool) -> None: ...


@dataclass(slots=True)
class _Copy:
    engine_id: str
    copy_id: int
    worker: str
    blocks: list[int]
    slots: list[int]
    started: float
    state: str = "running"
    error: str = ""


@dataclass(slots=True)
class _Share:
    uuid: str
    kind: str
    req: p.ShareGpuKv
    error: str = ""


@dataclass(slots=True)
class _Worker:
    uuid: str
    proc: subprocess.Popen[bytes]
    reader: wire.FrameReader = field(default_factory=wire.FrameReader)
    engines: set[str] = field(default_factory=set)


class GpuCopyService:
    """Handlers for the three ops, plus ``engine_gone`` and ``close`` for the daemon."""

    def __init__(
        self,
        *,
        arena: Callable[[], tuple[str, int, int]],
        mode: str,
        deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
        python: str = sys.executable,
    ) -> None:
        self._arena = arena  # (name, bytes, slot bytes) of the formatted arena
        self.mode = mode  # the ``gpu_copies`` setting: off, cuda or fake
        self.deadline_s = deadline_s
        self._clock = clock
        self._python = python
        self._shares: dict[str, _Share] = {}
        self._workers: dict[str, _Worker] = {}
        self._copies: dict[int, _Copy] = {}  # by the daemon-wide id the worker knows
        self._ids: dict[tuple[str, int], int] = {}  # (engine, its copy id) -> daemon-wide id
        self._next = 1
        self._retry_at: dict[str, float] = {}  # GPU uuid -> no new worker before

    # ------------------------------------------------------------------ handlers

    def share(self, engine_id: str, req: p.ShareGpuKv) -> p.ShareGpuKvReply:
        kinds = {t.kind for t in req.tensors}
        uuids = {t.device_uuid for t in req.tensors}
        if not req.tensors or len(req.tensors) > MAX_TENSORS or req.num_blocks <= 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "1..4096 tensors and num_blocks > 0")
        if len(kinds) != 1 or len(uuids) != 1:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "tensors of one device only")
        kind, uuid = kinds.pop(), uuids.pop()
        if self.mode == "off":
            raise ProtocolError(ErrorCode.BAD_REQUEST, "gpu_copies is off: copy blocks yourself")
        if kind != self.mode:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind} tensors, gpu_copies = {self.mode}")
        if not 0 < len(uuid) <= 64 or not uuid.replace("-", "").isalnum():
            raise ProtocolError(ErrorCode.BAD_REQUEST, "device_uuid: 1..64 letters, digits, -")
        self.engine_gone(engine_id)  # sharing again replaces the earlier tensors
        self._shares[engine_id] = _Share(uuid, kind, req)
        worker = self._worker_for(engine_id)
        pid = worker.proc.pid if worker is not None else 0
        return p.ShareGpuKvReply(worker_pid=pid, deadline_s=self.deadline_s)

    def copy(self, engine_id: str, owner: int, store: SlotHolder, req: p.GpuCopy) -> p.GpuCopyReply:
        share = self._shares.get(engine_id)
        if share is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "share_gpu_kv first")
        self._check_copy(engine_id, share, req)
        store.check_held(owner, req.slots, writing=req.direction == "offload")
        self.poll()
        worker = self._worker_for(engine_id)
        wid = self._next
        self._next += 1
        self._copies[wid] = _Copy(
            engine_id, req.copy_id, share.uuid, req.blocks, req.slots, self._clock()
        )
        self._ids[(engine_id, req.copy_id)] = wid
        upload = req.direction == "upload"
        if worker is None or share.error:
            self._finish(wid, share.error or "the GPU's copy worker failed; retrying shortly")
        else:
            msg = wire.Copy(wid, engine_id, upload, req.blocks, req.slots, req.after_event)
            self._send(worker, msg)
        return p.GpuCopyReply(req.copy_id)

    def status(self, engine_id: str, req: p.GpuCopyStatus) -> p.GpuCopyStatusReply:
        if len(req.copy_ids) > p.MAX_HASHES_PER_REQUEST:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "too many copy ids")
        self.poll()
        states, errors = [], []
        for copy_id in req.copy_ids:
            wid = self._ids.get((engine_id, copy_id))
            c = self._copies.get(wid) if wid is not None else None
            states.append(c.state if c is not None else "unknown")
            errors.append(c.error if c is not None else "")
            if c is not None and c.state != "running":  # reported once, then forgotten
                assert wid is not None
                del self._copies[wid], self._ids[(engine_id, copy_id)]
        return p.GpuCopyStatusReply(states, errors)

    # ------------------------------------------------------------------ lifetime

    def engine_gone(self, engine_id: str) -> None:
        """Forget the engine's tensors. With a copy of it in flight, its worker is killed and
        reaped first, so the caller may free the engine's slots once this returns."""
        share = self._shares.pop(engine_id, None)
        running = [c for c in self._copies.values() if c.engine_id == engine_id]
        for c in running:
            if c.state == "running" and c.worker in self._workers:
                self._kill(self._workers[c.worker], "an engine left with copies in flight")
        for c in running:
            wid = self._ids.pop((engine_id, c.copy_id), None)
            if wid is not None:
                del self._copies[wid]
        worker = self._workers.get(share.uuid) if share is not None else None
        if worker is not None and engine_id in worker.engines:
            worker.engines.discard(engine_id)
            self._send(worker, wire.CloseEngine(engine_id))

    def poll(self) -> None:
        """Take what the workers reported; fail the copies of a worker that died or overran."""
        now = self._clock()
        for worker in list(self._workers.values()):
            for msg in self._drain(worker):
                if isinstance(msg, wire.Finished):
                    self._finish(msg.copy_id, msg.error)
                elif isinstance(msg, wire.Opened) and msg.error:
                    share = self._shares.get(msg.engine_id)
                    if share is not None:
                        share.error = msg.error
                    logger.warning("copy worker: %s", msg.error)
                elif isinstance(msg, wire.Fatal):
                    self._kill(worker, f"copy worker failed: {msg.error}", failed=True)
                    break
            else:
                overrun = [
                    c
                    for c in self._copies.values()
                    if c.worker == worker.uuid
                    and c.state == "running"
                    and now - c.started > OVERRUN * self.deadline_s
                ]
                if overrun or worker.proc.poll() is not None:
                    self._kill(worker, "copy worker died or stopped answering", failed=True)

    def close(self) -> None:
        for worker in list(self._workers.values()):
            self._kill(worker, "daemon stopping")

    def workers(self) -> dict[str, int]:
        """GPU uuid -> pid of each live copy worker."""
        return {uuid: w.proc.pid for uuid, w in self._workers.items()}

    # ------------------------------------------------------------------ internals

    def _check_copy(self, engine_id: str, share: _Share, req: p.GpuCopy) -> None:
        n = len(req.blocks)
        if n != len(req.slots) or not 0 < n <= p.MAX_HASHES_PER_REQUEST:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "blocks and slots: same length, 1..65536")
        if min(req.blocks) < 0 or max(req.blocks) >= share.req.num_blocks:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "block id out of range")
        if len(set(req.blocks)) != n or len(set(req.slots)) != n:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "a block or slot appears twice")
        if len(req.after_event) > 256:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "after_event is an IPC event handle")
        if (engine_id, req.copy_id) in self._ids:
            raise ProtocolError(ErrorCode.CONFLICT, f"copy {req.copy_id} is still known")
        blocks, slots = set(req.blocks), set(req.slots)
        for c in self._copies.values():
            mine = c.engine_id == engine_id and c.state == "running"
            if mine and (blocks.intersection(c.blocks) or slots.intersection(c.slots)):
                raise ProtocolError(
                    ErrorCode.CONFLICT, f"a block or slot is in copy {c.copy_id} still"
                )

    def _worker_for(self, engine_id: str) -> _Worker | None:
        """The engine's GPU's worker, started (and told the engine's tensors) if need be;
        None while a worker that died is not to be started again yet."""
        share = self._shares[engine_id]
        worker = self._workers.get(share.uuid)
        if worker is None:
            if self._clock() < self._retry_at.get(share.uuid, 0.0):
                return None
            worker = self._spawn(share.uuid, share.kind)
        if engine_id not in worker.engines:
            name, size, slot_bytes = self._arena()
            req = share.req
            msg = wire.OpenEngine(engine_id, req.num_blocks, req.tensors, name, size, slot_bytes)
            share.error = ""
            worker.engines.add(engine_id)
            self._send(worker, msg)
        return self._workers.get(share.uuid)

    def _spawn(self, uuid: str, kind: str) -> _Worker:
        cmd = [self._python, "-m", "tokencake.daemon.gpu.copy_worker", "--kind", kind]
        cmd += ["--device-uuid", uuid, "--deadline-s", str(self.deadline_s)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdin is not None
        for f in (proc.stdout, proc.stdin):
            flags = fcntl.fcntl(f.fileno(), fcntl.F_GETFL)
            fcntl.fcntl(f.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
        worker = self._workers[uuid] = _Worker(uuid, proc)
        logger.info("copy worker started", extra={"gpu": uuid, "pid": proc.pid})
        return worker

    def _send(self, worker: _Worker, msg: msgspec.Struct) -> None:
        assert worker.proc.stdin is not None
        try:
            wire.write_all(worker.proc.stdin.fileno(), wire.frame(msg))
        except (BlockingIOError, BrokenPipeError, OSError) as exc:
            # It died (a broken pipe) or stopped reading (a full pipe) of itself: the same
            # pause before a new worker as a death found by ``poll``.
            self._kill(worker, f"cannot reach the copy worker: {exc}", failed=True)

    def _drain(self, worker: _Worker) -> list[wire.FromWorker]:
        assert worker.proc.stdout is not None
        out: list[wire.FromWorker] = []
        while True:
            try:
                data = os.read(worker.proc.stdout.fileno(), 1 << 20)
            except BlockingIOError:
                return out
            except OSError:
                data = b""
            if not data:  # the worker exited: what it said before still counts
                return out
            try:
                out.extend(wire.from_worker.decode(raw) for raw in worker.reader.feed(data))
            except (wire.WireError, msgspec.DecodeError) as exc:
                out.append(wire.Fatal(f"garbled frame: {exc}"))
                return out

    def _finish(self, wid: int, error: str) -> None:
        c = self._copies.get(wid)
        if c is not None and c.state == "running":
            c.state, c.error = ("failed", error) if error else ("done", "")

    def _kill(self, worker: _Worker, why: str, failed: bool = False) -> None:
        """Kill and reap (a dead process moves no more bytes), then fail its copies.
        ``failed``: it died of itself; its GPU gets no new worker for ``RESPAWN_S``."""
        if self._workers.get(worker.uuid) is worker:
            del self._workers[worker.uuid]
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait()
        for f in (worker.proc.stdin, worker.proc.stdout):
            if f is not None:
                f.close()
        for wid, c in self._copies.items():
            if c.worker == worker.uuid and c.state == "running":
                self._finish(wid, why)
        if failed:
            self._retry_at[worker.uuid] = self._clock() + RESPAWN_S
        logger.warning("copy worker stopped: %s", why, extra={"gpu": worker.uuid})
