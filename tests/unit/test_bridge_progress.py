"""The worker relays an executor's progress report to the scheduler without losing fields."""

from hypha.protocol import bridge as b
from hypha.protocol import messages as m
from hypha.worker.backend import to_event, to_instruction


def test_progress_report_keeps_every_field() -> None:
    body = b.ProgressReport(batches=3, samples=24, seconds=0.5, loss=2.0, round=4, slices_done=[7, 9])
    assert to_event(body) == m.BatchesDone(
        round=4, batches=3, samples=24, seconds=0.5, loss=2.0, slices_done=[7, 9]
    )
    assert to_event(b.UpdateSentReport(round=2, samples=10)) == m.UpdateSent(round=2, samples=10)
    assert to_event(b.UpdateAppliedReport(round=2)) == m.UpdateApplied(round=2)


def test_instructions_map_to_bridge_actions() -> None:
    assert to_instruction(m.SyncAfter(round=1, batches=5)) == b.InstructionBody(
        action="sync", batches=5, round=1
    )
    assert to_instruction(m.Done()) == b.InstructionBody(action="done")
    assert to_instruction(m.Continue()) == b.InstructionBody(action="continue")
