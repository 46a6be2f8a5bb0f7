"""What the admin API may see of the running service, and what it may ask of it: nothing more.

The service implements `ServiceView`; the API is given it (and the store) and never the service's parts, so
the admin side imports nothing of the service and a console or another API can be served from the same view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Config
from ..events import Event
from ..jobs import JobState
from ..metrics import Metrics
from ..store import Accepted


@dataclass(frozen=True, slots=True)
class IntegrationState:
    """A running integration's delivery state, as it is at the moment it is asked for.

    The times are unix seconds, and None when they do not apply now.
    """

    circuit: str  # the circuit breaker: closed, open or half_open
    circuit_open_until: float | None  # end of the cool-down while the circuit is open
    paused_until: float | None  # while the target's slow-down (429, 502, 504, Retry-After) holds deliveries
    disabled: tuple[float, str] | None  # (since, why) while a 410 Gone keeps the integration disabled
    in_flight: int  # deliveries under way
    unwritable: bool  # outcomes cannot be written to the database, so nothing new is sent
    paused_at: float | None = None  # since an operator paused the integration


class ReloadReport(Protocol):
    """How a reload went."""

    @property
    def at(self) -> float: ...
    @property
    def ok(self) -> bool: ...
    @property
    def errors(self) -> tuple[str, ...]: ...  # why the file was refused, or could not be applied
    @property
    def changes(self) -> tuple[str, ...]: ...  # what it did, e.g. "added crm"


class ServiceView(Protocol):
    """The running service as the admin API sees it.

    Reads are the configuration in force and the delivery state of its integrations; actions are the
    operator's (they go now: DESIGN "an operator's explicit action goes now").
    """

    @property
    def config(self) -> Config: ...
    @property
    def started_at(self) -> float: ...  # unix seconds
    @property
    def last_reload(self) -> ReloadReport | None: ...  # None: not reloaded since the start
    @property
    def metrics(self) -> Metrics: ...

    def integration_state(self, name: str) -> IntegrationState | None:
        """The integration's delivery state; None while it is not running (unknown, or disabled in the config)."""
        ...

    def held_by(self, name: str) -> str | None:
        """Why the integration's jobs cannot go now (for the operator to read), or None when they can."""
        ...

    async def retry(self, name: str, job_id: int) -> JobState | None:
        """Make a pending or dead job due now; the state it had, None when there is no such job."""
        ...

    async def replay(self, name: str, **selection: Any) -> int:
        """Re-queue jobs (Store.replay's selection); how many."""
        ...

    async def enable(self, name: str) -> bool:
        """Turn on an integration a 410 disabled; False when it was not disabled."""
        ...

    async def send_test(self, name: str, event: Event) -> Accepted:
        """Store `event` with a job for this integration alone, and send it now."""
        ...

    async def pause(self, name: str) -> bool:
        """Hold the integration's deliveries until resumed; False when it was paused already."""
        ...

    async def resume(self, name: str) -> bool:
        """Let a paused integration deliver again; False when it was not paused."""
        ...

    def close_circuit(self, name: str) -> str | None:
        """Close the integration's circuit now; the state it had, None while the integration is not running."""
        ...

    async def reload(self) -> ReloadReport:
        """Read the configuration file again and apply it, as SIGHUP does."""
        ...

    async def refresh_gauges(self) -> None:
        """Bring the gauges `metrics` renders up to date (backlogs, in flight)."""
        ...
