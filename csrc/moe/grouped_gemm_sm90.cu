// Grouped GEMM of the MoE prefill on Hopper (see grouped_gemm.h for the contract).
//
// Persistent and warp specialized. Each CTA (one per SM) walks the tiles t = blockIdx.x, blockIdx.x +
// gridDim.x, ... Its three warp groups:
//   producer   one thread issues the TMA loads of every k step into a ring of kStages shared-memory stages
//              (A [128 x 64] and B [256 x 64], 48 KB), each guarded by a "full" and an "empty" mbarrier;
//   consumers  two warp groups: wgmma m64n256k16 from shared memory (128-byte swizzle, K-major A and B), one
//              group of MMAs in flight, a stage released when its MMAs are done; then the epilogue packs
//              the tile's rows into registers (silu * up, or the routing weight; bf16), and stores them
//              once the next tile's first MMAs are issued (measured: Lite prefill down 522-540 -> 497 µs).
// The tiles of an expert are its rows in 128-row steps; a tile's rows past the expert's end belong to the
// next expert (or are TMA's zero fill past the last row): computed, never stored. The tile order groups
// kGroupM row tiles over the column tiles, so an expert's weights are read from DRAM about once and the
// group's rows stay in the L2 (236B prefill down, ncu: 3.4 GB read for 2.6 GB of weights and rows; group
// sizes 1 to 32 measured no better, tune/moe_sm90_group.json). Every CTA derives the experts' rows and row
// tiles from the offsets into shared memory first.
// The kernel is bound by the operand bytes every SM takes in (ncu, 236B prefill down: L2 throughput 84-92 %
// of peak, tensor pipe 84 % active; clusters of two CTAs sharing A or B by TMA multicast cut the DRAM reads
// from 3.4 to 2.7 GB but not the 11.3 GB delivered to the SMs, and were slower: tune/moe_sm90_cluster.json),
// so the rows computed past an expert's end (20 % on 236B prefill: 307 rows per expert computed as 384) are
// its main loss. A last piece of <= 64 rows spanning two column tiles instead (both consumer warp groups on
// its 64 rows, one column tile each, tune/moe_sm90_tails.json) was slower: 1745 -> 2419 µs on that GEMM; it
// needs 1.5x the operand bytes per MMA and halves the ring's depth in k steps.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "../common/check.h"
#include "../common/stream.h"
#include "grouped_gemm.h"

namespace pk {
namespace {

constexpr int kBlockM = 128;                     // rows of a tile: two consumer warp groups of 64
constexpr int kBlockN = 256;                     // weight rows of a tile (gate_up: 128 + 128)
constexpr int kBlockK = 64;                      // 128 bytes of bf16: one swizzle row
constexpr int kStages = 4;
constexpr int kGroupM = 8;                       // row tiles that sweep the column tiles together
constexpr int kThreads = 384;                    // producer + two consumer warp groups
constexpr int kMaxExperts = 512;
constexpr int kABytes = kBlockM * kBlockK * 2;          // 16 KB
constexpr int kBHalfBytes = kBlockN / 2 * kBlockK * 2;  // 16 KB: one TMA box of 128 weight rows
// setmaxnreg: 128 producer + 256 consumer threads share the launch's 384 x 168 registers.
constexpr int kProducerRegs = 40, kConsumerRegs = 232;

struct Shared {
  alignas(1024) std::uint8_t a[kStages][kABytes];
  alignas(1024) std::uint8_t b[kStages][2 * kBHalfBytes];
  std::uint64_t full[kStages];   // the stage is loaded (TMA bytes)
  std::uint64_t empty[kStages];  // the consumers' MMAs of the stage are done (one arrival per consumer warp)
  int row_begin[kMaxExperts];    // clamped [begin, end) rows of each expert
  int row_end[kMaxExperts];
  int row_tile_end[kMaxExperts];  // cumulative row tiles up to and including each expert
};

// Rows [row_begin, min(row_begin + 128, row_end)) of expert `expert` times column tile n.
struct Tile {
  int expert, row_begin, row_end, n;
};

struct Params {
  __nv_bfloat16* out;
  const int* offsets;        // [experts] cumulative row ends
  const int* pair;           // down: [rows] route of each sorted row, or null (see kScatter)
  const float* weights;      // down with pair: the routing weight of each route
  int rows, k, experts, w_rows, n_out;
};

__device__ __forceinline__ std::uint32_t smem(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(std::uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_bytes(std::uint64_t* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(std::uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem(bar)) : "memory");
}

// Wait until the phase of the given parity is complete (a fresh barrier counts its phase "1" as complete).
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, int parity) {
  asm volatile(
      "{\n"
      ".reg .pred ready;\n"
      "waiting:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n"
      "@!ready bra waiting;\n"
      "}\n" ::"r"(smem(bar)),
      "r"(parity)
      : "memory");
}

// dst [box] = the box at (inner, outer) of the tensor map; completes `bytes` on bar.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, std::uint64_t* bar, int inner, int outer) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem(dst)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(inner), "r"(outer), "r"(smem(bar))
      : "memory");
}

