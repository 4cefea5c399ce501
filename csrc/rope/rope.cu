// Rotary embedding + paged latent-cache write (see rope.h for the contract).
//
// Work decomposition: one thread per "unit" of 16 bytes (the aligned path) or of one pair / one value (the
// fallback path for addresses or sizes that are not multiples of 16 bytes). For a token with H heads,
// rotary_dim d and latent width L the units are, in order:
//   [0, H * R)          q: head u / R, unit u % R of that head's d values        (R units per row)
//   [H * R, H * R + R)  k: unit u - H * R of k's row, written to the cache row
//   [.., + C)           latent: C units copied to the start of the cache row
// Interleaved rows: a unit is kVec consecutive values = kVec / 2 pairs (x[2i], x[2i+1]), R = d / kVec.
// Half-split rows: a unit is kVec values at [j, j + kVec) and their partners at [j + d/2, ...), R = d / 2 / kVec.
// Two kernels run the same per-item code (rope_item, see Items), chosen by the token count (rows_per_thread):
//   tokens kernel (decode): grid x covers one token's units, y walks the tokens (a grid-stride loop beyond
//                           65535 tokens); a thread does one unit of one token.
//   flat kernel (prefill):  a 1-D grid over (token, item) pairs; a q item is one unit of kRows heads of its
//                           token and a latent item kRows copy units, all loaded before anything is stored,
//                           so kRows 16-byte loads are in flight per thread, and every thread of every block
//                           has work (the tokens kernel's second block of an h16 token is mostly idle).
// Each thread reads its tokens' positions (and slots) itself: the same 8 bytes for all threads of a token,
// served by L1; cos/sin come from the table row of that position (d * 4 bytes, L1/L2 resident per token).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "../common/check.h"
#include "../common/stream.h"
#include "rope.h"

