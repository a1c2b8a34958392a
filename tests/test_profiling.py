"""`training.profiling.gpu_gaps` against hand-counted intervals, and `logging.profile_steps` checks."""

from types import SimpleNamespace

import pytest

from nemo_qwen3_next.field_checks import ConfigError
from nemo_qwen3_next.training import config as train_config
from nemo_qwen3_next.training.profiling import gpu_gaps


def _ev(kind, start, end, name="k", parent=None):
    return SimpleNamespace(device_type=f"DeviceType.{kind}", time_range=SimpleNamespace(start=start, end=end),
                           name=name, cpu_parent=parent)


def test_gpu_gaps_counts_busy_union_and_names_the_host_ops_in_gaps():
    # window 0..10000 us; kernels overlap (1000-3000, 2000-4000) -> busy 1000-4000, then 6000-9000
    events = [_ev("CPU", 0, 10000, "step"), _ev("CUDA", 1000, 3000), _ev("CUDA", 2000, 4000),
              _ev("CUDA", 6000, 9000), _ev("CPU", 4200, 5800, "aten::item")]
    events[-1].cpu_parent = None
    child = _ev("CPU", 4300, 4400, "aten::_local_scalar_dense", parent=events[-1])
    g = gpu_gaps(events + [child], steps=2, min_gap_us=500)
    assert g["wall_ms_per_step"] == 5.0
    assert g["gpu_busy_ms_per_step"] == 3.0  # (3000 + 3000) us / 2 steps
    assert g["gpu_idle_ms_per_step"] == 2.0
    # gaps >= 500 us: 0-1000, 4000-6000, 9000-10000 = 4 ms over 2 steps
    assert g["gaps_over_min"] == 3 and g["idle_in_gaps_over_min_ms_per_step"] == 2.0
    biggest = g["largest_gaps"][0]
    assert biggest["ms"] == 2.0 and biggest["start_ms"] == 4.0
    assert biggest["cpu_ops_ms"]["aten::item"] == 1.6 and "aten::_local_scalar_dense" not in biggest["cpu_ops_ms"]


@pytest.mark.parametrize("steps,needle", [([3], "must be [start, stop]"), ([4, 2], "must be [start, stop]"),
                                          ([10, 30], "trainer.max_steps is 40")])
def test_profile_steps_bad_values_are_one_line(steps, needle):
    raw = {"trainer": {"max_steps": 40}, "logging": {"profile_steps": steps}}
    with pytest.raises(ConfigError) as e:
        train_config.validate(raw, 1, model_keys=False)
    assert needle in str(e.value) and "logging.profile_steps" in str(e.value) and "\n" not in str(e.value)


def test_profile_steps_accepted():
    raw = {"trainer": {"max_steps": 40}, "logging": {"profile_steps": [10, 12]}}
    assert train_config.validate(raw, 1, model_keys=False).logging.profile_steps == [10, 12]
