"""The compiled extension: it imports without a GPU, says so clearly, and its copy kernel is exact."""
import pytest
import torch

from pykernels import _ext


def test_reports_missing_device_cleanly():
    if not _ext.built():
        pytest.skip("pykernels._C not built (no nvcc at install time)")
    module = _ext.require()
    assert module.cuda_architectures  # the build recorded its targets
    if module.device_count() == 0:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            module.device_properties(0)
        with pytest.raises(RuntimeError, match="no CUDA device"):
            module.copy_2d(0, 0, 0, 0, 1, 1, 0)


def test_copy_2d_rejects_bad_arguments_on_cpu():
    src = torch.randn(4, 8)
    with pytest.raises(ValueError, match="dst"):
        _ext.copy_2d(torch.empty(4, 7), src)
    with pytest.raises(TypeError, match="dst"):
        _ext.copy_2d(torch.empty(4, 8, dtype=torch.float16), src)
    with pytest.raises(ValueError, match="src: expected a CUDA tensor"):
        _ext.copy_2d(torch.empty(4, 8), src)


@pytest.mark.gpu
def test_device_properties_match_torch():
    props = _ext.require().device_properties(0)
    ref = torch.cuda.get_device_properties(0)
    assert props.name == ref.name
    assert props.multiprocessors == ref.multi_processor_count
    assert (props.major, props.minor) == (ref.major, ref.minor)
    assert props.memory_bus_width_bits > 0 and props.memory_clock_khz > 0
    with pytest.raises(ValueError, match="device"):
        _ext.require().device_properties(torch.cuda.device_count())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.float64])
@pytest.mark.parametrize("rows,cols,src_pad,dst_pad", [(1, 1, 0, 0), (37, 129, 3, 5), (512, 1024, 0, 0), (3, 7, 1, 0)])
def test_copy_2d_equals_torch_copy(dtype, rows, cols, src_pad, dst_pad):
    big_src = torch.randint(0, 100, (rows, cols + src_pad), device="cuda").to(dtype)
    src = big_src[:, src_pad:]  # misaligned start when src_pad is odd: exercises the narrow paths
    dst_big = torch.full((rows, cols + dst_pad), 255, device="cuda").to(dtype)
    dst = dst_big[:, :cols]
    _ext.copy_2d(dst, src)
    torch.cuda.synchronize()
    assert torch.equal(dst, src)
    if dst_pad:
        assert (dst_big[:, cols:] == 255).all(), "wrote outside the destination columns"


@pytest.mark.gpu
def test_copy_2d_runs_on_the_current_stream():
    src = torch.randn(2048, 2048, device="cuda")
    dst = torch.empty_like(src)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        _ext.copy_2d(dst, src)
        out = dst.clone()  # ordered after the copy on the same stream
    stream.synchronize()
    assert torch.equal(out, src)
