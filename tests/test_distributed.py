"""Calibration and QAT under torch.distributed (issue #4): observer statistics merged over ranks.

Two gloo ranks (spawned processes) calibrate the same model on different data, or train it
through DDP. Every rank must end with the same int8 model: with min/max observers exactly the
one a single process calibrates on both ranks' data together, with histogram and moving-average
observers close to it. One spawn runs every case and writes its results to files the tests read.
"""
import datetime
import re
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.multiprocessing as mp
import torch.nn as nn

import fxq
from fxq import quant, stages

WORLD_SIZE = 2
QUANTIZE_OP = re.compile(r"\bquantize_per_tensor\b")  # torch.quantize_per_tensor, quantized_decomposed's; not dequantize
#: A deadlocked collective fails the test instead of freezing CI (a normal run takes seconds).
SPAWN_DEADLINE_SECONDS = 300
X86 = fxq.get_backend("x86")


#: Compared with one process on all the data: reference backends, one precision split each, by
#: activation observer. x86 (histogram activations) may keep another of its precision splits
#: than one process does, so it is only checked for being the same on every rank.
BACKENDS = {observer: fxq.reference_backend(activation_observer=observer)
            for observer in ("minmax", "histogram", "moving_average")}
ALL_BACKENDS = {**BACKENDS, "x86": X86}


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x)) + x
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet().eval()


EXAMPLE_INPUTS = (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7)),)


def _batches(rank: int) -> list[torch.Tensor]:
    """Rank 0's data is shifted down, rank 1's up: the union's range comes from both ranks."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 3, 16, 16, generator=generator) * 2 + (2 * rank - 1) for _ in range(3)]


def _union_batches() -> list[torch.Tensor]:
    return [batch for rank in range(WORLD_SIZE) for batch in _batches(rank)]


def _quantize(model: nn.Module, batches: list, backend: fxq.Backend) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxq.quantize(model, EXAMPLE_INPUTS, calibration_data=batches, backend=backend)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``module``'s state; a quantized one as its int8 values, scales and zero points."""
    flat = {}

    def add(key, value):
        if isinstance(value, (tuple, list)):  # packed Linear params: (weight, bias)
            for index, item in enumerate(value):
                add(f"{key}.{index}", item)
        elif isinstance(value, torch.Tensor) and value.is_quantized:
            flat[f"{key}.int8"] = value.int_repr()
            if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                flat[f"{key}.scale"] = torch.tensor(value.q_scale())
                flat[f"{key}.zero_point"] = torch.tensor(value.q_zero_point())
            else:
                flat[f"{key}.scale"] = value.q_per_channel_scales()
                flat[f"{key}.zero_point"] = value.q_per_channel_zero_points()
        elif isinstance(value, torch.Tensor):
            flat[key] = value

    for key, value in module.state_dict().items():
        add(key, value)
    return {**flat, **_quantize_node_qparams(module)}


