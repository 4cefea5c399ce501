// Rotary embedding + paged latent-cache write (see rope.h for the contract).
//
// Units. A token's work is U = H * R + R + C units, in this order:
//   [0, H * R)          q: head u / R, unit u % R of that head's d values        (R units per row)
//   [H * R, H * R + R)  k: unit u - H * R of k's row, written to its destination row
//   [H * R + R, U)      latent: C units copied to the start of the cache row (rope_and_cache only)
// On the aligned path a unit is 16 bytes: interleaved rows take kVec = 16 / sizeof(T) consecutive values
// (kVec / 2 pairs x[2i], x[2i+1]), R = d / kVec; half-split rows take kVec values at [j, j + kVec) and
// their partners at [j + d/2, ...), R = d / 2 / kVec; a latent unit is kVec values. The element path (for
// addresses or sizes that are not multiples of 16 bytes) takes one pair (or one value of each half) per
// rotation unit and one value per latent unit, with element-wide accesses.
//
// Chunks. The units of all tokens form one token-major list; CTA b takes the chunk of N = threads *
// kUnits units starting at b * N, and thread i its units i, i + threads, ... (a warp's 32 consecutive
// units are 512 contiguous bytes of a row, or four whole 128-byte rope rows of q). Each CTA:
//   1. loads the values of all its units (kUnits 16-byte loads in flight per thread before any store);
//   2. computes, for every token its chunk touches, cos/sin of every pair into shared memory (one
//      __sincosf per (token, pair), not per unit: h128 shares them over 128 heads) and the token's
//      destination (whether q is written, the k cache row); position and slot are read once per token;
//   3. after one barrier, rotates its units with the shared cos/sin and stores them.
// Loads of step 1 and the position loads of step 2 are independent, so a CTA waits for one memory round
// trip, then the cos/sin, then stores: the decode-path latency is one round trip, not position -> table ->
// store. Shared memory: (d floats + 12 bytes) per token a chunk touches, at most (N + U - 2) / U + 1 tokens
// (2 KB for h16 with N = 1024); beyond 48 KB (rotary_dim in the thousands) the launch opts in to more.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/check.h"
#include "../common/stream.h"
#include "rope.h"

