"""precision auto: the resolution table per hardware class (mocked), the cached probe, `vlm env`."""

import json

import pytest

from vlm.core.hardware import (
    GPU,
    Hardware,
    detect,
    probed_bf16_speedup,
    resolve_precision,
)

AVX2 = Hardware("AMD EPYC", "AVX2", frozenset({"avx2"}))
AVX512 = Hardware("Intel Xeon Skylake", "AVX512", frozenset({"avx2", "avx512f"}))
AVX512_BF16 = Hardware("AMD EPYC Genoa", "AVX512", frozenset({"avx2", "avx512f", "avx512_bf16"}))
AMX = Hardware("Intel Xeon Sapphire Rapids", "AVX512", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
CUDA_BF16 = Hardware("any", "AVX2", frozenset({"avx2"}), (GPU("NVIDIA H100", (9, 0), True),))
CUDA_NO_BF16 = Hardware("any", "AVX2", frozenset({"avx2"}), (GPU("Tesla V100", (7, 0), False),))


def never_probe(hardware):
    raise AssertionError(f"probed on {hardware.hardware_class}: the flags decide there")


@pytest.mark.parametrize("hardware, expected, why", [
    (CUDA_BF16, "bf16", "CUDA device NVIDIA H100 supports bf16"),
    (CUDA_NO_BF16, "fp32", "CUDA device Tesla V100 has no native bf16"),
    (AMX, "bf16", "AMX"),
    (AVX512, "fp32", "bf16 matmul is emulated"),
    (AVX2, "fp32", "CPU capability AVX2, bf16 matmul is emulated"),
])
def test_auto_resolves_by_hardware_class(hardware, expected, why):
    choice = resolve_precision("auto", hardware, probe=never_probe)
    assert choice.precision == expected and why in choice.reason and choice.warning is None


@pytest.mark.parametrize("speedup, expected", [(2.5, "bf16"), (0.8, "fp32"), (1.05, "fp32")])
def test_avx512_bf16_without_amx_asks_the_probe(speedup, expected):
    choice = resolve_precision("auto", AVX512_BF16, probe=lambda hw: speedup)
    assert choice.precision == expected and f"{speedup:.2f}x" in choice.reason


def test_explicit_precision_is_kept_and_warned_about_where_emulated():
    slow = resolve_precision("bf16", AVX2, probe=never_probe)
    assert slow.precision == "bf16" and "emulated" in slow.warning and "10-20x" in slow.warning
    assert resolve_precision("bf16", AMX, probe=never_probe).warning is None
    assert resolve_precision("fp32", AMX, probe=never_probe).precision == "fp32"
    assert resolve_precision("fp16", CUDA_BF16, probe=never_probe).precision == "fp16"  # only when asked


def test_the_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return 1.7

    assert probed_bf16_speedup(AVX512_BF16, measure) == 1.7
    assert probed_bf16_speedup(AVX512_BF16, measure) == 1.7
    assert len(calls) == 1
    assert list(json.loads((tmp_path / "bf16_probe.json").read_text()).values()) == [1.7]
    (tmp_path / "bf16_probe.json").write_text("not json")  # a broken cache is measured again
    assert probed_bf16_speedup(AVX512_BF16, measure) == 1.7 and len(calls) == 2


def test_vlm_env_json_names_the_capability_and_the_resolved_precision(capsys):
    from vlm.app.cli import main

    main(["env", "--json"])
    env = json.loads(capsys.readouterr().out)
    here = detect()
    assert env["cpu"]["capability"] == here.cpu_capability
    assert env["cpu"]["hardware_class"] == here.hardware_class
    assert env["precision_auto"] == resolve_precision("auto", here).as_record()
    assert env["versions"]["torch"] and "lmms-eval" in env["extras"]