def _quantize_node_qparams(module: nn.Module) -> dict[str, torch.Tensor]:
    """Scale and zero point of every quantize node (a reference model keeps them in the graph)."""
    found = {}
    for path, graph_module in module.named_modules():
        if not isinstance(graph_module, fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and QUANTIZE_OP.search(str(node.target)):
                for role, arg in zip(("scale", "zero_point"), node.args[1:3]):
                    value = graph_module.get_buffer(arg.target) if isinstance(arg, fx.Node) else arg
                    found[f"{path}.{node.name}.{role}"] = torch.as_tensor(value)
    return found


def _scales(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every scale of a converted model: activations (``conv1.scale``, ``_scale_0``) and weights."""
    return {key: value for key, value in tensors.items() if "scale" in key.rsplit(".", 1)[-1]}


def _max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(((a[key].double() - b[key].double()).abs() / b[key].double().abs()).max()) for key in a)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- the spawned ranks -------------------------------------------------------------------------


def _spawn(worker, workdir) -> list[dict]:
    """Run ``worker(rank)`` on WORLD_SIZE gloo ranks; return what each returned (via ``rank<N>.pt``)."""
    context = mp.start_processes(_init_and_run, args=(worker, str(workdir)), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_SECONDS
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed ranks still running after {SPAWN_DEADLINE_SECONDS} s: deadlock?")
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _init_and_run(rank: int, worker, workdir: str) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(worker(rank), f"{workdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _calibrate_on_rank(rank: int) -> dict:
    results = {name: _tensors(_quantize(_model(), _batches(rank), backend)) for name, backend in ALL_BACKENDS.items()}
    wrapped = nn.parallel.DistributedDataParallel(_model())
    results["ddp_wrapped"] = _tensors(_quantize(wrapped, _batches(rank), BACKENDS["minmax"]))
    results["plain_ddp"] = _observed_through_ddp(rank, sync=False, with_grad=False)
    results["plain_ddp_training"] = _observed_through_ddp(rank, sync=False, with_grad=True)
    results["ddp_synced"] = _observed_through_ddp(rank, sync=True, with_grad=False)
    results["qat"] = _train_qat(rank)
    results["zoo"] = _sync_observer_zoo(rank)
    results["mismatch"] = _mismatched_observers(rank)
    return results


def _prepared_minmax() -> fx.GraphModule:
    return stages.prepare_unit(fx.symbolic_trace(_model()), EXAMPLE_INPUTS, BACKENDS["minmax"])


def _observed(batches: list) -> dict:
    """Observer ranges of a prepared model calibrated in one process."""
    prepared = _prepared_minmax()
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    return quant.observer_state(prepared)


def _observed_through_ddp(rank: int, sync: bool, with_grad: bool) -> dict:
    """Observer ranges after calibrating a prepared model wrapped in DDP, as a DDP user would;
    ``with_grad``: forward and backward, as in training (DDP syncs buffers only then)."""
    ddp = nn.parallel.DistributedDataParallel(_prepared_minmax())
    for batch in _batches(rank):
        with torch.set_grad_enabled(with_grad):
            output = ddp(batch)
        if with_grad:
            output.sum().backward()
    if sync:
        fxq.sync_observers(ddp)
    return quant.observer_state(ddp.module)


def _train_qat(rank: int) -> dict:
    """A few SGD steps of QAT through DDP on this rank's batches, then freeze and convert."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxq.prepare_qat(_model(), EXAMPLE_INPUTS)
        ddp = nn.parallel.DistributedDataParallel(prepared)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        for batch in _batches(rank):
            optimizer.zero_grad()
            ddp(batch).square().mean().backward()
            optimizer.step()
        fxq.freeze_bn(prepared)
        trained = {key: value.clone() for key, value in prepared.state_dict().items()}
        fxq.freeze_observers(prepared)
        return {"trained": trained, "converted": _tensors(fxq.convert(prepared))}


def _observer_zoo() -> nn.ModuleDict:
    """One of every observer kind fxq merges, and a batch norm."""
    with quant.quiet():
        fake_quant = torch.ao.quantization.FakeQuantize(observer=quant.MovingAverageMinMaxObserver)
    return nn.ModuleDict({
        "minmax": quant.MinMaxObserver(),
        "per_channel": quant.PerChannelMinMaxObserver(ch_axis=1),
        "moving_average": quant.MovingAverageMinMaxObserver(averaging_constant=0.5),
        "moving_average_per_channel": quant.MovingAveragePerChannelMinMaxObserver(ch_axis=1, averaging_constant=0.5),
        "histogram": quant.HistogramObserver(),
        "nbit_histogram": quant.NBitHistogramObserver(quant_min=0, quant_max=15),
        "fake_quant": fake_quant,
        "bn": nn.BatchNorm1d(4),
        # rank 1 feeds these nothing: they must not pull the merged result towards inf or 0
        "rank0_only_histogram": quant.HistogramObserver(),
        "rank0_only_per_channel": quant.PerChannelMinMaxObserver(ch_axis=1),
        "rank0_only_moving_average": quant.MovingAverageMinMaxObserver(),
    })


def _zoo_batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(200 + rank)
    return [torch.randn(64, 4, generator=generator) * (1 + rank) + (2 * rank - 1) for _ in range(2)]


def _feed_zoo(zoo: nn.ModuleDict, batches: list, rank: int = 0) -> nn.ModuleDict:
    for batch in batches:
        for name, module in zoo.items():
            if rank == 0 or not name.startswith("rank0_only"):
                module(batch)
    return zoo


def _sync_observer_zoo(rank: int) -> dict:
    zoo = _feed_zoo(_observer_zoo(), _zoo_batches(rank), rank)
    count = fxq.sync_observers(zoo)
    synced = {key: value.clone() for key, value in zoo.state_dict().items()}
    fxq.sync_observers(zoo)  # the second call: everything agrees already
    with quant.quiet():
        qparams = {name: module.calculate_qparams() for name, module in zoo.items() if name != "bn"}
    return {"count": count, "synced": synced, "again": zoo.state_dict(), "qparams": qparams}


def _mismatched_observers(rank: int) -> str:
    """Rank 1's model has an observer under another name: both ranks fail, naming it."""
    observers = nn.ModuleDict({"shared": quant.MinMaxObserver(), f"only_on_rank{rank}": quant.MinMaxObserver()})
    try:
        fxq.sync_observers(observers)
    except fxq.DistributedError as error:
        return str(error)
    return "no error"


# ---- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _spawn(_calibrate_on_rank, tmp_path_factory.mktemp("ddp_calibration"))


@pytest.fixture(scope="module")
def union() -> dict:
    """Single-process calibration on both ranks' batches together."""
    return {name: _tensors(_quantize(_model(), _union_batches(), backend)) for name, backend in BACKENDS.items()}


@pytest.mark.parametrize("backend", list(ALL_BACKENDS))
def test_every_rank_converts_the_same_int8_model(ranks, backend):
    _assert_same(ranks[0][backend], ranks[1][backend])


def test_minmax_calibration_equals_one_process_on_all_the_data(ranks, union):
    _assert_same(ranks[0]["minmax"], union["minmax"])


def test_histogram_calibration_is_close_to_one_process_on_all_the_data(ranks, union):
    """Measured: max relative scale difference 5.1e-4 (re-binning each rank's histogram onto
    the union range differs from re-binning batch by batch)."""
    difference = _max_relative_difference(_scales(ranks[0]["histogram"]), _scales(union["histogram"]))
    assert difference < 1e-3


def test_moving_average_calibration_is_close_to_one_process_on_all_the_data(ranks, union):
    """Measured: max relative scale difference 0.18. A moving average weighs batches by their
    order, so one process is no firm reference either: fed rank 1's batches first instead of
    rank 0's, it moves the scales by up to 0.36. The merged mean must be closer than that."""
    merged, rank0_first = _scales(ranks[0]["moving_average"]), _scales(union["moving_average"])
    rank1_first = _scales(_tensors(_quantize(_model(), _batches(1) + _batches(0), BACKENDS["moving_average"])))
    difference = _max_relative_difference(merged, rank0_first)
    assert difference < 0.2
    assert difference < _max_relative_difference(rank1_first, rank0_first)


def test_a_ddp_wrapped_model_is_quantized_as_the_model_it_wraps(ranks):
    _assert_same(ranks[0]["ddp_wrapped"], ranks[0]["minmax"])


def test_plain_ddp_calibration_keeps_each_ranks_own_data(ranks):
    """Calibrated through DDP without sync, each rank's observers saw its own batches only:
    the ranks' ranges differ from each other and from the union's; synced, they are the union's."""
    union_ranges = _observed(_union_batches())
    for rank in range(WORLD_SIZE):
        assert ranks[rank]["plain_ddp"] == _observed(_batches(rank)) != union_ranges
        assert ranks[rank]["ddp_synced"] == union_ranges


def test_plain_ddp_training_overwrites_observers_with_rank0s(ranks):
    """With gradients (training, QAT) DDP broadcasts rank 0's buffers before every forward: rank
    0 never sees rank 1's data, and rank 1 keeps only its last batch on top of rank 0's."""
    assert ranks[0]["plain_ddp_training"] == _observed(_batches(0))
    assert ranks[1]["plain_ddp_training"] == _observed(_batches(0)[:-1] + _batches(1)[-1:])


def test_plain_ddp_scales_differ_from_the_unions(ranks):
    """How far plain DDP's activation scales are from the union's: measured, up to 0.17 relative
    on rank 0 and 0.43 on rank 1."""
    union_ranges = _observed(_union_batches())
    difference = max(_range_scale_difference(ranks[rank]["plain_ddp"], union_ranges) for rank in range(WORLD_SIZE))
    assert difference > 0.4


def _range_scale_difference(ranges: dict, reference: dict) -> float:
    def scale(low, high):
        return max(high, 0.0) - min(low, 0.0)
    return max(abs(scale(*ranges[key]) / scale(*reference[key]) - 1) for key in reference)


def test_qat_through_ddp_converts_the_same_int8_model_on_every_rank(ranks):
    converted = [ranks[rank]["qat"]["converted"] for rank in range(WORLD_SIZE)]
    assert any(key.endswith(".int8") for key in converted[0])
    _assert_same(converted[0], converted[1])


def test_qat_through_ddp_leaves_ranks_with_different_statistics_until_synced(ranks):
    """DDP keeps weights equal, but each rank's last batch updates its own observers and BN
    running statistics: without the sync in freeze_observers the int8 models would differ."""
    trained = [ranks[rank]["qat"]["trained"] for rank in range(WORLD_SIZE)]
    differing = {key for key in trained[0] if not torch.equal(trained[0][key], trained[1][key])}
    assert any(key.endswith("min_val") or key.endswith("max_val") for key in differing)
    assert any(key.endswith("bn.running_mean") for key in differing)
    assert not any(key.endswith("weight") for key in differing)


# ---- every observer kind, merged (the zoo) ---------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_union() -> nn.ModuleDict:
    return _feed_zoo(_observer_zoo(), _zoo_batches(0) + _zoo_batches(1))


def test_zoo_every_rank_holds_the_same_statistics(ranks):
    _assert_same(ranks[0]["zoo"]["synced"], ranks[1]["zoo"]["synced"])
    assert ranks[0]["zoo"]["count"] == ranks[1]["zoo"]["count"] == 10  # every observer, not the batch norm


def test_zoo_a_second_sync_changes_nothing(ranks):
    _assert_same(ranks[0]["zoo"]["again"], ranks[0]["zoo"]["synced"])


def test_zoo_minmax_ranges_are_the_unions(ranks, zoo_union):
    synced = ranks[0]["zoo"]["synced"]
    for name in ("minmax", "per_channel"):
        assert torch.equal(synced[f"{name}.min_val"], zoo_union[name].min_val)
        assert torch.equal(synced[f"{name}.max_val"], zoo_union[name].max_val)


def test_zoo_moving_averages_and_batch_norm_are_means_over_ranks(ranks):
    per_rank = [_feed_zoo(_observer_zoo(), _zoo_batches(rank), rank) for rank in range(WORLD_SIZE)]
    synced = ranks[0]["zoo"]["synced"]
    for key in ("moving_average.min_val", "moving_average_per_channel.max_val", "fake_quant.activation_post_process.min_val",
                "bn.running_mean", "bn.running_var"):
        mean = sum(zoo.state_dict()[key].double() for zoo in per_rank) / WORLD_SIZE
        torch.testing.assert_close(synced[key], mean.float())


def test_zoo_fake_quantize_scale_follows_its_merged_observer(ranks):
    synced, (scale, zero_point) = ranks[0]["zoo"]["synced"], ranks[0]["zoo"]["qparams"]["fake_quant"]
    assert torch.equal(synced["fake_quant.scale"], scale) and torch.equal(synced["fake_quant.zero_point"], zero_point.int())


def test_zoo_histograms_are_close_to_the_unions(ranks, zoo_union):
    synced = ranks[0]["zoo"]["synced"]
    for name in ("histogram", "nbit_histogram"):
        assert float(synced[f"{name}.min_val"]) == float(zoo_union[name].min_val)
        assert float(synced[f"{name}.max_val"]) == float(zoo_union[name].max_val)
        assert float(synced[f"{name}.histogram"].sum()) == pytest.approx(float(zoo_union[name].histogram.sum()))
        with quant.quiet():
            union_scale = float(zoo_union[name].calculate_qparams()[0])
        # measured: the same scale; the range search is coarser than the re-binning error
        assert float(ranks[0]["zoo"]["qparams"][name][0]) == pytest.approx(union_scale, rel=1e-3)


def test_zoo_observers_that_saw_no_data_on_a_rank_do_not_poison_the_merge(ranks):
    rank0_alone = _feed_zoo(_observer_zoo(), _zoo_batches(0))
    for rank in range(WORLD_SIZE):
        synced = ranks[rank]["zoo"]["synced"]
        for name in ("rank0_only_histogram", "rank0_only_per_channel", "rank0_only_moving_average"):
            for statistic in ("min_val", "max_val"):
                assert torch.equal(synced[f"{name}.{statistic}"], getattr(rank0_alone[name], statistic)), name
        assert torch.equal(synced["rank0_only_histogram.histogram"], rank0_alone["rank0_only_histogram"].histogram)


def test_ranks_with_different_observers_fail_alike_naming_the_first_difference(ranks):
    for rank in range(WORLD_SIZE):
        message = ranks[rank]["mismatch"]
        assert "rank 1 has 'only_on_rank1' (MinMaxObserver) where rank 0 has 'only_on_rank0'" in message


# ---- one process ------------------------------------------------------------------------------------


def test_without_a_process_group_sync_is_a_no_op():
    zoo = _feed_zoo(_observer_zoo(), _zoo_batches(0))
    before = {key: value.clone() for key, value in zoo.state_dict().items()}
    assert not dist.is_initialized()
    assert fxq.sync_observers(zoo) == 0
    _assert_same(zoo.state_dict(), before)


def test_a_single_rank_process_group_is_a_no_op(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        assert fxq.sync_observers(_feed_zoo(_observer_zoo(), _zoo_batches(0))) == 0
    finally:
        dist.destroy_process_group()


def test_histograms_of_two_halves_rebinned_onto_the_union_range_sum_to_the_wholes():
    halves = [torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * (1 + seed) + seed for seed in (0, 1)]
    observers = [quant.HistogramObserver() for _ in halves]
    for observer, half in zip(observers, halves):
        observer(half)
    whole = quant.HistogramObserver()
    whole(torch.cat(halves))
    merged = quant.HistogramObserver()
    merged.min_val.copy_(whole.min_val)
    merged.max_val.copy_(whole.max_val)
    merged.histogram.copy_(sum(quant.rebin_histogram(observer, whole.min_val, whole.max_val) for observer in observers))
    assert float(merged.histogram.sum()) == pytest.approx(2000)
    # re-binning moves mass by less than a bin: the cumulative counts differ by 2.1 (measured) of 2000
    assert float((merged.histogram.cumsum(0) - whole.histogram.cumsum(0)).abs().max()) < 3
    with quant.quiet():
        for merged_qparam, whole_qparam in zip(merged.calculate_qparams(), whole.calculate_qparams()):
            assert torch.equal(merged_qparam, whole_qparam)