// wgmma descriptor of a K-major bf16 operand in 128-byte swizzle: rows of 128 bytes, 8-row atoms 1024
// bytes apart (stride byte offset), the leading byte offset unused; advancing 16 k-values adds 32 bytes.
__device__ __forceinline__ std::uint64_t operand_desc(const void* p) {
  const std::uint64_t address = smem(p);
  return ((address & 0x3FFFF) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accumulator reads or writes across the asynchronous MMAs.
template <int kRegs>
__device__ __forceinline__ void fence_accumulators(float (&d)[kRegs]) {
#pragma unroll
  for (int i = 0; i < kRegs; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d [64 x 256] (+)= A [64 x 16] . B [256 x 16]^T, both from shared memory; accumulate = 0 overwrites d.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], std::uint64_t desc_a, std::uint64_t desc_b,
                                                 int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

__device__ __forceinline__ std::uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&pair);
}

// Lane q of a quad holds v[i] = its two columns (2q, 2q + 1) of 8-column block i; returns block q's eight
// columns: a 4 x 4 transpose over the quad in two butterfly steps (the off-diagonal 2 x 2 blocks trade
// places across lanes q ^ 2, then the off-diagonal pairs inside them across lanes q ^ 1).
__device__ __forceinline__ uint4 quad_transpose(std::uint32_t (&v)[4], int q) {
  const bool high = q & 2;
  std::uint32_t s0 = __shfl_xor_sync(0xffffffffu, high ? v[0] : v[2], 2);
  std::uint32_t s1 = __shfl_xor_sync(0xffffffffu, high ? v[1] : v[3], 2);
  if (high) v[0] = s0, v[1] = s1; else v[2] = s0, v[3] = s1;
  const bool odd = q & 1;
  s0 = __shfl_xor_sync(0xffffffffu, odd ? v[0] : v[1], 1);
  s1 = __shfl_xor_sync(0xffffffffu, odd ? v[2] : v[3], 1);
  if (odd) v[0] = s0, v[2] = s1; else v[1] = s0, v[3] = s1;
  return make_uint4(v[0], v[1], v[2], v[3]);
}

template <int kRegs>
__device__ __forceinline__ void registers_down() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs) : "memory");
}
template <int kRegs>
__device__ __forceinline__ void registers_up() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs) : "memory");
}

// The experts' rows and cumulative row tiles into shared memory (every thread; ends with a barrier).
__device__ __forceinline__ void map_rows(Shared& s, const int* offsets, int experts, int rows) {
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    const int end = min(offsets[e], rows);  // memory safety under unchecked offsets
    const int begin = e > 0 ? max(min(offsets[e - 1], rows), 0) : 0;
    s.row_begin[e] = begin;
    s.row_end[e] = max(end, begin);
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // one warp: a running sum per lane over its chunk of experts, then a scan
    const int lane = threadIdx.x;
    const int chunk = (experts + 31) / 32;
    const int first = min(lane * chunk, experts), last = min(first + chunk, experts);
    const auto tiles = [&](int e) { return (s.row_end[e] - s.row_begin[e] + kBlockM - 1) / kBlockM; };
    int sum = 0;
    for (int e = first; e < last; ++e) sum += tiles(e);
    int before = sum;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, before, d);
      if (lane >= d) before += v;
    }
    before -= sum;
    for (int e = first; e < last; ++e) s.row_tile_end[e] = before += tiles(e);
  }
  __syncthreads();
}

