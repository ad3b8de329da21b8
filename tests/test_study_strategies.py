"""`fl-ietagc-study strategies --smoke`: every registered strategy through the real app, one comparison table.

In a file of its own: at ~5 min on 2 cores it is the suite's longest test, and scripts/test.sh's pytest-xdist
workers take whole files (`--dist loadfile`), so it runs beside the other smoke studies instead of after them."""

import pytest

from tests.test_studies import check_smoke_study


@pytest.mark.slow(minutes=5.5)
def test_the_strategies_smoke_study_runs_every_strategy_and_writes_a_comparison(tmp_path, ray_head, monkeypatch):
    check_smoke_study("strategies", tmp_path, ray_head, monkeypatch)
