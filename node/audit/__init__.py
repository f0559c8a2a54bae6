"""The audit log: one row per inference request, served or refused, in ``audit.sqlite3``.

``AuditLog.open(state_dir, config.audit)`` at start, ``await audit.close()`` at shutdown;
``audit.record(row)`` never blocks the event loop (``log.py`` explains the writer thread).
"""

from __future__ import annotations

from .log import AUDIT_FILE, AuditLog, AuditLogError, AuditRow

__all__ = ["AUDIT_FILE", "AuditLog", "AuditLogError", "AuditRow"]
