"""A request as the scheduler sees it: token ids and how many of them are computed.

No torch here: the scheduler and the KV block manager work on plain Python state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were taken; recomputed when resumed
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence to generate. ``payload`` is the engine's own state, opaque here.

    Every step a running request computes tokens until ``num_computed_tokens`` catches
    up with ``num_tokens``; then the engine samples one more token and appends it.
    Prefill, chunked prefill, decode and recompute after preemption are all this rule.
    """

    request_id: str
    all_token_ids: list[int]
    num_prompt_tokens: int
    arrival_time: float = 0.0
    payload: Any = None
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    #: prompt tokens found in the prefix cache when first scheduled
    num_cached_tokens: int = 0
    first_scheduled: bool = field(default=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    def append_token(self, token: int) -> None:
        self.all_token_ids.append(token)