namespace pk {
namespace {

constexpr int kThreads = 128;        // 4 warps; tokens kernel: an h16 token (8 * 16 + 8 + 64 bf16 units) in 2 blocks
constexpr int kMaxGridY = 65535;     // CUDA's limit on gridDim.y; more tokens loop
constexpr std::int64_t kMaxGridX = 2147483647;  // CUDA's limit on gridDim.x; more work loops
constexpr std::int64_t kDecodeMaxTokens = 256;  // up to this many tokens: the tokens kernel (rows_per_thread)
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

// Pairs in one unit, and the cos/sin of those pairs.
template <bool kInterleaved, int kVec>
constexpr int kUnitPairs = kInterleaved ? kVec / 2 : kVec;

template <int kPairs>
struct UnitTable {
  Vec<float, kPairs> c, s;
};

// The cos/sin of the unit's pairs from table row pos (d floats: cos, then sin); pos_ok == false gives the
// identity (cos 1, sin 0) without reading the table. The accesses are as wide as the unit's slice.
template <bool kInterleaved, int kVec>
__device__ __forceinline__ UnitTable<kUnitPairs<kInterleaved, kVec>> load_table(const float* cos_sin, std::int64_t pos,
                                                                               bool pos_ok, int d, int unit) {
  constexpr int kPairs = kUnitPairs<kInterleaved, kVec>;
  constexpr int kTable = kWideAccess<float, kPairs>;
  const int first_pair = kInterleaved ? unit * kVec / 2 : unit * kVec;
  UnitTable<kPairs> cs;
  if (pos_ok) {
    const float* row = cos_sin + pos * d;
    cs.c = load_vec<kTable, float, kPairs>(row + first_pair);
    cs.s = load_vec<kTable, float, kPairs>(row + d / 2 + first_pair);
  } else {
#pragma unroll
    for (int p = 0; p < kPairs; ++p) cs.c.v[p] = 1.f, cs.s.v[p] = 0.f;
  }
  return cs;
}

// Rotate the unit's values by cs and store them at dst (same layout as the source).
template <typename T, bool kInterleaved, int kVec, int kAlign>
__device__ __forceinline__ void rotate_store(const UnitValues<T, kVec>& x,
                                             const UnitTable<kUnitPairs<kInterleaved, kVec>>& cs, T* dst, int unit,
                                             int half) {
  constexpr int kPairs = kUnitPairs<kInterleaved, kVec>;
  const int e = unit * kVec;
  UnitValues<T, kVec> out;
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const float a = kInterleaved ? to_float(x.lo.v[2 * p]) : to_float(x.lo.v[p]);
    const float b = kInterleaved ? to_float(x.lo.v[2 * p + 1]) : to_float(x.hi.v[p]);
    const T ra = from_float<T>(a * cs.c.v[p] - b * cs.s.v[p]), rb = from_float<T>(b * cs.c.v[p] + a * cs.s.v[p]);
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

__device__ __forceinline__ bool position_ok(const RopeArgs& args, std::int64_t pos) {
  return pos >= 0 && pos < args.max_position;
}

// The indices of token t: its position and its k row (slots[t], or t without slots).
struct TokenIndex {
  std::int64_t pos, slot;
};

// kPaired: both loads are issued unconditionally (without slots the second one reads the position again,
// from L1), so they overlap; with the slot load behind a branch nvcc compares the position first and so
// waits for it. The flat kernel pairs them; the tokens kernel does not: pairing raised its registers from
// 32 to 48 (bf16), a second wave of blocks at T = 256, h128, for one L1/L2 round trip of the k threads.
template <bool kPaired>
__device__ __forceinline__ TokenIndex load_token_index(const RopeArgs& args, std::int64_t t) {
  const bool has_slots = args.slots != nullptr;
  const std::int64_t pos = load_index(args.positions, args.positions_int32, t);
  if constexpr (kPaired) {
    const std::int64_t slot = load_index(has_slots ? args.slots : args.positions,
                                         has_slots ? args.slots_int32 : args.positions_int32, t);
    return {pos, has_slots ? slot : t};
  } else {
    return {pos, has_slots ? load_index(args.slots, args.slots_int32, t) : t};
  }
}

// Where token t's k row goes: row idx.slot, whether to write it, and the error bits it raises.
struct Destination {
  std::int64_t row;
  bool write;
  int err;
};

__device__ __forceinline__ Destination destination(const RopeArgs& args, const TokenIndex& idx) {
  const bool pos_ok = position_ok(args, idx.pos);
  Destination dst{idx.slot, pos_ok || args.copy_bad_rows, pos_ok ? 0 : kErrPosition};
  if (args.slots != nullptr) {
    if (dst.row < -1 || dst.row >= args.k_dst_rows) dst.err |= kErrSlot;
    dst.write = pos_ok && dst.row >= 0 && dst.row < args.k_dst_rows;
  }
  return dst;
}

// The work items of one token. A thread's item is one of
//   q:      unit `unit` of kRows heads of the token: heads g, g + HG, g + 2 HG, ... below H (HG = ceil(H / kRows)),
//           so the lanes of a warp read consecutive 16-byte units for each of its loads;
//   k:      one unit of the token's k row;
//   latent: kRows copy units of the token's latent row: g, g + LG, ... below C (LG = ceil(C / kRows)).
// A q item loads its kRows values, then the position, then one cos/sin slice for all of them, and stores
// last: kRows independent 16-byte loads in flight per thread, sharing the position and table loads (a
// thread doing several tokens would hold a cos/sin slice per token: ptxas gave it 148 registers at 4
// bf16 tokens, which leaves fewer bytes in flight per SM, not more).
// NOTES: the stores are asm volatile with a "memory" clobber, so no load moves past one; the code is
// written loads first for that reason.
struct Items {
  int row;          // R: units of one rotated row
  int head_groups;  // HG
  int copy_units;   // C
  int copy_groups;  // LG
  int q, total;     // q items (HG * R), and q + k + latent items of a token
};

template <bool kInterleaved, int kVec, int kCopy, int kRows>
__host__ __device__ __forceinline__ Items items_of(const RopeArgs& args) {
  Items it{};
  it.row = kInterleaved ? args.rotary_dim / kVec : args.rotary_dim / 2 / kVec;
  it.head_groups = (args.heads + kRows - 1) / kRows;
  it.copy_units = args.latent == nullptr ? 0 : args.latent_dim / kCopy;
  it.copy_groups = (it.copy_units + kRows - 1) / kRows;
  it.q = it.head_groups * it.row;
  it.total = it.q + it.row + it.copy_groups;
  return it;
}

template <typename T, bool kInterleaved, int kVec, int kAlign, int kRows>
__device__ __forceinline__ void rotate_q_item(const RopeArgs& args, const Items& items, int group, int unit,
                                              std::int64_t t) {
  const int d = args.rotary_dim, half = d / 2;
  UnitValues<T, kVec> x[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int h = group + r * items.head_groups;
    if (h < args.heads) {
      const T* src = static_cast<const T*>(args.q_src) + t * args.q_src_stride_t + h * args.q_src_stride_h;
      x[r] = load_unit<T, kInterleaved, kVec, kAlign>(src, unit, half);
    }
  }
  const std::int64_t pos = load_index(args.positions, args.positions_int32, t);
  const bool pos_ok = position_ok(args, pos);
  if (!pos_ok && !args.copy_bad_rows) return;  // rope_and_cache leaves a bad row as it is
  const auto cs = load_table<kInterleaved, kVec>(args.cos_sin, pos, pos_ok, d, unit);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int h = group + r * items.head_groups;
    if (h < args.heads) {
      T* dst = static_cast<T*>(args.q_dst) + t * args.q_dst_stride_t + h * args.q_dst_stride_h;
      rotate_store<T, kInterleaved, kVec, kAlign>(x[r], cs, dst, unit, half);
    }
  }
}

// Unit 0 of a token's k row also raises the token's error bits.
template <typename T, bool kInterleaved, int kVec, int kAlign, bool kPaired>
__device__ __forceinline__ void rotate_k_unit(const RopeArgs& args, int unit, std::int64_t t) {
  const int d = args.rotary_dim, half = d / 2;
  const T* src = static_cast<const T*>(args.k_src) + t * args.k_src_stride_t;
  const UnitValues<T, kVec> x = load_unit<T, kInterleaved, kVec, kAlign>(src, unit, half);
  const TokenIndex idx = load_token_index<kPaired>(args, t);
  const Destination to = destination(args, idx);
  if (unit == 0 && to.err != 0) atomicOr(args.flag, to.err);
  if (!to.write) return;
  const bool pos_ok = position_ok(args, idx.pos);
  T* dst = static_cast<T*>(args.k_dst) + to.row * args.k_dst_stride_t + args.latent_dim;
  rotate_store<T, kInterleaved, kVec, kAlign>(x, load_table<kInterleaved, kVec>(args.cos_sin, idx.pos, pos_ok, d, unit),
                                              dst, unit, half);
}

template <typename T, int kCopy, int kAlign, int kRows, bool kPaired>
__device__ __forceinline__ void copy_latent_item(const RopeArgs& args, const Items& items, int group, std::int64_t t) {
  const T* src = static_cast<const T*>(args.latent) + t * args.latent_stride_t;
  Vec<T, kCopy> v[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int c = group + r * items.copy_groups;
    if (c < items.copy_units) v[r] = load_vec<kAlign, T, kCopy>(src + c * kCopy);
  }
  const Destination to = destination(args, load_token_index<kPaired>(args, t));
  if (!to.write) return;
  T* dst = static_cast<T*>(args.k_dst) + to.row * args.k_dst_stride_t;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int c = group + r * items.copy_groups;
    if (c < items.copy_units) store_vec<kAlign>(dst + c * kCopy, v[r]);
  }
}

// Item v (< items.total) of token t. kVec: values per rotation unit (see the file comment); kCopy: latent
// values per copy unit; kAlign: the alignment every q/k/latent access may assume; kRows: see Items;
// kPaired: see load_token_index.
template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign, int kRows, bool kPaired>
__device__ __forceinline__ void rope_item(const RopeArgs& args, const Items& items, int v, std::int64_t t) {
  if (v < items.q) {
    const int group = v / items.row;
    rotate_q_item<T, kInterleaved, kVec, kAlign, kRows>(args, items, group, v - group * items.row, t);
  } else if (v < items.q + items.row) {
    rotate_k_unit<T, kInterleaved, kVec, kAlign, kPaired>(args, v - items.q, t);
  } else {
    copy_latent_item<T, kCopy, kAlign, kRows, kPaired>(args, items, v - items.q - items.row, t);
  }
}

// Decode (few tokens): grid x covers one token's items, y walks the tokens; one q row per item.
template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign>
__global__ void __launch_bounds__(kThreads) rope_tokens_kernel(const RopeArgs args) {
  const Items items = items_of<kInterleaved, kVec, kCopy, 1>(args);
  const int v = blockIdx.x * kThreads + threadIdx.x;
  if (v >= items.total) return;
  for (std::int64_t t = blockIdx.y; t < args.tokens; t += gridDim.y) {
    rope_item<T, kInterleaved, kVec, kCopy, kAlign, 1, false>(args, items, v, t);
  }
}

// Prefill (many tokens): a 1-D grid over (token, item) pairs, item fastest, so every thread of every block
// has work (the tokens kernel's second block of an h16 token is mostly idle: 136 items in 2 x 128 threads).
template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign, int kRows>
__global__ void __launch_bounds__(kThreads) rope_flat_kernel(const RopeArgs args) {
  const Items items = items_of<kInterleaved, kVec, kCopy, kRows>(args);
  const std::int64_t work = args.tokens * items.total;
  for (std::int64_t w = std::int64_t{blockIdx.x} * kThreads + threadIdx.x; w < work;
       w += std::int64_t{gridDim.x} * kThreads) {
    const std::int64_t t = w / items.total;
    rope_item<T, kInterleaved, kVec, kCopy, kAlign, kRows, true>(args, items, static_cast<int>(w - t * items.total),
                                                                 t);
  }
}

__global__ void empty_kernel_impl() {}

template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign, int kRows>
void launch_flat(const RopeArgs& args, cudaStream_t stream) {
  const std::int64_t work = args.tokens * items_of<kInterleaved, kVec, kCopy, kRows>(args).total;
  const std::int64_t blocks = (work + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(blocks < kMaxGridX ? blocks : kMaxGridX));
  rope_flat_kernel<T, kInterleaved, kVec, kCopy, kAlign, kRows><<<grid, kThreads, 0, stream>>>(args);
}

// One launch with kVec values per rotation unit and kCopy per latent unit: rows_per_thread 0 takes the
// tokens kernel, else the flat kernel with that many q rows (or latent units) per item.
template <typename T, bool kInterleaved, int kVec, int kCopy, int kAlign>
void launch_items(const RopeArgs& args, int rows_per_thread, cudaStream_t stream) {
  switch (rows_per_thread) {
    case 0: {
      const Items items = items_of<kInterleaved, kVec, kCopy, 1>(args);
      const dim3 grid(static_cast<unsigned>((items.total + kThreads - 1) / kThreads),
                      static_cast<unsigned>(args.tokens < kMaxGridY ? args.tokens : kMaxGridY));
      rope_tokens_kernel<T, kInterleaved, kVec, kCopy, kAlign><<<grid, kThreads, 0, stream>>>(args);
      break;
    }
    case 1: launch_flat<T, kInterleaved, kVec, kCopy, kAlign, 1>(args, stream); break;
    case 2: launch_flat<T, kInterleaved, kVec, kCopy, kAlign, 2>(args, stream); break;
    case 4: launch_flat<T, kInterleaved, kVec, kCopy, kAlign, 4>(args, stream); break;
    default: launch_flat<T, kInterleaved, kVec, kCopy, kAlign, 8>(args, stream); break;
  }
}

template <typename T, bool kInterleaved>
void launch_typed(const RopeArgs& args, bool aligned, int rows_per_thread, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);  // values per 16-byte access
  if (aligned) {
    launch_items<T, kInterleaved, kWide, kWide, 16>(args, rows_per_thread, stream);
  } else {  // one pair (interleaved) or one value and its partner (halves) per unit, one latent value per copy
    launch_items<T, kInterleaved, kInterleaved ? 2 : 1, 1, sizeof(T)>(args, rows_per_thread, stream);
  }
  PK_LAUNCH_CHECK();
}

