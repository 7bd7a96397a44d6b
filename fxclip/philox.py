"""A counter-based Gaussian stream for noise on CPU: Philox4x32-10 and Box-Muller, compiled C.

torch's CPU generator is a Mersenne Twister that makes one value at a time (~3.5 ns per value on
the 2-core machine of bench/). This stream computes 64 counters at once in SIMD lanes (~1.7 ns per
value there, AVX-512), and each value is a function of (key, draw, index) alone: drawing ahead, or
in pieces, gives the same values as drawing in order, and no generator state needs keeping.

The stream (documented, reproducible on one machine): value i of draw d under the 64-bit key K is,
with B = i // 256, k = (i % 256) // 64, l = i % 64, and w = Philox4x32-10(key = (K mod 2^32,
K >> 32), counter = (j mod 2^32, j >> 32, d mod 2^32, d >> 32)) for j = 64 B + l (Salmon et al.
2011, the Random123 reference):

    r = sqrt(-2 ln(((w[2h] >> 8) + 1/2) / 2^24)),  t = 2 pi (w[2h + 1] >> 8) / 2^24,  h = k // 2
    value = r cos t (k even), r sin t (k odd)

Uniforms have 24 bits, as torch's float32 normal_ (|value| <= 5.9). The transcendental functions
come from glibc's vector math library, so the last bits may differ between machines and libc
versions, as torch's own vectorized normal_ does between CPU capabilities.

The C is compiled once per machine with the C compiler torch.compile on CPU already needs (`cc`,
or $CC), into $FXCLIP_CACHE_DIR (default ~/.cache/fxclip), and loaded with ctypes, which releases
the GIL during the draw. -ffast-math is used when compiling (it lets glibc vectorize log, sin and
cos) but never when linking: a shared object linked with it would flush float denormals to zero
in the whole process.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

BLOCK_VALUES = 256  # values per block of 64 counters: pieces start at multiples of it

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define LANES 64
#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u

void fxclip_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], a = key[0], b = key[1];
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)M0 * c0, p1 = (uint64_t)M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ a, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ b;
        c1 = (uint32_t)p1; c3 = (uint32_t)p0; c0 = n0; c2 = n2;
        a += W0; b += W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Philox4x32-10 of counters (first + l, draw) for l < LANES, word k of lane l in w[k][l]. */
static void philox_lanes(uint64_t first, uint64_t draw, uint32_t k0, uint32_t k1, uint32_t w[4][LANES]) {
    uint32_t *restrict o0 = w[0], *restrict o1 = w[1], *restrict o2 = w[2], *restrict o3 = w[3];
    #pragma omp simd
    for (int l = 0; l < LANES; l++) {
        uint64_t j = first + (uint64_t)l;
        uint32_t c0 = (uint32_t)j, c1 = (uint32_t)(j >> 32), c2 = (uint32_t)draw, c3 = (uint32_t)(draw >> 32);
        uint32_t a = k0, b = k1;
        for (int r = 0; r < 10; r++) {
            uint64_t p0 = (uint64_t)M0 * c0, p1 = (uint64_t)M1 * c2;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ a, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ b;
            c1 = (uint32_t)p1; c3 = (uint32_t)p0; c0 = n0; c2 = n2;
            a += W0; b += W1;
        }
        o0[l] = c0; o1[l] = c1; o2[l] = c2; o3[l] = c3;
    }
}

/* Box-Muller of the words (radius, angle) into cos and sin values; three loops, so that each
   vectorizes with glibc's SIMD log, cos and sin. */
static void box_muller(const uint32_t *restrict wr, const uint32_t *restrict wt, float *restrict zc,
                       float *restrict zs) {
    const float scale = 1.0f / 16777216.0f, two_pi = 6.283185307179586f;
    float r[LANES], t[LANES];
    #pragma omp simd
    for (int l = 0; l < LANES; l++) {
        r[l] = sqrtf(-2.0f * logf(((float)(wr[l] >> 8) + 0.5f) * scale));
        t[l] = two_pi * ((float)(wt[l] >> 8) * scale);
    }
    #pragma omp simd
    for (int l = 0; l < LANES; l++) zc[l] = r[l] * cosf(t[l]);
    #pragma omp simd
    for (int l = 0; l < LANES; l++) zs[l] = r[l] * sinf(t[l]);
}

/* Values first .. first + n - 1 of draw `draw` (first a multiple of 4 * LANES). */
void fxclip_philox_normal(float *out, int64_t n, uint64_t key, uint64_t draw, int64_t first) {
    uint32_t w[4][LANES];
    float z[4 * LANES];
    for (int64_t done = 0; done < n; done += 4 * LANES) {
        uint64_t block = (uint64_t)(first + done) / (4 * LANES);
        philox_lanes(block * LANES, draw, (uint32_t)key, (uint32_t)(key >> 32), w);
        int64_t left = n - done;
        float *dst = left >= 4 * LANES ? out + done : z;
        box_muller(w[0], w[1], dst, dst + LANES);
        box_muller(w[2], w[3], dst + 2 * LANES, dst + 3 * LANES);
        if (left < 4 * LANES) memcpy(out + done, z, (size_t)left * sizeof(float));
    }
}

/* acc[i] += alpha * value first + i of draw `draw`, i < n: the draw and the add in one pass. */
void fxclip_philox_add(float *acc, int64_t n, uint64_t key, uint64_t draw, int64_t first, float alpha) {
    float z[4 * LANES];
    for (int64_t done = 0; done < n; done += 4 * LANES) {
        int64_t count = n - done < 4 * LANES ? n - done : 4 * LANES;
        fxclip_philox_normal(z, count, key, draw, first + done);
        float *a = acc + done;
        #pragma omp simd
        for (int64_t i = 0; i < count; i++) a[i] += alpha * z[i];
    }
}
"""

