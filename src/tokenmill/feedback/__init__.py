"""User feedback and the opt-in request log, stored in SQLite or PostgreSQL.

store = open_store("feedback.db", request_log=True, retention_days=30)
store.log_request({...})            # queued; written by a background thread
store.add_feedback("chatcmpl-1", 5, ["helpful"], None)
store.close()
"""

from tokenmill.feedback.errors import InvalidFeedback, StoreError, StoreUnavailable
from tokenmill.feedback.records import RATING_MAX, RATING_MIN
from tokenmill.feedback.store import Store, open_store

__all__ = [
    "RATING_MAX",
    "RATING_MIN",
    "InvalidFeedback",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "open_store",
]
