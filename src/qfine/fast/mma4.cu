// y (m <= 16, n) = x (m, k) W^T for a bitsandbytes 4-bit W (n, k): one decode step's projection on tensor
// cores, compiled at run time by NVRTC (qfine/fast/mma_kernel.py, which prepends the #defines below).
//
// Each warp owns 16*TILES rows of W and a run of absmax blocks along k; each step of its loop covers GROUP
// blocks. A block of WARPS * RW warps holds RW row groups of WARPS warps, the WARPS of a group splitting k
// (RW > 1: fewer k ranges, so longer loops that keep loads in flight, and one table fill serves more rows).
// Per absmax block, a thread (lane = 4g + t) reads BS/8 packed bytes of rows g and g+8 of each 16-row tile
// (a quad of lanes reads one row's block as one contiguous piece), turns every byte into the two 16-bit
// code values it holds with one shared-memory lookup (a 256-entry table of value pairs, one copy per lane
// so that a warp's 32 lookups never share a bank), and feeds them as the A operand of mma.m16n8k16: W's
// rows are the mma's rows, the token rows its columns (NT tiles of 8). The k order inside a block is
// permuted the same way for W and x (thread t's pair p of a row is x's pair p of the same k), so every
// mma sums over one absmax block only: the block's fp32 product is scaled by its absmax once and added
// to the fp32 accumulator, as the other 4-bit kernels of qfine do. A weight is decoded, never rescaled.
//
// Defines: BS (64 | 128) absmax block size; NESTED, BS2 double quantization and its block size; NT token
// tiles of 8 (m <= 8 NT); TILES 16-row tiles per warp; WARPS warps per row group, each a k range; RW row
// groups per block; SPLIT k ranges per grid column (fp32 partials, summed by a second kernel); LORA,
// RESIDUAL epilogue terms; F16 (fp16 activations, else bf16); ADT the adapter's dtype (0 fp32, 1 bf16,
// 2 fp16); WIDE the 64 KiB table layout (see pair()); LORA_R the adapter's rank; PAIR: two weights of one
// shape and input (gate, up), tile 0 from the first and tile 1 the same rows of the second, written as
// silu(gate) * up (TILES 2, SPLIT 1); NG: 1 to 3 weights of one k and input, each block's rows from one of
// them, each written to its own output (SPLIT 1); PDL: launched as a programmatic dependent launch, waiting
// for the previous kernel only before the first read of x, xa or the residual, and letting the next start;
// L2B, AHEAD, BULK: how the weights are requested from memory (see load_block, ahead_l2 and piece_l2).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define GROUP 4              // absmax blocks per loop step (their 4 one-byte absmax codes: one 32-bit load)
#define EPI_LATE (NT > 2)    // many token tiles: the epilogue's inputs read after the loop, not held through it
#define WORDS (BS / 32)      // 32-bit words a thread reads per row per block (8 weights each)
#define MMAS (BS / 16)       // mma steps (k = 16) per block
#define XW (BS / 8)          // 32-bit words (pairs of x) a thread needs per token row per block
#define ROW_SHIFT (WIDE ? 6 : 5)  // log2 of a table row's words: 32 lane copies, or 64 (WIDE: half unused)
#define LUT_WORDS (256 << ROW_SHIFT)

__device__ __forceinline__ float act_to_f32(u16 v) {
#if F16
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
#else
  return __uint_as_float(((u32)v) << 16);
#endif
}

__device__ __forceinline__ u16 f32_to_act(float f) {  // round to nearest even
  u16 v;
#if F16
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
#endif
  return v;
}

__device__ __forceinline__ float adapter_f32(const void* p, long i) {
#if ADT == 0
  return ((const float*)p)[i];
#elif ADT == 1
  return __uint_as_float(((u32)((const u16*)p)[i]) << 16);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(((const u16*)p)[i]));
  return f;
#endif
}

