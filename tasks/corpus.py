from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from tasks import retry_on
from thinkdiff import pipeline
from thinkdiff.config import load_config
from thinkdiff.data.corpus import IncompleteDownloadError


# Retried only when img2dataset stopped early (a rerun continues); a bad url list or a low success
# rate would fail the same way again.
@task(name="build-corpus", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_on(IncompleteDownloadError),
      timeout_seconds=24 * 3600)
def build_corpus_task(config: str, overrides: list[str]) -> str:
    corpus = pipeline.build_corpus(load_config(config, overrides))
    create_table_artifact(corpus.shard_success_rates, key="corpus-success-rates",
                          description=f"Images img2dataset downloaded per shard of {corpus.path}")
    return str(corpus.path)
