// Device helpers of the 4-bit decode kernel (mma4.cu): types, conversions, how the weights and absmax
// values are read, the adapter's term, and W4. mma_kernel.py's _source puts this first, then mma4_down.cu,
// then mma4.cu, after the #defines of a setting.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define GROUP 4              // absmax blocks per loop step (their 4 one-byte absmax codes: one 32-bit load)
// many token tiles: the epilogue's inputs read after the loop, not held through it; FD: the adapter's x A^T
// is known once the loop is done, or (FD_MID) half-way through it
#define EPI_LATE (NT > 2 || (FD && !FD_MID))
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