// L2B: how many bytes the L2 fetches from memory around each weight load (0: its own choice). One load
// instruction reads 32 bytes (BS 64) of each of 8 rows, so the 128 or 256 bytes of a row that the next
// loads want arrive with the first request instead of as separate ones
#if L2B == 256
#define L2Q ".L2::256B"
#elif L2B == 128
#define L2Q ".L2::128B"
#else
#define L2Q ""
#endif

// W is read once per step: no L1 allocation, read-only path; OFF a byte offset known at compile time
template <int OFF>
__device__ __forceinline__ void load_block(u32* d, const u8* p) {
#if BS == 64
  asm("ld.global.nc.L1::no_allocate" L2Q ".v2.u32 {%0, %1}, [%2+%3];"
      : "=r"(d[0]), "=r"(d[1]) : "l"(p), "n"(OFF));
#else
  asm("ld.global.nc.L1::no_allocate" L2Q ".v4.u32 {%0, %1, %2, %3}, [%4+%5];"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "l"(p), "n"(OFF));
#endif
}

// AHEAD: loop steps ahead whose weights are requested into L2 (0: none), so a warp's loads find them there
// instead of waiting on memory, with no registers held for them. A step's bytes of one row (GROUP * BS / 2:
// 128 or 256, 128-byte aligned) are one or two lines; p is the thread's pointer into the row's step
// (offset t * BS / 8 < 128), so lanes t = 1, 3 take the second line when there is one
#define STEP_BYTES (GROUP * BS / 2)
__device__ __forceinline__ void ahead_l2(const u8* p, int t) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p + (STEP_BYTES > 128 ? (t & 1) * 128 : 0)));
}

// BULK: a row's next BULK loop steps (BULK * STEP_BYTES contiguous bytes) requested into L2 together, a
// piece ahead of the loads (0: none), so that memory serves the row's bytes in one run instead of a 128-byte
// line per step from rows 2 KiB or more apart. The row's four lanes (t) take every fourth line of the piece.
// p: this thread's pointer into the piece's first step (t * BS / 8 past the row's byte); steps: the piece's
__device__ __forceinline__ void piece_l2(const u8* p, int t, u32 steps) {
  const u8* row = p - t * (BS / 8);
  for (u32 line = t; line < steps * (STEP_BYTES / 128); line += 4)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(row + 128 * line));
}