// Tile t of m_tiles x n_tiles: row tiles in groups of kGroupM, each group sweeping the column tiles.
__device__ __forceinline__ Tile tile_at(const Shared& s, int t, int m_tiles, int n_tiles, int experts) {
  const int per_group = kGroupM * n_tiles;
  const int first_m = t / per_group * kGroupM;
  const int group = min(m_tiles - first_m, kGroupM);
  const int m = first_m + t % per_group % group;
  int lo = 0, hi = experts - 1;  // the first expert whose row tiles end past m
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (s.row_tile_end[mid] > m) hi = mid; else lo = mid + 1;
  }
  const int row = s.row_begin[lo] + (m - (lo > 0 ? s.row_tile_end[lo - 1] : 0)) * kBlockM;
  return {lo, row, s.row_end[lo], t % per_group / group};
}

// A position in the ring of stages: the stage and the parity of its current phase.
struct Ring {
  int stage = 0, phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) stage = 0, phase ^= 1;
  }
};

// The k loop of one tile on the consumer side: per k step, wait until its stage is loaded, issue mma(stage,
// accumulate) (the warp group's MMAs reading it; accumulate = 0 on the first step), and release the previous
// stage once its MMAs are done (one arrival per warp). overlap() runs while the first step's MMAs do.
// Returns with every MMA complete.
template <typename Mma, typename Overlap>
__device__ __forceinline__ void consume_tile(Shared& s, int k_steps, Ring& ring, int lane, Mma mma, Overlap overlap) {
  mbar_wait(&s.full[ring.stage], ring.phase);
  wgmma_fence();
  mma(ring.stage, 0);
  wgmma_commit();
  overlap();
  int previous = ring.stage;
  ring.advance();
  for (int step = 1; step < k_steps; ++step) {
    mbar_wait(&s.full[ring.stage], ring.phase);
    wgmma_fence();
    mma(ring.stage, 1);
    wgmma_commit();
    wgmma_wait<1>();
    if (lane == 0) mbar_arrive(&s.empty[previous]);
    previous = ring.stage;
    ring.advance();
  }
  wgmma_wait<0>();
  if (lane == 0) mbar_arrive(&s.empty[previous]);
}

// A consumer thread's share of a tile's output: its rows row0 and row0 + 8 as 16-byte blocks of 8 columns,
// block g at columns col + 32 g (col = col0 + 8 (lane % 4)), and where each row goes (null: not stored).
// It is packed once the tile's MMAs are done and stored while the next tile's first MMAs run.
template <int kGroups>
struct RowsOut {
  uint4 block[2][kGroups];
  __nv_bfloat16* dest[2];
  int col;
};

// out = this lane's rows of the accumulators: value(j, i) is the float of 8-column block j at fragment index
// i = 2h + c, i.e. row row0 + 8h, column 8j + 2 (lane % 4) + c (the accumulator layout of m64nNk16), times
// scale[h]. The 4 lanes of a quad share a row; they trade pairs so that each holds 8 consecutive columns.
template <int kGroups, typename Value>
__device__ __forceinline__ void pack_rows(RowsOut<kGroups>& out, const float (&scale)[2], int lane, Value value) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      std::uint32_t v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[i] = pack_bf16x2(value(4 * g + i, 2 * h) * scale[h], value(4 * g + i, 2 * h + 1) * scale[h]);
      }
      out.block[h][g] = quad_transpose(v, lane % 4);
    }
  }
}

template <int kGroups>
__device__ __forceinline__ void store_rows(const RowsOut<kGroups>& out, int n_out) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      if (out.dest[h] != nullptr && out.col + 32 * g < n_out) {
        *reinterpret_cast<uint4*>(out.dest[h] + out.col + 32 * g) = out.block[h][g];
      }
    }
  }
}

