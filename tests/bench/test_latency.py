"""Latency harness: sane statistics, untouched models, interleaved comparison, MAC-based ideal
speedup, and a clear answer when CUDA is asked for but absent."""
import json

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from model_state import assert_unchanged, snapshot
from fxprune import bench
from fxprune.bench import (BenchError, Comparison, DeviceUnavailableError, LatencyStats,
                           batch_sweep, compare, count_macs, count_params, format_table,
                           measure, resize_batch, to_json)

FAST = dict(warmup=1, runs=5, threads=1)  # one thread: quick and steady on a busy 2-core box


class ConvBnRelu(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def _inputs(batch=2):
    return (torch.randn(batch, 3, 16, 16),)


CALL_LOG = []  # module-level, so the private copies the harness makes still write here


class Tagged(nn.Module):
    def __init__(self, tag):
        super().__init__()
        self.tag = tag
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        CALL_LOG.append(self.tag)
        return self.linear(x)


def test_stats_are_ordered_and_positive():
    stats = measure(ConvBnRelu(), _inputs(), **FAST)
    assert isinstance(stats, LatencyStats)
    assert stats.median_ms > 0 and stats.p25_ms <= stats.median_ms <= stats.p75_ms
    assert stats.iqr_ms == pytest.approx(stats.p75_ms - stats.p25_ms)
    assert (stats.runs, stats.device, stats.dtype, stats.batch) == (5, "cpu", "fp32", 2)
    assert len(stats.samples_ms) == 5 and all(s > 0 for s in stats.samples_ms)


def test_percentiles_interpolate_like_numpy():
    stats = LatencyStats.from_samples([4.0, 1.0, 3.0, 2.0], device="cpu", dtype="fp32", batch=1)
    assert (stats.p25_ms, stats.median_ms, stats.p75_ms, stats.iqr_ms) == (1.75, 2.5, 3.25, 1.5)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "fx"])
def test_measure_leaves_the_model_as_it_was(traced):
    model = ConvBnRelu()
    model = fx.symbolic_trace(model) if traced else model
    model.train()
    before, threads_before = snapshot(model), torch.get_num_threads()
    stats = measure(model, _inputs(), warmup=1, runs=5, threads=1)
    assert_unchanged(model, before)  # training flags, parameters and BN statistics
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert stats.threads == 1 and torch.get_num_threads() == threads_before
    assert measure(model, _inputs(), warmup=1, runs=2).threads == threads_before


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_runs_under_autocast_without_converting_the_model(dtype):
    model = ConvBnRelu()
    stats = measure(model, _inputs(), dtype=dtype, **FAST)
    assert stats.dtype == dtype and stats.median_ms > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_channels_last_and_compile_options_run():
    model = ConvBnRelu()
    stats = measure(model, _inputs(), channels_last=True, compile="eager", **FAST)
    assert stats.median_ms > 0
    assert model.conv1.weight.is_contiguous()  # the caller's layout is untouched


def test_batch_sweep_resizes_inputs_along_dim0():
    sweep = batch_sweep(ConvBnRelu(), _inputs(batch=2), [1, 3, 4], **FAST)
    assert [s.batch for s in sweep] == [1, 3, 4]
    x = torch.arange(6.0).reshape(2, 3)
    resized = resize_batch((x, {"mask": torch.ones(2)}, 0.5), 5)
    assert resized[0].shape == (5, 3) and torch.equal(resized[0][2], x[0])
    assert resized[1]["mask"].shape == (5,) and resized[2] == 0.5


def test_compare_against_half_width_reports_ideal_speedup_above_one():
    original, pruned = ConvBnRelu(width=16), ConvBnRelu(width=8)
    before = snapshot(original)
    record = compare(original, pruned, _inputs(), name="conv_bn_relu", **FAST)
    assert_unchanged(original, before)
    assert isinstance(record, Comparison) and record.name == "conv_bn_relu"
    assert record.original.runs == record.pruned.runs == 5
    assert record.original_macs == count_macs(original, _inputs())
    assert record.pruned_macs < record.original_macs and record.ideal_speedup > 1
    assert record.original_params == count_params(original) > record.pruned_params
    assert record.speedup == pytest.approx(record.original.median_ms / record.pruned.median_ms)
    assert record.efficiency == pytest.approx(record.speedup / record.ideal_speedup)


