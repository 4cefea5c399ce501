// Rotary embedding + paged latent-cache write (see rope.h for the contract).
//
// Work decomposition: one thread per "unit" of 16 bytes (the aligned path) or of one pair / one value (the
// fallback path for addresses or sizes that are not multiples of 16 bytes). For a token with H heads,
// rotary_dim d and latent width L the units are, in order:
//   [0, H * R)          q: head u / R, unit u % R of that head's d values        (R units per row)
//   [H * R, H * R + R)  k: unit u - H * R of k's row, written to the cache row
//   [.., + C)           latent: C units copied to the start of the cache row
// Grid: x covers one token's units, y walks the tokens (a grid-stride loop beyond 65535 tokens).
// Interleaved rows: a unit is kVec consecutive values = kVec / 2 pairs (x[2i], x[2i+1]), R = d / kVec.
// Half-split rows: a unit is kVec values at [j, j + kVec) and their partners at [j + d/2, ...), R = d / 2 / kVec.
// Each thread reads its token's position (and slot) itself: the same 8 bytes for all threads of a token,
// served by L1; cos/sin come from the table row of that position (d * 4 bytes, L1/L2 resident per token).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/check.h"
#include "../common/stream.h"
#include "rope.h"

namespace pk {
namespace {

constexpr int kThreads = 128;        // 4 warps: one token of h16 (8 * 16 + 8 + 64 units for bf16) in 2 blocks
constexpr int kMaxGridY = 65535;     // CUDA's limit on gridDim.y; more tokens loop
constexpr int kErrPosition = 1;      // same bits as pykernels/rope.py
constexpr int kErrSlot = 2;

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

// Load / store N values of T at p with kAccess-byte accesses (p must be kAccess-aligned), through a union
// of the values and the access words. Stores are PTX: nvcc split the 16-byte stores of the in-place q path
// into 2- or 4-byte ones otherwise (seen in the PTX of CUDA 13.0).
template <int kAccess, typename T, int N>
union Words {
  static_assert((sizeof(T) * N) % kAccess == 0, "the access width must divide the vector");
  Vec<T, N> values;
  typename Raw<kAccess>::type words[sizeof(T) * N / kAccess];
};

template <int kAccess, typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  using R = typename Raw<kAccess>::type;
  Words<kAccess, T, N> u;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T)) * N / kAccess; ++i) u.words[i] = reinterpret_cast<const R*>(p)[i];
  return u.values;
}

// One kAccess-byte global store of the words at w (PTX, so the width is exactly the one asked for); the
// kernels store 16 bytes (aligned path) or one element (fallback path).
template <int kAccess>
__device__ __forceinline__ void store_words(void* p, const typename Raw<kAccess>::type& w);
template <>
__device__ __forceinline__ void store_words<16>(void* p, const uint4& w) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w) : "memory");
}
template <>
__device__ __forceinline__ void store_words<4>(void* p, const unsigned int& w) {
  asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(w) : "memory");
}
template <>
__device__ __forceinline__ void store_words<2>(void* p, const unsigned short& w) {
  asm volatile("st.global.b16 [%0], %1;" ::"l"(p), "h"(w) : "memory");
}

template <int kAccess, typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& value) {
  Words<kAccess, T, N> u;
  u.values = value;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T)) * N / kAccess; ++i) {
    store_words<kAccess>(reinterpret_cast<char*>(p) + i * kAccess, u.words[i]);
  }
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
  const float* cos_sin;
  std::int64_t max_position;
  const void* slots;  // null: k goes to row t of k_dst
  bool slots_int32;
  int* flag;
  std::int64_t tokens;
  int heads, rotary_dim;
  bool copy_bad_rows;
};

// The values of one unit: kVec values at src + e (interleaved: kVec / 2 pairs), or kVec values at src + e
// and their partners at src + e + d/2 (halves, in `hi`). kAlign: the access width of q/k (16 bytes on the
// aligned path, one element on the fallback path).
template <typename T, int kVec>
struct UnitValues {
  Vec<T, kVec> lo, hi;
};

