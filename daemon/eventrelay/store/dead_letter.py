"""The event a dead job becomes for its integration's dead-letter integration: one shape for every engine."""

from __future__ import annotations

from .. import codec


def dead_letter_payload(integration: str, job_id: int, attempts: int, error: str | None, status_code: int | None,
                        event_id: str, event_type: str, original_payload: str | None) -> str:
    """The stored payload (JSON text) of the dead-letter event: what died where, and the event itself."""
    original = codec.loads(original_payload.encode()) if original_payload else {}
    data = {"type": "dead_letter", "integration": integration, "job_id": str(job_id), "attempts": attempts,
            "error": error, "status_code": status_code, "event": {"id": event_id, "type": event_type, **original}}
    return codec.dumps({"data": data})