def test_compare_interleaves_the_two_models_in_alternating_rounds():
    CALL_LOG.clear()
    compare(Tagged("o"), Tagged("p"), (torch.randn(2, 4),), warmup=1, runs=4)
    timed = CALL_LOG[-8:]  # after the warm-up calls and the MAC count
    assert timed == ["o", "p", "p", "o", "o", "p", "p", "o"]


def test_mac_count_matches_hand_count():
    conv = nn.Conv2d(3, 8, 3, bias=False)
    assert count_macs(conv, (torch.randn(2, 3, 10, 10),)) == 2 * 8 * 8 * 8 * 3 * 3 * 3
    assert count_macs(nn.Linear(4, 3), torch.randn(5, 4)) == 5 * 4 * 3


def test_table_and_json_contain_every_field():
    record = compare(ConvBnRelu(16), ConvBnRelu(8), _inputs(), name="net", **FAST)
    table = format_table([record])
    for column in ("model", "original ms", "pruned ms", "speedup", "ideal", "efficiency", "MACs"):
        assert column in table
    assert "net" in table
    doc = json.loads(json.dumps(to_json([record])))
    entry = doc["records"][0]
    for key in ("original", "pruned", "speedup", "ideal_speedup", "efficiency", "original_macs",
                "pruned_macs", "original_params", "pruned_params"):
        assert key in entry
    assert entry["original"]["median_ms"] == record.original.median_ms
    assert doc["schema"] == "fxprune.bench" and doc["environment"]["torch"] == torch.__version__
    sweep = batch_sweep(ConvBnRelu(), _inputs(), [1, 2], **FAST)
    assert "median ms" in format_table(sweep)
    assert json.dumps(to_json(sweep, samples=True))


def test_cuda_request_without_cuda_raises_a_clear_error():
    model = ConvBnRelu()
    before = snapshot(model)
    if torch.cuda.is_available():  # documented behaviour where a GPU exists: it is measured
        stats = measure(model, _inputs(), device="cuda", dtype="fp16", **FAST)
        assert stats.device.startswith("cuda") and stats.median_ms > 0
        assert_unchanged(model, before)
        return
    with pytest.raises(DeviceUnavailableError, match="CUDA is unavailable") as info:
        measure(model, _inputs(), device="cuda", **FAST)
    assert "device='cpu'" in str(info.value) and isinstance(info.value, BenchError)
    with pytest.raises(DeviceUnavailableError):
        compare(model, ConvBnRelu(8), _inputs(), device="cuda:0", **FAST)
    assert_unchanged(model, before)


@pytest.mark.parametrize("options,message", [
    (dict(dtype="int8"), "unknown dtype"),
    (dict(device="tpu"), "device"),
    (dict(runs=0), "runs"),
    (dict(threads=0), "threads"),
])
def test_invalid_settings_raise_bench_error(options, message):
    with pytest.raises(BenchError, match=message):
        measure(ConvBnRelu(), _inputs(), **{**FAST, **options})


def test_package_exports_the_documented_api():
    for name in ("measure", "batch_sweep", "compare", "format_table", "to_json", "LatencyStats"):
        assert hasattr(bench, name)


def test_fold_norms_times_the_deployed_form_and_leaves_the_model_alone():
    from fxprune.bench.latency import ModelRunner, fold_batch_norms
    model = ConvBnRelu().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    before = snapshot(model)
    runner = ModelRunner(model, _inputs(), fold_norms=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in runner.module.modules())
    with torch.no_grad():
        x = _inputs()
        assert torch.allclose(runner.module(*x), model(*x), atol=1e-5)
        assert torch.allclose(fold_batch_norms(model)(*x), model(*x), atol=1e-5)
    assert measure(model, _inputs(), fold_norms=True, **FAST).median_ms > 0
    assert_unchanged(model, before)


def test_fold_norms_on_an_untraceable_model_says_so():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x
    with pytest.raises(BenchError, match="cannot fold norms"):
        measure(Branchy(), _inputs(), fold_norms=True, **FAST)
