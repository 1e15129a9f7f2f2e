"""The project's refusal type: a request that cannot work as asked (torch-free).

Every error the project raises on purpose for a bad request (a missing or damaged
checkpoint, a model that does not fit the task, a bad config or job spec, an unsafe
destination) derives from :class:`UsageError`; the command line exits 2 for those and
3 for anything else, which is a bug.
"""
from __future__ import annotations


class UsageError(Exception):
    """The request cannot work as asked; the message says what to change."""
