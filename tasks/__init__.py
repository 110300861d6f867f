"""Thin Prefect tasks: each resolves the config, calls one stage function of the library
(`thinkdiff.pipeline`, or `thinkdiff.eval.stage` for CoBSAT) and returns something small (a path as
a string, a list of paths, a dict of strings). A task is named after its flow's verb-noun
(`train-aligner`) or a step of it (`cache-feature-shard`), and its function after the task
(`train_aligner_task`)."""

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler


class _InsideRunsOnly(logging.Filter):
    """The same library also runs outside flows (CLI, tests); only run-time records go to the API."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


# Library log lines (logger "thinkdiff", which never imports Prefect) go to the Prefect run logs.
# Attached here rather than through PREFECT_LOGGING_EXTRA_LOGGERS, which only works when set
# before Prefect's first import; INFO because Prefect leaves the root logger at WARNING.
_library_logger = logging.getLogger("thinkdiff")
_library_logger.setLevel(logging.INFO)
if not any(isinstance(h, APILogHandler) for h in _library_logger.handlers):
    _handler = APILogHandler()
    _handler.addFilter(_InsideRunsOnly())
    _library_logger.addHandler(_handler)


def retry_on(*transient: type[BaseException]):
    """A `retry_condition_fn` that retries only failures of the given (transient) types; anything else
    would fail the same way again."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except transient:
            return True
        except Exception:  # noqa: BLE001 - every other failure is final
            return False
        return False

    return condition


def send_run_logs(task, task_run, state) -> None:
    """An on_completion / on_failure hook of tasks that run in Ray workers: such a process sends its
    batched log records (the library's progress lines among them) only when told to, so the task
    run's logs reach the Prefect API as it ends rather than never."""
    for handler in _library_logger.handlers:
        handler.flush()