template <typename T>
void launch_layout(const RopeArgs& args, bool interleaved, bool aligned, int rows_per_thread, cudaStream_t stream) {
  if (interleaved) return launch_typed<T, true>(args, aligned, rows_per_thread, stream);
  return launch_typed<T, false>(args, aligned, rows_per_thread, stream);
}

// q rows (or latent units) per thread for `tokens` tokens; 0 = the tokens kernel (one row per thread).
//   T <= 256 (decode)  0: the 2-D grid, as few instructions as possible between launch and stores; decode
//                      time is launch latency, not bandwidth.
//   larger (prefill)   4: four 16-byte loads in flight per thread against one position and one cos/sin
//                      slice (~40 registers: full occupancy, ~2048 threads x 64 B = 128 KiB issued per SM,
//                      well above the ~32 KiB Little's law asks for: ~4.2 TB/s x ~1 us / 132 SMs).
// bench/tune_rope.py times 0, 1, 2, 4 and 8 at the prefill shapes. PYKERNELS_ROPE_ROWS_PER_THREAD (one of
// those) overrides the table for T > 256: the sweep's knob, read only on that path.
int rows_per_thread(std::int64_t tokens) {
  if (tokens <= kDecodeMaxTokens) return 0;
  if (const char* env = std::getenv("PYKERNELS_ROPE_ROWS_PER_THREAD"); env != nullptr && *env != '\0') {
    const std::string value(env);
    PK_CHECK(value == "0" || value == "1" || value == "2" || value == "4" || value == "8",
             "PYKERNELS_ROPE_ROWS_PER_THREAD: expected 0, 1, 2, 4 or 8, got '", value, "'");
    return std::stoi(value);
  }
  return 4;
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
  const int per_thread = rows_per_thread(tokens);
  switch (dtype) {
    case kRopeFloat32: return launch_layout<float>(args, interleaved, aligned, per_thread, st);
    case kRopeFloat16: return launch_layout<__half>(args, interleaved, aligned, per_thread, st);
    default: return launch_layout<__nv_bfloat16>(args, interleaved, aligned, per_thread, st);
  }
}

void empty_kernel(std::uintptr_t stream) {
  require_device();
  empty_kernel_impl<<<1, 32, 0, as_stream(stream)>>>();
  PK_LAUNCH_CHECK();
}

}  // namespace pk