template <typename T, bool kInterleaved, int kVec, int kAlign>
__device__ __forceinline__ UnitValues<T, kVec> load_unit(const T* src, int unit, int half) {
  UnitValues<T, kVec> x;
  const int e = unit * kVec;
  x.lo = load_vec<kAlign, T, kVec>(src + e);
  if constexpr (!kInterleaved) x.hi = load_vec<kAlign, T, kVec>(src + half + e);
  return x;
}

// Rotate the unit's values by the cos/sin of the table row cs_row and store them at dst (same layout).
// pos_ok == false rotates by nothing (cos 1, sin 0): the values are stored unchanged. The cos/sin accesses
// are as wide as the unit's slice of the table.
template <typename T, bool kInterleaved, int kVec, int kAlign>
__device__ __forceinline__ void rotate_store(const UnitValues<T, kVec>& x, T* dst, int unit, const float* cs_row,
                                             bool pos_ok, int half) {
  constexpr int kPairs = kInterleaved ? kVec / 2 : kVec;  // pairs in the unit
  constexpr int kTable = kWideAccess<float, kPairs>;
  const int e = unit * kVec;
  const int first_pair = kInterleaved ? e / 2 : e;
  Vec<float, kPairs> c, s;
  if (pos_ok) {
    c = load_vec<kTable, float, kPairs>(cs_row + first_pair);
    s = load_vec<kTable, float, kPairs>(cs_row + half + first_pair);
  } else {
#pragma unroll
    for (int p = 0; p < kPairs; ++p) c.v[p] = 1.f, s.v[p] = 0.f;
  }
  UnitValues<T, kVec> out;
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const float a = kInterleaved ? to_float(x.lo.v[2 * p]) : to_float(x.lo.v[p]);
    const float b = kInterleaved ? to_float(x.lo.v[2 * p + 1]) : to_float(x.hi.v[p]);
    const T ra = from_float<T>(a * c.v[p] - b * s.v[p]), rb = from_float<T>(b * c.v[p] + a * s.v[p]);
    if constexpr (kInterleaved) {
      out.lo.v[2 * p] = ra;
      out.lo.v[2 * p + 1] = rb;
    } else {
      out.lo.v[p] = ra;
      out.hi.v[p] = rb;
    }
  }
  store_vec<kAlign>(dst + e, out.lo);
  if constexpr (!kInterleaved) store_vec<kAlign>(dst + half + e, out.hi);
}

__device__ __forceinline__ std::int64_t load_index(const void* p, bool is_int32, std::int64_t i) {
  return is_int32 ? static_cast<std::int64_t>(static_cast<const int*>(p)[i]) : static_cast<const std::int64_t*>(p)[i];
}

// Where token t's k row goes: row slots[t] (or t), whether to write it, and the error bits it raises.
struct Destination {
  std::int64_t row;
  bool write;
  int err;
};

__device__ __forceinline__ Destination destination(const RopeArgs& args, std::int64_t t, bool pos_ok) {
  Destination dst{t, pos_ok || args.copy_bad_rows, pos_ok ? 0 : kErrPosition};
  if (args.slots != nullptr) {
    dst.row = load_index(args.slots, args.slots_int32, t);
    if (dst.row < -1 || dst.row >= args.k_dst_rows) dst.err |= kErrSlot;
    dst.write = pos_ok && dst.row >= 0 && dst.row < args.k_dst_rows;
  }
  return dst;
}