// kScatter (down with pair): out[pair[r]] = weights[pair[r]] * row r.
template <bool kGateUp, bool kScatter>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                        const Params p) {
  constexpr int kTileN = kGateUp ? kBlockN / 2 : kBlockN;  // output columns of a column tile
  const int experts = p.experts;
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another architecture (wgmma and setmaxnreg are sm_90a); the host refuses such GPUs
#else
  extern __shared__ std::uint8_t raw[];
  Shared& s = *reinterpret_cast<Shared*>((reinterpret_cast<std::uintptr_t>(raw) + 1023) & ~std::uintptr_t{1023});
  const int warp_group = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&s.full[i], 1);
      mbar_init(&s.empty[i], 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  map_rows(s, p.offsets, experts, p.rows);  // (its barriers also publish the mbarrier init)
  const int n_tiles = (p.n_out + kTileN - 1) / kTileN;
  const int k_steps = (p.k + kBlockK - 1) / kBlockK;
  // (read after setmaxnreg, so that nothing read here stays live across it)
  const auto row_tiles = [&] { return s.row_tile_end[experts - 1]; };

  if (warp_group == 0) {
    registers_down<kProducerRegs>();
    if (threadIdx.x != 0) return;
    const int m_tiles = row_tiles(), tiles = m_tiles * n_tiles;
    Ring ring;
    for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
      const Tile tile = tile_at(s, t, m_tiles, n_tiles, experts);
      // gate_up: the gate rows of the tile's 128 columns, then their up rows; down: 256 output columns.
      const int b_first = tile.expert * p.w_rows + tile.n * kTileN;
      const int b_second = b_first + (kGateUp ? p.n_out : kBlockN / 2);
      for (int step = 0; step < k_steps; ++step) {
        std::uint64_t* full = &s.full[ring.stage];
        mbar_wait(&s.empty[ring.stage], ring.phase ^ 1);
        mbar_expect_bytes(full, kABytes + 2 * kBHalfBytes);
        tma_load(s.a[ring.stage], &map_a, full, step * kBlockK, tile.row_begin);
        tma_load(s.b[ring.stage], &map_b, full, step * kBlockK, b_first);
        tma_load(s.b[ring.stage] + kBHalfBytes, &map_b, full, step * kBlockK, b_second);
        ring.advance();
      }
    }
    return;
  }

  registers_up<kConsumerRegs>();
  const int m_tiles = row_tiles(), tiles = m_tiles * n_tiles;
  const int half = warp_group - 1;
  const int warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  Ring ring;
  float acc[128];
  RowsOut<kTileN / 32> out;  // the previous tile's rows, stored during the next tile's first MMAs
  out.dest[0] = out.dest[1] = nullptr;
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {  // rows [64 half, 64 half + 64) of the tile
    const Tile tile = tile_at(s, t, m_tiles, n_tiles, experts);
    const int row0 = tile.row_begin + 64 * half + 16 * warp + lane / 4;
    std::int64_t dest[2];  // the output row of rows row0 and row0 + 8, or -1
    float scale[2];
    consume_tile(s, k_steps, ring, lane, [&](int stage, int accumulate) {
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) {
        wgmma_m64n256k16(acc, operand_desc(s.a[stage] + half * 64 * 128 + kk * 32), operand_desc(s.b[stage] + kk * 32),
                         accumulate || kk > 0);
      }
    }, [&] {  // this tile's routes (global loads, waited for only after the k loop), the previous tile's stores
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + 8 * h;
        dest[h] = row < tile.row_end ? (kScatter ? p.pair[row] : row) : -1;
      }
      store_rows(out, p.n_out);
#pragma unroll
      for (int h = 0; h < 2; ++h) scale[h] = kScatter ? (dest[h] >= 0 ? p.weights[dest[h]] : 0.0f) : 1.0f;
    });
    fence_accumulators(acc);
    // gate_up: silu(gate) * up, the up columns 128 further (block j + 16)
    pack_rows(out, scale, lane, [&](int j, int i) {
      return kGateUp ? silu(acc[4 * j + i]) * acc[4 * (j + 16) + i] : acc[4 * j + i];
    });
#pragma unroll
    for (int h = 0; h < 2; ++h) out.dest[h] = dest[h] >= 0 ? p.out + dest[h] * p.n_out : nullptr;
    out.col = tile.n * kTileN + 8 * (lane % 4);
  }
  store_rows(out, p.n_out);
