"""pk.moe_gate: every backend against a float64 reference, both Triton kernels, strides, determinism, errors.

Accuracy asserted (DESIGN.md's fp32 tolerance, for every x dtype: bf16/fp16 x is exact in float32, so only the
float32 accumulation rounds), against ``ref = float64(x) @ float64(weight).T``:
- elementwise |out - ref| <= 1.01 * H * 2^-24 * (|x| @ |weight|.T): the worst-case error bound of a float32 dot
  product of length H in any summation order (FMA only tightens it);
- ||out - ref|| / ||ref|| <= 1e-5 (observed ~1e-7; TF32 products would give ~1e-3 and fail it).
"""
import pytest
import torch
from compiled_triton import run_compile_script

import pykernels as pk
from pykernels import _backend
from pykernels.moe_gate import TRITON_DEFAULT_MAX_TOKENS, moe_gate_reference

TRITON_ON_CPU = _backend.triton_usable(torch.device("cpu"))
needs_interpreter = pytest.mark.skipif(not TRITON_ON_CPU, reason="needs TRITON_INTERPRET=1 on the CPU")
REL_TOL = 1e-5

# (T, E, H): model shapes (Lite E 64 H 2048, 236B E 160 H 5120), odd E and H, odd T, T past the default cutoff.
GPU_CASES = [(T, E, H) for T in (1, 7, 64, 257) for E, H in ((64, 2048), (160, 5120), (37, 2050))]
# Interpreter-friendly subset (the interpreter runs a program's chunks in numpy, one program at a time).
CPU_CASES = [(1, 64, 2048), (7, 37, 2050), (2, 40, 5120), (64, 64, 2048)]


def _inputs(T, E, H, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype).to(device)
    weight = (torch.randn(E, H, generator=g) / H**0.5).to(device)
    return x, weight


def _assert_fp32_accurate(out, x, weight):
    T, H = x.shape
    assert out.dtype == torch.float32 and out.shape == (T, weight.shape[0]) and out.is_contiguous()
    xd, wd = x.double(), weight.double()
    ref = xd @ wd.T  # [T, E]
    bound = 1.01 * H * 2.0**-24 * (xd.abs() @ wd.abs().T)
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e} beyond the float32 bound"
    if T:
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel <= REL_TOL, f"relative error {rel:.3e}"


def _backends():
    out = [pytest.param("cpu", torch.float32, "torch", id="cpu-torch-fp32"),
           pytest.param("cpu", torch.bfloat16, "torch", id="cpu-torch-bf16")]
    if TRITON_ON_CPU:
        out += [pytest.param("cpu", dt, "triton", id=f"cpu-triton-{str(dt)[6:]}") for dt in (torch.float32, torch.float16)]
    return out


def _gpu_backends():
    return [pytest.param("cuda", dt, b, id=f"cuda-{b}-{str(dt)[6:]}", marks=pytest.mark.gpu)
            for b in ("triton", "torch") for dt in (torch.bfloat16, torch.float16, torch.float32)]


@pytest.mark.parametrize("device,dtype,backend", _backends())
@pytest.mark.parametrize("T,E,H", CPU_CASES)
def test_cpu_backend_accurate(device, dtype, backend, T, E, H):
    x, weight = _inputs(T, E, H, dtype, device)
    _assert_fp32_accurate(pk.moe_gate(x, weight, backend=backend), x, weight)


@pytest.mark.parametrize("device,dtype,backend", _gpu_backends())
@pytest.mark.parametrize("T,E,H", GPU_CASES)
def test_gpu_backend_accurate_and_deterministic(device, dtype, backend, T, E, H):
    x, weight = _inputs(T, E, H, dtype, device)
    out = pk.moe_gate(x, weight, backend=backend)
    _assert_fp32_accurate(out, x, weight)
    for _ in range(3):
        assert torch.equal(pk.moe_gate(x, weight, backend=backend), out)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_deterministic(dtype):
    x, weight = _inputs(5, 37, 2050, dtype, "cpu", seed=1)
    first = pk.moe_gate(x, weight, backend="triton")
    assert torch.equal(pk.moe_gate(x, weight, backend="triton"), first)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_every_kernel_shape(dtype):
    """Both kernels at interpreter-friendly sizes: the dot kernel (prefill tiles, ragged T, E and H), the rows
    kernel with several experts and tokens a program and each vector width, partial last blocks."""
    from pykernels.triton.moe_gate import GateConfig, moe_gate_triton

    configs = [
        (GateConfig(True, 16, 16, 32, 1, 4, 2), 37, 21, 200),  # ragged everywhere
        (GateConfig(True, 32, 32, 64, 1, 4, 3), 40, 64, 256),  # full K tiles
        (GateConfig(False, 4, 8, 512, 4, 4, 1), 10, 37, 1030),
        (GateConfig(False, 8, 2, 256, 2, 4, 1), 13, 9, 700),
        (GateConfig(False, 2, 4, 128, 1, 4, 1), 3, 6, 128),  # H = one chunk exactly
        (GateConfig(False, 1, 1, 512, 4, 4, 1), 1, 5, 96),  # H smaller than a chunk
    ]
    for cfg, T, E, H in configs:
        x, weight = _inputs(T, E, H, dtype, "cpu", seed=T)
        _assert_fp32_accurate(moe_gate_triton(x, weight, cfg), x, weight)