template <int OFF>
__device__ __forceinline__ void load_group(u32 (*d)[WORDS], const u8* p) {
  load_block<OFF>(d[0], p);
  load_block<OFF + BS / 2>(d[1], p);
  load_block<OFF + BS>(d[2], p);
  load_block<OFF + 3 * BS / 2>(d[3], p);
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if F16
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// the code values of byte p (0..3) of a word as a pair, the high nibble's value (the lower k) in the low half,
// by one lookup in this lane's copy of the table. lane: 4 * lane; base: the table's shared-memory address.
// WIDE: one byte permute gives byte p * 256 + 4 * lane, the offset itself (rows of 256 bytes); else the byte
// is picked out, then multiplied by the row's 128 bytes and added to base + 4 * lane.
template <int P>
__device__ __forceinline__ u32 pair(u32 word, u32 lane, u32 base) {
  u32 v;
#if WIDE
  asm("{\n.reg .b32 b;\nprmt.b32 b, %1, %2, %4;\nadd.u32 b, b, %3;\nld.shared.u32 %0, [b];\n}"
      : "=r"(v) : "r"(word), "r"(lane), "r"(base), "n"(0x5504 + 16 * P));
#else
  asm("{\n.reg .b32 b;\nprmt.b32 b, %1, 0, %3;\nmad.lo.u32 b, b, 128, %2;\nld.shared.u32 %0, [b];\n}"
      : "=r"(v) : "r"(word), "r"(base + lane), "n"(0x4440 + P));
#endif
  return v;
}

// the GROUP absmax values of one row as read from memory: their one-byte codes and the second-level scale
// (NESTED), or the values; requested a loop step ahead with the weights, so no step waits on their latency
struct Amax {
#if NESTED
  u32 codes;
  float s;
#else
  float4 v;
#endif
};

__device__ __forceinline__ Amax amax_load(const void* q, const float* absmax2, u32 blk) {
  Amax r;
#if NESTED
  r.codes = *(const u32*)((const u8*)q + blk);
  r.s = absmax2[blk / BS2];
#else
  r.v = *(const float4*)((const float*)q + blk);
#endif
  return r;
}

// the GROUP absmax values of r: c8 the second-level code book, offset the one added to every absmax
__device__ __forceinline__ void absmax4(float* a, const Amax& r, const float* c8, float offset) {
#if NESTED
#pragma unroll
  for (int i = 0; i < GROUP; i++) a[i] = c8[(r.codes >> (8 * i)) & 0xFF] * r.s + offset;
#else
  a[0] = r.v.x; a[1] = r.v.y; a[2] = r.v.z; a[3] = r.v.w;
#endif
}

// (x A^T)[col] . B[row] in fp32: the adapter's term before its scale (LORA_R, the rank, known at compile
// time: all 2 LORA_R loads are in flight at once)
__device__ __forceinline__ float lora_term(const void* xa, const void* lora_b, int col, int row, int stride_xa) {
  float d = 0.0f;
#pragma unroll
  for (int q = 0; q < LORA_R; q++)
    d += adapter_f32(xa, (size_t)col * stride_xa + q) * adapter_f32(lora_b, (size_t)row * LORA_R + q);
  return d;
}

// one weight of a launch and where its rows' outputs go (mma_kernel.py's W4 mirrors this layout)
struct W4 {
  const u8* packed;       // (n, k / 2) packed codes
  const void* absmax_q;   // (n k / BS,) one-byte codes (NESTED) or fp32 values
  const float* code8;     // NESTED: the second-level code book (256,), else the weight's own (unused)
  const float* absmax2;   // NESTED: (n k / BS / BS2,) second-level scales
  const float* offset;    // NESTED: the one offset added to every absmax
  const void* xa;         // LORA: (m, LORA_R) x A^T at row stride stride_xa, ADT
  const void* lora_b;     // LORA: (n, LORA_R) B, ADT
  void* out;              // (m, n) in x's dtype, or (SPLIT, m, n) fp32 partials
  const u16* res;         // RESIDUAL: (m, n)
  float scale;            // LORA: the adapter's scale
  int n;                  // W's rows
  int ctas;               // NG > 1: the blocks along x that take this weight's rows
};

// NG: the weights whose rows follow one another along the grid's x (q, k, v: one launch, three outputs)
#define PICK(f) (sel == 0 ? w0.f : (NG > 2 && sel == 2) ? w2.f : w1.f)

extern "C" __global__ void __launch_bounds__(WARPS * RW * 32)
qfine_mma4(const u16* __restrict__ x, const u32* __restrict__ pairs, int m, int k, int stride_x, int stride_xa,
           W4 w0, W4 w1, W4 w2) {
  // this block's weight (NG > 1: by where blockIdx.x falls among the weights' ranges) and its block along x
  int sel = 0, bx = blockIdx.x;
  if (NG > 1 && bx >= w0.ctas) {
    bx -= w0.ctas;
    sel = 1;
    if (NG > 2 && bx >= w1.ctas) {
      bx -= w1.ctas;
      sel = 2;
    }
  }
#if PDL  // the down-products' kernel after this one may start: it only reads its A until this one is done
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  const u8* __restrict__ packed = PICK(packed);
  const void* __restrict__ absmax_q = PICK(absmax_q);
  const float* __restrict__ code8 = PICK(code8);
  const float* __restrict__ absmax2 = PICK(absmax2);
  const float* __restrict__ offset_p = PICK(offset);
  const void* __restrict__ xa = PICK(xa);
  const void* __restrict__ lora_b = PICK(lora_b);
  void* __restrict__ out = PICK(out);
  const u16* __restrict__ res = PICK(res);
  const float scale = PICK(scale);
  const int n = PICK(n);
  // PAIR: the second weight, whose same rows tile 1 holds
  const u8* __restrict__ packed2 = w1.packed;
  const void* __restrict__ absmax_q2 = w1.absmax_q;
  const float* __restrict__ absmax2_2 = w1.absmax2;
  extern __shared__ u32 smem[];
  u32* lut = smem;                             // [byte][lane]: the byte's pair of code values
  float* c8 = (float*)(smem + LUT_WORDS);      // the second-level code book(s) (double quantization)
  // warp: this warp's k range within its row group rw
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) % WARPS, rw = (threadIdx.x >> 5) / WARPS;
  const int g = lane >> 2, t = lane & 3;
  const u32 nblk = k / BS, per_warp = nblk / (SPLIT * WARPS);
  const u32 blk0 = blockIdx.y * (nblk / SPLIT) + warp * per_warp;
  const int row0 = (bx * RW + rw) * 16 * (PAIR ? 1 : TILES);
  const u32 base = (u32)__cvta_generic_to_shared(lut), lane4 = 4 * lane;

  // this thread's rows (g, g + 8 of each tile; past n: the last row, read but not stored): pointers to its
  // bytes of the warp's first block, and the index of that block's absmax
  // (PAIR: tile 1 holds the same rows of the second weight)
  const u8* wp[TILES][2];
  u32 ablk[TILES][2];
#pragma unroll
  for (int i = 0; i < TILES; i++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const u32 row = min(row0 + (PAIR ? 0 : 16 * i) + g + 8 * h, n - 1);
      wp[i][h] = (PAIR && i ? packed2 : packed) + (size_t)row * (k / 2) + (size_t)blk0 * (BS / 2) + t * (BS / 8);
      ablk[i][h] = row * nblk + blk0;
    }
  const u16* xp[NT];
#pragma unroll
  for (int j = 0; j < NT; j++) xp[j] = x + (size_t)min(8 * j + g, m - 1) * stride_x + (size_t)blk0 * BS + t * (BS / 4);

  // the first step's words are requested before the tables are filled: their latency covers the fill
  // tile i's absmax at block blk (PAIR: tile 1 from the second weight)
  auto tile_amax = [&](int i, u32 blk) {
    return (PAIR && i) ? amax_load(absmax_q2, absmax2_2, blk) : amax_load(absmax_q, absmax2, blk);
  };
  u32 w[TILES][2][GROUP][WORDS];
  Amax am[TILES][2];
#pragma unroll
  for (int i = 0; i < TILES; i++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      load_group<0>(w[i][h], wp[i][h]);
      am[i][h] = tile_amax(i, ablk[i][h]);
#if AHEAD
#pragma unroll
      for (int d = 1; d <= AHEAD; d++)
        if (d * GROUP < per_warp) ahead_l2(wp[i][h] + d * STEP_BYTES, t);
#endif
#if BULK  // the first two pieces
      {
        const u32 steps = per_warp / GROUP;
        piece_l2(wp[i][h], t, min((u32)BULK, steps));
        if (steps > BULK) piece_l2(wp[i][h] + BULK * STEP_BYTES, t, min((u32)BULK, steps - BULK));
      }
#endif
    }

  // the epilogue's inputs (the adapter's scaled term, the residual), read by the writing warp while the
  // weights are on their way, instead of after the loop with nothing else in flight; PDL: after the wait below
  float pre[TILES][NT][4];
  u16 pre_res[TILES][NT][4];
  auto read_epilogue = [&]() {
#pragma unroll
    for (int i = 0; i < TILES; i++)
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          pre[i][j][e] = 0.0f;
          pre_res[i][j][e] = 0;
          const int row = row0 + (PAIR ? 0 : 16 * i) + g + 8 * (e >> 1), col = 8 * j + 2 * t + (e & 1);
          if (warp != 0 || row >= n || col >= m) continue;
#if LORA
          if (blockIdx.y == 0) {
            if (PAIR && i) pre[i][j][e] = lora_term(w1.xa, w1.lora_b, col, row, stride_xa) * w1.scale;
            else pre[i][j][e] = lora_term(xa, lora_b, col, row, stride_xa) * scale;
          }
#endif
#if RESIDUAL && SPLIT == 1
          pre_res[i][j][e] = res[(size_t)col * n + row];
#endif
        }
  };
