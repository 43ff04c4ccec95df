// Grouped GEMMs for a step's experts on Hopper (sm_90a): wgmma from shared memory fed by a
// producer warpgroup. Work item: one tile (up to 128 rows of one expert) times one column tile;
// a persistent grid of one CTA per SM strides over the items.
//
// CTA: three warpgroups. Warpgroup 0 loads, for every 64-wide slice of K, the tile's A rows and 256
// weight rows into a four-stage ring in the 128-byte swizzled layout wgmma reads. The weights come
// by the tensor copy engine (TMA, one tensor map per expert matrix), completing on the stage's
// `full` barrier by bytes; down's A rows (h, packed) come the same way; gate_up's A rows are
// gathered through `row_idx` with 16-byte cp.async (evict-last in L2: read again by the token's
// other experts), each producer thread's copies arriving on the same barrier when they land
// (cp.async.mbarrier.arrive.noinc). Warpgroups 1 and 2 each own 64 of a
// tile's rows: wait for `full`, four m64n256k16 wgmmas (fp32 accumulators in registers), release
// the stage whose wgmmas have completed on its `empty` barrier. A warpgroup whose 64 rows are past
// the tile's end only passes the stages on (in a loop of its own: no wgmma sits in a branch).
// Clusters of two take a pair of tiles (moe_gemm.hpp's list layout): of one expert, each CTA's
// producer loads one of the stage's two weight boxes for both (multicast) and a stage is refilled
// once the consumers of both CTAs released it; a mixed pair (two experts' last tiles) loads each
// CTA's weights on its own, under the same barriers.
// Epilogue while the producer already loads the next item: gate_up applies SwiGLU (a thread holds
// gate column j and up column j of the same row: the B tile is 128 gate rows then the matching 128
// up rows) and stores bf16 h from the registers; down converts to bf16 rows, and each consumer
// warp writes its 16 rows, 64 columns at a time, into one of its two 2 KiB boxes of shared memory
// (128-byte swizzle: no bank conflicts) and hands the box to the copy engine, which stores it
// while the warp goes on to the next item's wgmmas (a warp's rows where the tile ends inside them
// are stored from the registers).
// A rows past the tile's end are zeros (gate_up) or another tile's rows (down, read whole by TMA);
// either way their output rows are never stored.
// Launched to overlap (programmatic dependent launch), gate_up waits for the kernel before it and
// only then lets down launch; down's CTAs start on the SMs gate_up's last items free, load their
// first item's weight stages and read h once gate_up has completed.
#include "model/cuda/moe_gemm.hpp"
#include "model/cuda/pdl.cuh"

#include <cuda.h>  // CUtensorMap and its encoder's types; the encoder comes through the runtime
#include <cuda_bf16.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace sy::model::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int tile_m = moe_tile_rows;  // 128 rows: two consumer warpgroups of 64
constexpr int tile_k = 64;             // one 128-byte swizzle row of bf16
constexpr int tile_n = 256;            // weight rows per stage (gate_up: 128 gate + 128 up)
constexpr int stages = 4;
constexpr int a_stage = tile_m * tile_k * 2;  // 16 KiB
constexpr int b_stage = tile_n * tile_k * 2;  // 32 KiB
constexpr int out_rows = 16;                     // rows of a consumer warp's output box
constexpr int out_box = out_rows * tile_k * 2;     // 2 KiB: 16 rows × 64 bf16 columns, 128-byte swizzle
constexpr int out_warp = 2 * out_box;              // each consumer warp's two output boxes (down)
constexpr int smem_bytes = 1024 /* alignment */ + stages * (a_stage + b_stage) + 8 * out_warp + 2 * stages * 8;
constexpr int threads = 384;
// The stages and then the output boxes from a 1024-byte aligned base: each box stays 1024-byte
// aligned (the 128-byte swizzle's period); all of it within the 227 KiB a CTA may take.
static_assert((stages * (a_stage + b_stage)) % 1024 == 0 && out_box % 1024 == 0);
static_assert(smem_bytes <= 227 * 1024);
// Down's epilogue alternates its two boxes: an even number of boxes an item keeps "the last bulk
// group used the other box" true across items.
static_assert((tile_n / tile_k) % 2 == 0);

static_assert(sizeof(CUtensorMap) == moe_map_bytes);

