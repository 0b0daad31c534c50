"""The GPU benchmark's own logic, on the CPU (CI has no GPU; the figures come from benchmarks/device_check.sh)."""

import pytest
import torch

from benchmarks import gpu, vision


def test_gpu_benchmark_without_cuda_is_one_sentence(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        gpu.main([])
    assert "needs a CUDA device" in str(e.value)


def test_timer_runs_warmup_then_whole_windows():
    calls = []
    seconds = gpu._timer(lambda: calls.append(1), warmup=2, reps=3, rounds=4, device="cpu")
    assert len(calls) == 2 + 3 * 4 and len(seconds) == 4 and all(s >= 0 for s in seconds)


def test_training_step_runs_on_the_cpu_and_the_flops_follow_the_paper():
    step = gpu.model_step("mlpmixer", "mixer_s32_224", 1, train=True, compiled=False, device="cpu")
    step()  # one AdamW step on a fresh model: runs end to end under CPU bf16 autocast
    # S/32 forward: 49 patches, C 512, D_S 256, D_C 2048, 8 blocks, stem 3·32² → C, head C → 1000
    s, c = 49, 512
    forward = 2 * s * 3072 * c + 8 * (4 * c * s * 256 + 4 * s * c * 2048) + 2 * c * 1000
    assert vision.flops("mixer_s32_224", 1, train=False) == forward
    assert vision.flops("mixer_s32_224", 2, train=True) == 2 * (3 * forward - 2 * s * 3072 * c)