// kVec: values per rotation unit (see the file comment); kCopy: latent values per copy unit; kAlign: the
// alignment every q/k/latent access may assume.
// NOTES: every thread loads its q/k/latent values before the token's position and slot: they do not depend
// on them, so the two loads overlap and a decode step waits for two memory round trips (values + index,
// then the cos/sin row), not three.
template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign>
__global__ void __launch_bounds__(kThreads) rope_rows_kernel(const RopeArgs args) {
  const int d = args.rotary_dim, half = d / 2;
  const int row_units = kInterleaved ? d / kVec : half / kVec;
  const int q_units = args.heads * row_units;
  const int copy_units = args.latent == nullptr ? 0 : args.latent_dim / kCopy;
  const int u = blockIdx.x * kThreads + threadIdx.x;
  if (u >= q_units + row_units + copy_units) return;

  for (std::int64_t t = blockIdx.y; t < args.tokens; t += gridDim.y) {
    if (u < q_units) {
      const int h = u / row_units, unit = u - h * row_units;
      const T* src = static_cast<const T*>(args.q_src) + t * args.q_src_stride_t + h * args.q_src_stride_h;
      T* dst = static_cast<T*>(args.q_dst) + t * args.q_dst_stride_t + h * args.q_dst_stride_h;
      const UnitValues<T, kVec> x = load_unit<T, kInterleaved, kVec, kAlign>(src, unit, half);
      const std::int64_t pos = load_index(args.positions, args.positions_int32, t);
      const bool pos_ok = pos >= 0 && pos < args.max_position;
      if (!pos_ok && !args.copy_bad_rows) continue;  // rope_and_cache leaves a bad row as it is
      rotate_store<T, kInterleaved, kVec, kAlign>(x, dst, unit, args.cos_sin + (pos_ok ? pos : 0) * d, pos_ok,
                                                  half);
    } else if (u < q_units + row_units) {
      const int unit = u - q_units;
      const T* src = static_cast<const T*>(args.k_src) + t * args.k_src_stride_t;
      const UnitValues<T, kVec> x = load_unit<T, kInterleaved, kVec, kAlign>(src, unit, half);
      const std::int64_t pos = load_index(args.positions, args.positions_int32, t);
      const bool pos_ok = pos >= 0 && pos < args.max_position;
      const Destination to = destination(args, t, pos_ok);
      if (unit == 0 && to.err != 0) atomicOr(args.flag, to.err);
      if (!to.write) continue;
      T* dst = static_cast<T*>(args.k_dst) + to.row * args.k_dst_stride_t + args.latent_dim;
      rotate_store<T, kInterleaved, kVec, kAlign>(x, dst, unit, args.cos_sin + (pos_ok ? pos : 0) * d, pos_ok,
                                                  half);
    } else {
      const int e = (u - q_units - row_units) * kCopy;
      const T* src = static_cast<const T*>(args.latent) + t * args.latent_stride_t;
      const Vec<T, kCopy> v = load_vec<kAlign, T, kCopy>(src + e);
      const std::int64_t pos = load_index(args.positions, args.positions_int32, t);
      const Destination to = destination(args, t, pos >= 0 && pos < args.max_position);
      if (!to.write) continue;
      store_vec<kAlign>(static_cast<T*>(args.k_dst) + to.row * args.k_dst_stride_t + e, v);
    }
  }
}

__global__ void empty_kernel_impl() {}

template <typename T, bool kInterleaved>
void launch_typed(const RopeArgs& args, bool aligned, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);  // values per 16-byte access
  const int d = args.rotary_dim;
  if (aligned) {
    constexpr int kVec = kWide;
    const int row_units = kInterleaved ? d / kVec : d / 2 / kVec;
    const int units = args.heads * row_units + row_units + (args.latent ? args.latent_dim / kWide : 0);
    const dim3 grid((units + kThreads - 1) / kThreads,
                    static_cast<unsigned>(args.tokens < kMaxGridY ? args.tokens : kMaxGridY));
    rope_rows_kernel<T, kInterleaved, kVec, kWide, 16><<<grid, kThreads, 0, stream>>>(args);
  } else {
    constexpr int kVec = kInterleaved ? 2 : 1;  // one pair per unit
    const int row_units = kInterleaved ? d / kVec : d / 2 / kVec;
    const int units = args.heads * row_units + row_units + (args.latent ? args.latent_dim : 0);
    const dim3 grid((units + kThreads - 1) / kThreads,
                    static_cast<unsigned>(args.tokens < kMaxGridY ? args.tokens : kMaxGridY));
    rope_rows_kernel<T, kInterleaved, kVec, 1, sizeof(T)><<<grid, kThreads, 0, stream>>>(args);
  }
  PK_LAUNCH_CHECK();
}