struct gemm_args {
  CUtensorMap a_map;     // down: h [rows, ffn] for TMA (gate_up gathers A with cp.async instead)
  CUtensorMap out_map;   // down: y [rows, hidden], written in boxes of 16 rows × 64 columns
  const moe_tile* tiles;
  int n_tiles;           // tiles, or with tile_count their most
  const int* tile_count; // null, or the tile count in device memory (written by an earlier launch)
  int col_tiles;         // column tiles of the output (ffn / 128 for gate_up, hidden / 256 for down)
  const bf16* a;         // gate_up: A rows, `k` wide
  const int* row_idx;    // gate_up: tile row r reads A row row_idx[src_row + r]; null: A row src_row + r
  const CUtensorMap* w;  // tensor map of each expert id's weight matrix, [rows, k] row-major
  int k;
  int n;                 // output width (gate_up: ffn, also the first up row; down: hidden)
  bf16* out;
  int overlap;           // down launched to overlap gate_up: its first weight stages go out before the wait
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SY_MOE_WGMMA 1

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

/// Arrives on `bar` and adds `bytes` to the transaction count its phase waits for.
__device__ __forceinline__ void mbar_arrive_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
/// Tensor copy engine: the box at (c0 = column, c1 = row) of the tensor map into shared memory at
/// `dst`, its bytes counted on `bar` as they land.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

/// The same box written to the same offset of every CTA of the cluster in `mask`, each CTA's
/// barrier at `bar` counting the bytes that reach it.
__device__ __forceinline__ void tma_load_multicast(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                                   uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
/// Every thread of every CTA of the cluster arrives and waits (release / acquire).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}
/// Acquires the copy engine's view of a tensor map in global memory written from the host.
__device__ __forceinline__ void fence_tensormap(const CUtensorMap* map) {
  asm volatile("fence.proxy.tensormap::generic.acquire.sys [%0], 128;" ::"l"(map) : "memory");
}
/// Makes this thread's mbarrier initialisations visible to the cluster.
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
/// Arrives on the barrier at this CTA-relative address in CTA `rank` of the cluster. The arrival
/// is a release at CTA scope, as for a local one: what it orders is this warp's reads of the stage,
/// done before it (their wgmmas waited for); a cluster-scope release here (`.release.cluster`)
/// cost every stage a wait and made pairs 1.5-2x slower than single CTAs (H100 and H200, 2026-12-06).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, int rank) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}

/// An L2 policy that keeps what it loads ahead of normal lines when lines must go.
__device__ __forceinline__ uint64_t evict_last_policy() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
  return p;
}
/// 16 bytes global -> shared, L2 only, under L2 policy `pol`; `src_bytes` 0 writes zeros.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;" ::"r"(dst), "l"(src), "r"(src_bytes),
               "l"(pol)
               : "memory");
}
/// Arrives on `bar` once every cp.async this thread issued so far has landed (the arrival counts
/// toward the barrier's expected count: no pending-count increment).
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

/// Tensor copy engine, the other way: the box at `src` (shared memory, written and then fenced
/// for the async proxy) to (c0 = column, c1 = row) of the tensor map, in this thread's bulk group.
__device__ __forceinline__ void tma_store(const CUtensorMap* map, uint32_t src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(map), "r"(src),
               "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
/// Waits until at most N of this thread's bulk groups still read their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
/// Waits until at most N of this thread's bulk groups are still under way (writes included).
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void st_shared_bf162(uint32_t addr, float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(*reinterpret_cast<const uint32_t*>(&v)) : "memory");
}

/// The tile list and its length are read through L2 only (`ld.global.cg`): down reads them before
/// its griddepcontrol.wait, written by a kernel two launches back, and no L1 line may hold them.
__device__ __forceinline__ moe_tile load_tile(const moe_tile* t) {
  static_assert(sizeof(moe_tile) == sizeof(int4));
  const int4 v = __ldcg(reinterpret_cast<const int4*>(t));
  return moe_tile{v.x, v.y, v.z, v.w};
}

