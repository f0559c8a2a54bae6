"""The peer table's rules as pure functions over one ``PeerEntry`` (plain data + ``now``).

Who owns a device id (see docs/discovery.md, "A peer claiming another's id"):

* First come: the first address that claims a device id becomes the entry's address.
* A claim for the same id from another address becomes the entry's single *candidate*;
  it takes nothing over until a health check at that address answers with that id.
  Then:
  - the anchor proved the device key and the candidate did not → hijack refused;
  - the candidate is the same running process (same ``instanceId``, or neither side
    reports one) → kept as an alternate address (failover, LAN + VPN);
  - the candidate proved the key and the anchor did not → the candidate wins;
  - the anchor is not reachable, or its first check after the candidate appeared failed
    → the candidate wins (a restart on a new address);
  - both answer, as different instances → duplicate: the anchor stays, the caller warns
    (a copied state dir, or an impostor).
* An address whose health answer names another device id is flagged and ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from ..capability.curve import Curve
from .model import HealthReport, Peer, PeerClaim, PeerState
from .validate import VIA_VALUES, Via, address_of


class MergeOutcome(StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    CANDIDATE = "candidate"
    """another address claims this id; it is being checked."""
    SWITCHED = "switched"
    """the candidate address took over."""
    ALTERNATE = "alternate"
    """the candidate is another address of the same process."""
    HIJACK_REJECTED = "hijack_rejected"
    """the candidate could not prove the key the current address proved."""
    DUPLICATE = "duplicate"
    """two live processes answer as one device id."""
    MISMATCH = "mismatch"
    """an address answered as another device id."""
    IGNORED = "ignored"
    SELF = "self"
    """a claim about this node itself."""
    TABLE_FULL = "table_full"


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """One row of the peer table. ``base_url`` is the anchor address."""

    device_id: str
    base_url: str
    via: Via
    claims: Mapping[Via, PeerClaim]
    first_seen_at: int
    last_seen_at: int
    state: PeerState = PeerState.PENDING
    last_ok_at: int | None = None
    health: HealthReport | None = None
    anchor_ok: bool | None = None
    """result of the latest check of ``base_url`` (None: not checked yet)."""
    anchor_checked_at: int | None = None
    candidate: PeerClaim | None = None
    candidate_since: int = 0
    candidate_report: HealthReport | None = None
    candidate_ok_at: int = 0
    alternates: tuple[str, ...] = ()
    flag: str | None = None

    @property
    def confirmed(self) -> bool:
        """A health check confirmed this device at least once."""
        return self.last_ok_at is not None


def new_entry(claim: PeerClaim, now: int) -> PeerEntry:
    return PeerEntry(
        device_id=claim.device_id,
        base_url=claim.base_url,
        via=claim.source,
        claims={claim.source: claim},
        first_seen_at=now,
        last_seen_at=now,
    )


def apply_claim(entry: PeerEntry | None, claim: PeerClaim, now: int) -> tuple[PeerEntry, MergeOutcome]:
    """Merge what a source says about a device into its entry."""
    if entry is None:
        return new_entry(claim, now), MergeOutcome.ADDED
    claims = {**entry.claims, claim.source: claim}
    if claim.base_url == entry.base_url or claim.base_url in entry.alternates:
        return dataclasses.replace(entry, claims=claims, last_seen_at=now), MergeOutcome.UPDATED
    if not entry.confirmed and entry.candidate is None and claim.source == entry.via:
        # Never confirmed, and the same source now names another address: it moved.
        moved = dataclasses.replace(
            entry, claims=claims, base_url=claim.base_url, last_seen_at=now,
            anchor_ok=None, anchor_checked_at=None, flag=None,
            state=PeerState.PENDING if entry.state is PeerState.FLAGGED else entry.state,
        )
        return moved, MergeOutcome.UPDATED
    if entry.candidate is not None and entry.candidate.base_url == claim.base_url:
        return dataclasses.replace(entry, candidate=claim), MergeOutcome.UNCHANGED
    return (
        dataclasses.replace(entry, candidate=claim, candidate_since=now, candidate_report=None),
        MergeOutcome.CANDIDATE,
    )


def apply_health_ok(
    entry: PeerEntry, base_url: str, report: HealthReport, now: int, *, max_alternates: int
) -> tuple[PeerEntry, MergeOutcome]:
    """A health check of ``base_url`` answered ``report``."""
    if base_url == entry.base_url:
        if report.device_id != entry.device_id:
            flagged = dataclasses.replace(
                entry, state=PeerState.FLAGGED, anchor_ok=False, anchor_checked_at=now,
                flag=f"{address_of(base_url)} answers as device {report.device_id}",
            )
            resolved, outcome = _resolve_candidate(flagged, now, max_alternates)
            return resolved, outcome or MergeOutcome.MISMATCH
        healthy = dataclasses.replace(
            entry, state=PeerState.REACHABLE, last_ok_at=now, last_seen_at=now, health=report,
            anchor_ok=True, anchor_checked_at=now, flag=None,
        )
        resolved, outcome = _resolve_candidate(healthy, now, max_alternates)
        return resolved, outcome or MergeOutcome.UPDATED
    if entry.candidate is not None and base_url == entry.candidate.base_url:
        if report.device_id != entry.device_id:
            return _drop_candidate(entry), MergeOutcome.MISMATCH
        reported = dataclasses.replace(entry, candidate_report=report, candidate_ok_at=now)
        resolved, outcome = _resolve_candidate(reported, now, max_alternates)
        return resolved, outcome or MergeOutcome.UNCHANGED
    if base_url in entry.alternates:
        if report.device_id != entry.device_id:
            kept = tuple(url for url in entry.alternates if url != base_url)
            return dataclasses.replace(entry, alternates=kept), MergeOutcome.MISMATCH
        return dataclasses.replace(entry, last_seen_at=now), MergeOutcome.UNCHANGED
    return entry, MergeOutcome.IGNORED


def apply_health_failure(
    entry: PeerEntry, base_url: str, now: int, *, max_alternates: int
) -> tuple[PeerEntry, MergeOutcome]:
    """A health check of ``base_url`` failed (timeout, refused, bad answer)."""
    if base_url == entry.base_url:
        failed = dataclasses.replace(entry, anchor_ok=False, anchor_checked_at=now)
        if failed.alternates:
            # Fail over to a verified address of the same process; the old one goes last.
            failed = dataclasses.replace(
                failed, base_url=failed.alternates[0], anchor_ok=None,
                alternates=(*failed.alternates[1:], entry.base_url),
            )
        resolved, outcome = _resolve_candidate(failed, now, max_alternates)
        return resolved, outcome or MergeOutcome.UPDATED
    if entry.candidate is not None and base_url == entry.candidate.base_url:
        return _drop_candidate(entry), MergeOutcome.UPDATED
    if base_url in entry.alternates:
        kept = tuple(url for url in entry.alternates if url != base_url)
        return dataclasses.replace(entry, alternates=kept), MergeOutcome.UPDATED
    return entry, MergeOutcome.IGNORED


def apply_timeouts(
    entry: PeerEntry, now: int, *, unreachable_after_ms: int, remove_after_ms: int
) -> PeerEntry | None:
    """Mark a silent entry unreachable, or return None when it should be removed."""
    silent_ms = now - (entry.last_ok_at if entry.last_ok_at is not None else entry.first_seen_at)
    if entry.state in (PeerState.PENDING, PeerState.REACHABLE) and silent_ms >= unreachable_after_ms:
        entry = dataclasses.replace(entry, state=PeerState.UNREACHABLE)
    if entry.state in (PeerState.UNREACHABLE, PeerState.FLAGGED) and silent_ms >= remove_after_ms:
        return None
    return entry


def withdraw_source(entry: PeerEntry, source: Via) -> PeerEntry | None:
    """A source stopped reporting the device (mDNS goodbye, gone from custom results)."""
    claims = {via: claim for via, claim in entry.claims.items() if via != source}
    if not claims:
        return None
    entry = dataclasses.replace(entry, claims=claims)
    if entry.candidate is not None and entry.candidate.source == source:
        entry = _drop_candidate(entry)
    if entry.via == source:
        via = next(v for v in VIA_VALUES if v in claims)
        base_url = claims[via].base_url
        alternates = tuple(url for url in entry.alternates if url != base_url)
        if base_url != entry.base_url:
            entry = dataclasses.replace(entry, anchor_ok=None, alternates=alternates)
        entry = dataclasses.replace(entry, via=via, base_url=base_url)
    return entry


def to_peer(entry: PeerEntry) -> Peer:
    """The public view of an entry."""
    claims = [entry.claims[v] for v in (entry.via, *VIA_VALUES) if v in entry.claims]
    health = entry.health
    capability: dict[str, float] = {}
    curves: dict[str, Curve] = {}
    for claim in reversed(claims):
        capability.update(claim.capability)
        curves.update(claim.capability_curve)
    if health is not None:
        curves.update(health.capability_curve)  # the freshest word, and it reaches rendezvous peers too
    first = claims[0]
    return Peer(
        device_id=entry.device_id,
        device_name=_first(
            # A name an operator gave (config, registry) beats the one the device reports.
            *(entry.claims[v].device_name for v in ("static", "custom") if v in entry.claims),
            health.device_name if health else "",
            *(c.device_name for c in claims),
        ),
        dvai_version=_first(health.version if health else "", *(c.dvai_version for c in claims)),
        base_url=entry.base_url,
        app_id=first.app_id,
        loaded_models=health.loaded_models if health else first.loaded_models,
        capability=capability,
        via=entry.via,
        secure=entry.base_url.startswith("https:"),
        last_seen_at=entry.last_seen_at,
        state=entry.state,
        address=address_of(entry.base_url),
        queue_depth=dict(health.queue_depth if health else first.queue_depth),
        sources=tuple(v for v in VIA_VALUES if v in entry.claims),
        identity_verified=bool(health and health.proven and entry.state is PeerState.REACHABLE),
        flag=entry.flag,
        features=dict(health.features) if health else {},
        capability_curve=curves,
    )


def _first(*values: str) -> str:
    return next((v for v in values if v), "")


def _drop_candidate(entry: PeerEntry) -> PeerEntry:
    return dataclasses.replace(entry, candidate=None, candidate_report=None, candidate_ok_at=0)


def _resolve_candidate(
    entry: PeerEntry, now: int, max_alternates: int
) -> tuple[PeerEntry, MergeOutcome | None]:
    """Decide about a candidate address once it answered; None while still undecided."""
    candidate, report = entry.candidate, entry.candidate_report
    if candidate is None or report is None:
        return entry, None
    reachable = entry.state is PeerState.REACHABLE
    anchor_proven = reachable and entry.health is not None and entry.health.proven
    if anchor_proven and not report.proven:
        return _drop_candidate(entry), MergeOutcome.HIJACK_REJECTED
    anchor_instance = entry.health.instance_id if entry.health else None
    if reachable and report.instance_id == anchor_instance:
        # Same process at another address (both without an instance id: cannot tell, assume so).
        alternates = (*[u for u in entry.alternates if u != candidate.base_url], candidate.base_url)
        claims = entry.claims if candidate.source in entry.claims else {
            **entry.claims, candidate.source: candidate}
        kept = dataclasses.replace(
            _drop_candidate(entry), claims=claims, alternates=alternates[-max_alternates:]
        )
        return kept, MergeOutcome.ALTERNATE
    anchor_failed_since = (
        entry.anchor_checked_at is not None
        and entry.anchor_checked_at > entry.candidate_since
        and not entry.anchor_ok
    )
    if (report.proven and not anchor_proven) or not reachable or anchor_failed_since:
        return _switch_to_candidate(entry, candidate, report), MergeOutcome.SWITCHED
    if entry.anchor_checked_at is not None and entry.anchor_checked_at > entry.candidate_since:
        return _drop_candidate(entry), MergeOutcome.DUPLICATE
    return entry, None


def _switch_to_candidate(entry: PeerEntry, candidate: PeerClaim, report: HealthReport) -> PeerEntry:
    return dataclasses.replace(
        _drop_candidate(entry),
        base_url=candidate.base_url,
        via=candidate.source,
        claims={**entry.claims, candidate.source: candidate},
        state=PeerState.REACHABLE,
        last_ok_at=entry.candidate_ok_at,
        last_seen_at=max(entry.last_seen_at, entry.candidate_ok_at),
        health=report,
        anchor_ok=True,
        anchor_checked_at=entry.candidate_ok_at,
        alternates=(),
        flag=None,
    )