namespace pk {
namespace {

constexpr int kMaxThreads = 256;  // the largest CTA a launch may ask for (launch_bounds: up to 255 registers)
constexpr int kDefaultSharedBytes = 48 * 1024;  // per CTA without opting in to more
constexpr std::int64_t kMaxUnits = std::int64_t{1} << 31;  // units of a launch: FastDiv's numerator bound
constexpr int kErrPosition = 1;  // same bits as pykernels/rope.py
constexpr int kErrSlot = 2;
constexpr double kTwoPi = 6.283185307179586476925;
constexpr double kInvTwoPi = 0.159154943091895335768;

// n / d for 0 <= n < 2^31 by a multiply-high, an add and a shift (the round-up method); d in [1, 2^31).
struct FastDiv {
  unsigned multiplier, shift;
  __device__ __forceinline__ int operator()(int n) const {
    const unsigned hi = __umulhi(static_cast<unsigned>(n), multiplier);
    return static_cast<int>((hi + static_cast<unsigned>(n)) >> shift);
  }
};

FastDiv make_fast_div(std::uint32_t d) {
  unsigned shift = 0;
  while ((std::uint64_t{1} << shift) < d) ++shift;
  const std::uint64_t m = ((std::uint64_t{1} << 32) * ((std::uint64_t{1} << shift) - d)) / d + 1;
  return {static_cast<unsigned>(m), shift};
}

template <typename T, int N>
struct Vec {
  T v[N];
};

template <int kBytes> struct Raw;  // the integer type of one kBytes-wide memory access
template <> struct Raw<16> { using type = uint4; };
template <> struct Raw<8> { using type = uint2; };
template <> struct Raw<4> { using type = unsigned int; };
template <> struct Raw<2> { using type = unsigned short; };

// The widest access (at most 16 bytes) for N values of T when the address is aligned to all of them.
template <typename T, int N>
constexpr int kWideAccess = sizeof(T) * N < 16 ? sizeof(T) * N : 16;

// N values of T as the kAccess-byte words they move as. Loaded values stay packed in these words until
// they are used: unpacking them into per-value registers right after the load (as a Vec of bf16 would)
// makes the thread wait for that load before it issues the next one (seen in the SASS: PRMTs after every
// LDG), which serialises the loads this kernel means to have in flight together.
template <int kAccess, typename T, int N>
struct Packed {
  static_assert((sizeof(T) * N) % kAccess == 0, "the access width must divide the vector");
  static constexpr int kWords = static_cast<int>(sizeof(T)) * N / kAccess;
  typename Raw<kAccess>::type w[kWords];
};

template <int kAccess, typename T, int N>
__device__ __forceinline__ Vec<T, N> unpack(const Packed<kAccess, T, N>& p) {
  Vec<T, N> out;
  memcpy(&out, &p, sizeof(out));
  return out;
}

template <int kAccess, typename T, int N>
__device__ __forceinline__ Packed<kAccess, T, N> pack(const Vec<T, N>& v) {
  Packed<kAccess, T, N> out;
  memcpy(&out, &v, sizeof(out));
  return out;
}

// Global loads and stores of one word, plain or streaming (.cs: evict first, the data is used once). Both
// are PTX, so the width is exactly the one asked for (nvcc split the 16-byte stores of the in-place q path
// into 2- or 4-byte ones otherwise, seen in the PTX of CUDA 13.0). The loads are not volatile: they may be
// scheduled freely; the stores are, and they follow the barrier of step 3.
template <int kAccess>
struct GlobalWord;
template <>
struct GlobalWord<16> {
  __device__ __forceinline__ static uint4 load(const void* p, bool streaming) {
    uint4 w;
    if (streaming) {
      asm("ld.global.cs.v4.b32 {%0, %1, %2, %3}, [%4];" : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w) : "l"(p));
    } else {
      asm("ld.global.v4.b32 {%0, %1, %2, %3}, [%4];" : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w) : "l"(p));
    }
    return w;
  }
  __device__ __forceinline__ static void store(void* p, const uint4& w, bool streaming) {
    if (streaming) {
      asm volatile("st.global.cs.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
                   : "memory");
    } else {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
                   : "memory");
    }
  }
};
template <>
struct GlobalWord<4> {
  __device__ __forceinline__ static unsigned int load(const void* p, bool streaming) {
    unsigned int w;
    if (streaming) {
      asm("ld.global.cs.b32 %0, [%1];" : "=r"(w) : "l"(p));
    } else {
      asm("ld.global.b32 %0, [%1];" : "=r"(w) : "l"(p));
    }
    return w;
  }
  __device__ __forceinline__ static void store(void* p, const unsigned int& w, bool streaming) {
    if (streaming) {
      asm volatile("st.global.cs.b32 [%0], %1;" ::"l"(p), "r"(w) : "memory");
    } else {
      asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(w) : "memory");
    }
  }
};
template <>
struct GlobalWord<2> {
  __device__ __forceinline__ static unsigned short load(const void* p, bool streaming) {
    unsigned short w;
    if (streaming) {
      asm("ld.global.cs.b16 %0, [%1];" : "=h"(w) : "l"(p));
    } else {
      asm("ld.global.b16 %0, [%1];" : "=h"(w) : "l"(p));
    }
    return w;
  }
  __device__ __forceinline__ static void store(void* p, const unsigned short& w, bool streaming) {
    if (streaming) {
      asm volatile("st.global.cs.b16 [%0], %1;" ::"l"(p), "h"(w) : "memory");
    } else {
      asm volatile("st.global.b16 [%0], %1;" ::"l"(p), "h"(w) : "memory");
    }
  }
};

// N values of T at global p with kAccess-byte accesses (p must be kAccess-aligned), packed.
template <int kAccess, typename T, int N>
__device__ __forceinline__ Packed<kAccess, T, N> load_global(const T* p, bool streaming) {
  Packed<kAccess, T, N> u;
#pragma unroll
  for (int i = 0; i < u.kWords; ++i) {
    u.w[i] = GlobalWord<kAccess>::load(reinterpret_cast<const char*>(p) + i * kAccess, streaming);
  }
  return u;
}

template <int kAccess, typename T, int N>
__device__ __forceinline__ void store_global(T* p, const Packed<kAccess, T, N>& u, bool streaming) {
#pragma unroll
  for (int i = 0; i < u.kWords; ++i) {
    GlobalWord<kAccess>::store(reinterpret_cast<char*>(p) + i * kAccess, u.w[i], streaming);
  }
}