template <int R>
__device__ __forceinline__ void regs_down() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void regs_up() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
/// Keeps the compiler from moving reads of the accumulators above a wgmma wait.
__device__ __forceinline__ void fence_regs(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

/// Shared-memory matrix descriptor: K-major rows of 128 bytes in the 128-byte swizzle, 8-row
/// groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

/// D (+)= A·Bᵀ for a 64×256 tile, k = 16: A and B from shared memory (descriptors), D in the
/// warpgroup's registers (128 floats a thread); `accumulate` 0 overwrites D.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
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
      : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ float silu(float g) { return __fdividef(g, 1.0f + __expf(-g)); }

__device__ __forceinline__ void store2(bf16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
#endif

constexpr int box_rows = 128;  // rows of one TMA box (64 columns = 128 bytes, the swizzle's span)

template <bool SwiGLU, int Cl>
__global__ void __launch_bounds__(threads, 1) moe_gemm_kernel(const __grid_constant__ gemm_args p) {
#ifdef SY_MOE_WGMMA
  static_assert(Cl == 1 || Cl == 2);
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t sa = base, sb = base + stages * a_stage;
  const uint32_t so = sb + stages * b_stage;  // the consumer warps' output boxes
  const uint32_t full = so + 8 * out_warp, empty = full + stages * 8;  // mbarriers, 8 bytes each
  const int tid = threadIdx.x;
  const int rank = Cl == 1 ? 0 : static_cast<int>(cluster_rank());
  if (tid == 0)
    for (int s = 0; s < stages; ++s) {
      // gate_up: every producer thread once its cp.async copies landed, and thread 0's expect;
      // down: thread 0's expect. The TMA bytes complete the phase.
      mbar_init(full + s * 8, SwiGLU ? 129 : 1);
      // Lane 0 of every consumer warp of the cluster: a stage is refilled (in every CTA of the
      // cluster, the weights being multicast) only once all of them have read it.
      mbar_init(empty + s * 8, 8 * Cl);
    }
  if (tid == 0) fence_mbar_init();  // the copy engine (and with Cl = 2, the peer) sees them initialised
  if constexpr (Cl > 1) cluster_sync();  // the peer's barriers are initialised before anything arrives on them
  else __syncthreads();
  // Gate_up launched to overlap the kernel before it (programmatic dependent launch): nothing it
  // reads (tile list, row index) is read before that one completed. Only then may the next kernel
  // (down) launch on the SMs this grid frees, reading the tile list early; down lets the combine
  // launch at once (it waits for down to complete before reading anything).
  if constexpr (SwiGLU) pdl_wait();
  pdl_trigger();
  const int kbs = p.k / tile_k;
  constexpr int cols = SwiGLU ? tile_n / 2 : tile_n;  // output columns of a work item
  // Work item w: column tile w % col_tiles of row tile (Cl = 2: tile pair) w / col_tiles. The
  // clusters stride over the items, so the ones running at once share A rows (same row tile) and
  // weights (same expert). A pair is two tiles of one expert; CTA `rank` of a cluster takes tile
  // Cl · (w / col_tiles) + rank.
  const int items = (p.tile_count ? __ldcg(p.tile_count) : p.n_tiles) / Cl * p.col_tiles;
  const int first = blockIdx.x / Cl, stride = gridDim.x / Cl;
  if (tid < 128) {
    regs_down<120>();
    if (SwiGLU || tid == 0) {  // down: one thread drives the copy engine
      const int chunk = tid & 7, r0 = tid >> 3;  // gate_up: this thread copies 16-byte chunk `chunk` of rows r0, r0 + 16, ...
      int it = 0;                                // k-blocks issued, over all items
      // gate_up's token rows: each is read by the tiles of all its experts, spread over the whole
      // launch, while 0.8 GB of weights (Qwen3-shaped, 4096 tokens) stream through a 50 MB L2.
      // Kept ahead of the weights, they are read from DRAM 35 MB less (976 against 1010 MB by
      // Nsight Compute on an H100; 0.61 against 0.63 ms a layer at 2048 tokens).
      const uint64_t keep = SwiGLU ? evict_last_policy() : 0;
      // What a work item loads.
      struct item_loads {
        moe_tile t;
        bool shared;  // Cl = 2: a pair of one expert's tiles shares its weight boxes; a mixed pair does not
        bool load_a, load_b;
        int n0, second;
        const CUtensorMap* w;
      };
      auto describe = [&](int wi) {
        item_loads m;
        const int pair = Cl * (wi / p.col_tiles);
        m.t = load_tile(p.tiles + pair + rank);
        m.shared = false;
        if constexpr (Cl > 1) m.shared = load_tile(p.tiles + pair).expert == load_tile(p.tiles + pair + 1).expert;
        m.load_b = m.shared || m.t.rows > 0;  // an empty tile outside a shared pair reads nothing
        m.load_a = SwiGLU || m.t.rows > 0;    // down: an empty tile reads no A
        m.n0 = (wi % p.col_tiles) * cols;
        // gate_up: the first box is gate rows n0.., the second the matching up rows; down: 256
        // rows. Cl = 2: each CTA loads one box for both.
        m.second = SwiGLU ? p.n + m.n0 : m.n0 + box_rows;
        m.w = p.w + m.t.expert;
        return m;
      };
      auto expect = [&](const item_loads& m, uint32_t bar) {
        mbar_arrive_expect(bar, (SwiGLU || !m.load_a ? 0 : a_stage) + (m.load_b ? b_stage : 0));
      };
      auto load_weights = [&](const item_loads& m, int kb, uint32_t bs, uint32_t bar) {
        if (m.shared) {
          tma_load_multicast(bs + rank * box_rows * 128, m.w, bar, kb * tile_k, rank == 0 ? m.n0 : m.second, 0x3);
        } else if (m.load_b) {
          tma_load(bs, m.w, bar, kb * tile_k, m.n0);
          tma_load(bs + box_rows * 128, m.w, bar, kb * tile_k, m.second);
        }
      };
      // Down, launched to overlap gate_up's last items (programmatic dependent launch): the first
      // item's weight stages go out at once, its A rows (h, gate_up's output) only once gate_up has
      // completed. The tile list is older than gate_up: readable before the wait.
      int pre = 0;  // k-blocks of the first item whose weights were loaded before the wait
      if constexpr (!SwiGLU) {
        if (p.overlap && first < items) {
          const item_loads m = describe(first);
          fence_tensormap(m.w);
          pre = kbs < stages ? kbs : stages;
          for (int kb = 0; kb < pre; ++kb) {
            expect(m, full + kb * 8);
            load_weights(m, kb, sb + kb * b_stage, full + kb * 8);
          }
        }
        pdl_wait();
      }
      for (int wi = first; wi < items; wi += stride) {
        const item_loads m = describe(wi);
        const moe_tile& t = m.t;
        // The maps were written by a host copy (and rewritten in place when experts change): the
        // copy engine's view of them is acquired before use.
        if (tid == 0) fence_tensormap(m.w);
        int row[tile_m / 16];
        if constexpr (SwiGLU) {
#pragma unroll
          for (int i = 0; i < tile_m / 16; ++i) {
            const int r = r0 + 16 * i;
            row[i] = r < t.rows ? (p.row_idx ? p.row_idx[t.src_row + r] : t.src_row + r) : -1;
          }
        }
        for (int kb = 0; kb < kbs; ++kb, ++it) {
          const int s = it % stages;
          if (it >= stages) mbar_wait(empty + s * 8, (it / stages - 1) & 1);
          const uint32_t as = sa + s * a_stage, bs = sb + s * b_stage, bar = full + s * 8;
          if (tid == 0) {
            if (it >= pre) expect(m, bar);
            if (!SwiGLU && m.load_a) tma_load(as, &p.a_map, bar, kb * tile_k, t.src_row);
            if (it >= pre) load_weights(m, kb, bs, bar);
          }
          if constexpr (SwiGLU) {
            const int col = kb * tile_k + chunk * 8;
#pragma unroll
            for (int i = 0; i < tile_m / 16; ++i) {
              const int r = r0 + 16 * i;
              cp_async16(as + r * 128 + ((chunk ^ (r & 7)) << 4), p.a + int64_t(row[i] < 0 ? 0 : row[i]) * p.k + col,
                         row[i] < 0 ? 0 : 16, keep);
            }
            cp_async_arrive(bar);  // counts once this thread's copies so far have landed
          }
        }
      }
    }
    // Cl = 2: no CTA leaves while its peer may still write its shared memory or arrive on its
    // barriers. (Down: warp 0 reconverges first, thread 0 having run the loop alone.)
    if constexpr (Cl > 1) {
      __syncwarp();
      cluster_sync();
    }
    return;
  }
  regs_up<184>();
  const int c = tid / 128 - 1;  // consumer warpgroup: rows c·64 .. c·64 + 63 of each tile
  const int lane = tid & 31, warp = (tid / 32) % 4;
  // Lane 0 of each consumer warp releases a stage in every CTA of the cluster.
  auto release = [&](int s) {
    __syncwarp();
    if (lane == 0) {
      if constexpr (Cl == 1) mbar_arrive(empty + s * 8);
      else
        for (int r = 0; r < Cl; ++r) mbar_arrive_cluster(empty + s * 8, r);
    }
  };
  float d[128];
  int it = 0;
  for (int wi = first; wi < items; wi += stride) {
    const moe_tile t = load_tile(p.tiles + Cl * (wi / p.col_tiles) + rank);
    const int n0 = (wi % p.col_tiles) * cols;
    // A warpgroup past the tile's rows only passes the stages on. Its own loop: wgmma inside a
    // branch the compiler cannot prove warp-uniform is serialized (ptxas C7518), one wgmma waiting
    // for the last.
    if (c * 64 >= t.rows) {
      for (int kb = 0; kb < kbs; ++kb, ++it) {
        mbar_wait(full + (it % stages) * 8, (it / stages) & 1);
        release(it % stages);
      }
      continue;
    }
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.0f;
    for (int kb = 0; kb < kbs; ++kb, ++it) {
      const int s = it % stages;
      mbar_wait(full + s * 8, (it / stages) & 1);
      // gate_up's A rows were written by cp.async (generic proxy); wgmma reads through the async
      // proxy. TMA writes are async-proxy already.
      if constexpr (SwiGLU) fence_proxy_async();
      const uint32_t as = sa + s * a_stage + c * 64 * 128, bs = sb + s * b_stage;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < tile_k / 16; ++kk) wgmma_m64n256k16(d, smem_desc(as + kk * 32), smem_desc(bs + kk * 32), 1);
      wgmma_commit();
      wgmma_wait<1>();  // the previous stage's wgmmas are done: release it
      if (kb > 0) release((it - 1) % stages);
    }
    wgmma_wait<0>();
    release((it - 1) % stages);  // the item's last stage
    fence_regs(d);
    // The warp's 16 rows of the tile. Down, whole: through its two boxes in shared memory to the
    // copy engine, which writes them while the next item's wgmmas run. Gate_up, and down's rows
    // where the tile ends inside a warp's 16: stored from the registers, row by row. (Gate_up's
    // 128 columns through the boxes were slower: Nsight Compute, Qwen3-shaped at 4096 tokens on an
    // H100, 487 against 457 µs, where down's 256 took 242 against 319.)
    const int wrow = c * 64 + warp * 16;
    if (!SwiGLU && wrow + out_rows <= t.rows) {
      const uint32_t ob = so + (c * 4 + warp) * out_warp;
#pragma unroll
      for (int b = 0; b < cols / tile_k; ++b) {
        const uint32_t box = ob + (b & 1) * out_box;
        // The last group always used the other box: once at most one group still reads, this
        // one's earlier store (two groups back, maybe the previous item's) has read it.
        if (lane == 0) bulk_wait_read<1>();
        __syncwarp();
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = lane / 4 + 8 * half;  // row of the box; r & 7 == lane / 4
#pragma unroll
          for (int u = 0; u < 8; ++u) {  // 16-byte unit u of the row holds columns 8u.. of the box
            const int q = 8 * b + u;
            st_shared_bf162(box + r * 128 + ((u ^ (lane / 4)) << 4) + (lane % 4) * 4, d[4 * q + 2 * half],
                            d[4 * q + 2 * half + 1]);
          }
        }
        fence_proxy_async();  // the writes above, seen by the copy engine
        __syncwarp();
        if (lane == 0) {
          tma_store(&p.out_map, box, n0 + b * tile_k, t.dst_row + wrow);
          bulk_commit();
        }
      }
    } else {
      const int col = n0 + (lane % 4) * 2;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = wrow + lane / 4 + 8 * half;
        if (r >= t.rows) continue;
        bf16* o = p.out + int64_t(t.dst_row + r) * p.n + col;
        if constexpr (SwiGLU) {
#pragma unroll
          for (int q = 0; q < 16; ++q)
            store2(o + 8 * q, silu(d[4 * q + 2 * half]) * d[4 * (q + 16) + 2 * half],
                   silu(d[4 * q + 2 * half + 1]) * d[4 * (q + 16) + 2 * half + 1]);
        } else {
#pragma unroll
          for (int q = 0; q < 32; ++q) store2(o + 8 * q, d[4 * q + 2 * half], d[4 * q + 2 * half + 1]);
        }
      }
    }
  }
  // The boxes' stores are done before the CTA's shared memory goes (and the kernel ends).
  if (!SwiGLU && lane == 0) bulk_wait<0>();
  __syncwarp();
  if constexpr (Cl > 1) cluster_sync();