def test_launch_config_spreads_the_weight():
    """Decode shapes: the rows kernel, >= 64 programs at T = 1 (one expert row each); prefill: the dot kernel."""
    pytest.importorskip("triton")
    from pykernels.triton.moe_gate import TARGET_PROGRAMS, launch_config

    for E, H in ((64, 2048), (160, 5120), (37, 2050)):
        cfg = launch_config(1, E, H)
        assert not cfg.dot and cfg.block_t == 1 and cfg.block_e == 1
        for T in (1, 7, 64, 256):
            cfg = launch_config(T, E, H)
            programs = -(-E // cfg.block_e) * -(-T // cfg.block_t)
            assert not cfg.dot and (programs >= TARGET_PROGRAMS or cfg.block_e == 1)
            assert cfg.block_k == cfg.vec * 32 * cfg.num_warps
        assert launch_config(8192, E, H).dot


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_ON_CPU else []))
def test_strided_inputs(backend):
    """x rows that are a slice (row stride > H, an odd element offset), every other row, and weight rows in a
    wider buffer."""
    torch.manual_seed(3)
    E, H = 37, 130
    big_x = torch.randn(9, H + 7)
    big_w = torch.randn(E, H + 3) / H**0.5
    weight = big_w[:, 1:H + 1]
    for x in (big_x[:, 3:H + 3], big_x[::2, :H]):
        assert not x.is_contiguous() and not weight.is_contiguous()
        out = pk.moe_gate(x, weight, backend=backend)
        _assert_fp32_accurate(out, x, weight)
        if backend == "triton":
            assert torch.equal(out, pk.moe_gate(x.contiguous(), weight.contiguous(), backend=backend))


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_ON_CPU else []))
def test_nan_and_no_tokens(backend):
    x, weight = _inputs(4, 8, 64, torch.float32, "cpu")
    x[2, 5] = float("nan")
    out = pk.moe_gate(x, weight, backend=backend)
    assert bool(out[2].isnan().all()) and not bool(out[[0, 1, 3]].isnan().any())
    assert pk.moe_gate(x[:0], weight, backend=backend).shape == (0, 8)


def test_reference_is_deepseeks_expression():
    x, weight = _inputs(5, 16, 48, torch.bfloat16, "cpu")
    assert torch.equal(pk.moe_gate(x, weight, backend="torch"), torch.nn.functional.linear(x.float(), weight.float()))
    assert torch.equal(moe_gate_reference(x, weight), pk.moe_gate(x, weight))  # CPU: backend=None is the reference


