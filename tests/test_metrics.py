"""The delivery metrics, which are counted as plain numbers and rendered by a collector."""

from __future__ import annotations

from eventrelay.metrics import Metrics


def sample(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.rsplit(" ", 1)[1])


def test_delivery_counts_render_as_a_counter_and_a_cumulative_histogram() -> None:
    m = Metrics()
    erp = m.deliveries("erp")
    for seconds in (0.0004, 0.001, 0.0011, 31.0):  # 0.001 is on a bound: le counts it there
        erp.add("delivered", seconds)
    erp.add("failed", 2.0)
    assert m.deliveries("erp") is erp  # one per integration, kept by the registry's owner
    text = m.render().decode()
    assert sample(text, 'eventrelay_delivery_attempts_total{integration="erp",result="delivered"}') == 4
    assert sample(text, 'eventrelay_delivery_attempts_total{integration="erp",result="failed"}') == 1
    # Every result is exported from the start, at 0 until it happens (an increase() alert sees the first).
    assert sample(text, 'eventrelay_delivery_attempts_total{integration="erp",result="dead"}') == 0
    hist = 'eventrelay_delivery_duration_seconds'
    assert sample(text, hist + '_bucket{integration="erp",le="0.001"}') == 2
    assert sample(text, hist + '_bucket{integration="erp",le="0.0025"}') == 3
    assert sample(text, hist + '_bucket{integration="erp",le="2.5"}') == 4
    assert sample(text, hist + '_bucket{integration="erp",le="30.0"}') == 4
    assert sample(text, hist + '_bucket{integration="erp",le="+Inf"}') == 5
    assert sample(text, hist + '_count{integration="erp"}') == 5
    assert abs(sample(text, hist + '_sum{integration="erp"}') - 33.0025) < 1e-9


def test_counters_exist_at_zero_from_the_start_and_the_process_is_described() -> None:
    text = Metrics().render().decode()
    for name in ('eventrelay_config_reloads_total{result="ok"}', 'eventrelay_config_reloads_total{result="failed"}',
                 'eventrelay_connections_refused_total{listener="http"}',
                 'eventrelay_connections_refused_total{listener="socket"}'):
        assert sample(text, name) == 0
    assert sample(text, "process_resident_memory_bytes") > 0
    assert sample(text, "process_open_fds") > 0
    assert "process_cpu_seconds_total" in text