#endif
}

/// The driver's tensor-map encoder, looked up once through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

/// Tensor map of a bf16 [rows, cols] row-major matrix read or written in boxes of `box` rows × 64
/// columns, 128-byte swizzle (the layout the kernel's descriptors name); rows past the end read as
/// zeros and are not written.
cudaError_t encode(CUtensorMap* map, const void* m, int64_t rows, int64_t cols, int box = box_rows) {
  auto fn = encoder();
  if (!fn) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t dim[2] = {tile_k, static_cast<cuuint32_t>(box)}, step[2] = {1, 1};
  const CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(m), dims, strides, dim, step,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

/// The kernels' launch configuration: `grid` CTAs of `threads`, all of the shared memory they
/// take, clusters of `cl` CTAs; with `overlap`, a programmatic dependent launch (the grid may start
/// while the previous kernel on the stream drains). Not copyable: the configuration points at its
/// own attributes.
struct cluster_launch {
  cudaLaunchAttribute attr[2]{};
  cudaLaunchConfig_t cfg{};
  cluster_launch(int grid, int cl, cudaStream_t stream, bool overlap = false) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cl);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(grid));
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem_bytes;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = overlap ? 2 : 1;
  }
  cluster_launch(const cluster_launch&) = delete;
  cluster_launch& operator=(const cluster_launch&) = delete;
};