// N floats of shared memory at p, as wide as their alignment allows.
template <int N>
__device__ __forceinline__ Vec<float, N> load_shared(const float* p) {
  constexpr int kAccess = kWideAccess<float, N>;
  using R = typename Raw<kAccess>::type;
  Packed<kAccess, float, N> u;
#pragma unroll
  for (int i = 0; i < u.kWords; ++i) u.w[i] = reinterpret_cast<const R*>(p)[i];
  return unpack(u);
}

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float(float x) { return x; }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float(float x) { return x; }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

struct RopeArgs {
  const void* q_src;
  void* q_dst;
  std::int64_t q_src_stride_t, q_src_stride_h, q_dst_stride_t, q_dst_stride_h;
  const void* k_src;
  std::int64_t k_src_stride_t;
  void* k_dst;
  std::int64_t k_dst_stride_t, k_dst_rows;
  const void* latent;  // null: no latent copy
  std::int64_t latent_stride_t;
  int latent_dim;
  const void* positions;
  bool positions_int32;
  const float* inv_freq;
  float cos_sin_scale;
  std::int64_t max_position;
  const void* slots;  // null: k goes to row t of k_dst
  bool slots_int32;
  int* flag;
  std::int64_t tokens;
  int heads, rotary_dim;
  bool copy_bad_rows, streaming;
  // The unit layout (set by the launcher for the path it takes): R, U, the most tokens one chunk touches
  // (the rows of the shared arrays), and FastDivs by R, U and d/2.
  int row_units, token_units, chunk_tokens;
  FastDiv div_row_units, div_token_units, div_half;
};

// The values of one unit, packed as loaded: kVec values at src + e (interleaved: kVec / 2 pairs), or kVec
// values at src + e and their partners at src + e + d/2 (halves, in `hi`). A latent unit's kCopy values
// (kCopy <= kVec) take the first words of `lo`.
template <typename T, int kVec, int kCopy, int kAlign>
struct UnitValues {
  static_assert(kCopy <= kVec, "a latent unit lives in a rotation unit's registers");
  Packed<kAlign, T, kVec> lo, hi;

  __device__ __forceinline__ void load_copy(const T* src, bool streaming) {
    const Packed<kAlign, T, kCopy> v = load_global<kAlign, T, kCopy>(src, streaming);
#pragma unroll
    for (int i = 0; i < v.kWords; ++i) lo.w[i] = v.w[i];
  }
  __device__ __forceinline__ void store_copy(T* dst, bool streaming) const {
    Packed<kAlign, T, kCopy> v;
#pragma unroll
    for (int i = 0; i < v.kWords; ++i) v.w[i] = lo.w[i];
    store_global(dst, v, streaming);
  }
};

template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign>
__device__ __forceinline__ void load_rotation_unit(UnitValues<T, kVec, kCopy, kAlign>& x, const T* src, int unit,
                                                   int half, bool streaming) {
  const int e = unit * kVec;
  x.lo = load_global<kAlign, T, kVec>(src + e, streaming);
  if constexpr (!kInterleaved) x.hi = load_global<kAlign, T, kVec>(src + half + e, streaming);
}

// Rotate the unit's values by the shared cos/sin row cs (cos in [0, d/2), sin in [d/2, d)) and store them
// at dst in the same layout.
template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign>
__device__ __forceinline__ void rotate_store(const UnitValues<T, kVec, kCopy, kAlign>& x, T* dst, int unit,
                                             const float* cs, int half, bool streaming) {
  constexpr int kPairs = kInterleaved ? kVec / 2 : kVec;  // pairs in the unit
  const int e = unit * kVec;
  const int first_pair = kInterleaved ? e / 2 : e;
  const Vec<float, kPairs> c = load_shared<kPairs>(cs + first_pair);
  const Vec<float, kPairs> s = load_shared<kPairs>(cs + half + first_pair);
  const Vec<T, kVec> lo = unpack(x.lo);
  Vec<T, kVec> hi;
  if constexpr (!kInterleaved) hi = unpack(x.hi);
  Vec<T, kVec> out_lo, out_hi;
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const float a = kInterleaved ? to_float(lo.v[2 * p]) : to_float(lo.v[p]);
    const float b = kInterleaved ? to_float(lo.v[2 * p + 1]) : to_float(hi.v[p]);
    const T ra = from_float<T>(a * c.v[p] - b * s.v[p]), rb = from_float<T>(b * c.v[p] + a * s.v[p]);
    if constexpr (kInterleaved) {
      out_lo.v[2 * p] = ra;
      out_lo.v[2 * p + 1] = rb;
    } else {
      out_lo.v[p] = ra;
      out_hi.v[p] = rb;
    }
  }
  store_global(dst + e, pack<kAlign>(out_lo), streaming);
  if constexpr (!kInterleaved) store_global(dst + half + e, pack<kAlign>(out_hi), streaming);
}

