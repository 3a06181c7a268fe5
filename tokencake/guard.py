"""The critical-inversion guard: one admission rule for every engine that applies it.

A request of an agent off the critical path may take GPU blocks only while the blocks that
critical-path agents ranking ahead of it need stay free. Two things decide the rule, and
both live here so that the daemon's policy (which the simulator's engine asks through
``may_allocate``) and vLLM's ``TokenCakeScheduler`` (which reads the daemon's per-agent
figures from ``list_agents``) take the same decision from the same inputs:

* what one critical agent asks to be kept free (``protected_blocks``): while it waits for
  admission, the blocks its request needs; while it is in a tool call, its KV still on the
  GPU (kept there, or not yet offloaded; unless pinned: a pinned block is held, no longer
  counted free, so it needs no protection) and the blocks of an upload bringing it back
  that have not taken GPU memory yet. KV the temporal scheduler parked on the host is not
  protected until its upload is due: freeing that memory for others during the tool call is
  the point of the offload. Nothing when the agent runs (it holds its blocks), is idle or
  done, or is off the critical path;
* whether one request may go ahead (``verdict``): critical requests always; others when
  ``free - need >= protect``, with ``protect`` the sum over the critical agents that rank
  ahead (an older application, or the requester's own), capped at a fraction of the pool so
  that a burst of critical demand cannot freeze everything else.

"Free" is the engine's count of blocks a new request may take without preempting anyone:
vLLM's free block queue (idle cached blocks included) and the simulator's the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokencake.phases import TOOL as TOOL_PHASE
from tokencake.phases import WAITING as WAITING_PHASE

PLAIN_HEAD_START_S = 300.0
"""Plain traffic (a request with no agent metadata) ranks as an application registered
this long before the request arrived: ahead of every agent application younger than that,
behind older ones. Agent priority cannot starve it (it waits at most behind apps already
``PLAIN_HEAD_START_S`` old), and a stream of plain requests cannot starve an agent app
past that age. The daemon's policy and ``TokenCakeScheduler`` use the same figure."""


TAIL_LEAD = 0.5
"""An agent application ranks as one registered this share of its expected critical path
earlier than it did (``app_lead_s``), at most ``TAIL_LEAD_MAX_S``: the tail guard of the
application order."""
TAIL_LEAD_MAX_S = 10.0
"""The most an application's rank moves ahead of its registration: the lead reorders the
apps of one burst, never an app that arrived well before (a long app overtaking those
would put the longest job first, which loses the mean where app lengths vary widely:
react-coding at 1 app/s, mean 213 -> 308 s without this bound)."""


def plain_rank(arrival_s: float) -> float:
    """The application rank (a registration time) of a plain request arriving then."""
    return arrival_s - PLAIN_HEAD_START_S


def app_lead_s(critical_length_s: float) -> float:
    """How far ahead of its registration an agent application ranks: ``TAIL_LEAD`` times
    its expected critical path (the DAG's, fixed at registration), at most
    ``TAIL_LEAD_MAX_S``.

    Serving whole applications in registration order minimises mean latency, but in a
    burst the newest applications wait for every older one and then run their sequential
    remainder nearly alone, which sets the p95 (and the makespan). Advancing each app by
    half its critical length starts a long app that arrived just after short ones first
    (its chain is what would be left at the end), while an app more than
    ``TAIL_LEAD_MAX_S`` older still goes first: bounded, and no app is starved. A rank
    that follows the remaining path as nodes finish, or the app's waiting time, recovered
    the p95 of some bursts but lost the mean elsewhere (``docs/scheduling.md``).
    """
    return min(TAIL_LEAD * max(0.0, critical_length_s), TAIL_LEAD_MAX_S)


def protected_blocks(
    *,
    critical: bool,
    phase: str,
    wait_blocks: int,
    gpu_blocks: int,
    returning_blocks: int,
    pinned: bool = False,
) -> int:
    """Blocks one agent asks the guard to keep free for it (see the module docstring)."""
    if not critical:
        return 0
    if phase == WAITING_PHASE:
        return max(0, wait_blocks)
    if phase == TOOL_PHASE:
        return (0 if pinned else max(0, gpu_blocks)) + max(0, returning_blocks)
    return 0


def protect_cap(pool_blocks: int, max_fraction: float) -> int:
    """The most blocks the guard ever holds back: ``max_fraction`` of the pool."""
    return max(0, int(max_fraction * max(0, pool_blocks)))


def total_protected(ahead: Iterable[int], cap: int) -> int:
    """Blocks protected for a requester: the sum over the agents ranking ahead, capped."""
    return min(sum(ahead), max(0, cap))


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    allowed: bool
    rule: str
    """``allow:critical``, ``allow:nothing_protected``, ``allow:shared_pool`` or
    ``deny:critical_inversion``."""


def verdict(*, critical: bool, need: int, free: int, protect: int) -> GuardVerdict:
    """May a request needing ``need`` blocks be admitted with ``free`` blocks free?"""
    if critical:
        return GuardVerdict(True, "allow:critical")
    if protect <= 0:
        return GuardVerdict(True, "allow:nothing_protected")
    if free - need >= protect:
        return GuardVerdict(True, "allow:shared_pool")
    return GuardVerdict(False, "deny:critical_inversion")