template <bool SwiGLU, int Cl>
cudaError_t launch_cl(const gemm_args& args, int grid, cudaStream_t stream, bool overlap) {
  const cluster_launch l(grid, Cl, stream, overlap);
  return cudaLaunchKernelEx(&l.cfg, moe_gemm_kernel<SwiGLU, Cl>, args);
}

template <bool SwiGLU>
cudaError_t launch(const moe_gemm_setup& setup, int cluster, const moe_tile* tiles, int n_tiles, const int* tile_count,
                   const void* a, const int* row_idx, int64_t a_rows, const void* w_maps, int k, int n, void* out,
                   bool overlap, cudaStream_t stream) {
  if (n_tiles <= 0) return cudaSuccess;
  if (cluster != 1 && cluster != 2) return cudaErrorInvalidValue;
  if (!tile_count && n_tiles % cluster != 0) return cudaErrorInvalidValue;  // a pair list has whole pairs
  if (cluster == 2 && setup.clusters2 <= 0) return cudaErrorNotSupported;
  gemm_args args{};
  if (!SwiGLU) {  // down: h in, y (as many rows) out
    if (auto e = encode(&args.a_map, a, a_rows, k); e != cudaSuccess) return e;
    if (auto e = encode(&args.out_map, out, a_rows, n, out_rows); e != cudaSuccess) return e;
  }
  args.tiles = tiles;
  args.n_tiles = n_tiles;
  args.tile_count = tile_count;
  args.col_tiles = n / (SwiGLU ? tile_n / 2 : tile_n);
  args.a = static_cast<const bf16*>(a);
  args.row_idx = row_idx;
  args.w = static_cast<const CUtensorMap*>(w_maps);
  args.k = k;
  args.n = n;
  args.out = static_cast<bf16*>(out);
  args.overlap = overlap ? 1 : 0;
  // Persistent: one CTA per SM (each takes all of an SM's shared memory), as many clusters as fit
  // at once, striding over the items.
  const int64_t items = int64_t(n_tiles / cluster) * args.col_tiles;
  const int64_t most = cluster == 1 ? setup.sms : setup.clusters2;
  const int grid = static_cast<int>(std::min(items, most)) * cluster;
  const cudaError_t e =
      cluster == 1 ? launch_cl<SwiGLU, 1>(args, grid, stream, overlap) : launch_cl<SwiGLU, 2>(args, grid, stream, overlap);
  return e != cudaSuccess ? e : cudaGetLastError();
}

}  // namespace