__device__ __forceinline__ std::int64_t load_index(const void* p, bool is_int32, std::int64_t i) {
  return is_int32 ? static_cast<std::int64_t>(static_cast<const int*>(p)[i]) : static_cast<const std::int64_t*>(p)[i];
}

// cos and sin of the float32 angle float(pos) * inv_freq (the product YarnRotary's table holds: no
// contraction), times scale. The angle (up to ~1.6e5 rad) is reduced to [-pi, pi] in double (error < 1e-10),
// where the hardware __sincosf is within 4e-7 of the exact values: a few float32 ulps from the table, and no
// slow path (sincosf's large-argument reduction keeps a local array: a stack frame in every instance).
__device__ __forceinline__ void cos_sin_of(std::int64_t pos, float inv_freq, float scale, float& c, float& s) {
  const double angle = __fmul_rn(static_cast<float>(pos), inv_freq);
  const double turns = rint(angle * kInvTwoPi);
  const float reduced = static_cast<float>(fma(-turns, kTwoPi, angle));
  float sr, cr;
  __sincosf(reduced, &sr, &cr);
  c = cr * scale;
  s = sr * scale;
}

// kVec: values per rotation unit; kCopy: latent values per copy unit; kAlign: the alignment every q/k/latent
// access may assume; kUnits: units per thread (see the file comment). The launch bounds ask for one CTA per
// SM at least: with ptxas' own occupancy target one instance (float32, half-split, 4 units) was held at 64
// registers and spilled.
template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign, int kUnits>
__global__ void __launch_bounds__(kMaxThreads, 1) rope_rows_kernel(const RopeArgs args) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int d = args.rotary_dim, half = d / 2;
  const int R = args.row_units, U = args.token_units, q_units = args.heads * R;
  const int threads = static_cast<int>(blockDim.x), chunk = threads * kUnits;
  const bool streaming = args.streaming;

  // The chunk starts at unit offset0 of token t0 and touches n_tokens tokens (every unit index is < 2^31).
  const int first = static_cast<int>(blockIdx.x) * chunk;
  const int t0 = args.div_token_units(first);
  const int offset0 = first - t0 * U;
  const int n_tokens = min(static_cast<int>(args.tokens) - t0, args.div_token_units(offset0 + chunk - 1) + 1);

  // Shared: cos/sin rows [chunk_tokens, d], k destination rows [chunk_tokens] (-1: none), q written [chunk_tokens].
  float* s_cos_sin = reinterpret_cast<float*>(smem);
  std::int64_t* s_k_row = reinterpret_cast<std::int64_t*>(s_cos_sin + args.chunk_tokens * d);
  int* s_q_write = reinterpret_cast<int*>(s_k_row + args.chunk_tokens);

  // 1. Every unit's values, loaded before anything is stored.
  UnitValues<T, kVec, kCopy, kAlign> x[kUnits];
  int tok[kUnits], w[kUnits];  // token within the chunk, unit within the token
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    const int v = offset0 + static_cast<int>(threadIdx.x) + k * threads;
    tok[k] = args.div_token_units(v);
    w[k] = v - tok[k] * U;
    if (tok[k] >= n_tokens) continue;
    const std::int64_t t = t0 + tok[k];
    if (w[k] < q_units) {
      const int h = args.div_row_units(w[k]), unit = w[k] - h * R;
      const T* src = static_cast<const T*>(args.q_src) + t * args.q_src_stride_t + h * args.q_src_stride_h;
      load_rotation_unit<T, kInterleaved>(x[k], src, unit, half, streaming);
    } else if (w[k] < q_units + R) {
      const T* src = static_cast<const T*>(args.k_src) + t * args.k_src_stride_t;
      load_rotation_unit<T, kInterleaved>(x[k], src, w[k] - q_units, half, streaming);
    } else {
      const T* src = static_cast<const T*>(args.latent) + t * args.latent_stride_t + (w[k] - q_units - R) * kCopy;
      x[k].load_copy(src, streaming);
    }
  }

  // 2. cos/sin of every (token, pair) of the chunk, and each token's destination.
  for (int p = static_cast<int>(threadIdx.x); p < n_tokens * half; p += threads) {
    const int tk = args.div_half(p), i = p - tk * half;
    const std::int64_t t = t0 + tk;
    const std::int64_t pos = load_index(args.positions, args.positions_int32, t);
    const float freq = args.inv_freq[i];
    const bool token_lead = i == 0;  // one thread per token reads the slot and writes the destination
    const std::int64_t slot = token_lead && args.slots != nullptr ? load_index(args.slots, args.slots_int32, t) : t;
    const bool pos_ok = pos >= 0 && pos < args.max_position;
    float c = 1.f, s = 0.f;  // a bad position rotates by nothing
    if (pos_ok) cos_sin_of(pos, freq, args.cos_sin_scale, c, s);
    s_cos_sin[tk * d + i] = c;
    s_cos_sin[tk * d + half + i] = s;
    if (token_lead) {
      int err = pos_ok ? 0 : kErrPosition;
      bool write_k = pos_ok || args.copy_bad_rows;
      if (args.slots != nullptr) {
        if (slot < -1 || slot >= args.k_dst_rows) err |= kErrSlot;
        write_k = pos_ok && slot >= 0 && slot < args.k_dst_rows;
      }
      s_k_row[tk] = write_k ? slot : -1;
      s_q_write[tk] = pos_ok || args.copy_bad_rows;
      if (err != 0) atomicOr(args.flag, err);
    }
  }
  __syncthreads();

  // 3. Rotate and store.
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    if (tok[k] >= n_tokens) continue;
    const std::int64_t t = t0 + tok[k];
    const float* cs = s_cos_sin + tok[k] * d;
    if (w[k] < q_units) {
      if (!s_q_write[tok[k]]) continue;  // rope_and_cache leaves a bad row as it is
      const int h = args.div_row_units(w[k]), unit = w[k] - h * R;
      T* dst = static_cast<T*>(args.q_dst) + t * args.q_dst_stride_t + h * args.q_dst_stride_h;
      rotate_store<T, kInterleaved>(x[k], dst, unit, cs, half, streaming);
      continue;
    }
    const std::int64_t row = s_k_row[tok[k]];
    if (row < 0) continue;
    T* dst = static_cast<T*>(args.k_dst) + row * args.k_dst_stride_t;
    if (w[k] < q_units + R) {
      rotate_store<T, kInterleaved>(x[k], dst + args.latent_dim, w[k] - q_units, cs, half, streaming);
    } else {
      x[k].store_copy(dst + (w[k] - q_units - R) * kCopy, streaming);
    }
  }
}

