"""The C++ CPU kernel (impl='cpp' and the decode path): what the shared property tests do not reach."""

import platform
import shutil
import subprocess

import pytest
import torch
from kernel_support import cpp_microkernels, cpu_flags

from aha import AhaInputError, aha_attention, choose_impl
from aha.kernels import _cpp_build, cpp
from aha.kernels._cpp_build import cpp_kernel_error

needs_kernel = pytest.mark.skipif(not cpp.cpp_available(), reason=f"C++ kernel unavailable: {cpp_kernel_error()}")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_kernel_builds_where_a_compiler_exists():
    assert cpp.cpp_available(), cpp_kernel_error()


def grads_of(impl, q, k, v, route, window, kpm=None, sink=0):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = aha_attention(q, k, v, route, window, impl=impl, key_padding_mask=kpm, sink=sink)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
    (out * weights).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


@needs_kernel
@pytest.mark.parametrize("impl", cpp_microkernels())
@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("rho", [0.0, 0.15, 1.0])
def test_long_sequences_cross_key_blocks(impl, dim, rho):
    """Over 512 keys a tile's range is cut into several blocks merged by the online softmax; the later
    blocks of a tile of scattered global rows are computed for its later rows only."""
    q = torch.randn(1, 4, 1300, dim)
    k, v = torch.randn(2, 1, 2, 1400, dim)
    route = torch.rand(1, 4, 1300) < rho
    want = grads_of("reference", q, k, v, route, 300)
    got = grads_of(impl, q, k, v, route, 300)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("impl", cpp_microkernels())
@pytest.mark.parametrize("rho", [0.0, 0.15])
def test_sink_keys_spanning_several_key_blocks(impl, rho):
    """A sink longer than a key block (512) is read in blocks of its own before each local tile's window."""
    q = torch.randn(1, 2, 1500, 16)
    k, v = torch.randn(2, 1, 1, 1500, 16)
    route = torch.rand(1, 2, 1500) < rho
    want = grads_of("reference", q, k, v, route, 100, sink=700)
    got = grads_of(impl, q, k, v, route, 100, sink=700)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize(
    "dtype, tol, impl",
    [(dtype, tol, m) for dtype, tol in [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)] for m in cpp_microkernels(dtype)],
)
def test_half_precision_forward_and_backward(dtype, tol, impl):
    q = torch.randn(1, 4, 600, 32)
    k, v = torch.randn(2, 1, 2, 600, 32)
    route = torch.rand(1, 4, 600) < 0.2
    want = grads_of("reference", q, k, v, route, 70)
    got = grads_of(impl, q.to(dtype), k.to(dtype), v.to(dtype), route, 70)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("impl", cpp_microkernels())
def test_strided_inputs_need_no_copy_and_match(impl):
    """[batch, seq, heads, dim] projections transposed to [batch, heads, seq, dim] (HF layout)."""
    q = torch.randn(2, 90, 4, 16).transpose(1, 2)
    k, v = (torch.randn(2, 90, 2, 16).transpose(1, 2) for _ in range(2))
    route = torch.rand(2, 4, 90) < 0.3
    expected = aha_attention(q, k, v, route, 11, impl="reference")
    out = aha_attention(q, k, v, route, 11, impl=impl)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("impl", cpp_microkernels())
@pytest.mark.parametrize("layout", ["left", "right", "both", "holes"])
@pytest.mark.parametrize("sink", [0, 3])
def test_padding_layouts(impl, layout, sink):
    q = torch.randn(2, 4, 60, 16)
    k, v = torch.randn(2, 2, 2, 80, 16)
    route = torch.rand(2, 4, 60) < 0.3
    kpm = torch.ones(2, 80, dtype=torch.bool)
    if layout in ("left", "both"):
        kpm[0, :30] = False
    if layout in ("right", "both"):
        kpm[1, 70:] = False
    if layout == "holes":
        kpm[1, 40:45] = False
    want = grads_of("reference", q, k, v, route, 9, kpm, sink)
    if layout == "holes":  # the kernel takes contiguous real keys only: asked for, it says so; auto runs split
        with pytest.raises(AhaInputError, match="holes"):
            aha_attention(q, k, v, route, 9, impl=impl, key_padding_mask=kpm, sink=sink)
        assert choose_impl(q, k, route, 9, kpm) == "split"
        impl = "auto"
    got = grads_of(impl, q, k, v, route, 9, kpm, sink)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@needs_kernel
def test_auto_uses_the_kernel_on_cpu():
    q, k = torch.randn(2, 1, 2, 40, 16)
    assert choose_impl(q, k, torch.rand(1, 2, 40) < 0.1, 8) == "cpp"
    assert choose_impl(q.bfloat16(), k.bfloat16(), torch.rand(1, 2, 40) < 0.1, 8) == "cpp"
    assert choose_impl(q.double(), k.double(), torch.rand(1, 2, 40) < 0.1, 8) == "split"