template <typename T>
void launch_layout(const RopeArgs& args, bool interleaved, bool aligned, cudaStream_t stream) {
  if (interleaved) return launch_typed<T, true>(args, aligned, stream);
  return launch_typed<T, false>(args, aligned, stream);
}

bool multiple_of_16(std::uint64_t v) { return v % 16 == 0; }

}  // namespace

void rope_rows(std::uintptr_t q_src, std::int64_t q_src_stride_t, std::int64_t q_src_stride_h, std::uintptr_t q_dst,
               std::int64_t q_dst_stride_t, std::int64_t q_dst_stride_h, std::uintptr_t k_src,
               std::int64_t k_src_stride_t, std::uintptr_t k_dst, std::int64_t k_dst_stride_t,
               std::int64_t k_dst_rows, std::uintptr_t latent, std::int64_t latent_stride_t, std::int64_t latent_dim,
               std::uintptr_t positions, bool positions_int32, std::uintptr_t cos_sin, std::int64_t max_position,
               std::uintptr_t slots, bool slots_int32, std::uintptr_t flag, std::int64_t tokens, std::int64_t heads,
               std::int64_t rotary_dim, int dtype, bool interleaved, bool copy_bad_rows, std::uintptr_t stream) {
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
  if (tokens == 0) return;
  PK_CHECK(q_src != 0 && q_dst != 0 && k_src != 0, "q_src/q_dst/k_src: null pointer");
  PK_CHECK(k_dst != 0 || k_dst_rows == 0, "k_dst: null pointer with ", k_dst_rows, " rows");
  PK_CHECK(positions != 0 && cos_sin != 0 && flag != 0, "positions/cos_sin/flag: null pointer");
  PK_CHECK(static_cast<std::int64_t>(heads) * rotary_dim + rotary_dim + latent_dim < (std::int64_t{1} << 30),
           "heads * rotary_dim + latent_dim: too many values per token");

  const std::uint64_t elem = dtype == kRopeFloat32 ? 4 : 2;
  const auto bytes = [elem](std::int64_t n) { return static_cast<std::uint64_t>(n) * elem; };
  // The 16-byte path needs every row start, every unit and the table slices on 16-byte boundaries.
  const bool aligned =
      multiple_of_16(q_src | q_dst | k_src | k_dst | cos_sin) && (latent == 0 || multiple_of_16(latent)) &&
      multiple_of_16(bytes(q_src_stride_t) | bytes(q_src_stride_h) | bytes(q_dst_stride_t) | bytes(q_dst_stride_h) |
                     bytes(k_src_stride_t) | bytes(k_dst_stride_t) | bytes(latent_dim) | bytes(rotary_dim / 2) |
                     (latent ? bytes(latent_stride_t) : 0)) &&
      rotary_dim % 8 == 0;  // the table row (d floats) and its halves start on 16 bytes

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
  args.cos_sin = as_ptr<const float>(cos_sin);
  args.max_position = max_position;
  args.slots = slots ? as_ptr<const void>(slots) : nullptr;
  args.slots_int32 = slots_int32;
  args.flag = as_ptr<int>(flag);
  args.tokens = tokens;
  args.heads = static_cast<int>(heads);
  args.rotary_dim = static_cast<int>(rotary_dim);
  args.copy_bad_rows = copy_bad_rows;

  const cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case kRopeFloat32: return launch_layout<float>(args, interleaved, aligned, st);
    case kRopeFloat16: return launch_layout<__half>(args, interleaved, aligned, st);
    default: return launch_layout<__nv_bfloat16>(args, interleaved, aligned, st);
  }
}

void empty_kernel(std::uintptr_t stream) {
  require_device();
  empty_kernel_impl<<<1, 32, 0, as_stream(stream)>>>();
  PK_LAUNCH_CHECK();
}

}  // namespace pk