#if !PDL && !EPI_LATE
  read_epilogue();
#endif

  u32 mine[8];  // pairs[lane + 32 j], handed to the whole warp by shuffles
#pragma unroll
  for (int j = 0; j < 8; j++) mine[j] = pairs[lane + 32 * j];
#pragma unroll
  for (int j = 0; j < 8; j++)
    for (int e = threadIdx.x >> 5; e < 32; e += WARPS * RW)
      lut[((32 * j + e) << ROW_SHIFT) | lane] = __shfl_sync(0xffffffffu, mine[j], e);
#if NESTED
  for (int i = threadIdx.x; i < 256; i += WARPS * RW * 32) c8[i] = code8[i];
  if (PAIR)
    for (int i = threadIdx.x; i < 256; i += WARPS * RW * 32) c8[256 + i] = w1.code8[i];
  const float offset = *offset_p, offset2 = PAIR ? *w1.offset : 0.0f;
#else
  const float offset = 0.0f, offset2 = 0.0f;
#endif
  __syncthreads();
#if PDL  // x, xa and the residual may come from the kernel before this one: read only once it has finished
  asm volatile("griddepcontrol.wait;" ::: "memory");
#if !EPI_LATE
  read_epilogue();
#endif
#endif

  float acc[TILES][NT][4];