__global__ void empty_kernel_impl() {}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign>
void launch_path(RopeArgs args, int threads, int units_per_thread, cudaStream_t stream) {
  const int d = args.rotary_dim;
  const int R = kInterleaved ? d / kVec : d / 2 / kVec;
  const int C = args.latent ? args.latent_dim / kCopy : 0;
  const std::int64_t U = static_cast<std::int64_t>(args.heads) * R + R + C;
  PK_CHECK(U < (std::int64_t{1} << 30), "heads * rotary_dim + latent_dim: too many values per token (", U,
           " units)");
  const int chunk = threads * units_per_thread;
  args.row_units = R;
  args.token_units = static_cast<int>(U);
  args.chunk_tokens = static_cast<int>((chunk + U - 2) / U + 1);
  args.div_row_units = make_fast_div(static_cast<std::uint32_t>(R));
  args.div_token_units = make_fast_div(static_cast<std::uint32_t>(U));
  args.div_half = make_fast_div(static_cast<std::uint32_t>(d / 2));
  const std::int64_t shared = static_cast<std::int64_t>(args.chunk_tokens) * (d * sizeof(float) + sizeof(std::int64_t) +
                                                                              sizeof(int));
  PK_CHECK(args.tokens * U + chunk <= kMaxUnits, "tokens: ", args.tokens, " tokens of ", U,
           " units each are too many for one launch (at most 2^31 units); split the batch");
  const std::int64_t blocks = ceil_div(args.tokens * U, chunk);
  void (*kernel)(RopeArgs) = units_per_thread == 1   ? rope_rows_kernel<T, kInterleaved, kVec, kCopy, kAlign, 1>
                             : units_per_thread == 2 ? rope_rows_kernel<T, kInterleaved, kVec, kCopy, kAlign, 2>
                             : units_per_thread == 4 ? rope_rows_kernel<T, kInterleaved, kVec, kCopy, kAlign, 4>
                                                     : rope_rows_kernel<T, kInterleaved, kVec, kCopy, kAlign, 8>;
  if (shared > kDefaultSharedBytes) {  // wide rows (rotary_dim in the thousands): opt in to more
    int device = 0, optin = 0;
    PK_CUDA_CHECK(cudaGetDevice(&device));
    PK_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    PK_CHECK(shared <= optin, "threads * units_per_thread: a chunk of ", chunk, " units touches ", args.chunk_tokens,
             " tokens, whose cos/sin need ", shared, " bytes of shared memory (the device allows ", optin,
             "); use a smaller chunk");
    PK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  }
  kernel<<<dim3(static_cast<unsigned>(blocks)), threads, static_cast<size_t>(shared), stream>>>(args);
  PK_LAUNCH_CHECK();
}

