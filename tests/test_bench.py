"""The benchmark tool runs end to end and writes well-formed JSON. No timing thresholds: machines are noisy."""
import json
import math

import pytest

from torch_cnnbp import bench


def _positive_finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _run(tmp_path, *args):
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def _check_case(case, family):
    assert case["family"] == family
    for side in ("ours", "native"):
        stats = case[side]
        for key in ("median_ms", "q1_ms", "q3_ms", "min_ms"):
            assert _positive_finite(stats[key]), (side, key, stats[key])
        assert stats["q1_ms"] <= stats["median_ms"] <= stats["q3_ms"]
        assert stats["reps"] >= bench.QUICK.min_rounds
    assert _positive_finite(case["ratio"])
    assert _positive_finite(case["ratio_paired"]["median"])
    assert isinstance(case["agrees"], bool) and case["relative_error"] >= 0


def test_conv_case_with_memory(tmp_path):
    doc = _run(tmp_path, "--filter", "lenet5.c3", "--memory", "--threads", "1")
    machine = doc["machine"]
    for key in ("cpu_model", "logical_cpus", "torch", "date"):
        assert machine[key]
    assert doc["settings"]["mode"] == "fwdbwd" and doc["settings"]["dtype"] == "float32"
    (run,) = doc["runs"]
    assert run["threads"] == 1
    (case,) = run["cases"]
    _check_case(case, "conv2d")
    # 2·N·K·OH·OW·(C/groups)·kh·kw, 3x for forward+backward
    assert case["flops"] == 3 * 2 * 8 * 16 * 10 * 10 * 6 * 5 * 5
    assert _positive_finite(case["ours"]["gflops"]) and _positive_finite(case["native"]["gflops"])
    memory = case["memory"]
    for side in ("ours", "native"):
        assert memory[side]["peak_extra_bytes"] >= 0
        assert memory[side]["result_bytes"] > 0
    assert memory["method"]
    family = run["summary"]["families"]["conv2d"]
    assert family["cases"] == 1 and _positive_finite(family["geomean_ratio"])
    assert _positive_finite(run["summary"]["max_ratio"])


def test_pool_cases_at_two_thread_counts(tmp_path):
    doc = _run(tmp_path, "--filter", "lenet5.s2", "--threads", "1,2", "--mode", "fwd")
    assert [run["threads"] for run in doc["runs"]] == [1, 2]
    for run in doc["runs"]:
        names = [c["name"] for c in run["cases"]]
        assert len(names) == 2 and any("channels_last" in n for n in names) and any("NCHW" in n for n in names)
        for case in run["cases"]:
            _check_case(case, case["family"])
            assert case["family"].startswith("max_pool2d")
            assert _positive_finite(case["ours"]["gbytes_per_s"])
        assert set(run["summary"]["families"]) == {"max_pool2d NCHW", "max_pool2d channels_last"}
    for ups in doc["scaling"]["cases"].values():
        assert _positive_finite(ups[0]["ours"]) and _positive_finite(ups[0]["native"])


def test_suite_covers_the_issue(capsys):
    names = [c.name for c in bench.select_cases(quick=False, filters=[])]
    assert len(names) == len(set(names))
    for needle in ("lenet5.c1", "lenet5.c3", "resnet.stem 3->64 7x7 s2 p3 @224x224 n1",
                   "resnet.stem 3->64 7x7 s2 p3 @224x224 n8", "64->64 3x3 p1 @56x56", "128->128 3x3 p1 @28x28",
                   "256->256 3x3 p1 @14x14", "512->512 3x3 p1 @7x7", "256->64 1x1 @56x56", "64->256 1x1 @56x56",
                   "mobilenet.dw", "mobilenet.pw", "d2", "resnet.maxpool 64ch 3x3 s2 p1 @112x112",
                   "lenet5.s2 6ch 2x2 s2 @28x28 n64 NCHW", "lenet5.s2 6ch 2x2 s2 @28x28 n64 channels_last"):
        assert any(needle in n for n in names), needle
    quick = bench.select_cases(quick=True, filters=[])
    assert all(c.batch <= 8 for c in quick)
    assert bench.main(["--list", "--filter", "resnet.stem"]) == 0
    assert "resnet.stem" in capsys.readouterr().out


def test_extra_suite_is_other_shapes_of_every_family(capsys):
    main = {c.name for c in bench.select_cases(quick=False, filters=[])}
    extra = bench.select_cases(quick=False, filters=[], suite_name="extra")
    names = [c.name for c in extra]
    assert len(names) == len(set(names)) and not main & set(names)
    assert {c.family for c in extra} == set(bench.FAMILIES)
    for needle in ("5x5", "g4", "d3", "s2", "1x1", "g96", "channels_last", "NCHW"):
        assert any(needle in n for n in names), needle
    assert bench.main(["--list", "--suite", "extra", "--filter", "other.grouped"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        f"{'conv2d':<26} other.grouped 128->128 3x3 p1 g4 @28x28 n4"]


@pytest.mark.parametrize("bad", ["0", "a", "1,,x"])
def test_threads_option_rejects_bad_counts(bad):
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--threads", bad])


def test_memory_fallback_without_clear_refs(monkeypatch):
    import dataclasses

    import torch

    monkeypatch.setattr(bench, "_reset_peak_rss", lambda: False)
    case = bench.select_cases(quick=True, filters=["lenet5.c3"])[0]
    spec = {"case": dataclasses.asdict(case), "dtype": "float32", "mode": "fwdbwd",
            "threads": torch.get_num_threads(), "impl": "ours"}
    result = bench.memory_worker(spec)
    assert result["method"].startswith("ru_maxrss") and result["peak_extra_bytes"] >= 0
    assert result["result_bytes"] > 0
