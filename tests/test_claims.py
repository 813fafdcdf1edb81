"""Tests of the claim record a worker shares with the producer, on real files and processes."""

import fcntl
import os

import pytest

from gaspar._claims import KEPT_REPLY_SIZE, ClaimRecord


@pytest.fixture
def records(tmp_path):
    """Return the worker's and the producer's view of one claim record."""
    path = str(tmp_path / "worker-1.claims")
    worker_view = ClaimRecord.create(path)
    producer_view = ClaimRecord.open(path)
    yield worker_view, producer_view
    worker_view.close()
    producer_view.close(unlink=True)


def run_and_crash(action) -> None:
    """Run ``action()`` in a forked child that then exits without closing anything, as a crash would."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0


def test_claims_claim_shows_in_other_process_view(records):
    worker_view, producer_view = records

    assert worker_view.claim(7)

    assert producer_view.started == 7


def test_claims_revoke_returns_last_started(records):
    worker_view, producer_view = records
    worker_view.claim(3)

    assert producer_view.revoke_through(5) == 3


def test_claims_revoked_request_cannot_be_claimed(records):
    worker_view, producer_view = records
    worker_view.claim(3)
    producer_view.revoke_through(5)

    assert not worker_view.claim(4)
    assert not worker_view.claim(5)
    assert worker_view.claim(6)
    assert producer_view.started == 6


def test_claims_revoke_mark_never_moves_back(records):
    worker_view, producer_view = records
    producer_view.revoke_through(9)
    producer_view.revoke_through(4)

    assert not worker_view.claim(8)


def test_claims_revoke_skipped_while_worker_holds_lock(records):
    worker_view, producer_view = records

    fcntl.flock(worker_view._fd, fcntl.LOCK_EX)
    try:
        assert producer_view.revoke_through(5) is None
    finally:
        fcntl.flock(worker_view._fd, fcntl.LOCK_UN)

    assert worker_view.claim(5)


def test_claims_started_survives_process_death(tmp_path):
    path = str(tmp_path / "worker-2.claims")

    def claim_two() -> None:
        record = ClaimRecord.create(path)
        record.claim(41)
        record.claim(42)

    run_and_crash(claim_two)

    record = ClaimRecord.open(path)
    try:
        assert record.started == 42
        # A dead process holds no lock.
        assert record.revoke_through(50) == 42
    finally:
        record.close(unlink=True)
    assert not os.path.exists(path)


def test_claims_create_rejects_existing_file(tmp_path):
    path = tmp_path / "worker-3.claims"
    path.write_bytes(b"")

    with pytest.raises(FileExistsError):
        ClaimRecord.create(str(path))


def test_claims_closed_record_raises(tmp_path):
    record = ClaimRecord.create(str(tmp_path / "worker-4.claims"))
    record.close()

    with pytest.raises(ValueError, match="closed"):
        record.started


def test_claims_kept_reply_survives_process_death(tmp_path):
    path = str(tmp_path / "worker-5.claims")

    def keep_two() -> None:
        record = ClaimRecord.create(path)
        record.keep_reply(7, b"first")
        record.keep_reply(8, b"second reply")

    run_and_crash(keep_two)

    record = ClaimRecord.open(path)
    try:
        assert record.kept_reply() == (8, b"second reply")
    finally:
        record.close(unlink=True)


def test_claims_kept_reply_empty_at_start(records):
    _, producer_view = records

    assert producer_view.kept_reply() == (0, b"")


def test_claims_keep_reply_rejects_too_large(records):
    worker_view, producer_view = records
    worker_view.keep_reply(3, b"small")

    assert not worker_view.keep_reply(4, b"x" * (KEPT_REPLY_SIZE + 1))
    assert producer_view.kept_reply() == (3, b"small")


def test_claims_keep_reply_at_size_limit(records):
    worker_view, producer_view = records
    reply = bytes(range(256)) * (KEPT_REPLY_SIZE // 256)

    assert worker_view.keep_reply(9, reply)
    assert producer_view.kept_reply() == (9, reply)
