from __future__ import annotations

from prefect import task

from thinkdiff import pipeline
from thinkdiff.config import load_config
from thinkdiff.data.corpus import IncompleteDownloadError


def retry_if_incomplete_download(task, task_run, state) -> bool:
    """Retry only when img2dataset stopped early (a rerun continues); a bad url list or a low
    success rate would fail the same way again."""
    try:
        state.result()
    except IncompleteDownloadError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is final
        return False
    return False


@task(name="build-corpus", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_incomplete_download,
      timeout_seconds=24 * 3600)
def build_corpus_task(config: str, overrides: list[str]) -> str:
    return str(pipeline.build_corpus(load_config(config, overrides)))
