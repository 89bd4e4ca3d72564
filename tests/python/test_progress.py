import logging

from sdrpn.progress import LogProgress, show_progress


def test_a_log_gets_plain_progress_lines(caplog):
    caplog.set_level(logging.INFO, logger="sdrpn.progress")
    bar = LogProgress(total=10, desc="label", unit="sample", initial=2, every=0.0)
    bar.update(3)
    bar.set_postfix(loss="0.1234")
    bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("label: 5/10 samples, ") and "samples/s" in lines[0] and " left" in lines[0]
    assert lines[1].startswith("label: 6/10 samples, ") and lines[1].endswith(", loss 0.1234")
    assert "\r" not in "".join(lines)


def test_iterating_reports_the_end_and_keeps_the_items(caplog):
    caplog.set_level(logging.INFO, logger="sdrpn.progress")
    # Under pytest stderr is not a terminal: the log form, as in a redirected job.
    assert list(show_progress(range(4), desc="infer", unit="sample")) == [0, 1, 2, 3]
    assert caplog.records[-1].getMessage().startswith("infer: 4/4 samples, ")
    assert list(show_progress(range(2), desc="x", unit="step", disable=True)) == [0, 1]