bool moe_gemm_available(int device) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return false;
  if (prop.major != 9 || prop.minor != 0) return false;
  if (!encoder()) return false;
  cudaFuncAttributes attr{};
  return cudaFuncGetAttributes(&attr, moe_gemm_kernel<true, 1>) == cudaSuccess && attr.binaryVersion == 90;
}

cudaError_t moe_gemm_prepare(int device, moe_gemm_setup* setup) {
  if (auto e = cudaSetDevice(device); e != cudaSuccess) return e;
  for (auto kernel : {moe_gemm_kernel<true, 1>, moe_gemm_kernel<false, 1>, moe_gemm_kernel<true, 2>, moe_gemm_kernel<false, 2>})
    if (auto e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes); e != cudaSuccess)
      return e;
  if (auto e = cudaDeviceGetAttribute(&setup->sms, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess) return e;
  // Pairs of SMs of one processor cluster that can hold the kernel at once (fewer than sms / 2
  // where a processor cluster has an odd number of SMs).
  const cluster_launch l(setup->sms / 2 * 2, 2, nullptr);
  int gu = 0, dn = 0;
  if (cudaOccupancyMaxActiveClusters(&gu, moe_gemm_kernel<true, 2>, &l.cfg) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&dn, moe_gemm_kernel<false, 2>, &l.cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // no clusters here: the launches keep to one CTA
    gu = dn = 0;
  }
  setup->clusters2 = std::min(gu, dn);
  return cudaSuccess;
}

