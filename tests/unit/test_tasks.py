"""Covers: tasks retry only transient failures (an interrupted download, an unreachable tracking
server), never a bad input."""

from __future__ import annotations

from prefect.states import Completed, Failed

from tasks import retry_on
from thinkdiff.data.corpus import CorpusError, IncompleteDownloadError
from thinkdiff.registry import TrackingUnavailableError


def test_retry_only_on_transient_failures():
    condition = retry_on(IncompleteDownloadError, TrackingUnavailableError)
    assert condition(None, None, Failed(data=IncompleteDownloadError("img2dataset stopped")))
    assert condition(None, None, Failed(data=TrackingUnavailableError("server down")))
    assert not condition(None, None, Failed(data=CorpusError("only 10% downloaded")))
    assert not condition(None, None, Failed(data=ValueError("bad config")))
    assert not condition(None, None, Completed(data=1))