#pragma unroll
  for (int i = 0; i < TILES; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

  for (u32 s = 0; s < per_warp; s += GROUP) {
    u32 nxt[TILES][2][GROUP][WORDS];
    Amax amn[TILES][2];
    const bool more = s + GROUP < per_warp;
    if (more) {
#pragma unroll
      for (int i = 0; i < TILES; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          wp[i][h] += STEP_BYTES;
          load_group<0>(nxt[i][h], wp[i][h]);
          amn[i][h] = tile_amax(i, ablk[i][h] + s + GROUP);
#if AHEAD  // the step AHEAD past the one just requested (wp now points at step s / GROUP + 1)
          if (s + (AHEAD + 1) * GROUP < per_warp) ahead_l2(wp[i][h] + AHEAD * STEP_BYTES, t);
#endif
#if BULK  // at the start of piece c >= 1, piece c + 1 (from step s / GROUP + BULK, BULK - 1 past wp's)
          {
            const u32 st = s / GROUP, steps = per_warp / GROUP;
            if (st > 0 && st % BULK == 0 && st + BULK < steps)
              piece_l2(wp[i][h] + (BULK - 1) * STEP_BYTES, t, min((u32)BULK, steps - st - BULK));
          }
#endif
        }
    }
    float amax[TILES][2][GROUP];
#pragma unroll
    for (int i = 0; i < TILES; i++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const bool second = PAIR && i;
        absmax4(amax[i][h], am[i][h], c8 + (second ? 256 : 0), second ? offset2 : offset);
      }
#pragma unroll
    for (int b = 0; b < GROUP; b++) {
      u32 xv[NT][XW];
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int q = 0; q < XW; q += 4) {
          const uint4 v = *(const uint4*)(xp[j] + (s + b) * BS + 2 * q);
          xv[j][q] = v.x; xv[j][q + 1] = v.y; xv[j][q + 2] = v.z; xv[j][q + 3] = v.w;
        }
#pragma unroll
      for (int i = 0; i < TILES; i++) {
        float c[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
          for (int e = 0; e < 4; e++) c[j][e] = 0.0f;
#pragma unroll
        for (int q = 0; q < MMAS; q++) {  // pairs 2q and 2q + 1 of the thread's bytes (byte p: word p / 4)
          const u32 lo = w[i][0][b][q / 2], hi = w[i][1][b][q / 2];
          u32 a0, a1, a2, a3;
          if (q % 2 == 0) {
            a0 = pair<0>(lo, lane4, base); a2 = pair<1>(lo, lane4, base);
            a1 = pair<0>(hi, lane4, base); a3 = pair<1>(hi, lane4, base);
          } else {
            a0 = pair<2>(lo, lane4, base); a2 = pair<3>(lo, lane4, base);
            a1 = pair<2>(hi, lane4, base); a3 = pair<3>(hi, lane4, base);
          }
#pragma unroll
          for (int j = 0; j < NT; j++) mma(c[j], a0, a1, a2, a3, xv[j][2 * q], xv[j][2 * q + 1]);
        }
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
          for (int e = 0; e < 4; e++) acc[i][j][e] += c[j][e] * amax[i][e >> 1][b];
      }
    }
    // past the last step nxt and amn hold nothing, and w and am are not read again: no test needed
#pragma unroll
    for (int i = 0; i < TILES; i++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        am[i][h] = amn[i][h];
#pragma unroll
        for (int b = 0; b < GROUP; b++)
#pragma unroll
          for (int q = 0; q < WORDS; q++) w[i][h][b][q] = nxt[i][h][b][q];
      }
  }

#if WARPS > 1  // a group's k ranges summed in warp order (the table's space is free once all are done)
  __syncthreads();
  float* red = (float*)smem;
  if (warp > 0) {
#pragma unroll
    for (int i = 0; i < TILES; i++)
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
          red[((((rw * WARPS + warp) * TILES + i) * NT + j) * 4 + e) * 32 + lane] = acc[i][j][e];
  }
  __syncthreads();
  if (warp > 0) return;
  for (int v = 1; v < WARPS; v++)
#pragma unroll
    for (int i = 0; i < TILES; i++)
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
          acc[i][j][e] += red[((((rw * WARPS + v) * TILES + i) * NT + j) * 4 + e) * 32 + lane];
#endif

#if EPI_LATE
  read_epilogue();
#endif

  // c[e]: row g + 8 (e >> 1) of the tile, token row 2t + (e & 1) of the token tile
#if PAIR  // act(round(y1)) * round(y2), rounded: the MLP's act_fn(gate(x)) * up(x) computed in fp32 once
#pragma unroll
  for (int j = 0; j < NT; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int row = row0 + g + 8 * (e >> 1), col = 8 * j + 2 * t + (e & 1);
      if (row >= n || col >= m) continue;
      const float y1 = acc[0][j][e] + pre[0][j][e], y2 = acc[1][j][e] + pre[1][j][e];
      const float a = act_to_f32(f32_to_act(y1)), u = act_to_f32(f32_to_act(y2));
      ((u16*)out)[(size_t)col * n + row] = f32_to_act(a / (1.0f + __expf(-a)) * u);
    }
#else
#pragma unroll
  for (int i = 0; i < TILES; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int row = row0 + 16 * i + g + 8 * (e >> 1), col = 8 * j + 2 * t + (e & 1);
        if (row >= n || col >= m) continue;
        const float y = acc[i][j][e] + pre[i][j][e];  // the adapter's term: by the first k range only
        const size_t at = (size_t)col * n + row;
#if SPLIT == 1
        u16 o = f32_to_act(y);
#if RESIDUAL
        o = f32_to_act(act_to_f32(pre_res[i][j][e]) + act_to_f32(o));
#endif
        ((u16*)out)[at] = o;
#else
        ((float*)out)[(size_t)blockIdx.y * m * n + at] = y;
#endif
      }
#endif
}
