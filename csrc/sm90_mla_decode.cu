// MLA decode on a paged latent cache: absorbed MLA is MQA with one 576-wide KV head whose first
// 512 entries are also V. Three kernels:
//   1. sm90_mla_metadata: the split-KV schedule. Work = 64-token tiles plus a fixed overhead per
//      split; it is cut into num_parts equal contiguous pieces over (request, tile) order, so long
//      requests are split across SMs and short ones are packed together. One thread, no host sync.
//   2. sm90_mla_decode: CTA (head block of 64 packed query rows, part). For each request of its
//      piece: S = Q K^T (bf16, fp32 accumulators), online softmax in the log2 domain, O += P V with
//      warpgroup MMAs (S m64n64k16, PV m64n256k16 with V the K tile read MN-major).
//      A request done by one CTA writes out/lse directly; otherwise each split writes its normalized
//      O and lse to fp32 workspaces.
//   3. sm90_mla_combine: log-sum-exp merge of the splits of every split request.
//
// Roles (3 warpgroups): warps 0-7 are the consumers; warpgroup 2 fills a ring of 2 swizzled K tiles.
// It walks the same (request, tile) sequence as the consumers and fills a buffer as soon as it is
// released, across request boundaries, so loads never wait on the softmax:
//   bf16: warp 8 alone (warps 9-11 exit, lending their registers). A full page is 9 TMA boxes
//         (64 columns x 64 tokens, SWIZZLE_128B); the page holding seqlen's end (or no valid token)
//         is copied with zero-filling cp.async, so tokens at or past seqlen are never read and their
//         K/V rows are exactly 0.
//   FP8:  the whole warpgroup dequantizes, from global memory straight into registers (no staging
//         tile, so a page's loads are issued while its buffer is still being read), and stores the
//         bf16 K tile; tokens at or past seqlen are not read and written as 0. The consumers then run
//         exactly the bf16 path, and a page's dequantization overlaps the MMAs of the page before it.
// Handshake per buffer: full (bf16: 32 producer arrivals + the TMA bytes; FP8: the 128 dequantizer
// threads) and empty (8 consumer warps).
// NOTE: fill n of a ring of kStages uses buffer n % kStages in round n / kStages: the consumers wait
// full with parity round & 1, the producer waits empty with parity (round & 1) ^ 1 (a fresh barrier
// counts as having completed the phase before phase 0, so the first round does not wait).
//
// Consumer warp layout: warp w owns query rows 16 * (w % 4) .. +15 and column half w / 4 (= its
// warpgroup): latent columns 256 * half .. +255 of O (128 fp32 registers a thread).
// Per tile, one warpgroup (fill % 2, alternating) scores all 64 tokens: S with m64n64 (36 wgmma that
// read 4 KB of shared memory per 64x64x16 instead of 3 KB per 64x32x16 when each warpgroup scored half
// the tokens), full rows so no max exchange, then P (bf16) over the tile's RoPE block, which V never
// reads, and the rows' bases. One barrier (named barrier 1, the 256 consumers) publishes them; both
// warpgroups then rebase O and do their PV. A row's base only rises past a threshold, so O is rarely
// rescaled (a warp skips the multiplies when none of its rows moved).
// Shared tiles (Q, K, P) use the wgmma 128-byte-swizzle layout: 64-column (128-byte) blocks of 64 rows,
// 16-byte chunks XOR-ed with row % 8 (what a SWIZZLE_128B TMA box writes).
// At the end the two warpgroups add their row sums (of the tiles each scored) via shared memory.
#include <cuda_bf16.h>

#include <cfloat>
#include <climits>

#include "common.h"
#include "launch_pdl.h"

#include "barrier.cuh"
#include "bulk_copy.cuh"
#include "cache_policy.cuh"
#include "cp_async.cuh"
#include "fence.cuh"
#include "fp8.cuh"
#include "griddep.cuh"
#include "mbarrier.cuh"
#include "memory.cuh"
#include "sm90_mla_decode.h"
#include "tensor_map.h"
#include "tma.cuh"
#include "warpgroup.cuh"
#include "wgmma.cuh"
#include "wgmma_bf16.cuh"