# compile flags, tried in order: the vectorized build, then a plain one (no glibc vector math)
_BUILDS = (
    (["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"], ["-lmvec", "-lm"]),
    (["-O3"], ["-lm"]),
)

_lock = threading.Lock()
_library = None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    root = os.environ.get("FXCLIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fxclip")
    return Path(root)


def _build(cc: str, compile_flags: list, link_flags: list) -> Path:
    """The shared object for these flags, compiled once (named by a hash of source, compiler and
    flags) and written atomically, so concurrent processes never load a half-written file."""
    tag = hashlib.sha256("\0".join([_SOURCE, cc, *compile_flags, *link_flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"philox-{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, obj, lib = (Path(tmp) / name for name in ("philox.c", "philox.o", "philox.so"))
        src.write_text(_SOURCE)
        # compile and link apart: -ffast-math at link time would add crtfastmath.o (denormals off)
        subprocess.run([cc, *compile_flags, "-fPIC", "-c", str(src), "-o", str(obj)],
                       check=True, capture_output=True)
        subprocess.run([cc, "-shared", str(obj), "-o", str(lib), *link_flags], check=True, capture_output=True)
        os.replace(lib, target)
    return target


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("noise_rng='philox' compiles a small C file and found no C compiler (cc, gcc "
                           "or $CC); install one, or use the default noise_rng='torch'")
    errors = []
    for compile_flags, link_flags in _BUILDS:
        try:
            lib = ctypes.CDLL(str(_build(cc, compile_flags, link_flags)))
        except (OSError, subprocess.CalledProcessError) as e:
            errors.append(getattr(e, "stderr", b"") or str(e))
            continue
        lib.fxclip_philox_normal.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64,
                                             ctypes.c_uint64, ctypes.c_int64]
        lib.fxclip_philox_normal.restype = None
        lib.fxclip_philox_add.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                                          ctypes.c_int64, ctypes.c_float]
        lib.fxclip_philox_add.restype = None
        lib.fxclip_philox4x32_10.argtypes = [ctypes.POINTER(ctypes.c_uint32)] * 3
        lib.fxclip_philox4x32_10.restype = None
        return lib
    raise RuntimeError(f"noise_rng='philox': compiling its C with {cc} failed: {errors[-1]!r}")


def library() -> ctypes.CDLL:
    """The compiled stream, built at first use (about a second) and cached on disk."""
    global _library
    with _lock:
        if _library is None:
            _library = _load()
    return _library


def philox4x32_10(counter: tuple, key: tuple) -> tuple:
    """The raw generator on one counter (4 words) and key (2 words): for known-answer tests."""
    words = ctypes.c_uint32 * 4
    out = words()
    library().fxclip_philox4x32_10(words(*counter), (ctypes.c_uint32 * 2)(*key), out)
    return tuple(out)


def normal_(out: torch.Tensor, key: int, draw: int, first: int = 0) -> torch.Tensor:
    """Fills `out` (CPU) with values first .. first + out.numel() - 1 of draw `draw` of the stream
    of `key`, in its flat order. Not float32, not contiguous, or `first` inside a block: drawn in
    float32 from the block's start, then copied."""
    if out.device.type != "cpu":
        raise ValueError("the philox stream draws on the CPU")
    skip = first % BLOCK_VALUES
    direct = out.dtype == torch.float32 and out.is_contiguous() and not skip
    target = out if direct else torch.empty(skip + out.numel(), dtype=torch.float32)
    library().fxclip_philox_normal(target.data_ptr(), target.numel(), key % 2**64, draw % 2**64, first - skip)
    if not direct:
        out.copy_(target[skip:].view(out.shape))
    return out


def add_(acc: torch.Tensor, alpha: float, key: int, draw: int, first: int = 0) -> torch.Tensor:
    """acc += alpha * (values first .. of draw `draw`), in one pass for a contiguous float32 CPU
    tensor (no buffer); else through normal_ and one fused add."""
    if acc.dtype == torch.float32 and acc.is_contiguous() and acc.device.type == "cpu" and not first % BLOCK_VALUES:
        (_library or library()).fxclip_philox_add(acc.data_ptr(), acc.numel(), key % 2**64, draw % 2**64, first, alpha)
        return acc
    z = normal_(torch.empty(acc.shape, dtype=acc.dtype), key, draw, first)
    torch._foreach_add_([acc], [z], alpha=alpha)
    return acc