@needs_interpreter
def test_triton_direct_call_and_op_agree():
    """Eager calls launch the kernel directly; the torch.library op (under modes, tracing, grad) gives the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, weight = _inputs(6, 24, 300, torch.float16, "cpu", seed=5)
    direct = pk.moe_gate(x, weight, backend="triton")
    assert torch.equal(torch.ops.pykernels.moe_gate(x, weight, "triton"), direct)
    grad_w = weight.clone().requires_grad_()
    assert torch.equal(pk.moe_gate(x, grad_w, backend="triton"), direct)
    with FakeTensorMode() as mode:
        out = pk.moe_gate(mode.from_tensor(x), mode.from_tensor(weight), backend="triton")
        assert out.shape == (6, 24) and out.dtype == torch.float32


def test_custom_op_fake_and_compile():
    x, weight = _inputs(6, 16, 40, torch.bfloat16, "cpu")
    torch.library.opcheck(torch.ops.pykernels.moe_gate.default, (x, weight, "torch"))
    compiled = torch.compile(lambda a, b: pk.moe_gate(a, b), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, weight), moe_gate_reference(x, weight))


@pytest.mark.parametrize(
    "x,weight,kwargs,error,words",
    [
        (torch.randn(4, 8).long(), torch.randn(3, 8), {}, TypeError, "^x: expected dtype"),
        ([[1.0] * 8], torch.randn(3, 8), {}, TypeError, "^x: expected a torch.Tensor"),
        (torch.randn(4, 8), torch.randn(3, 8).bfloat16(), {}, TypeError, "^weight: expected dtype float32"),
        (torch.randn(4, 8), torch.randn(3, 8).double(), {}, TypeError, "^weight: expected dtype float32"),
        (torch.randn(4, 8), torch.randn(3, 9), {}, ValueError, "^x: expected H = 9"),
        (torch.randn(4, 8, 1), torch.randn(3, 8), {}, ValueError, "^x: expected 2 dimensions"),
        (torch.randn(8), torch.randn(3, 8), {}, ValueError, "^x: expected 2 dimensions"),
        (torch.randn(4, 8), torch.randn(24), {}, ValueError, "^weight: expected 2 dimensions"),
        (torch.randn(8, 4).T, torch.randn(3, 8), {}, ValueError, "^x: expected stride 1"),
        (torch.randn(4, 8), torch.randn(8, 3).T, {}, ValueError, "^weight: expected stride 1"),
        (torch.randn(4, 8), torch.randn(0, 8), {}, ValueError, "^weight \\(E"),
        (torch.randn(4, 0), torch.randn(3, 0), {}, ValueError, "^weight \\(H"),
        (torch.randn(4, 8), torch.randn(3, 8), {"backend": "cuda"}, ValueError, "^backend"),
    ],
)
def test_bad_input(x, weight, kwargs, error, words):
    with pytest.raises(error, match=words):
        pk.moe_gate(x, weight, **kwargs)


@pytest.mark.gpu
def test_gpu_devices_must_match():
    with pytest.raises(ValueError, match="^weight: expected a tensor on"):
        pk.moe_gate(torch.randn(4, 8, device="cuda"), torch.randn(3, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, TRITON_DEFAULT_MAX_TOKENS, TRITON_DEFAULT_MAX_TOKENS + 1, 8192])
def test_gpu_default_backend_rule(T):
    """backend=None: the Triton kernel up to TRITON_DEFAULT_MAX_TOKENS tokens, the reference beyond (bit-identical)."""
    x, weight = _inputs(T, 160, 5120, torch.bfloat16, "cuda", seed=2)
    want = "triton" if T <= TRITON_DEFAULT_MAX_TOKENS else "torch"
    assert torch.equal(pk.moe_gate(x, weight), pk.moe_gate(x, weight, backend=want))


@pytest.mark.gpu
@pytest.mark.parametrize("E,H", [(64, 2048), (160, 5120)])
def test_gpu_prefill_dot_kernel(E, H):
    x, weight = _inputs(8192, E, H, torch.bfloat16, "cuda", seed=4)
    out = pk.moe_gate(x, weight, backend="triton")
    _assert_fp32_accurate(out, x, weight)
    assert torch.equal(pk.moe_gate(x, weight, backend="triton"), out)


@pytest.mark.gpu
def test_gpu_cuda_graph():
    x, weight = _inputs(64, 160, 5120, torch.bfloat16, "cuda", seed=6)
    pk.moe_gate(x, weight)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pk.moe_gate(x, weight)
    x.copy_(torch.randn_like(x))
    graph.replay()
    _assert_fp32_accurate(out, x, weight)


_COMPILE_FOR_SM90 = r"""
import os
import subprocess
import sys
import tempfile

import triton
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError
try:
    from triton.backends.compiler import GPUTarget
except ImportError:
    sys.exit(77)
from pykernels.triton import moe_gate as gate

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
hinted = ("x_ptr", "w_ptr", "out_ptr", "stride_x", "stride_w")
for T, E, H in [(1, 64, 2048), (1, 160, 5120), (8, 64, 2048), (64, 64, 2048), (64, 160, 5120), (256, 64, 2048),
                (256, 160, 5120), (7, 37, 2050), (8192, 64, 2048), (8192, 160, 5120)]:
    cfg = gate.launch_config(T, E, H)
    kernel = gate._gate_dot_kernel if cfg.dot else gate._gate_rows_kernel
    consts = dict(H=H, BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e)
    consts.update(dict(BLOCK_K=cfg.block_k) if cfg.dot else dict(KT=cfg.block_k // cfg.vec, V=cfg.vec))
    for x_type in ("*bf16", "*fp32"):
        sig = {n: "constexpr" if n in consts else x_type if n == "x_ptr" else "*fp32" if n.endswith("_ptr") else "i32"
               for n in kernel.arg_names}
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        except CompilationError:
            raise
        except Exception as e:  # an API difference or no ptxas: not this kernel's fault
            print(f"cannot compile here: {type(e).__name__}: {e}")
            sys.exit(77)
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
        print("compiled", T, E, H, x_type, tuple(cfg), "registers", fields["REG"], "stack", fields["STACK"],
              "local", fields["LOCAL"])
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", "spills"
"""


def test_triton_kernels_compile_for_sm90_without_spills():
    """Compile both kernels at the model's shapes for sm_90 without a GPU (in a process without TRITON_INTERPRET,
    with the 16-byte divisibility hints a real launch gets): no stack or local memory (spills)."""
    out = run_compile_script(_COMPILE_FOR_SM90)
    assert out.count("compiled") == 20, out