namespace dso {
namespace {

constexpr int kNumConsumers = 256;             // 2 warpgroups
// NOTE: a whole third warpgroup although the bf16 cache needs one loading warp: each SM sub-partition
// holds 16K registers, so a 9th warp would cap every thread at 168 either way, and setmaxnreg moves
// registers between the warpgroups within the launch's 168 a thread: a consumer, a consumer and a
// warpgroup-2 lane of one sub-partition share 3 x 168. bf16: 40 for the TMA warp, 232 for the
// consumers. FP8: 120 for the dequantizers (a page's loads, 96 registers, in flight at once) and 192
// for the consumers, which need no more (no spill; at 184 they spill).
constexpr int kThreads = kNumConsumers + 128;
constexpr int kLaunchRegs = 168;
template <bool kFp8> constexpr int kProducerRegs = kFp8 ? 120 : 40;
template <bool kFp8> constexpr int kConsumerRegs = kFp8 ? 192 : 232;
static_assert(2 * kConsumerRegs<true> + kProducerRegs<true> <= 3 * kLaunchRegs &&
              2 * kConsumerRegs<false> + kProducerRegs<false> <= 3 * kLaunchRegs, "the CTA's registers");
constexpr int kNumConsumerWarps = kNumConsumers / 32;
constexpr uint32_t kConsumerBarrier = 1;        // named barrier of the 256 consumer threads
constexpr uint32_t kWarpgroupBarrier = 2;       // + half: named barrier of one consumer warpgroup
constexpr int BLOCK_M = kMlaBlockRows;   // packed query rows per CTA
constexpr int BLOCK_N = kMlaPageSize;    // tokens per tile = one page
constexpr int kRowBytes = kMlaHeadDimQK * 2;          // 1152: one bf16 token or query row
constexpr int kRowChunks = kRowBytes / 16;            // 72 16-byte chunks
constexpr int kTileBytes = BLOCK_N * kRowBytes;       // 73728 (also the Q tile)
constexpr int kSplitOverheadTiles = 5;  // a split's fixed cost (Q load, epilogue, combine) in tiles
constexpr int kMaxSeqlen = 1 << 24;     // device seqlens are clamped here so tile counts cannot overflow
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// A row's base (the max that O, the row sum and P are scaled to) is raised only when a tile's max
// exceeds it by more than this (log2 domain), so O is rarely rescaled; P <= 2^8 stays exact in bf16's
// relative precision and the fp32 sums cannot overflow (<= 2^8 * 64 * 2^18 tiles).
constexpr float kRescaleThreshold = 8.0f;

constexpr int kSwizzleBlockBytes = BLOCK_N * 128;    // one 64-column block of a 64-row tile
constexpr int kRopeBox = kTileBytes / kSwizzleBlockBytes - 1;  // the last block: RoPE, then P
using ScoreMma = ptx::Wgmma<__nv_bfloat16, BLOCK_N>;        // S = Q K^T, all 64 tokens of a tile
using PvMma = ptx::Wgmma<__nv_bfloat16, kMlaHeadDimV / 2>;  // O += P V, one warpgroup's 256 columns
static_assert(ScoreMma::kNumAccum == 32 && PvMma::kNumAccum == 128, "S is 8 x 4 and O 32 x 4 registers a thread");
static_assert(kRowChunks % 8 == 0, "rows split into whole 128-byte swizzle blocks");
static_assert(BLOCK_M == BLOCK_N, "Q and K tiles share one layout");
static_assert(BLOCK_M == 4 * 16 && kNumConsumerWarps == 8, "4 row groups of 16 x 2 column halves");
static_assert(kTileBytes == 9 * kSwizzleBlockBytes, "a bf16 page is 9 TMA boxes of 64 columns");
static_assert(BLOCK_N * BLOCK_N * 2 == kSwizzleBlockBytes, "P (64 rows x 64 tokens) fills the RoPE block");

// FP8 dequantization: warp w of warpgroup 2 takes tokens 16 w .. + 15 of a page, in 8 pairs. One load
// instruction reads one half (256 bytes) of a pair's two value rows: lane l takes token 2 j + (l / 4) % 2
// of the pair and 16-byte chunk 4 (l / 8) + l % 4 of the half, so each instruction reads two contiguous
// 256-byte runs (few L1 wavefronts), and in each 8-lane phase of a 16-byte tile store the two tokens'
// rows (even, odd) put the same chunks in different swizzle slots (no bank conflict). The RoPE rows
// (128 bytes, bf16 already) go global -> shared by cp.async, no register: one instruction per 4
// tokens, lane l taking token l / 8, chunk l % 8.
constexpr int kDequantThreads = 128;
constexpr int kFp8PageBytes = BLOCK_N * kMlaFp8TokenBytes;
constexpr int kWarpTokens = BLOCK_N / (kDequantThreads / 32);  // 16
constexpr int kWarpPairs = kWarpTokens / 2;
constexpr int kHalfBytes = kMlaHeadDimV / 2;                  // 256 e4m3 a value half
constexpr int kRopeBytes = (kMlaHeadDimQK - kMlaHeadDimV) * 2;  // 128
constexpr int kRopeCopies = kWarpTokens / (32 * 16 / kRopeBytes);  // 4 tokens a copy instruction
static_assert(kHalfBytes == 16 * 16 && kRopeBytes == 8 * 16, "16 lanes a value half, 8 a RoPE row");
static_assert(kMlaFp8TokenBytes % 16 == 0 && kMlaFp8ScalesOffset % 16 == 0 && kMlaFp8RopeOffset % 16 == 0,
              "a token's chunks are 16-byte aligned");
static_assert(kMlaFp8ScalesOffset == kMlaHeadDimV && kMlaHeadDimV / 128 == 4, "4 scales (float4) after the values");

// Shared memory: Q tile, two K tiles (P of a tile is written over its K tile's RoPE block), row bases
// of the last two tiles, row sums, then the full/empty mbarriers of the two buffers.
constexpr int kSmemQ = 0;
constexpr int kSmemK = kSmemQ + kTileBytes;
constexpr int kSmemBase = kSmemK + 2 * kTileBytes;
constexpr int kSmemSum = kSmemBase + 2 * BLOCK_M * 4;
constexpr int kSmemFull = kSmemSum + 2 * BLOCK_M * 4;
constexpr int kSmemEmpty = kSmemFull + 2 * 8;
constexpr int kSmemBytes = kSmemEmpty + 2 * 8;
static_assert(kSmemBytes <= 227 * 1024, "exceeds the 227 KB of shared memory a Hopper CTA may use");

// Tiles of a request: at least one, so an empty request still has a CTA that writes out = 0, lse = +inf.
__host__ __device__ __forceinline__ int num_tiles_of(int seqlen) {
  seqlen = seqlen < 0 ? 0 : (seqlen > kMaxSeqlen ? kMaxSeqlen : seqlen);
  const int tiles = (seqlen + BLOCK_N - 1) / BLOCK_N;
  return tiles > 0 ? tiles : 1;
}

// ---------------------------------------------------------------------------------------------
// Schedule
// ---------------------------------------------------------------------------------------------

__global__ void sm90_mla_metadata_kernel(const int* __restrict__ cache_seqlens, int batch, int num_parts,
                                         int* __restrict__ tile_sched, int* __restrict__ split_offsets) {
  if (threadIdx.x != 0) return;
  int64_t total = 0;
  for (int r = 0; r < batch; ++r) total += num_tiles_of(cache_seqlens[r]) + kSplitOverheadTiles;
  const int64_t per_part = (total + num_parts - 1) / num_parts + kSplitOverheadTiles;

  int req = 0, tile = 0, split = 0, num_splits_so_far = 0;
  split_offsets[0] = 0;
  for (int part = 0; part < num_parts; ++part) {
    const int begin_req = req, begin_tile = tile, begin_split = split;
    int end_req = -1, end_tile = 0;
    // The last part takes whatever is left, so every tile is scheduled exactly once.
    int64_t budget = part == num_parts - 1 ? INT64_MAX / 2 : per_part;
    while (req < batch) {
      const int tiles = num_tiles_of(cache_seqlens[req]);
      const int left = tiles - tile;
      if (budget >= left + kSplitOverheadTiles) {  // the request ends in this part
        budget -= left + kSplitOverheadTiles;
        end_req = req, end_tile = tiles;
        num_splits_so_far += split + 1;
        split_offsets[req + 1] = num_splits_so_far;
        ++req, tile = 0, split = 0;
      } else {
        const int64_t take = budget - kSplitOverheadTiles;
        if (take > 0) {
          tile += static_cast<int>(take);
          end_req = req, end_tile = tile;
          ++split;
        }
        break;
      }
    }
    int* row = tile_sched + part * kMlaSchedCols;
    const bool empty = end_req < 0;
    row[0] = empty ? batch : begin_req;
    row[1] = empty ? 0 : begin_tile;
    row[2] = end_req;
    row[3] = end_tile;
    row[4] = empty ? 0 : begin_split;
    row[5] = row[6] = row[7] = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` (of 72) of row `row` (of 64) in a Q or K tile: 9 blocks of
// 64 rows x 128 bytes (columns 64 b .. 64 b + 63), the wgmma SWIZZLE_128B atom layout.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return (chunk >> 3) * kSwizzleBlockBytes + row * 128 + (((chunk ^ row) & 7) << 4);
}

struct Request {
  int idx;
  int seqlen;       // clamped to the block table's capacity: no read past a request's own pages
  int tile_begin, tile_end;
  int num_splits;
  int split_global;  // workspace row of this CTA's split
};

// The metadata is read as given (it may have been built for other lengths): the requests of a piece
// are clamped into [0, batch), its tiles into the request's, its split rows into the workspaces, so
// wrong metadata gives wrong values, never an access outside q, out, the block table or the workspaces.
__device__ __forceinline__ int first_request(const int* sched) { return max(sched[0], 0); }
__device__ __forceinline__ int last_request(const MlaDecodeArgs& args, const int* sched) {
  return min(sched[2], args.batch - 1);
}

// Request `req` (first_request .. last_request) of this CTA's piece of the schedule; false when the
// piece holds none of its tiles.
// NOTE: the producer and the consumers both walk the piece through this one function, so they agree
// on the sequence of (request, tile) fills.
__device__ __forceinline__ bool make_request(const MlaDecodeArgs& args, const int* sched, int req, Request& r) {
  const int begin_req = sched[0], begin_tile = sched[1], end_req = sched[2], end_tile = sched[3];
  r.idx = req;
  const int seqlen = min(max(args.cache_seqlens[req], 0), kMaxSeqlen);
  // An empty cache has no page to read: every token is treated as past seqlen.
  r.seqlen = args.num_blocks > 0 ? min(seqlen, args.max_blocks * BLOCK_N) : 0;
  const int num_tiles = num_tiles_of(args.cache_seqlens[req]);
  r.tile_begin = req == begin_req ? max(begin_tile, 0) : 0;
  r.tile_end = min(req == end_req ? end_tile : num_tiles, num_tiles);
  const int64_t num_split_rows = mla_num_split_rows(args.batch, args.num_parts);
  const int64_t split_base = args.split_offsets[req];
  const int64_t split = split_base + (req == begin_req ? sched[4] : 0);
  r.num_splits = static_cast<int>(min(max(args.split_offsets[req + 1] - split_base, int64_t{0}), num_split_rows));
  r.split_global = static_cast<int>(min(max(split, int64_t{0}), num_split_rows - 1));
  return r.tile_begin < r.tile_end;
}

// Q rows row_base .. row_base + 63 of request `req` (zero rows past the last query row), by the consumers.
__device__ __forceinline__ void load_q(const MlaDecodeArgs& args, int req, int row_base, int num_rows,
                                       uint8_t* smem_q) {
  const int rows = args.s_q * args.h_q;
  const uint8_t* gmem_q = static_cast<const uint8_t*>(args.q) + (static_cast<int64_t>(req) * rows + row_base) * kRowBytes;
  for (int i = threadIdx.x; i < BLOCK_M * kRowChunks; i += kNumConsumers) {
    const int row = i / kRowChunks, chunk = i % kRowChunks;
    const bool valid = row < num_rows;
    const uint8_t* src = valid ? gmem_q + row * kRowBytes + chunk * 16 : gmem_q;
    ptx::cp_async_cg_16(smem_q + swizzled(row, chunk), src, valid ? 16 : 0);
  }
}

// Page of tile `tile` of request `req`, clamped into the cache so that a bad entry cannot read out of bounds.
__device__ __forceinline__ int64_t page_of(const MlaDecodeArgs& args, const Request& r, int tile) {
  if (tile * BLOCK_N >= r.seqlen) return 0;  // no valid token: nothing is read (and tile may be past max_blocks)
  int page = args.block_table[static_cast<int64_t>(r.idx) * args.block_table_stride + tile];
  page = page < 0 ? 0 : (page >= args.num_blocks ? args.num_blocks - 1 : page);
  return page;
}

// ---------------------------------------------------------------------------------------------
// Producer (warp 8)
// ---------------------------------------------------------------------------------------------

// bf16 page -> swizzled K tile. Every lane arrives once on `full` (count 32).
__device__ __forceinline__ void produce_tile_bf16(const MlaDecodeArgs& args, const CUtensorMap* tmap_kv,
                                                  const Request& r, int tile, uint8_t* smem_k, uint64_t* full,
                                                  bool read_once, uint64_t evict_first) {
  const int lane = threadIdx.x % 32;
  const int64_t page = page_of(args, r, tile);
  const int num_valid = r.seqlen - tile * BLOCK_N;
  if (num_valid >= BLOCK_N) {
    if (lane == 0) {
      // expect_tx before the copies, so the byte count can never complete the phase early.
      ptx::mbarrier_arrive_expect_tx(full, kTileBytes);
#pragma unroll
      for (int b = 0; b < kTileBytes / kSwizzleBlockBytes; ++b) {
        uint8_t* box = smem_k + b * kSwizzleBlockBytes;
        if (read_once) {
          ptx::tma_load_2d(box, tmap_kv, full, 64 * b, static_cast<int32_t>(page * BLOCK_N), evict_first);
        } else {
          ptx::tma_load_2d(box, tmap_kv, full, 64 * b, static_cast<int32_t>(page * BLOCK_N));
        }
      }
    } else {
      ptx::mbarrier_arrive(full);
    }
    return;
  }
  // The last page of a request: tokens at or past seqlen are zero-filled, never read (they may be
  // NaN, and P = 0 would not cancel a NaN in V). Once per request, so the warp waits for it here.
  const uint8_t* gmem_page = static_cast<const uint8_t*>(args.kv_cache) + page * kTileBytes;
  for (int i = lane; i < BLOCK_N * kRowChunks; i += 32) {
    const int token = i / kRowChunks, chunk = i % kRowChunks;
    const bool valid = token < num_valid;
    const uint8_t* src = valid ? gmem_page + token * kRowBytes + chunk * 16 : gmem_page;
    ptx::cp_async_cg_16(smem_k + swizzled(token, chunk), src, valid ? 16 : 0);
  }
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  ptx::fence_proxy_async_shared();  // this lane's cp.async writes -> the consumers' wgmma reads
  ptx::mbarrier_arrive(full);       // release: the consumers' acquire of `full` sees the tile
}

// A page read by one CTA only (one head block) is read once: its lines are the first L2 evicts, so
// the stream replaces itself instead of what else L2 holds, and no dirty line has to be written back
// to make room (the A/B is in benchmarks/RESULTS.md). With several head blocks the other CTAs of the
// part read the same page at about the same time: no hint.
__device__ __forceinline__ bool page_read_once() { return gridDim.x == 1; }

// Warp 8 over a bf16 cache: walks the consumers' (request, tile) sequence and refills each buffer once
// it is released.
__device__ __forceinline__ void producer(const MlaDecodeArgs& args, const CUtensorMap* tmap_kv, const int* sched,
                                         uint8_t* smem, uint64_t* full, uint64_t* empty) {
  const bool read_once = page_read_once();
  const uint64_t evict_first = ptx::l2_policy_evict_first();
  uint32_t fill = 0;
  for (int req = first_request(sched); req <= last_request(args, sched); ++req) {
    Request r;
    if (!make_request(args, sched, req, r)) continue;
    for (int tile = r.tile_begin; tile < r.tile_end; ++tile, ++fill) {
      const int stage = fill % 2;
      uint8_t* smem_k = smem + kSmemK + stage * kTileBytes;
      ptx::mbarrier_wait(&empty[stage], ((fill / 2) & 1) ^ 1);
      produce_tile_bf16(args, tmap_kv, r, tile, smem_k, &full[stage], read_once, evict_first);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// FP8 dequantizers (warpgroup 2)
// ---------------------------------------------------------------------------------------------

// bf16(e4m3 * scale) of 16 values (two per output word, low byte first), rounded as the reference does:
// any scale (the path of a page with a scale that is not a power of two).
__device__ __forceinline__ void dequant_e4m3x16(const uint4 raw, float scale, uint32_t (&out)[8]) {
  const uint16_t* pairs = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
  for (int p = 0; p < 8; ++p) {
    const float2 v = ptx::e4m3x2_to_float2(pairs[p]);
    const __nv_bfloat162 b = __floats2bfloat162_rn(v.x * scale, v.y * scale);
    out[p] = *reinterpret_cast<const uint32_t*>(&b);
  }
}

// The cache's scales are powers of two (csrc/sm90_mla_cache.h): bf16(e4m3 * scale) is then the e4m3
// pair widened exactly (F2FP to f16x2, two HADD2.F32) and packed to bf16x2 (exact: every e4m3 value
// is a bf16), times the scale in one bf16x2 multiply (exact for a power of two: the products stay
// normal). A NaN byte stays NaN. The factor (bf16x2 (scale, scale)) where the scale is a power of two
// that bf16 represents, else false: that page takes dequant_e4m3x16.
__device__ __forceinline__ bool pow2_scale_factor(float scale, uint32_t& factor) {
  const uint32_t bits = __float_as_uint(scale);
  const uint32_t e = bits >> 23;  // the biased exponent where the sign is 0
  factor = bits >> 16 | (bits & 0xffff0000u);
  return (bits & 0x807fffffu) == 0 && e >= 1 && e <= 254;
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t x, uint32_t y) {
  const __nv_bfloat162 p = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&x), *reinterpret_cast<const __nv_bfloat162*>(&y));
  return *reinterpret_cast<const uint32_t*>(&p);
}

// dequant_e4m3x16 for a power-of-two scale (its factor from pow2_scale_factor).
__device__ __forceinline__ void dequant_e4m3x16_pow2(const uint4 raw, uint32_t factor, uint32_t (&out)[8]) {
  const uint16_t* pairs = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
  for (int p = 0; p < 8; ++p) {
    const float2 v = ptx::e4m3x2_to_float2(pairs[p]);
    const __nv_bfloat162 b = __floats2bfloat162_rn(v.x, v.y);
    out[p] = bf16x2_mul(*reinterpret_cast<const uint32_t*>(&b), factor);
  }
}

// One lane's share of a page (see kWarpTokens), as loaded.
struct DequantTile {
  uint4 values[kWarpPairs][2];  // pair j, half h: 16 e4m3 of the lane's token of the pair
  float scales[kWarpPairs][2];  // their scale
};

// A lane's fixed places in a page (see kWarpTokens): its token of each pair (pair_token) and 16-byte
// chunk of each half (chunk), its RoPE token of each copy (rope_token) and chunk (lane % 8), and their
// K tile offsets. Value chunk c of the half becomes bf16 chunks 2 c, 2 c + 1 of the row: block c / 4
// (+ 4 for the second half), swizzle slots s ^ 2 (j % 4) and that ^ 1, s = 2 (c % 4) ^ pair_token
// (row 16 w + 2 j + pair_token, whose row % 8 is 2 (j % 4) ^ pair_token). RoPE copy r: row 16 w +
// 4 r + lane / 8 of the RoPE block, slot (lane % 8) ^ (lane / 8) ^ 4 (r % 2).
struct DequantLane {
  int pair_token, chunk, rope_token;
  int value_src, scale_src, rope_src;  // page offsets of the lane's value chunk (pair 0, half 0), its
                                       // scale, its RoPE chunk (copy 0): the rest are immediates
  int value_base;       // K tile offset of pair 0, half 0, slot bits 0
  int value_slot[4];    // + 16 (s ^ 2 k), k = j % 4 (the hi chunk: ^ 16)
  int rope_offset[2];   // K tile offset of RoPE copy r, r % 2
};

__device__ __forceinline__ DequantLane make_dequant_lane() {
  const int lane = threadIdx.x % 32, first = threadIdx.x % kDequantThreads / 32 * kWarpTokens;
  DequantLane l;
  l.pair_token = lane / 4 % 2;
  l.chunk = lane / 8 * 4 + lane % 4;
  l.rope_token = first + lane / 8;
  l.value_base = l.chunk / 4 * kSwizzleBlockBytes + (first + l.pair_token) * 128;
  l.value_src = (first + l.pair_token) * kMlaFp8TokenBytes + 16 * l.chunk;
  l.scale_src = (first + l.pair_token) * kMlaFp8TokenBytes + kMlaFp8ScalesOffset + 4 * (16 * l.chunk / 128);
  l.rope_src = l.rope_token * kMlaFp8TokenBytes + kMlaFp8RopeOffset + 16 * (lane % 8);
  const int s = 2 * (l.chunk % 4) ^ l.pair_token;
#pragma unroll
  for (int k = 0; k < 4; ++k) l.value_slot[k] = 16 * (s ^ 2 * k);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l.rope_offset[r] = kRopeBox * kSwizzleBlockBytes + l.rope_token * 128 + 16 * ((lane % 8) ^ (lane / 8) ^ 4 * r);
  }
  return l;
}

__device__ __forceinline__ uint4 ld_chunk(const uint8_t* src) {
  const int4 v = ptx::ld_nc_na_l2_256_v4(src);
  return make_uint4(v.x, v.y, v.z, v.w);
}

// The lane's token of pair j.
__device__ __forceinline__ int pair_token(const DequantLane& l, int j) {
  return threadIdx.x % kDequantThreads / 32 * kWarpTokens + 2 * j + l.pair_token;
}

// Issues the lane's loads of a page's values. A token at or past seqlen is not read: its values are 0
// with scale 1, which the power-of-two path turns into exact zeros. Every page but a request's last is
// full: those loads take no predicate.
template <bool kFull>
__device__ __forceinline__ void load_tile(const DequantLane& l, const uint8_t* page, int num_valid, DequantTile& d) {
  const uint8_t* values = page + l.value_src;
  const float* scales = reinterpret_cast<const float*>(page + l.scale_src);
#pragma unroll
  for (int j = 0; j < kWarpPairs; ++j) {
    const bool valid = kFull || pair_token(l, j) < num_valid;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      d.values[j][h] = valid ? ld_chunk(values + 2 * j * kMlaFp8TokenBytes + kHalfBytes * h) : make_uint4(0, 0, 0, 0);
      d.scales[j][h] = valid ? __ldg(scales + (2 * j * kMlaFp8TokenBytes + kHalfBytes * h / 128 * 4) / 4) : 1.0f;
    }
  }
}

// The lane's RoPE chunks into the K tile (zeros for a token at or past seqlen: not read), as one
// cp.async group that the caller waits for before it publishes the tile.
__device__ __forceinline__ void copy_rope(const DequantLane& l, const uint8_t* page, int num_valid, uint8_t* smem_k) {
  const uint8_t* rope = page + l.rope_src;
#pragma unroll
  for (int r = 0; r < kRopeCopies; ++r) {
    const bool valid = l.rope_token + 4 * r < num_valid;
    ptx::cp_async_cg_16(smem_k + l.rope_offset[r % 2] + r * 4 * 128, valid ? rope + 4 * r * kMlaFp8TokenBytes : page,
                        valid ? 16 : 0);
  }
  ptx::cp_async_commit();
}

__device__ __forceinline__ void store_value(uint8_t* smem_k, const DequantLane& l, int j, int h,
                                            const uint32_t (&bf16x2)[8]) {
  uint8_t* dst = smem_k + l.value_base + 4 * h * kSwizzleBlockBytes + j * 256;
  *reinterpret_cast<uint4*>(dst + l.value_slot[j % 4]) = make_uint4(bf16x2[0], bf16x2[1], bf16x2[2], bf16x2[3]);
  *reinterpret_cast<uint4*>(dst + (l.value_slot[j % 4] ^ 16)) = make_uint4(bf16x2[4], bf16x2[5], bf16x2[6], bf16x2[7]);
}

// The lane's share as bf16 into the K tile by the power-of-two path; false where a scale is not a
// power of two: the caller then redoes the page by store_tile_any_scale.
__device__ __forceinline__ bool store_tile(const DequantLane& l, const DequantTile& d, uint8_t* smem_k) {
  bool exact = true;
#pragma unroll
  for (int j = 0; j < kWarpPairs; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t factor, bf16x2[8];
      exact &= pow2_scale_factor(d.scales[j][h], factor);
      dequant_e4m3x16_pow2(d.values[j][h], factor, bf16x2);
      store_value(smem_k, l, j, h, bf16x2);
    }
  }
  return exact;
}

// The lane's values again (reloaded: the page is still in L2), for any scale (rare; out of line, so the
// hot loop stays short). A token past seqlen has zero bytes: +0 at any scale.
__device__ __noinline__ void store_tile_any_scale(const uint8_t* page, int num_valid, uint8_t* smem_k) {
  const DequantLane l = make_dequant_lane();
  DequantTile d;
  load_tile<false>(l, page, num_valid, d);
#pragma unroll
  for (int j = 0; j < kWarpPairs; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t bf16x2[8];
      dequant_e4m3x16(d.values[j][h], d.scales[j][h], bf16x2);
      store_value(smem_k, l, j, h, bf16x2);
    }
  }
}

// Warpgroup 2 over an FP8 cache: walks the consumers' (request, tile) sequence. A page's loads are
// issued before the wait for its buffer, so they are in flight while the consumers still read it, and
// the next page of the request is prefetched into L2 meanwhile. After a page's stores every thread
// fences them for the wgmma reads and arrives on full (count 128).
// Lane l holds the page of tile pages_base + l of the request: one coalesced read of the block table
// per 32 tiles instead of a dependent read before every page's loads.
__device__ __forceinline__ void dequantizer(const MlaDecodeArgs& args, const int* sched, uint8_t* smem,
                                            uint64_t* full, uint64_t* empty) {
  const int lane = threadIdx.x % 32;
  const bool prefetcher = threadIdx.x % kDequantThreads == 0;
  const uint8_t* kv = static_cast<const uint8_t*>(args.kv_cache);
  const DequantLane l = make_dequant_lane();
  uint32_t fill = 0;
  for (int req = first_request(sched); req <= last_request(args, sched); ++req) {
    Request r;
    if (!make_request(args, sched, req, r)) continue;
    int pages_base = r.tile_begin, pages = static_cast<int>(page_of(args, r, r.tile_begin + lane));
    for (int tile = r.tile_begin; tile < r.tile_end; ++tile, ++fill) {
      if (tile - pages_base == 32) {
        pages_base = tile;
        pages = static_cast<int>(page_of(args, r, tile + lane));
      }
      const int page = __shfl_sync(0xffffffffu, pages, tile - pages_base);
      const int num_valid = r.seqlen - tile * BLOCK_N;
      const uint8_t* src = kv + static_cast<int64_t>(page) * kFp8PageBytes;
      DequantTile d;
      if (num_valid >= BLOCK_N) {
        load_tile<true>(l, src, num_valid, d);
      } else {
        load_tile<false>(l, src, num_valid, d);
      }
      const int next = tile + 1 - pages_base;
      const int next_page = __shfl_sync(0xffffffffu, pages, next % 32);
      const int next_valid = min(num_valid - BLOCK_N, BLOCK_N);
      if (prefetcher && tile + 1 < r.tile_end && next < 32 && next_valid > 0) {
        ptx::bulk_prefetch_l2(kv + static_cast<int64_t>(next_page) * kFp8PageBytes, next_valid * kMlaFp8TokenBytes);
      }
      const int stage = fill % 2;
      ptx::mbarrier_wait(&empty[stage], ((fill / 2) & 1) ^ 1);
      uint8_t* smem_k = smem + kSmemK + stage * kTileBytes;
      copy_rope(l, src, num_valid, smem_k);
      if (!store_tile(l, d, smem_k)) store_tile_any_scale(src, num_valid, smem_k);
      ptx::cp_async_wait<0>();
      ptx::fence_proxy_async_shared();  // this thread's stores and copies -> the consumers' wgmma reads
      ptx::mbarrier_arrive(&full[stage]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Consumers (warps 0-7)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void consumer_sync() { ptx::named_barrier_sync(kConsumerBarrier, kNumConsumers); }

// Per-thread state of one warp's share of a request: O columns 256 * half .. +255 of rows lane_row
// and lane_row + 8 of its row group, the row base (log2 domain: the scale of O, of the row sums and
// of P; identical in both warpgroups) and the row sum of the tiles this warpgroup scored.
struct Consumer {
  int row_group, half;
  int lane_row;  // lane / 4: this lane holds accumulator rows lane_row and lane_row + 8 of the 16
  int lane_col;  // lane % 4: and columns 2 lane_col, 2 lane_col + 1 of every 8-column tile
  float o[32][4];           // 32 n8 tiles of the 16 x 256 O slice
  float row_base[2], row_sum[2];
  int key_limit[2];         // keys < key_limit are visible to row lane_row (+ 8)
};

__device__ __forceinline__ void consumer_reset(Consumer& c, const MlaDecodeArgs& args, const Request& r, int row_base) {
#pragma unroll
  for (int j = 0; j < 32; ++j) c.o[j][0] = c.o[j][1] = c.o[j][2] = c.o[j][3] = 0.0f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    c.row_base[h] = -INFINITY;
    c.row_sum[h] = 0.0f;
    // Bottom-right causal alignment: query i of s_q sees keys < seqlen - s_q + 1 + i.
    const int row = row_base + 16 * c.row_group + c.lane_row + 8 * h;
    const int q_idx = row / args.h_q;
    const int limit = args.causal ? r.seqlen - args.s_q + 1 + q_idx : r.seqlen;
    c.key_limit[h] = limit < r.seqlen ? limit : r.seqlen;
  }
}

// The scoring warpgroup: S[64 rows, 64 tokens] = Q K^T over 36 k-steps (Q and K K-major).
__device__ __forceinline__ void scores_wgmma(const uint8_t* smem_q, const uint8_t* smem_k, float (&s)[8][4]) {
  float(&d)[32] = reinterpret_cast<float(&)[32]>(s);
  const uint64_t desc_q = ptx::make_smem_desc_sw128(smem_q);
  const uint64_t desc_k = ptx::make_smem_desc_sw128(smem_k);
  ptx::warpgroup::wgmma_fence();
#pragma unroll
  for (int k_idx = 0; k_idx < kMlaHeadDimQK / 16; ++k_idx) {
    const uint32_t offset = (k_idx / 4) * kSwizzleBlockBytes + (k_idx % 4) * 32;
    ScoreMma::mma(d, ptx::smem_desc_advance(desc_q, offset), ptx::smem_desc_advance(desc_k, offset), k_idx > 0);
  }
  ptx::warpgroup::wgmma_commit_group();
  ptx::warpgroup::wgmma_wait_group<0>();
  ptx::warpgroup::fence_accumulators(d);
}

// The scoring warpgroup's part of a tile: S in the log2 domain and masked, the rows' bases (to
// smem_base), P = exp2(S - base) in bf16 over the K tile's RoPE block (V never reads it, and the S
// wgmma that did has completed) and the tile's row sums relative to the new bases (fp32).
__device__ __forceinline__ void score_tile(const Consumer& c, const uint8_t* smem_q, uint8_t* smem_k, int tile,
                                           float scale_log2, float* smem_base, float (&tile_sum)[2]) {
  float s[8][4];
  scores_wgmma(smem_q, smem_k, s);
  // NOTE: masked scores are selected to -inf, never multiplied: a NaN would survive * 0.
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int token = tile * BLOCK_N + 8 * j + 2 * c.lane_col + (e & 1);
      s[j][e] = token < c.key_limit[e >> 1] ? s[j][e] * scale_log2 : -INFINITY;
    }
  }
  // NOTE: wgmma.wait_group only covers the executing warp's part of the S wgmma: P overwrites the RoPE
  // block, which every warp's part read, so the whole warpgroup must be past its wait first.
  ptx::named_barrier_sync(kWarpgroupBarrier + c.half, 128);
  uint8_t* smem_p = smem_k + 8 * kSwizzleBlockBytes;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = 16 * c.row_group + c.lane_row + 8 * h;
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    // The base only rises, and only past the threshold (-inf + threshold is -inf: the first visible
    // key sets it). The 4 lanes of a row agree: same m, same row_base.
    const float base = m > c.row_base[h] + kRescaleThreshold ? m : c.row_base[h];
    if (c.lane_col == 0) smem_base[row] = base;
    const float exp_base = base == -INFINITY ? 0.0f : base;  // no visible key yet: every p is exp2(-inf) = 0
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float p0 = exp2f(s[j][2 * h] - exp_base), p1 = exp2f(s[j][2 * h + 1] - exp_base);
      // NOTE: the row sum takes the fp32 values: summing the bf16-rounded ones costs lse ~1e-4 accuracy.
      sum += p0 + p1;
      *reinterpret_cast<__nv_bfloat162*>(smem_p + swizzled(row, j) + 4 * c.lane_col) = __floats2bfloat162_rn(p0, p1);
    }
    tile_sum[h] = sum;
  }
}

// Both warpgroups: O and the row sums move to the tile's bases, then the scorer's row sums are added.
// A warp whose rows all kept their base skips the multiplies (its factors are exactly 1).
__device__ __forceinline__ void rebase(Consumer& c, const float* smem_base, const float (&tile_sum)[2]) {
  float factor[2];
  bool moved = false;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float base = smem_base[16 * c.row_group + c.lane_row + 8 * h];
    // base >= row_base; both -inf (no visible key yet) is unmoved, so exp2 never sees -inf - -inf.
    const bool row_moved = base != c.row_base[h];
    factor[h] = row_moved ? exp2f(c.row_base[h] - base) : 1.0f;
    moved |= row_moved;
    c.row_base[h] = base;
    c.row_sum[h] = c.row_sum[h] * factor[h] + tile_sum[h];
  }
  if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
    for (int j = 0; j < 32; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) c.o[j][e] *= factor[e >> 1];
    }
  }
}

// Warpgroup `half`: O[64 rows, columns 256 half .. +255] += P V. P (in the RoPE block) is K-major
// (tokens contiguous); V is the K tile itself, MN-major (columns contiguous): 4 MN blocks 8 KB apart,
// 8-token groups 1 KB apart.
__device__ __forceinline__ void pv_wgmma(Consumer& c, const uint8_t* smem_k) {
  float(&d)[128] = reinterpret_cast<float(&)[128]>(c.o);
  const uint64_t desc_p = ptx::make_smem_desc_sw128(smem_k + 8 * kSwizzleBlockBytes);
  const uint64_t desc_v = ptx::make_smem_desc_sw128_mn(smem_k + 4 * c.half * kSwizzleBlockBytes, kSwizzleBlockBytes,
                                                       8 * 128);
  ptx::warpgroup::wgmma_fence();
#pragma unroll
  for (int k_idx = 0; k_idx < BLOCK_N / 16; ++k_idx) {
    PvMma::mma<ptx::Major::kMN>(d, ptx::smem_desc_advance(desc_p, 32 * k_idx),
                                ptx::smem_desc_advance(desc_v, 16 * 128 * k_idx), true);
  }
  ptx::warpgroup::wgmma_commit_group();
  ptx::warpgroup::wgmma_wait_group<0>();
  ptx::warpgroup::fence_accumulators(d);
}

// One tile: the scorer computes S, the bases and P, one barrier publishes them, then both warpgroups
// rebase and do their PV. Every consumer thread reaches the barrier.
// NOTE: nothing the scorer writes can still be read: P goes into this tile's own buffer, whose
// previous readers (the PV of the fill two back) completed before it was released and refilled;
// smem_base is this tile's slot of two (by fill parity), last read two tiles back before the barrier
// of the tile in between, which the scorer has passed.
__device__ __forceinline__ void process_tile(Consumer& c, const uint8_t* smem_q, uint8_t* smem_k, float* smem_base,
                                             int tile, bool scorer, float scale_log2) {
  float tile_sum[2] = {0.0f, 0.0f};
  if (scorer) {
    score_tile(c, smem_q, smem_k, tile, scale_log2, smem_base, tile_sum);
    ptx::fence_proxy_async_shared();  // P stores -> wgmma (async proxy) reads
  }
  consumer_sync();
  rebase(c, smem_base, tile_sum);
  pv_wgmma(c, smem_k);
}

// Normalized O and lse of the request (or of this split of it).
__device__ __forceinline__ void write_results(Consumer& c, const MlaDecodeArgs& args, const Request& r, int row_base,
                                              float* smem_sum) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = c.row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (c.lane_col == 0) smem_sum[c.half * BLOCK_M + 16 * c.row_group + c.lane_row + 8 * h] = sum;
  }
  consumer_sync();
  const int rows = args.s_q * args.h_q;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int local_row = 16 * c.row_group + c.lane_row + 8 * h;
    const int row = row_base + local_row;
    if (row >= rows) continue;
    const float sum = smem_sum[local_row] + smem_sum[BLOCK_M + local_row];
    const bool has_keys = sum != 0.0f;  // a NaN sum (a NaN in the cache) stays NaN, as in the reference
    const float inv = has_keys ? 1.0f / sum : 0.0f;
    const float lse_log2 = c.row_base[h] + log2f(sum);
    const int col = 256 * c.half + 2 * c.lane_col;
    if (r.num_splits == 1) {
      __nv_bfloat16* gmem_out = static_cast<__nv_bfloat16*>(args.out) + (static_cast<int64_t>(r.idx) * rows + row) * kMlaHeadDimV + col;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<__nv_bfloat162*>(gmem_out + 8 * j) =
            __floats2bfloat162_rn(c.o[j][2 * h] * inv, c.o[j][2 * h + 1] * inv);
      }
      if (c.half == 0 && c.lane_col == 0) {
        const int q_idx = row / args.h_q, head_idx = row % args.h_q;
        args.lse[(static_cast<int64_t>(r.idx) * args.h_q + head_idx) * args.s_q + q_idx] =
            has_keys ? lse_log2 * kLn2 : INFINITY;
      }
    } else {
      float* gmem_o = args.o_accum + (static_cast<int64_t>(r.split_global) * rows + row) * kMlaHeadDimV + col;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<float2*>(gmem_o + 8 * j) = make_float2(c.o[j][2 * h] * inv, c.o[j][2 * h + 1] * inv);
      }
      if (c.half == 0 && c.lane_col == 0) {
        args.lse_accum[static_cast<int64_t>(r.split_global) * rows + row] = has_keys ? lse_log2 * kLn2 : -INFINITY;
      }
    }
  }
}

// One consumer warp's release of a buffer: lane 0 arrives once its warp is done reading it.
__device__ __forceinline__ void release(uint64_t* bar) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) ptx::mbarrier_arrive(bar);
}

__device__ __forceinline__ void consumer(const MlaDecodeArgs& args, const int* sched, uint8_t* smem, uint64_t* full,
                                         uint64_t* empty) {
  uint8_t* smem_q = smem + kSmemQ;
  float* smem_base = reinterpret_cast<float*>(smem + kSmemBase);
  float* smem_sum = reinterpret_cast<float*>(smem + kSmemSum);

  const int rows = args.s_q * args.h_q;
  const int row_base = blockIdx.x * BLOCK_M;
  const int num_rows = min(BLOCK_M, rows - row_base);
  const float scale_log2 = args.softmax_scale * kLog2e;

  Consumer c;
  c.row_group = threadIdx.x / 32 % 4;
  c.half = threadIdx.x / 128;
  c.lane_row = threadIdx.x % 32 / 4;
  c.lane_col = threadIdx.x % 4;

  uint32_t fill = 0;  // the producer's fill index of the next tile
  for (int req = first_request(sched); req <= last_request(args, sched); ++req) {
    Request r;
    if (!make_request(args, sched, req, r)) continue;

    consumer_sync();  // the previous request's readers of Q (completed wgmma) and of smem_sum are done
    load_q(args, req, row_base, num_rows, smem_q);
    ptx::cp_async_commit();
    consumer_reset(c, args, r, row_base);
    ptx::cp_async_wait<0>();
    ptx::fence_proxy_async_shared();  // cp.async writes of Q -> wgmma reads
    consumer_sync();

    for (int tile = r.tile_begin; tile < r.tile_end; ++tile, ++fill) {
      const int stage = fill % 2;
      uint8_t* smem_k = smem + kSmemK + stage * kTileBytes;
      ptx::mbarrier_wait(&full[stage], (fill / 2) & 1);
      // Warpgroup fill % 2 scores the tile (the one of its buffer), so each scores every other tile.
      process_tile(c, smem_q, smem_k, smem_base + (fill & 1) * BLOCK_M, tile, (fill & 1) == c.half, scale_log2);
      release(&empty[stage]);  // this warp's wgmma reads of the tile (S, PV) have completed
    }
    write_results(c, args, r, row_base, smem_sum);
  }
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1)
    sm90_mla_decode_kernel(const __grid_constant__ MlaDecodeArgs args, const __grid_constant__ CUtensorMap tmap_kv) {
  // NOTE: 1024-byte alignment: the base offset of every 128-byte-swizzled wgmma operand is 0, and the
  // SWIZZLE_128B pattern TMA writes (address bits 4-6 XOR 7-9) is the one `swizzled` computes.
  extern __shared__ __align__(1024) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kSmemFull);
  uint64_t* empty = reinterpret_cast<uint64_t*>(smem + kSmemEmpty);
  const int* sched = args.tile_sched + blockIdx.y * kMlaSchedCols;
  // The combine kernel may launch now: its blocks take an SM as soon as a decode CTA leaves it (they
  // cannot share one: a decode CTA holds the whole register file) and wait for this grid there.
  ptx::griddep_launch_dependents();

  if (threadIdx.x == 0) {
    for (int stage = 0; stage < 2; ++stage) {
      // bf16: every producer lane, once a fill; FP8: every dequantizer thread.
      ptx::mbarrier_init(&full[stage], kFp8 ? kDequantThreads : 32);
      ptx::mbarrier_init(&empty[stage], kNumConsumerWarps);  // every consumer warp, once a fill
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();  // the only CTA-wide barrier: the roles never wait for each other's threads after it

  if (threadIdx.x >= kNumConsumers) {
    ptx::warpgroup::setmaxnreg_dec<kProducerRegs<kFp8>>();
    if constexpr (kFp8) {
      dequantizer(args, sched, smem, full, empty);
      return;
    }
    if (threadIdx.x / 32 != kNumConsumers / 32) return;  // over a bf16 cache, warps 9-11 only lend their registers
    if (threadIdx.x == kNumConsumers) ptx::tma_prefetch_descriptor(&tmap_kv);
    producer(args, &tmap_kv, sched, smem, full, empty);
  } else {
    ptx::warpgroup::setmaxnreg_inc<kConsumerRegs<kFp8>>();
    consumer(args, sched, smem, full, empty);
  }
}

// ---------------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------------

constexpr int kCombineWarps = 4;

// One warp per (request, query row) of a split request: out = sum_s exp(lse_s - lse) * o_s.
__global__ void __launch_bounds__(kCombineWarps * 32) sm90_mla_combine_kernel(const __grid_constant__ MlaDecodeArgs args) {
  const int req = blockIdx.y;
  const int rows = args.s_q * args.h_q;
  const int row = blockIdx.x * kCombineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  ptx::griddep_wait();  // launched early (PDL): the decode grid's o_accum / lse_accum are complete after this
  // split_offsets as given, clamped into the workspaces (see first_request).
  const int64_t num_split_rows = mla_num_split_rows(args.batch, args.num_parts);
  const int64_t split_begin = min(max(static_cast<int64_t>(args.split_offsets[req]), int64_t{0}), num_split_rows);
  const int64_t splits = static_cast<int64_t>(args.split_offsets[req + 1]) - args.split_offsets[req];
  const int num_splits = static_cast<int>(min(max(splits, int64_t{0}), num_split_rows - split_begin));
  if (row >= rows || num_splits <= 1) return;

  const float* lse_accum = args.lse_accum + split_begin * rows + row;
  float max_lse = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) max_lse = fmaxf(max_lse, lse_accum[static_cast<int64_t>(s) * rows]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));
  const float base = max_lse == -INFINITY ? 0.0f : max_lse;
  float sum = 0.0f;
  for (int s = lane; s < num_splits; s += 32) sum += expf(lse_accum[static_cast<int64_t>(s) * rows] - base);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const bool has_keys = sum != 0.0f;  // NaN: a NaN split's lse stays NaN
  const float lse = has_keys ? base + logf(sum) : INFINITY;

  // Each lane owns 16 columns: 4 float4 at lane * 4 + 128 * i.
  float4 acc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int s = 0; s < num_splits; ++s) {
    const float split_lse = lse_accum[static_cast<int64_t>(s) * rows];
    if (split_lse == -INFINITY) continue;  // an empty split holds zeros; skipping it also skips its 0 weight
    const float weight = expf(split_lse - lse);
    const float4* o = reinterpret_cast<const float4*>(
        args.o_accum + ((split_begin + s) * rows + row) * kMlaHeadDimV);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 v = o[lane + 32 * i];
      acc[i].x += weight * v.x, acc[i].y += weight * v.y, acc[i].z += weight * v.z, acc[i].w += weight * v.w;
    }
  }
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(args.out) + (static_cast<int64_t>(req) * rows + row) * kMlaHeadDimV;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(acc[i].x, acc[i].y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(acc[i].z, acc[i].w);
    uint2 packed;
    packed.x = *reinterpret_cast<const uint32_t*>(&lo);
    packed.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(out + 4 * (lane + 32 * i)) = packed;
  }
  if (lane == 0) {
    const int q_idx = row / args.h_q, head_idx = row % args.h_q;
    args.lse[(static_cast<int64_t>(req) * args.h_q + head_idx) * args.s_q + q_idx] = lse;
  }
}

}  // namespace

void launch_mla_metadata(const int* cache_seqlens, int batch, int num_parts, int* tile_sched, int* split_offsets,
                         cudaStream_t stream) {
  sm90_mla_metadata_kernel<<<1, 32, 0, stream>>>(cache_seqlens, batch, num_parts, tile_sched, split_offsets);
  DSO_LAUNCH_CHECK();
}

namespace {

// The bf16 cache as a 2-D tensor [num_blocks * 64 tokens, 576], read in SWIZZLE_128B boxes of
// 64 tokens x 64 columns: box b of a page is 64-column block b of the swizzled K tile.
CUtensorMap make_kv_tensor_map(const MlaDecodeArgs& args) {
  if (args.num_blocks == 0) return CUtensorMap{};  // never read: every token counts as past seqlen
  return encode_tensor_map_2d(args.kv_cache, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, kMlaHeadDimQK,
                              static_cast<uint64_t>(args.num_blocks) * BLOCK_N, kMlaHeadDimQK, 64, BLOCK_N,
                              CU_TENSOR_MAP_SWIZZLE_128B, "the MLA kv_cache");
}

template <bool kFp8>
void launch_decode_kernel(const MlaDecodeArgs& args, dim3 grid, cudaStream_t stream) {
  auto kernel = sm90_mla_decode_kernel<kFp8>;
  static std::once_flag attribute_set[kMaxDevices];  // one per kernel instantiation
  once_per_device(attribute_set, [kernel] {
    DSO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  });
  const CUtensorMap tmap_kv = kFp8 ? CUtensorMap{} : make_kv_tensor_map(args);  // FP8: read without TMA
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(args, tmap_kv);
  DSO_LAUNCH_CHECK();
}

}  // namespace

void launch_mla_decode(const MlaDecodeArgs& args, cudaStream_t stream) {
  const int rows = args.s_q * args.h_q;
  const dim3 grid(ceil_div(rows, BLOCK_M), args.num_parts);
  if (args.fp8_cache) {
    launch_decode_kernel<true>(args, grid, stream);
  } else {
    launch_decode_kernel<false>(args, grid, stream);
  }
  launch_with_pdl(sm90_mla_combine_kernel, dim3(ceil_div(rows, kCombineWarps), args.batch), kCombineWarps * 32, 0,
                  stream, args);
}

}  // namespace dso