@pytest.fixture(params=["cpp", "decode"])
def decode_path(request):
    """The one-query step of the C++ kernel, or the SDPA decode path."""
    if request.param == "cpp" and not cpp.cpp_available():
        pytest.skip("C++ kernel unavailable")
    return request.param


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("seq_kv, window", [(5000, 256), (300, 400), (2100, 7)])
@pytest.mark.parametrize("sink", [0, 4])
def test_decode_paths_match_reference(decode_path, dtype, tol, seq_kv, window, sink):
    """Long caches are split into chunks across threads and merged; left padding included."""
    q = torch.randn(2, 6, 1, 64).to(dtype)
    k, v = torch.randn(2, 2, 3, seq_kv, 64).to(dtype)
    route = torch.rand(2, 6, 1) < 0.5
    kpm = torch.ones(2, seq_kv, dtype=torch.bool)
    kpm[1, : seq_kv // 3] = False
    expected = aha_attention(q, k, v, route, window, impl="reference", key_padding_mask=kpm, sink=sink)
    out = aha_attention(q, k, v, route, window, impl=decode_path, key_padding_mask=kpm, sink=sink)
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def test_decode_never_reads_out_of_window_keys(decode_path):
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(2, 1, 2, 3000, 16)
    route = torch.tensor([[[False], [False], [True], [False]]])
    out = aha_attention(q, k, v, route, 10, impl=decode_path)
    k[:, 0, :2990] = float("nan")  # KV head 0 serves query heads 0-1, both local
    v[:, 0, :2990] = float("nan")
    torch.testing.assert_close(aha_attention(q, k, v, route, 10, impl=decode_path), out)


def test_the_sdpa_decode_path_checks_only_what_it_reads_for_non_finite_values(monkeypatch):
    """Its NaN check once summed all of k and v on every call: a whole-cache read for local heads."""
    from aha.kernels import nonfinite

    checked = []
    real = nonfinite.looks_finite
    monkeypatch.setattr(nonfinite, "looks_finite", lambda *ts: checked.extend(t.shape for t in ts) or real(*ts))
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(2, 1, 2, 3000, 16)
    local = torch.zeros(1, 4, 1, dtype=torch.bool)
    aha_attention(q, k, v, local, 10, impl="decode", sink=2)
    assert checked and max(shape[2] for shape in checked) == 12  # the window and the sink keys
    checked.clear()
    aha_attention(q, k, v, torch.tensor([[[False], [False], [True], [False]]]), 10, impl="decode")
    assert sorted(shape[:3] for shape in checked if shape[2] == 3000) == [(1, 1, 3000)] * 2  # KV head 1 only


def test_decode_with_sink_reads_only_the_sink_and_window_keys(decode_path):
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(2, 1, 2, 3000, 16)
    route = torch.tensor([[[False], [False], [True], [False]]])
    out = aha_attention(q, k, v, route, 10, impl=decode_path, sink=2)
    k[:, 0, 2:2990] = float("nan")  # KV head 0 serves query heads 0-1, both local
    v[:, 0, 2:2990] = float("nan")
    torch.testing.assert_close(aha_attention(q, k, v, route, 10, impl=decode_path, sink=2), out)
    assert (out - aha_attention(q, k, v, route, 10, impl="decode")).abs().max() > 1e-4


def test_a_build_target_gets_its_own_cached_kernel_and_a_bad_one_names_the_fix(monkeypatch):
    monkeypatch.delenv("AHA_CPU_ARCH", raising=False)
    native = _cpp_build.library_path("g++")
    monkeypatch.setenv("AHA_CPU_ARCH", "x86-64-v3")
    assert _cpp_build.build_arch() == "x86-64-v3"
    assert _cpp_build.library_path("g++") != native
    monkeypatch.setenv("AHA_CPU_ARCH", "native -O0")
    with pytest.raises(RuntimeError, match="not a -march name; use e.g. native, x86-64-v3"):
        _cpp_build.library_path("g++")


#: Portable builds run here when this CPU has their instruction set: (-march, /proc/cpuinfo flags it
#: needs, the vector microkernel's name prefix). skylake-avx512 compiles the AVX-512 code without
#: AVX512-BF16 (Skylake to Ice Lake, most AVX-512 servers), which a native build on a CPU with bf16
#: instructions never runs.
PORTABLE_BUILDS = {
    "x86-64-v3": ({"avx2", "fma", "f16c"}, "avx2"),
    "skylake-avx512": ({"avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}, "avx512"),
}


@pytest.fixture(scope="module", params=list(PORTABLE_BUILDS))
def portable_ops(request):
    """The kernel built for an older instruction set (``-march=<param>``) as ``torch.ops.aha_<param>``,
    beside the native build, and the name prefix its vector microkernel reports."""
    arch = request.param
    needs, isa = PORTABLE_BUILDS[arch]
    if not cpp.cpp_available() or platform.machine() != "x86_64":
        pytest.skip(f"C++ kernel unavailable: {cpp_kernel_error()}")
    missing = needs - cpu_flags()
    if missing:
        pytest.skip(f"this CPU cannot run -march={arch}: it lacks {sorted(missing)}")
    namespace = f"aha_{arch.replace('-', '_')}"
    target = _cpp_build.library_path(_cpp_build._compiler() or "").with_suffix(f".{arch}.so")
    if not target.exists():
        _cpp_build.build_variant(target, arch=arch, namespace=namespace)
    torch.ops.load_library(str(target))
    return getattr(torch.ops, namespace), isa


@pytest.mark.slow
def test_avx512_and_amx_builds_compile(tmp_path):
    """The AVX-512 (Ice Lake: no AVX512-BF16) and AVX512-BF16 + AMX (Sapphire Rapids) code paths compile
    on any x86 machine; the ISA matrix runs them only where the CPU has them. At -O0 (half the time of
    -O3; intrinsics used outside the enabled ISA still fail: always_inline is inlined at any level),
    both at once."""
    if _cpp_build._compiler() is None or platform.machine() != "x86_64":
        pytest.skip("needs a C++ compiler on x86-64")
    compiler, builds = _cpp_build._compiler(), {}
    for arch in ("icelake-server", "sapphirerapids"):
        target = tmp_path / f"aha_{arch}.so"
        namespace = f"aha_{arch.replace('-', '_')}"
        command = _cpp_build._compile_command(compiler, target, arch, namespace, optimization="-O0")
        builds[arch] = (target, subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
    for arch, (target, build) in builds.items():
        _, errors = build.communicate()
        assert build.returncode == 0, f"-march={arch}:\n{errors[-4000:]}"
        assert target.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, microkernel, tol",
    [(torch.float32, 1, 1e-5), (torch.float32, 2, 1e-5), (torch.bfloat16, 1, 3e-2), (torch.float16, 1, 3e-2)],
)
def test_portable_builds_match_reference(portable_ops, dtype, microkernel, tol):
    """Without AVX-512 the hand-written GEMMs run on AVX2 pairs, without AVX512-BF16 bf16 is widened to
    fp32; oneDNN's micro-GEMMs are JIT (whatever the build). Prefill forward and backward, and a decode step."""
    ops, isa = portable_ops
    name = ops.microkernel(dtype, microkernel)
    assert name.startswith(isa if microkernel == 1 else "onednn"), name
    assert dtype == torch.float32 or microkernel == 2 or "widened" in name, name  # no bf16/fp16 dot products
    q = torch.randn(2, 4, 300, 64)
    k, v = torch.randn(2, 2, 2, 340, 64)
    route = torch.rand(2, 4, 300) < 0.3
    starts = torch.tensor([0, 25], dtype=torch.int32)  # batch row 1 is left-padded (every query is real)
    kpm = torch.arange(340)[None, :] >= starts[:, None].long()
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    want = aha_attention(q, k, v, route, 40, impl="reference", key_padding_mask=kpm, sink=2)
    out_grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), out_grad)
    with torch.no_grad():
        out, lse, _ = ops.forward(q, k, v, route, starts, 40, 2, 64**-0.5, 32, 64, microkernel)
        grads = ops.backward(out_grad, q, k, v, out, lse, route, starts, 40, 2, 64**-0.5, 32, 64, microkernel)
        last_q, last_route = q[:, :, -1:].contiguous(), route[:, :, -1:].contiguous()
        step = ops.forward(last_q, k, v, last_route, starts, 40, 2, 64**-0.5, 32, 64, microkernel)[0]
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(step.float(), want[:, :, -1:].float(), atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("microkernel", [1, 2])
def test_the_op_clamps_huge_windows_and_sinks(microkernel):
    """The ops themselves (torch.ops.aha.*) also take any int64 window and sink without overflow."""
    q = torch.randn(1, 2, 30, 16)
    k, v = torch.randn(2, 1, 2, 30, 16)
    route = torch.rand(1, 2, 30) < 0.5
    starts = torch.zeros(1, dtype=torch.int32)
    want = torch.ops.aha.forward(q, k, v, route, starts, 30, 30, 0.25, 32, 64, microkernel)[0]
    for window, sink in [(2**31, 2**31), (2**32, 2**40), (2**62, 2**63 - 1)]:
        got = torch.ops.aha.forward(q, k, v, route, starts, window, sink, 0.25, 32, 64, microkernel)[0]
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.aha.forward(q, k, v, route, starts, 4, 0, float("nan"), 32, 64, microkernel)