bool moe_gemm_shapes(int64_t hidden, int64_t ffn) {
  return hidden > 0 && ffn > 0 && hidden % tile_n == 0 && ffn % (tile_n / 2) == 0 && hidden <= (int64_t{1} << 20) &&
         ffn <= (int64_t{1} << 20);
}

size_t moe_tile_list(int cluster, const int* experts, const int* off, const int* rows, size_t groups, moe_tile* out) {
  // Group g's tile past its whole pairs (its last tile, for an odd count), or `past` tiles later.
  auto after_run = [&](size_t g, int past) {
    return moe_expert_tile(experts[g], off[g], rows[g], moe_expert_place(cluster, rows[g]).whole + past);
  };
  int whole = 0, odd = 0;
  size_t open = 0;  // the last odd expert's group, while its last tile has no partner (odd is odd)
  for (size_t g = 0; g < groups; ++g) {
    const moe_tile_place pl = moe_expert_place(cluster, rows[g]);
    const int start = moe_run_start(whole, odd);
    if (out)
      for (int i = 0; i < pl.whole; ++i) out[start + i] = moe_expert_tile(experts[g], off[g], rows[g], i);
    if (pl.odd) {
      if (odd % 2 == 0) {
        open = g;
      } else if (out) {
        out[start + pl.whole] = after_run(open, 0);
        out[start + pl.whole + 1] = after_run(g, 0);
      }
    }
    whole += pl.whole;
    odd += pl.odd;
  }
  const int n = moe_list_length(whole, odd);
  if (out && odd % 2 == 1) {  // the last odd expert's tile ends the list, beside the empty one past it
    out[n - 2] = after_run(open, 0);
    out[n - 1] = after_run(open, 1);
  }
  return static_cast<size_t>(n);
}

cudaError_t moe_weight_maps(const void* const* w, int n, int64_t rows, int64_t cols, void* maps) {
  auto* out = static_cast<unsigned char*>(maps);
  for (int i = 0; i < n; ++i) {
    CUtensorMap m{};
    if (w[i])
      if (auto e = encode(&m, w[i], rows, cols); e != cudaSuccess) return e;
    std::memcpy(out + size_t(i) * moe_map_bytes, &m, moe_map_bytes);
  }
  return cudaSuccess;
}

cudaError_t moe_gate_up(const moe_gemm_setup& setup, int cluster, const moe_tile* tiles, int n_tiles,
                        const int* tile_count, const void* x, const int* row_idx, const void* w_maps, int hidden,
                        int ffn, void* h, bool overlap, cudaStream_t stream) {
  return launch<true>(setup, cluster, tiles, n_tiles, tile_count, x, row_idx, 0, w_maps, hidden, ffn, h, overlap, stream);
}

cudaError_t moe_down(const moe_gemm_setup& setup, int cluster, const moe_tile* tiles, int n_tiles,
                     const int* tile_count, const void* h, int64_t h_rows, const void* w_maps, int hidden, int ffn,
                     void* y, bool overlap, cudaStream_t stream) {
  return launch<false>(setup, cluster, tiles, n_tiles, tile_count, h, nullptr, h_rows, w_maps, ffn, hidden, y, overlap,
                       stream);
}

}  // namespace sy::model::cuda
