// The 4-bit decode kernel's own LoRA down-products (FD; see mma4.cu): struct Down and the two steps that
// post the partials (down_prologue) and add them (down_sum). Placed after mma4_base.cu, before mma4.cu.

// FD: the launch's own adapter down-products for one token row (mma_kernel.py's Down mirrors this layout).
// The first parts blocks to start (by a ticket: never a block still waiting for a free SM) each take k / parts
// of k and write the fp32 partial products of every adapter's rows there; every block waits for them all
// after (or half-way through) its loop, by then long posted, and adds them in a fixed order, so no second
// launch and no kernel boundary sits between x and the products that read it. sync: three counters, zero
// between launches (the last block out resets them)
struct Down {
  const void* a0;         // (LORA_R, k) A of weight 0, ADT
  const void* a1;         // of weight 1 (PAIR: up; NG > 1)
  const void* a2;         // of weight 2 (NG 3)
  const void* norm_w;     // NORM: (k,) the RMSNorm's weight, fp32 (NW32) or x's dtype
  float* part;            // (parts, NA * LORA_R) fp32 partials
  u32* sync;              // [0]: partials posted, [1]: blocks done reading them, [2]: tickets taken
  float eps;              // NORM: the RMSNorm's epsilon
  int parts;              // blocks that write partials; divides k
};

__device__ __forceinline__ const void* down_a(const Down& d, int i) { return i == 0 ? d.a0 : i == 1 ? d.a1 : d.a2; }

// an fp32 sum rounded to the adapter's dtype, as x A^T is when computed in that dtype (peft's lora_A)
__device__ __forceinline__ float adt_round(float f) {
#if ADT == 0
  return f;
#elif ADT == 1
  u16 v;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
  return __uint_as_float(((u32)v) << 16);
#else
  u16 v;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v));
  return r;
#endif
}

__device__ __forceinline__ float warp_sum(float v) {  // lanes' values added in a fixed tree order
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// (xa_s . B)[row]: the adapter's term before its scale, from the down-product this launch summed (fp32)
__device__ __forceinline__ float lora_term_s(const float* xa_s, const void* lora_b, int row) {
  float d = 0.0f;
#pragma unroll
  for (int q = 0; q < LORA_R; q++) d += xa_s[q] * adapter_f32(lora_b, (size_t)row * LORA_R + q);
  return d;
}

#define NTHR (WARPS * RW * 32)

__device__ __forceinline__ float norm_weight(const void* w, int i) {
#if NW32
  return ((const float*)w)[i];
#else
  return act_to_f32(((const u16*)w)[i]);
#endif
}

// FD, after the wait for the kernel before: NORM: x's row (one token) normalised into xs as Llama's RMSNorm
// rounds it, w * round(x * rstd) with rstd = 1 / sqrt(mean(x^2) + eps) in fp32 (every block computes it
// alike); then, in the blocks with tickets 0 .. parts - 1, the fp32 partial products of k slice <ticket> of
// the row with every adapter's rows (warps taking rows in turn, lanes along k), posted to dn.part and
// counted in dn.sync[0]. slot: a shared int for the ticket
__device__ __forceinline__ void down_prologue(const u16* x, int k, const Down& dn, u16* xs, float* scratch,
                                              int* slot, int lane) {
  const int tid = threadIdx.x;
  if (tid == 0) *slot = (int)atomicAdd(dn.sync + 2, 1u);  // its latency is covered by the norm's loads
#if NORM  // 8 values a load (rows are 16-byte aligned, k a multiple of 32): all of a thread's loads in flight
  const uint4* xv = (const uint4*)x;
  float ss = 0.0f;
  for (int i = tid; i < k / 8; i += NTHR) {
    const uint4 v = xv[i];
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const float f = act_to_f32((u16)(w[j / 2] >> (16 * (j % 2))));
      ss += f * f;
    }
  }
  ss = warp_sum(ss);
  if (lane == 0) scratch[tid >> 5] = ss;
  __syncthreads();
  float total = 0.0f;
  for (int v = 0; v < NTHR / 32; v++) total += scratch[v];
  const float rstd = rsqrtf(total / k + dn.eps);
  for (int i = tid; i < k / 8; i += NTHR) {
    const uint4 v = xv[i];
    const u32 w[4] = {v.x, v.y, v.z, v.w};
    u32 o[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float lo = act_to_f32((u16)(w[j] & 0xFFFF)), hi = act_to_f32((u16)(w[j] >> 16));
      const u16 a = f32_to_act(norm_weight(dn.norm_w, 8 * i + 2 * j) * act_to_f32(f32_to_act(lo * rstd)));
      const u16 b = f32_to_act(norm_weight(dn.norm_w, 8 * i + 2 * j + 1) * act_to_f32(f32_to_act(hi * rstd)));
      o[j] = (u32)a | ((u32)b << 16);
    }
    ((uint4*)xs)[i] = make_uint4(o[0], o[1], o[2], o[3]);
  }
  __syncthreads();
  const u16* src = xs;
#else
  const u16* src = x;
#endif
  __syncthreads();
  const int ticket = *slot;
  if (ticket >= dn.parts) return;
  const int chunk = k / dn.parts, k0 = ticket * chunk;
  for (int item = tid >> 5; item < NA * LORA_R; item += NTHR / 32) {
    const void* a = down_a(dn, item / LORA_R);
    const size_t at = (size_t)(item % LORA_R) * k + k0;
    float d = 0.0f;
    for (int i = lane; i < chunk; i += 32) d += adapter_f32(a, at + i) * act_to_f32(src[k0 + i]);
    d = warp_sum(d);
    if (lane == 0) dn.part[(size_t)ticket * (NA * LORA_R) + item] = d;
  }
  __threadfence();  // each writer's partials visible GPU-wide before the block counts itself
  __syncthreads();
  if (tid == 0) atomicAdd(dn.sync, 1u);
}

// FD, after the loop: waits until every partial is posted, then xa_s[0 .. items) = the sums over the parts
// of items first .. first + items of the partials (PAIR: both adapters; else this block's weight's), in a
// fixed order (a strided run per thread, then the runs in order), rounded to the adapter's dtype. The last
// block to finish reading resets dn.sync for the next launch
__device__ __forceinline__ void down_sum(const Down& dn, float* xa_s, float* scratch, int first) {
  const int tid = threadIdx.x, items = PAIR ? 2 * LORA_R : LORA_R;
  const int runs = NTHR >= items ? NTHR / items : 1;
  if (tid == 0) {  // bounded: a launch that never posts (a fault) ends in an error, not a hung GPU
    u32 seen, tries = 0;
    for (;;) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(dn.sync) : "memory");
      if (seen >= (u32)dn.parts) break;
      if (++tries == (1u << 24)) asm volatile("trap;");
      __nanosleep(32);
    }
  }
  __syncthreads();
  for (int u = tid; u < items * runs; u += NTHR) {
    const int item = u % items, run = u / items;
    float s = 0.0f;
    for (int p = run; p < dn.parts; p += runs) s += __ldcg(dn.part + (size_t)p * (NA * LORA_R) + first + item);
    scratch[u] = s;
  }
  __syncthreads();
  for (int item = tid; item < items; item += NTHR) {
    float s = 0.0f;
    for (int run = 0; run < runs; run++) s += scratch[run * items + item];
    xa_s[item] = adt_round(s);
  }
  __syncthreads();
  if (tid == 0 && atomicAdd(dn.sync + 1, 1u) == gridDim.x * gridDim.y - 1) {
    dn.sync[0] = 0;
    dn.sync[1] = 0;
    dn.sync[2] = 0;
  }
}
