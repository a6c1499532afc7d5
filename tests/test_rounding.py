"""Stochastic rounding to bfloat16 (memkernels/ops/rounding.py) and its numba, Triton and CUDA (rounding.h) twins.

Every backend must give the reference's bits exactly, for random_bits and for round_bf16, on 1e5 float32 values
(random bit patterns, which reach every exponent, NaN payloads and subnormals; normal values over 80 decades;
the edge values: zeros, exact bfloat16 values, halfway points, the largest finite bfloat16 and what lies above
it, subnormals, NaN, +-Inf) at element indices below and above 2**32, under several keys. Triton runs under
TRITON_INTERPRET=1 without a GPU (conftest.py), compiled on one; rounding.h is compiled for the host by
test_cuda_host.py's fixture.

The reference is checked against independent computations: its mixer against plain Python integers; its
rounding against the two bfloat16 neighbours found in float64 (frexp), always one of them, up with the
probability the distance gives (an exact binomial tail per element: at p = 2**-16 a normal bound would not
hold) and unbiased over all elements together; its bits against the uniform distribution (chi-square) and across
keys, steps, tensors and the index's high word (correlation, and how many values two streams share: a stream
that is a permutation of another shares them all). Thresholds come from each statistic's distribution at a
family-wise false-alarm rate of FALSE_ALARM per test; the inputs come from fixed seeds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from numba import njit
from scipy import stats

from memkernels.backends.numba import _rounding as numba_rounding
from memkernels.ops import rounding
from memkernels.ops.rounding import MASK32, random_bits, round_bf16, tensor_key
from test_cuda_host import host  # noqa: F401  (the fixture: rounding.h built for the host)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FALSE_ALARM = 1e-6
KEYS = [0, 1, 0x80000000, MASK32, tensor_key(2 ** 40 + 3, 10 ** 12, 7), tensor_key(0, 1, 0)]
BF16_MAX = 0x7F7F0000  # the bits of the largest finite bfloat16, as float32


# ------------------------------------------------------------------ inputs

def _as_float(words: list[int] | torch.Tensor) -> torch.Tensor:
    """float32 values of 32-bit patterns."""
    w = torch.as_tensor(words, dtype=torch.int64)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32).view(torch.float32)


def _edges() -> list[int]:
    """Bit patterns of the edge values: exact bfloat16 values, then each just above, halfway to and just
    below the next one; zeros, infinities, NaNs, the float32 extremes."""
    exact = [0x3F800000, 0xBF810000, 0x42F70000, 0x00010000, 0x80800000, BF16_MAX, 0xFF7F0000]
    near = [p | low for p in exact for low in (0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF)]
    special = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF,
               0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x8000FFFF, 0x007FFFFF]
    return exact + near + special


def _inputs(n: int = 100_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 values and their element indices (the last 2000 from just below 2**32 to far above it)."""
    gen = torch.Generator().manual_seed(seed)
    edges = _edges()
    patterns = _as_float(torch.randint(0, 1 << 32, ((n - len(edges)) // 2,), generator=gen))
    m = n - len(edges) - len(patterns)
    decades = torch.rand(m, generator=gen, dtype=torch.float64) * 83 - 45
    normal = (torch.randn(m, generator=gen, dtype=torch.float64) * 10.0 ** decades).to(torch.float32)
    x = torch.cat([patterns, normal, _as_float(edges)])
    index = torch.arange(n, dtype=torch.int64)
    index[-2000:-1000] = (1 << 32) - 500 + torch.arange(1000)
    index[-1000:] = torch.randint(1 << 32, 1 << 62, (1000,), generator=gen)
    return x, index


# ------------------------------------------------------------------ each backend over arrays

@njit
def _numba_kernel(key, index, x, bits, out):
    for i in range(index.size):
        bits[i] = numba_rounding.random_bits(key, index[i])
        out[i] = numba_rounding.round_bf16(x[i], bits[i])


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from memkernels.backends.triton import _rounding as triton_rounding

    @triton.jit
    def _triton_kernel(x_ptr, index_ptr, bits_ptr, out_ptr, key, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        bits = triton_rounding.random_bits(key, tl.load(index_ptr + offsets, mask=mask))
        tl.store(bits_ptr + offsets, bits.to(tl.int32, bitcast=True), mask=mask)
        tl.store(out_ptr + offsets, triton_rounding.round_bf16(tl.load(x_ptr + offsets, mask=mask), bits), mask=mask)


def _reference(key: int, index: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    bits = random_bits(key, index)
    return bits.numpy().astype(np.uint32), round_bf16(x, bits).view(torch.int16).numpy().view(np.uint16)


def _numba(key: int, index: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    bits, out = np.empty(len(x), np.uint32), np.empty(len(x), np.uint16)
    _numba_kernel(np.uint32(key), index.numpy(), x.numpy(), bits, out)
    return bits, out


def _triton(key: int, index: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    n, block = len(x), 1024
    bits = torch.empty(n, dtype=torch.int32, device=DEVICE)
    out = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    _triton_kernel[(triton.cdiv(n, block),)](x.to(DEVICE), index.to(DEVICE), bits, out, key, n, BLOCK=block)
    return bits.cpu().numpy().view(np.uint32), out.cpu().view(torch.int16).numpy().view(np.uint16)


def _assert_same(backend: str, key: int, index: torch.Tensor, x: torch.Tensor, got, want) -> None:
    for name, g, w in zip(("random_bits", "round_bf16"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (backend, name, g.dtype, g.shape)
        bad = np.flatnonzero(g != w)
        assert bad.size == 0, (
            f"{backend} {name}, key {key:#x}: {bad.size} of {g.size} differ, first at index {int(index[bad[0]])}, "
            f"x bits {int(x.view(torch.int32)[bad[0]]) & MASK32:#010x}: {int(g[bad[0]]):#x} vs {int(w[bad[0]]):#x}")


@pytest.mark.parametrize("backend", ["numba", "triton", "cuda_host"])
def test_every_backend_gives_the_reference_bits(backend, request):
    x, index = _inputs()
    if backend == "cuda_host":
        module = request.getfixturevalue("host")

        def run(key, index, x):
            bits = module.random_bits(key, index.numpy())
            return bits, module.round_bf16(x.numpy(), bits)
    else:
        run = {"numba": _numba, "triton": _triton}[backend]
    for key in KEYS:
        _assert_same(backend, key, index, x, run(key, index, x), _reference(key, index, x))
    if backend == "triton":  # int32 indices (a kernel's offsets below 2**31) skip the high word
        small = index < (1 << 31)
        for key in KEYS[:3]:
            i32, xs = index[small].to(torch.int32), x[small]
            _assert_same("triton int32", key, index[small], xs, _triton(key, i32, xs),
                         _reference(key, index[small], xs))


_COMPILE = textwrap.dedent('''
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    sys.path.insert(0, sys.argv[1])
    from test_rounding import _triton_kernel as fn

    out = []
    for key, index in (("i32", "i32"), ("i64", "i32"), ("i32", "i64"), ("i64", "i64")):
        signature = {"x_ptr": "*fp32", "index_ptr": "*" + index, "bits_ptr": "*i32", "out_ptr": "*bf16",
                     "key": key, "n": "i32", "BLOCK": "constexpr"}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs={(6,): 1024})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        out.append(sorted(set(re.findall(r"\\b(?:cvt[.a-z0-9]*bf16[.a-z0-9]*|shr\\.[su]32)", ptx))))
    print(json.dumps(out))
''')


def test_triton_functions_compile_for_sm90():
    """The interpreter is lenient: the functions also compile for Hopper, with every key and index type, with
    logical shifts on the 32-bit words and the bfloat16 made from its bits, never by a float conversion."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE, os.path.dirname(__file__)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [["shr.u32"]] * 4


# ------------------------------------------------------------------ the reference against independent checks

def _lowbias32(x: int) -> int:
    """lowbias32 in Python integers, reduced modulo 2**32 after each multiply."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) % (1 << 32)
    x ^= x >> 15
    x = (x * 0x846CA68B) % (1 << 32)
    return x ^ (x >> 16)


def test_mix32_is_lowbias32_modulo_2_32():
    words = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, MASK32] + \
        torch.randint(0, 1 << 32, (2000,), generator=torch.Generator().manual_seed(1)).tolist()
    assert rounding.mix32(torch.tensor(words)).tolist() == [_lowbias32(w) for w in words]
    assert [rounding.mix32(w) for w in words] == [_lowbias32(w) for w in words]


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """|x|'s bfloat16 neighbours below and above (float64; +inf above the largest finite bfloat16) and the
    probability of rounding up, from float64 arithmetic: a binade [2**(e-1), 2**e) holds 2**7 bfloat16 values,
    and below 2**-126 (subnormals) they are 2**-133 apart."""
    a = x.double().abs()
    _, e = torch.frexp(a)
    spacing = torch.ldexp(torch.ones_like(a), e.clamp(min=-125).to(torch.float64) - 8)
    lower = torch.floor(a / spacing) * spacing
    upper = lower + spacing
    p_up = (a - lower) / spacing
    return lower, torch.where(upper >= 2.0 ** 128, torch.inf, upper), p_up


def _finite_inputs(n: int, seed: int) -> torch.Tensor:
    """Finite float32 values over every exponent (subnormals included), and the edge values among them."""
    x, _ = _inputs(n, seed)
    return x[x.isfinite()]


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.view(torch.int32) < 0, -1.0, 1.0).double()


def test_rounds_up_exactly_when_the_low_bits_carry():
    """With random bits b, |x| rounds up iff its distance from the lower neighbour, in 2**-16 of their spacing
    (a whole number: float32 values are that far apart), plus the low 16 bits of b reaches 2**16: the
    probability of rounding up is the distance, in steps of 2**-16, and an exact value never moves."""
    x = _finite_inputs(20_000, seed=4)
    lower, upper, p_up = _neighbours(x)
    steps = p_up * 65536
    assert torch.equal(steps, steps.round())
    gen = torch.Generator().manual_seed(5)
    for b in (0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x1FFFF, MASK32, None):
        bits = torch.randint(0, 1 << 32, x.shape, generator=gen) if b is None else torch.full(x.shape, b)
        want = _sign(x) * torch.where(steps + (bits & 0xFFFF) >= 65536, upper, lower)
        assert torch.equal(round_bf16(x, bits).double(), want), b


def test_rounds_to_a_neighbour_up_with_the_distance_as_probability():
    x = _finite_inputs(4000, seed=2)
    keys = [tensor_key(3, step, 0) for step in range(400)]
    index = torch.arange(len(x), dtype=torch.int64)
    rounded = torch.stack([round_bf16(x, random_bits(key, index)).double() for key in keys])
    lower, upper, p_up = _neighbours(x)
    is_lower, is_upper = rounded == _sign(x) * lower, rounded == _sign(x) * upper
    assert (is_lower | is_upper).all(), x[~(is_lower | is_upper).all(0)][:4]
    assert torch.equal(rounded[:, p_up == 0], x[p_up == 0].double().expand(len(keys), -1)), "an exact value moved"
    # the number of times each element rounds up is Binomial(keys, p_up): both tails, exactly
    ups = is_upper.sum(0).numpy()
    k, p = len(keys), p_up.numpy()
    tail = np.minimum(stats.binom.cdf(ups, k, p), stats.binom.sf(ups - 1, k, p))
    worst = int(np.argmin(tail))
    assert tail[worst] >= FALSE_ALARM / (2 * len(x)), (float(x[worst]), ups[worst], k * p[worst])
    # unbiased: the sum over every element of (round(x) - x) / spacing is ups - k p_up, of variance k p (1 - p)
    z = (ups.sum() - k * p.sum()) / np.sqrt(k * (p * (1 - p)).sum())
    assert abs(z) <= stats.norm.isf(FALSE_ALARM / 2), z


def test_rounding_keeps_special_values():
    x = _as_float([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF,
                   0xFFFFFFFF])
    for key in KEYS:
        y = round_bf16(x, random_bits(key, torch.arange(len(x))))
        assert torch.equal(y[:4].view(torch.int16), x[:4].view(torch.int32).bitwise_right_shift(16).to(torch.int16))
        assert torch.equal(y[4:].view(torch.int16), torch.full((5,), 0x7FC0, dtype=torch.int16))


def _uniform_bits(n: int, key: int) -> torch.Tensor:
    return random_bits(key, torch.arange(n, dtype=torch.int64))


@pytest.mark.parametrize("key", KEYS[::2])
def test_random_bits_are_uniform(key):
    """Chi-square over the top nibble of the low 16 bits (the rounding's most significant), over all 65536
    values of the low 16 bits, and over each byte; every bit set half the time."""
    bits = _uniform_bits(1 << 22, key)
    low = bits & 0xFFFF
    for name, cells, ncells in (("low 16 bits' top nibble", low >> 12, 16), ("low 16 bits", low, 1 << 16),
                                ("high 16 bits' top nibble", bits >> 28, 16), ("high 16 bits", bits >> 16, 1 << 16),
                                *((f"byte {b}", (bits >> 8 * b) & 0xFF, 256) for b in range(4))):
        counts = torch.bincount(cells, minlength=ncells).double()
        expected = len(bits) / ncells
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 <= stats.chi2.isf(FALSE_ALARM / 8, ncells - 1), (name, chi2)
    ones = torch.stack([(bits >> b) & 1 for b in range(32)]).sum(1).double()
    z = (ones - len(bits) / 2) / np.sqrt(len(bits) / 4)
    assert z.abs().max() <= stats.norm.isf(FALSE_ALARM / 64), z


@pytest.mark.parametrize("key", KEYS[1::2])
def test_the_two_halves_round_independently(key):
    """Writes 2j and 2j + 1 round by the low and the high 16 bits of one hash (rounding.key_of_write): the
    halves' top bytes (the roundings' most significant bits) are independent by a chi-square over their
    256 x 256 joint counts, and the halves uncorrelated, element by element and one element on."""
    bits = _uniform_bits(1 << 22, key)
    low, high = ((bits >> 8) & 0xFF), bits >> 24
    joint = torch.bincount(low * 256 + high, minlength=1 << 16).double().reshape(256, 256)
    expected = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True) / joint.sum()
    chi2 = float(((joint - expected) ** 2 / expected).sum())
    assert chi2 <= stats.chi2.isf(FALSE_ALARM / 3, 255 * 255), chi2
    u, v = (bits & 0xFFFF).double().numpy(), (bits >> 16).double().numpy()
    z_max = stats.norm.isf(FALSE_ALARM / 6)
    for what, r in (("pair", np.corrcoef(u, v)[0, 1]), ("lag 1", np.corrcoef(u[:-1], v[1:])[0, 1])):
        assert abs(r) * np.sqrt(len(u)) <= z_max, (what, r)


def test_writes_share_a_key_in_pairs():
    assert [rounding.key_of_write(w) for w in range(5)] == [(0, 0), (0, 16), (1, 0), (1, 16), (2, 0)]
    assert [rounding.key_columns(w) for w in range(1, 7)] == [1, 1, 2, 2, 3, 3]


def _stream_pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pairs of streams that must not repeat each other: keys one apart or a bit apart, neighbouring seeds,
    steps and tensors, and the same low index words under another high word."""
    n, index = 100_000, torch.arange(100_000, dtype=torch.int64)
    k = tensor_key(11, 5, 2)
    pairs = [(f"keys {a:#x}, {b:#x}", a, b) for a, b in ((k, k + 1), (k, k ^ 1), (k, k ^ 0x80000000), (0, 1))]
    pairs += [("steps", tensor_key(11, 5, 2), tensor_key(11, 6, 2)),
              ("tensors", tensor_key(11, 5, 2), tensor_key(11, 5, 3)),
              ("seeds", tensor_key(11, 5, 2), tensor_key(12, 5, 2)),
              ("seeds 2**32 apart", tensor_key(11, 5, 2), tensor_key(11 + (1 << 32), 5, 2))]
    out = [(name, random_bits(a, index), random_bits(b, index)) for name, a, b in pairs]
    out.append(("high words", random_bits(k, index), random_bits(k, index + (1 << 32))))
    assert all(len(a) == n for _, a, _ in out)
    return out


def test_streams_are_uncorrelated_and_no_permutations_of_each_other():
    """Pairs of streams, element by element, and each first stream against itself one element on."""
    pairs = _stream_pairs()
    n = len(pairs[0][1])
    z_max = stats.norm.isf(FALSE_ALARM / (8 * len(pairs)))
    # two independent streams of n distinct-ish 32-bit values share Poisson(n^2 / 2^32) of them
    shared_max = stats.poisson.isf(FALSE_ALARM / len(pairs), n * n / 2.0 ** 32)
    for name, a, b in pairs:
        for part, mask in (("32 bits", MASK32), ("low 16 bits", 0xFFFF)):
            u, v = (a & mask).double().numpy(), (b & mask).double().numpy()
            for what, r in (("pair", np.corrcoef(u, v)[0, 1]), ("lag 1", np.corrcoef(u[:-1], u[1:])[0, 1])):
                assert abs(r) * np.sqrt(n) <= z_max, (name, part, what, r)
        shared = int(torch.isin(b, a).sum())
        assert shared <= shared_max, (name, shared, shared_max)


def test_tensor_key():
    fields = range(1 << 14)
    assert len({tensor_key(7, step, 3) for step in fields}) == len(fields)
    assert len({tensor_key(7, 9, tensor) for tensor in fields}) == len(fields)
    assert len({tensor_key(seed, 9, 3) for seed in fields}) == len(fields)
    big = [(1 << 32) + 5, (1 << 63) + 1, (1 << 64) - 1]
    keys = {tensor_key(s, 9, 3) for s in [5, *big]} | {tensor_key(5, s, 3) for s in big} | \
        {tensor_key(5, 9, s) for s in big}
    assert len(keys) == 1 + 3 * len(big) and all(0 <= k <= MASK32 for k in keys)
    assert tensor_key(3, 1, 2) != tensor_key(2, 1, 3) != tensor_key(1, 3, 2)
    assert tensor_key(2 ** 40 + 3, 10 ** 12, 7) == tensor_key(2 ** 40 + 3, 10 ** 12, 7)
    assert tensor_key(np.int64(5), torch.tensor(9), 3) == tensor_key(5, 9, 3)


@pytest.mark.parametrize("seed, step, tensor, error", [
    (-1, 0, 0, ValueError), (0, 1 << 64, 0, ValueError), (0, 0, 1.0, TypeError), (True, 0, 0, TypeError),
    (0, "1", 0, TypeError)])
def test_tensor_key_rejects_bad_input(seed, step, tensor, error):
    with pytest.raises(error, match="tensor_key"):
        tensor_key(seed, step, tensor)


def test_reference_rejects_bad_input():
    index, x = torch.arange(4), torch.ones(4)
    with pytest.raises(ValueError, match="key"):
        random_bits(1 << 32, index)
    with pytest.raises(ValueError, match="key"):
        random_bits(-1, index)
    with pytest.raises(TypeError, match="int64"):
        random_bits(0, index.to(torch.int32))
    with pytest.raises(ValueError, match=">= 0"):
        random_bits(0, index - 1)
    with pytest.raises(TypeError, match="float32"):
        round_bf16(x.double(), random_bits(0, index))
    with pytest.raises(ValueError, match="shape"):
        round_bf16(x, random_bits(0, torch.arange(3)))


def test_host_module_rejects_bad_input(host):  # noqa: F811
    index, x = np.arange(4, dtype=np.int64), np.ones(4, np.float32)
    bits = host.random_bits(0, index)
    with pytest.raises(TypeError):  # no silent conversion of another dtype
        host.round_bf16(x.astype(np.float64), bits)
    with pytest.raises(TypeError):
        host.random_bits(0, index.astype(np.int32))
    with pytest.raises(TypeError):  # keys are 32 bits
        host.random_bits(1 << 32, index)
    with pytest.raises(ValueError, match=">= 0"):
        host.random_bits(0, index - 1)
    with pytest.raises(ValueError, match="same size"):
        host.round_bf16(x[:3], bits)
