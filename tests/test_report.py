"""The benchmarks' interleaved call order (`rss_jax.report.interleaved`)."""
from rss_jax.report import interleaved


def test_interleaved_runs_every_config_on_every_item_in_a_rotating_order():
    calls = []
    outs = interleaved(["p", "q", "r", "s"], ["A", "B", "C"], lambda c, i, item: calls.append((c, i)) or f"{c}{item}")
    assert outs == [["Ap", "Aq", "Ar", "As"], ["Bp", "Bq", "Br", "Bs"], ["Cp", "Cq", "Cr", "Cs"]]
    # item i starts with config i % 3, then the list wraps around
    assert [c for c, _ in calls] == list("ABC" + "BCA" + "CAB" + "ABC")
    assert [i for _, i in calls] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert interleaved([], ["A"], None) == [[]] and interleaved(["p"], [], None) == []
