"""Thin Prefect tasks: each resolves the config, calls one `thinkdiff.pipeline` function and
returns something small (a path as a string, a list of paths)."""

import logging

from prefect.logging.handlers import APILogHandler

# Library log lines (logger "thinkdiff", which never imports Prefect) go to the Prefect run logs.
# Attached here rather than through PREFECT_LOGGING_EXTRA_LOGGERS, which only works when set
# before Prefect's first import; INFO because Prefect leaves the root logger at WARNING.
_library_logger = logging.getLogger("thinkdiff")
_library_logger.setLevel(logging.INFO)
if not any(isinstance(h, APILogHandler) for h in _library_logger.handlers):
    _library_logger.addHandler(APILogHandler())
