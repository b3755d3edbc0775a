"""A drain batch's prune of the backup's journal, beside the primary's work."""

from __future__ import annotations

import threading
from contextlib import suppress
from typing import Any

import psycopg

from .journal import JOURNAL, _steady

__all__ = ["Prune"]


class Prune:
    """The deletion of a batch's journal entries from the backup, after the primary commits.

    With a second connection to the backup (``pruner``) the DELETE runs in a
    thread while the primary applies the batch, and is committed only after
    the primary's commit (a batch that fails on the primary rolls it back:
    its entries stay). Without one, it runs on ``source`` at `commit`.
    Leaving the ``with`` block always joins the thread: none outlives a batch.
    """

    def __init__(self, source: psycopg.Connection[Any],
                 pruner: psycopg.Connection[Any] | None) -> None:
        self._source = source
        self._pruner = pruner
        self._seqs: list[int] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._committed = False

    def __enter__(self) -> Prune:
        return self

    def start(self, seqs: list[int]) -> None:
        self._seqs = seqs
        if self._pruner is not None:
            self._thread = threading.Thread(target=self._delete, name="agent-factory-prune",
                                            daemon=True)
            self._thread.start()

    def _delete(self) -> None:
        assert self._pruner is not None
        try:
            self._pruner.execute(_PRUNE, (self._seqs,))
        except BaseException as exc:  # noqa: BLE001 - re-raised by `commit`
            self._error = exc

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def commit(self) -> None:
        """Delete the entries (the primary has committed); a failure of the DELETE raises."""
        if self._seqs is None:
            return
        if self._pruner is None:
            with _steady(self._source):
                self._source.execute(_PRUNE, (self._seqs,))
        else:
            self._join()
            if self._error is not None:
                raise self._error
            self._pruner.commit()
        self._committed = True

    def __exit__(self, *exc: object) -> None:
        self._join()
        if self._pruner is not None and self._seqs is not None and not self._committed:
            with suppress(psycopg.Error):  # the batch's own error is the one to report
                self._pruner.rollback()


_PRUNE = f"DELETE FROM {JOURNAL} WHERE seq = ANY(%s)"