template <typename T, bool kInterleaved>
void launch_typed(const RopeArgs& args, bool aligned, int threads, int units_per_thread, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);  // values per 16-byte access
  if (aligned) return launch_path<T, kInterleaved, kWide, kWide, 16>(args, threads, units_per_thread, stream);
  // element path: one pair (interleaved) or one value of each half per rotation unit, one latent value per copy
  return launch_path<T, kInterleaved, kInterleaved ? 2 : 1, 1, sizeof(T)>(args, threads, units_per_thread, stream);
}

template <typename T>
void launch_layout(const RopeArgs& args, bool interleaved, bool aligned, int threads, int units_per_thread,
                   cudaStream_t stream) {
  if (interleaved) return launch_typed<T, true>(args, aligned, threads, units_per_thread, stream);
  return launch_typed<T, false>(args, aligned, threads, units_per_thread, stream);
}

bool multiple_of_16(std::uint64_t v) { return v % 16 == 0; }

}  // namespace

void rope_rows(std::uintptr_t q_src, std::int64_t q_src_stride_t, std::int64_t q_src_stride_h, std::uintptr_t q_dst,
               std::int64_t q_dst_stride_t, std::int64_t q_dst_stride_h, std::uintptr_t k_src,
               std::int64_t k_src_stride_t, std::uintptr_t k_dst, std::int64_t k_dst_stride_t,
               std::int64_t k_dst_rows, std::uintptr_t latent, std::int64_t latent_stride_t, std::int64_t latent_dim,
               std::uintptr_t positions, bool positions_int32, std::uintptr_t inv_freq, double cos_sin_scale,
               std::int64_t max_position, std::uintptr_t slots, bool slots_int32, std::uintptr_t flag,
               std::int64_t tokens, std::int64_t heads, std::int64_t rotary_dim, int dtype, bool interleaved,
               bool copy_bad_rows, int threads, int units_per_thread, bool streaming, std::uintptr_t stream) {
  require_device();
  PK_CHECK(dtype == kRopeFloat32 || dtype == kRopeFloat16 || dtype == kRopeBFloat16,
           "dtype: expected 0 (float32), 1 (float16) or 2 (bfloat16), got ", dtype);
  PK_CHECK(tokens >= 0, "tokens: expected >= 0, got ", tokens);
  PK_CHECK(heads >= 1 && heads <= (1 << 16), "heads: expected in [1, 65536], got ", heads);
  PK_CHECK(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= 4096,
           "rotary_dim: expected an even number in [2, 4096], got ", rotary_dim);
  PK_CHECK(latent_dim >= 0 && latent_dim <= (1 << 20), "latent_dim: expected in [0, 2^20], got ", latent_dim);
  PK_CHECK(latent == 0 || slots != 0, "latent: a latent copy needs slots (the cache rows)");
  PK_CHECK(k_dst_stride_t >= latent_dim + rotary_dim, "k_dst_stride_t: expected >= latent_dim + rotary_dim = ",
           latent_dim + rotary_dim, ", got ", k_dst_stride_t);
  PK_CHECK(max_position >= 1, "max_position: expected >= 1, got ", max_position);
  PK_CHECK(k_dst_rows >= 0, "k_dst_rows: expected >= 0, got ", k_dst_rows);
  PK_CHECK(slots != 0 || k_dst_rows >= tokens, "k_dst_rows: without slots k_dst needs a row per token (", tokens,
           "), got ", k_dst_rows);
  PK_CHECK(threads >= 32 && threads <= kMaxThreads && threads % 32 == 0,
           "threads: expected a multiple of 32 in [32, ", kMaxThreads, "], got ", threads);
  PK_CHECK(units_per_thread == 1 || units_per_thread == 2 || units_per_thread == 4 || units_per_thread == 8,
           "units_per_thread: expected 1, 2, 4 or 8, got ", units_per_thread);
  if (tokens == 0) return;
  PK_CHECK(q_src != 0 && q_dst != 0 && k_src != 0, "q_src/q_dst/k_src: null pointer");
  PK_CHECK(k_dst != 0 || k_dst_rows == 0, "k_dst: null pointer with ", k_dst_rows, " rows");
  PK_CHECK(positions != 0 && inv_freq != 0 && flag != 0, "positions/inv_freq/flag: null pointer");

  const std::uint64_t elem = dtype == kRopeFloat32 ? 4 : 2;
  const auto bytes = [elem](std::int64_t n) { return static_cast<std::uint64_t>(n) * elem; };
  // The 16-byte path needs every row start and every unit on 16-byte boundaries, and whole 16-byte units
  // in each half of a row (rotary_dim / 2 values a multiple of 16 bytes; also 16-byte cos/sin pieces).
  const bool aligned =
      multiple_of_16(q_src | q_dst | k_src | k_dst) && (latent == 0 || multiple_of_16(latent)) &&
      multiple_of_16(bytes(q_src_stride_t) | bytes(q_src_stride_h) | bytes(q_dst_stride_t) | bytes(q_dst_stride_h) |
                     bytes(k_src_stride_t) | bytes(k_dst_stride_t) | bytes(latent_dim) | bytes(rotary_dim / 2) |
                     (latent ? bytes(latent_stride_t) : 0)) &&
      rotary_dim % 8 == 0;

  RopeArgs args{};
  args.q_src = as_ptr<const void>(q_src);
  args.q_dst = as_ptr<void>(q_dst);
  args.q_src_stride_t = q_src_stride_t;
  args.q_src_stride_h = q_src_stride_h;
  args.q_dst_stride_t = q_dst_stride_t;
  args.q_dst_stride_h = q_dst_stride_h;
  args.k_src = as_ptr<const void>(k_src);
  args.k_src_stride_t = k_src_stride_t;
  args.k_dst = as_ptr<void>(k_dst);
  args.k_dst_stride_t = k_dst_stride_t;
  args.k_dst_rows = k_dst_rows;
  args.latent = latent ? as_ptr<const void>(latent) : nullptr;
  args.latent_stride_t = latent_stride_t;
  args.latent_dim = static_cast<int>(latent_dim);
  args.positions = as_ptr<const void>(positions);
  args.positions_int32 = positions_int32;
  args.inv_freq = as_ptr<const float>(inv_freq);
  args.cos_sin_scale = static_cast<float>(cos_sin_scale);
  args.max_position = max_position;
  args.slots = slots ? as_ptr<const void>(slots) : nullptr;
  args.slots_int32 = slots_int32;
  args.flag = as_ptr<int>(flag);
  args.tokens = tokens;
  args.heads = static_cast<int>(heads);
  args.rotary_dim = static_cast<int>(rotary_dim);
  args.copy_bad_rows = copy_bad_rows;
  args.streaming = streaming;

  const cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case kRopeFloat32: return launch_layout<float>(args, interleaved, aligned, threads, units_per_thread, st);
    case kRopeFloat16: return launch_layout<__half>(args, interleaved, aligned, threads, units_per_thread, st);
    default: return launch_layout<__nv_bfloat16>(args, interleaved, aligned, threads, units_per_thread, st);
  }
}

void empty_kernel(std::uintptr_t stream) {
  require_device();
  empty_kernel_impl<<<1, 32, 0, as_stream(stream)>>>();
  PK_LAUNCH_CHECK();
}

}  // namespace pk
