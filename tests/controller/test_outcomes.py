"""What the workers' results of one command add up to (outcomes.py), on outcomes built here: LMCache's
token count and health answers, each rank's count when ranks disagree, and the errors failures raise."""

from __future__ import annotations

import msgspec
import pytest

from kvbus.controller import outcomes
from kvbus.controller.answers import HealthAnswer, TokenCountAnswer
from kvbus.controller.bus import Outcome
from kvbus.controller.errors import AgentFailed, AgentTimeout, APIError, Refused
from kvbus.shared.messages import Result, ResultStatus

EVENT = "Clear-under-test"
OK, EXPIRED, ERROR, REFUSED = ResultStatus.OK, ResultStatus.EXPIRED, ResultStatus.ERROR, ResultStatus.REFUSED


def outcome(*results: tuple[ResultStatus, int, str], error_code: int = 0) -> Outcome:
    """An outcome of instance "inst" with worker n's (status, num_tokens, detail) at results[n]."""
    return Outcome(
        EVENT,
        "inst",
        {
            worker_id: Result(
                event_id=EVENT,
                instance_id="inst",
                worker_id=worker_id,
                status=status,
                num_tokens=num_tokens,
                error_code=error_code if status == OK else 0,
                detail=detail,
            )
            for worker_id, (status, num_tokens, detail) in enumerate(results)
        },
    )


def test_ranks_that_agree_give_lmcache_s_answer_exactly() -> None:
    answer = outcomes.token_count(outcome((OK, 512, ""), (OK, 512, "")))
    assert msgspec.to_builtins(answer) == {"event_id": EVENT, "num_tokens": 512}


def test_ranks_that_disagree_give_the_smallest_count_and_each_rank_s(caplog: pytest.LogCaptureFixture) -> None:
    answer = outcomes.token_count(outcome((OK, 600, ""), (OK, 512, ""), (OK, 700, "")))
    assert answer == TokenCountAnswer(
        event_id=EVENT, num_tokens=512, num_tokens_per_worker={"0": 600, "1": 512, "2": 700}
    )
    assert "workers of inst disagree on num_tokens" in caplog.text


@pytest.mark.parametrize(
    ("results", "error", "detail"),
    [
        ([(OK, 5, ""), (EXPIRED, 0, "arrived 30 ms past its deadline")], AgentTimeout, "received the command too late"),
        ([(OK, 5, ""), (ERROR, 0, "OSError: device lost")], AgentFailed, "failed"),
        ([(REFUSED, 0, "no compression on LocalDiskBackend")], Refused, "refused"),
    ],
    ids=["expired", "error", "refused"],
)
def test_a_failed_rank_raises_its_error_with_its_reason_and_the_event(
    results: list[tuple[ResultStatus, int, str]], error: type[APIError], detail: str
) -> None:
    with pytest.raises(error) as raised:
        outcomes.token_count(outcome(*results))
    reason = results[-1][2]
    assert raised.value.detail == f"the agent of 'inst' {detail}: {reason}"
    assert raised.value.context == {"event_id": EVENT}


def test_a_late_rank_counts_before_a_failed_one_and_a_failure_before_a_refusal() -> None:
    with pytest.raises(AgentTimeout):
        outcomes.token_count(outcome((REFUSED, 0, "r"), (ERROR, 0, "e"), (EXPIRED, 0, "late")))
    with pytest.raises(AgentFailed):
        outcomes.token_count(outcome((REFUSED, 0, "r"), (ERROR, 0, "e")))


def test_ranks_failing_for_different_reasons_are_each_named() -> None:
    with pytest.raises(AgentFailed) as different:
        outcomes.token_count(outcome((ERROR, 0, "OSError: device lost"), (OK, 5, ""), (ERROR, 0, "MemoryError: ")))
    assert (
        different.value.detail == "the agent of 'inst' failed: worker 0: OSError: device lost; worker 2: MemoryError: "
    )
    with pytest.raises(AgentFailed) as same:
        outcomes.token_count(outcome((ERROR, 0, "OSError: device lost"), (ERROR, 0, "OSError: device lost")))
    assert same.value.detail == "the agent of 'inst' failed: OSError: device lost"


def test_health_gives_each_rank_s_code_and_minus_1001_for_a_rank_that_could_not_check() -> None:
    healthy = outcomes.health(outcome((OK, 0, ""), (OK, 0, "")))
    assert msgspec.to_builtins(healthy) == {"event_id": EVENT, "error_codes": {"0": 0, "1": 0}}
    unwell = outcomes.health(outcome((OK, 0, "memory check failed"), (ERROR, 0, "OSError: device lost"), error_code=-1))
    assert unwell == HealthAnswer(
        event_id=EVENT,
        error_codes={"0": -1, "1": outcomes.WORKER_ERROR},
        details={"0": "memory check failed", "1": "OSError: device lost"},
    )
    assert outcomes.WORKER_ERROR == -1001  # LMCache's code
