"""The worker side's copies on a GPU: lent to the daemon's copy worker, or run in-process.

With the KV caches on a device (``DeviceBlockMover``), the connector's worker side shares
its KV regions with the daemon after every registration (``share_gpu_kv``: CUDA IPC handles)
and lends the blocks of the copies the daemon decided (an offload, a predictive upload:
``CopyJob.lend``) to the daemon's copy worker, so those copies cost the engine no step time.
The rules (``clients/gpu_lending.py``, docs/vllm.md "The block-ownership protocol"):

- a lent copy waits for an event recorded on the compute stream when it was lent (the
  forward that wrote the blocks, or still reads the blocks a load overwrites); the compute
  stream waits for nothing;
- a job with lent blocks is reported done or failed only once the daemon (or, when the
  daemon is lost, the copy worker's exit or the deadline) settled the loan: vLLM keeps the
  blocks (the request, the preload or the offload holds them) until then, and no copy of
  this process touches a lent block;
- the daemon cannot run the copy (``gpu_copies`` off, the tensors not shared: a
  ``bad_request`` refusal), or is known to be down: the job is copied in-process, as on an
  engine that never lends. A refusal that says the slots are not this engine's
  (``not_owner``...) fails the job: an in-process copy would write them all the same. A
  loan the daemon did not answer stays lent (orphaned) and turns lending off until the
  next registration shares the tensors again.

No vLLM import here: ``scripts/gpu-check.sh`` runs this on a GPU machine without vLLM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokencake.clients.client import DaemonUnavailable, TokenCakeClient
from tokencake.clients.gpu_lending import DaemonCopies, Direction, Settled
from tokencake.clients.kv_arena import ArenaMapping
from tokencake.gpu.block_mover import DeviceBlockMover
from tokencake.gpu.mover import BlockMover, CopyError, CopyHandle
from tokencake.protocol import ErrorCode, RemoteError

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")


def export_kv(mover: BlockMover[ArenaMapping]) -> list[Any]:
    """The IPC descriptions of a CUDA mover's KV regions, for ``share_gpu_kv``."""
    if not isinstance(mover, DeviceBlockMover):
        raise CopyError("only device KV tensors can be shared with the daemon")
    return [mover.device.export(r) for r in mover.regions]


SHARE_TIMEOUT_S = 0.25
"""The least time a share may take (the daemon may start its copy worker)."""


@dataclass(slots=True)
class LendingStats:
    shares: int = 0
    """Registrations the KV tensors were shared with (the daemon accepted them)."""
    lent: int = 0
    """Copies the daemon's copy worker ran (or runs) with this engine's blocks."""
    in_process: int = 0
    """Copies the daemon could have run but this process did (refused, down, off)."""
    refused: int = 0
    """Loans the daemon refused (they were then copied in-process)."""


class Lent(CopyHandle):
    """A copy run by the daemon's copy worker; over when its loan is settled."""

    def __init__(self, copy_id: int, event: Any, owner: LentCopies) -> None:
        self.copy_id = copy_id
        self.event: Any = event  # the compute-stream event the copy waits for: kept alive
        self.settled: Settled | None = None
        self._owner = owner

    def poll(self) -> bool:
        if self.settled is None:
            return False
        if not self.settled.ok:
            raise CopyError(f"the daemon's copy failed: {self.settled.reason}")
        return True

    def wait(self) -> None:
        while not self.poll():
            self._owner.poll()
            time.sleep(0.001)


class LentCopies:
    """A device mover plus the daemon's copy worker, for one vLLM worker."""

    def __init__(
        self,
        mover: DeviceBlockMover,
        endpoint: str,
        timeout_s: float,
        *,
        retry_s: float = 1.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.mover = mover
        self.stats = LendingStats()
        self._endpoint = endpoint or None
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._clock = clock
        self._daemon: DaemonCopies | None = None
        self._epoch = 0  # the registration that has answered the share (or refused it)
        self._retry_at = 0.0
        self.active = False
        """The daemon holds this engine's tensors: ``lend`` jobs go to its copy worker."""
        self._lent: dict[int, Lent] = {}

    @property
    def daemon(self) -> DaemonCopies:
        if self._daemon is None:
            client = TokenCakeClient(self._endpoint, timeout_s=self._timeout_s)
            self._daemon = DaemonCopies(client, clock=self._clock)
        return self._daemon

    def attach(self, engine_id: str, epoch: int) -> None:
        """A registration (``epoch``, from the scheduler side): share the KV tensors with
        it, once. A restarted daemon, or a re-registration, knows none of them. A share
        that got no reply is tried again every ``retry_s``."""
        now = self._clock()
        if epoch == self._epoch or not engine_id or now < self._retry_at:
            return
        self.active = False
        timeout_s = max(self._timeout_s, SHARE_TIMEOUT_S)
        tensors = export_kv(self.mover)
        try:
            reply = self.daemon.share(engine_id, tensors, self.mover.num_blocks, timeout_s)
        except RemoteError as exc:
            self._epoch = epoch
            logger.info("TokenCake: tokencaked runs no copies for this GPU (%s)", exc)
            return
        except DaemonUnavailable as exc:
            self._retry_at = now + self._retry_s
            logger.warning("TokenCake: GPU KV not shared with tokencaked (%s)", exc)
            return
        self._epoch, self.active = epoch, True
        self.stats.shares += 1
        logger.info("TokenCake: GPU KV shared with copy worker %d", reply.worker_pid)

    def start(
        self,
        arena: ArenaMapping,
        blocks: Sequence[int],
        slots: Sequence[int],
        *,
        upload: bool,
        lend: bool,
    ) -> CopyHandle:
        """Start one copy: lent to the daemon when ``lend`` and it takes it, else here."""
        if self._daemon is not None and any(self._daemon.ledger.is_lent(b) for b in blocks):
            raise CopyError("a block is lent to a copy still in flight")
        if lend and self.active:
            handle = self._lend(blocks, slots, upload)
            if handle is not None:
                return handle
        if lend:
            self.stats.in_process += 1
        if upload:
            return self.mover.load(arena, slots, blocks)
        return self.mover.store(arena, blocks, slots)

    def _lend(self, blocks: Sequence[int], slots: Sequence[int], upload: bool) -> Lent | None:
        device = self.mover.device
        event = device.record(device.compute_stream(), interprocess=True)
        direction: Direction = "upload" if upload else "offload"
        try:
            loan = self.daemon.lend(direction, blocks, slots, device.ipc_event_handle(event))
        except RemoteError as exc:
            self.stats.refused += 1
            if exc.code != ErrorCode.BAD_REQUEST:
                # not_owner and the like: the slots are not this engine's (any more), and
                # an in-process copy would write them all the same
                raise CopyError(f"tokencaked refused the copy: {exc}") from exc
            logger.debug("tokencaked refused a GPU copy (%s); copying in-process", exc)
            return None
        if loan.orphaned_at >= 0:  # no reply: the copy may run; lend no more until shared
            self.active = False
        handle = self._lent[loan.copy_id] = Lent(loan.copy_id, event, self)
        self.stats.lent += 1
        return handle

    def poll(self) -> None:
        """Once per step while loans are out: settle those that are over."""
        if self._daemon is None or not self._lent:
            return
        for settled in self._daemon.poll():
            handle = self._lent.pop(settled.copy_id, None)
            if handle is not None:
                handle.settled, handle.event = settled, None
        if self._daemon.ledger.orphaned():
            self.active = False

    def close(self) -> None:
        if self._daemon is not None:
            self._daemon.close()
            self._daemon.client.close()
            self._daemon = None