#endif
}

// A [outer, inner] bf16 tensor map with [box_outer, 64] boxes, 128-byte swizzle, zero fill out of bounds.
CUtensorMap tensor_map(const void* base, std::int64_t inner, std::int64_t outer, int box_outer) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    PK_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    PK_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr, "cuTensorMapEncodeTiled: not found in the driver");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(outer)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(inner) * 2};
  const cuuint32_t box[2] = {kBlockK, static_cast<cuuint32_t>(box_outer)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult status = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box,
                                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  PK_CHECK(status == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (", static_cast<int>(status), ")");
  return map;
}

template <bool kGateUp, bool kScatter>
void launch(const CUtensorMap& map_a, const CUtensorMap& map_b, const Params& params, cudaStream_t stream) {
  const int bytes = static_cast<int>(sizeof(Shared)) + 1024;  // + the 1024-byte alignment of the base
  auto kernel = grouped_gemm_kernel<kGateUp, kScatter>;
  PK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  int device = 0, sms = 0;
  PK_CUDA_CHECK(cudaGetDevice(&device));
  PK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  kernel<<<sms, kThreads, bytes, stream>>>(map_a, map_b, params);
  PK_LAUNCH_CHECK();
}

}  // namespace

void grouped_gemm_sm90(std::uintptr_t a, std::int64_t k, std::uintptr_t w, std::int64_t experts, std::int64_t w_rows,
                       std::uintptr_t out, std::int64_t n_out, std::uintptr_t offsets, std::int64_t rows,
                       std::uintptr_t pair, std::uintptr_t weights, bool gate_up, std::uintptr_t stream) {
  require_device();
  int device = 0, major = 0;
  PK_CUDA_CHECK(cudaGetDevice(&device));
  PK_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  PK_CHECK(major == 9, "grouped_gemm_sm90: needs a Hopper GPU (compute capability 9.x), this one is ", major, ".x");
  PK_CHECK(rows >= 1 && rows < (1ll << 31), "rows: expected 1 <= rows < 2^31, got ", rows);
  PK_CHECK(k >= 8 && k % 8 == 0 && k < (1ll << 31), "k: expected a positive multiple of 8 (16-byte rows), got ", k);
  PK_CHECK(experts >= 1 && experts <= kMaxExperts, "experts: expected 1 ... ", kMaxExperts, ", got ", experts);
  PK_CHECK(n_out >= 8 && n_out % 8 == 0, "n_out: expected a positive multiple of 8 (16-byte stores), got ", n_out);
  PK_CHECK(w_rows == (gate_up ? 2 * n_out : n_out), "w_rows: expected ", gate_up ? 2 * n_out : n_out, ", got ", w_rows);
  PK_CHECK(experts * w_rows < (1ll << 31), "w: too many rows for 32-bit TMA coordinates");
  PK_CHECK(!gate_up || pair == 0, "pair: the gate_up GEMM reads its rows in place, got an address");
  PK_CHECK((pair == 0) == (weights == 0), "weights: give them with pair, got ", weights == 0 ? "none" : "an address");
  PK_CHECK(a % 16 == 0 && w % 16 == 0 && out % 16 == 0, "a, w, out: expected 16-byte aligned addresses");
  const CUtensorMap map_a = tensor_map(as_ptr<void>(a), k, rows, kBlockM);
  const CUtensorMap map_b = tensor_map(as_ptr<void>(w), k, experts * w_rows, kBlockN / 2);
  const Params params{as_ptr<__nv_bfloat16>(out), as_ptr<const int>(offsets), as_ptr<const int>(pair),
                      as_ptr<const float>(weights), static_cast<int>(rows), static_cast<int>(k),
                      static_cast<int>(experts), static_cast<int>(w_rows), static_cast<int>(n_out)};
  const cudaStream_t s = as_stream(stream);
  if (gate_up) {
    launch<true, false>(map_a, map_b, params, s);
  } else {
    pair ? launch<false, true>(map_a, map_b, params, s) : launch<false, false>(map_a, map_b, params, s);
  }
}

}  // namespace pk
