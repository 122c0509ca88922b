import logging

from gpu_orchestrator.supervisor.logs import kv, relay_line, setup_logging


def test_kv_quotes_only_what_needs_it():
    assert kv("loader started", client="a", pid=3) == "loader started client=a pid=3"
    assert kv("failed", error='no "x" here\nnext') == 'failed error="no \\"x\\" here\\nnext"'
    assert kv("empty", reason="") == 'empty reason=""'


def test_waitress_queue_depth_warnings_are_silenced():
    setup_logging()
    assert not logging.getLogger("waitress.queue").isEnabledFor(logging.WARNING)
    assert logging.getLogger("waitress").isEnabledFor(logging.WARNING)


def test_relayed_lines_keep_their_level(caplog):
    logger = logging.getLogger("loader")
    with caplog.at_level(logging.INFO, logger="loader"):
        relay_line(logger, "ERROR loader: model failed client=a")
        relay_line(logger, "a traceback line")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "model failed client=a"), (logging.INFO, "a traceback line")]


def test_log_level_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOG_LEVEL", "warning")
    setup_logging()
    assert logging.getLogger().level == logging.WARNING
    monkeypatch.setenv("LOG_LEVEL", "nonsense")
    setup_logging()
    assert logging.getLogger().level == logging.INFO
