"""What the workers' results of one command add up to, as LMCache's JSON, or as the error to raise.

Every worker (tensor-parallel rank) of an instance answers each command. Ranks may
legitimately disagree on token counts (each evicts on its own), so a disagreement is
reported in the answer, with each rank's count, rather than failing as LMCache does.
"""

from __future__ import annotations

import logging

from msgspec import UNSET

from kvbus.controller.answers import HealthAnswer, TokenCountAnswer
from kvbus.controller.bus import Outcome
from kvbus.controller.errors import AgentFailed, AgentTimeout, Refused
from kvbus.shared.messages import Result, ResultStatus

log = logging.getLogger("kvbus.controller")

# LMCache's health codes for a worker that could not say it is healthy.
WORKER_ERROR = -1001


def token_count(outcome: Outcome) -> TokenCountAnswer:
    """`{event_id, num_tokens}`; when ranks disagree, the smallest count and each rank's."""
    _raise_for(outcome)
    counts = {worker: result.num_tokens for worker, result in outcome.results.items()}
    answer = TokenCountAnswer(event_id=outcome.event_id, num_tokens=min(counts.values()))
    if len(set(counts.values())) > 1:
        log.warning("%s: workers of %s disagree on num_tokens: %s", outcome.event_id, outcome.instance_id, counts)
        answer.num_tokens_per_worker = {str(w): n for w, n in counts.items()}
    return answer


def health(outcome: Outcome) -> HealthAnswer:
    """`{event_id, error_codes: {worker_id: code}}`; a worker that failed to check gets -1001."""
    codes = {
        str(worker): result.error_code if result.status == ResultStatus.OK else WORKER_ERROR
        for worker, result in outcome.results.items()
    }
    details = {str(w): r.detail for w, r in outcome.results.items() if r.detail}
    return HealthAnswer(event_id=outcome.event_id, error_codes=codes, details=details or UNSET)


def _raise_for(outcome: Outcome) -> None:
    def failed(status: ResultStatus) -> dict[int, Result]:
        return {w: r for w, r in outcome.results.items() if r.status == status}

    where = f"the agent of {outcome.instance_id!r}"
    if late := failed(ResultStatus.EXPIRED):
        raise AgentTimeout(f"{where} received the command too late: {_details(late)}", event_id=outcome.event_id)
    if errors := failed(ResultStatus.ERROR):
        raise AgentFailed(f"{where} failed: {_details(errors)}", event_id=outcome.event_id)
    if refusals := failed(ResultStatus.REFUSED):
        raise Refused(f"{where} refused: {_details(refusals)}", event_id=outcome.event_id)


def _details(results: dict[int, Result]) -> str:
    reasons = {r.detail for r in results.values()}
    if len(reasons) == 1:
        return reasons.pop()
    return "; ".join(f"worker {w}: {r.detail}" for w, r in results.items())
