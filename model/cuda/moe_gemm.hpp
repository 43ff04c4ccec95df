#pragma once
/// Grouped GEMMs of our own for a step's experts on Hopper (built for sm_90a, `moe_gemm.cu`):
/// the gate_up product reads its A rows straight from the token rows (no gathered copy) and applies
/// SwiGLU to the accumulators (no [rows, 2F] intermediate), and no expert is padded to another's
/// row count. Internal to model/cuda (CUDA types in the signatures).
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sy::model::cuda {

/// Rows of one tile: a tile is up to this many consecutive rows of one expert.
inline constexpr int moe_tile_rows = 128;

/// One tile of a grouped product: rows [src_row, src_row + rows) of the input (through the row
/// index when one is given) times expert `expert`'s weights, into rows [dst_row, dst_row + rows).
struct moe_tile {
  int expert;  ///< index into the weight tables
  int src_row;
  int rows;  ///< 1..moe_tile_rows (0: the empty tile that can end a list for clusters of two)
  int dst_row;
};

/// Where a tile list puts each expert's tiles: the layout `moe_tile_list` makes on the host and the
/// layer's plan on the device, and the kernels read. With `cluster` 1, every expert's tiles in
/// turn. With 2 the list runs in pairs (CTA r of a cluster takes tile 2p + r): each expert's
/// whole pairs first (two of its tiles: the CTAs share the weight tiles, each loading half for
/// both); an expert with an odd tile count leaves its last tile for a mixed pair with the next
/// such expert, placed right after that one's own pairs (its CTAs each load their own expert's
/// weights); with an odd number of such experts, the last one's tile ends the list, paired with
/// an empty tile (rows 0).
struct moe_tile_place {
  int whole;  ///< tiles in the expert's own run: all of them (cluster 1), its whole pairs (2)
  int odd;    ///< 1: its last tile goes to a mixed pair (cluster 2)
};
__host__ __device__ constexpr moe_tile_place moe_expert_place(int cluster, int rows) {
  const int tiles = (rows + moe_tile_rows - 1) / moe_tile_rows;
  return cluster == 1 ? moe_tile_place{tiles, 0} : moe_tile_place{tiles / 2 * 2, tiles % 2};
}
/// First slot of an expert's run, from the sums of `whole` and `odd` over the experts before it
/// (the mixed pairs placed so far: one per two odd experts). An expert whose `odd_before` is odd
/// places the mixed pair [the previous odd expert's last tile, its own] after its run.
__host__ __device__ constexpr int moe_run_start(int whole_before, int odd_before) {
  return whole_before + odd_before / 2 * 2;
}
/// Tiles in the list, from the sums over all experts.
__host__ __device__ constexpr int moe_list_length(int whole, int odd) { return whole + (odd + 1) / 2 * 2; }
/// Tile i of expert `expert`'s `rows` rows starting at row `first` of the packed row space (past
/// its last tile: an empty one).
__host__ __device__ constexpr moe_tile moe_expert_tile(int expert, int first, int rows, int i) {
  const int m = i * moe_tile_rows < rows ? i * moe_tile_rows : rows;
  return moe_tile{expert, first + m, rows - m < moe_tile_rows ? rows - m : moe_tile_rows, first + m};
}

/// Writes the tile list of a batch (`groups` experts: expert experts[g] on the `rows[g]` rows from
/// off[g] of the packed row space) into `out` (null: only counts) and returns its length, in the
/// layout above.
size_t moe_tile_list(int cluster, const int* experts, const int* off, const int* rows, size_t groups, moe_tile* out);

/// Bytes of one tensor map (the copy engine's description of a matrix in device memory).
inline constexpr size_t moe_map_bytes = 128;

/// What the launches need from the device, read once (`moe_gemm_prepare`).
struct moe_gemm_setup {
  int sms = 0;        ///< multiprocessors: the persistent grid's size with one CTA a cluster
  int clusters2 = 0;  ///< two-CTA clusters that fit at once (0: none, launches keep to one CTA)
};

/// True when the kernels were built for this device (compute capability 9.0) and the driver
/// encodes tensor maps.
[[nodiscard]] bool moe_gemm_available(int device);
/// Once per device before the first launch: raises the kernels' shared-memory limit, reads the
/// multiprocessor count and how many two-CTA clusters fit at once.
[[nodiscard]] cudaError_t moe_gemm_prepare(int device, moe_gemm_setup* setup);
/// True when the kernels take these widths (hidden a multiple of 256, ffn of 128).
[[nodiscard]] bool moe_gemm_shapes(int64_t hidden, int64_t ffn);

/// Encodes the tensor map of each weight matrix w[i] (bf16 [rows, cols] row-major, device memory;
/// null: an unused id, left zero) into `maps` (host memory, n · moe_map_bytes); the launches take
/// a device copy of that table, indexed by a tile's `expert`.
[[nodiscard]] cudaError_t moe_weight_maps(const void* const* w, int n, int64_t rows, int64_t cols, void* maps);

/// `tiles` is a device array of `n_tiles` tiles; or, with `tile_count` (device memory, written by
/// an earlier launch on the stream, at most `n_tiles`), of that many: the list then never passes
/// through the host. `cluster` 1: each CTA loads its own weight tiles; 2 (needs setup.clusters2 > 0,
/// a list built for 2): the CTAs of a pair of one expert's tiles each load half and the copy
/// engine writes it to both; a mixed pair's CTAs load their own.
///
/// For every tile and row r < rows, over every column j < ffn:
///   h[dst_row + r, j] = silu(x[i] · gate_j) · (x[i] · up_j),  i = row_idx ? row_idx[src_row + r] : src_row + r,
/// x bf16 [*, hidden], expert weights bf16 [2·ffn, hidden] (gate rows, then up rows; `w_maps` their
/// tensor maps), h bf16 [*, ffn]; fp32 accumulation, SwiGLU on the fp32 sums. Asynchronous on `stream`.
/// `overlap`: launched to start while the previous kernel on the stream drains (it waits for that
/// kernel before reading anything).
[[nodiscard]] cudaError_t moe_gate_up(const moe_gemm_setup& setup, int cluster, const moe_tile* tiles, int n_tiles,
                                      const int* tile_count, const void* x, const int* row_idx, const void* w_maps,
                                      int hidden, int ffn, void* h, bool overlap, cudaStream_t stream);
/// For every tile and row r < rows: y[dst_row + r] = h[src_row + r] · wᵀ, h bf16 [h_rows, ffn]
/// (read by the copy engine: 16-byte aligned), expert weights bf16 [hidden, ffn] (`w_maps`), y
/// bf16 [h_rows, hidden] (written by the copy engine: 16-byte aligned); fp32 accumulation.
/// `overlap`: launched to start while the previous kernel on the stream (the step's moe_gate_up,
/// which writes h) drains, on the SMs it frees: loads its first weight stages, then waits for that
/// kernel before reading h. It reads the tile list before that wait, so the list must be complete
/// when that kernel lets it launch: written by an earlier operation that kernel waited for (as
/// moe_gate_up does before it lets the next kernel launch) and not by that kernel; nor may that
/// kernel touch y.
[[nodiscard]] cudaError_t moe_down(const moe_gemm_setup& setup, int cluster, const moe_tile* tiles, int n_tiles,
                                   const int* tile_count, const void* h, int64_t h_rows, const void* w_maps, int hidden,
                                   int ffn, void* y, bool overlap, cudaStream_t stream);

}  // namespace sy::model::cuda
