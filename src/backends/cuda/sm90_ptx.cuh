// PTX wrappers for the Hopper (sm_90a) attention kernel: mbarriers, the
// cp.async completion hook, register reallocation, and the warpgroup matrix
// products (wgmma) with their shared-memory descriptors.
//
// Everything here exists only in the sm_90a device pass
// (__CUDA_ARCH_FEAT_SM90_ALL): wgmma and setmaxnreg are "arch-specific"
// instructions that plain sm_90 and sm_80 cannot assemble, and the kernel in
// attention_sm90.cu uses these helpers only under the same macro.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace moba::backends::cuda::detail::sm90 {

// ---- mbarriers (shared::cta, 64-bit objects) ----

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// One arrival (release semantics at CTA scope: the caller's earlier shared
// memory reads and writes are ordered before the phase completes).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// An arrival that the hardware makes once every cp.async this thread issued
// so far has landed. .noinc: the arrival counts against the barrier's
// expected count (the barrier is initialised with one arrival per producer
// thread), so the thread does not arrive a second time itself.
__device__ __forceinline__ void mbar_arrive_on_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// One test of the phase with the given parity. The thread may be suspended
// in the instruction until the phase completes or suspend_ns nanoseconds
// pass (a hint: the hardware may wake it earlier); without a hint the
// hardware's own window is short (ncu saw a retry every ~200 cycles), so a
// waiting warp kept issuing the retry loop.
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity, uint32_t suspend_ns) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity), "r"(suspend_ns)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

// Ends the launch with an error: `brkpt` assembles to the same SASS
// instruction as `trap` (BPT.TRAP 0x1; checked with cuobjdump, nvcc 13.0),
// so the kernel fails the same way, but ptxas treats it as an ordinary
// instruction that falls through. `trap` is a block terminator, and with a
// trap block in the consumers' code ptxas allocated that code against the
// 168-register cap at entry instead of the consumers' setmaxnreg budget of
// 232 (a toy kernel: up to R229 with brkpt, spills at R182 with trap), which
// is what had made the intra-warpgroup overlap spill and serialise.
__device__ __forceinline__ void hang_trap() {
  asm volatile("brkpt;\n" ::: "memory");
}

// The suspend hint of every wait: CUTLASS's value (10 ms). A suspended warp
// wakes as soon as the phase completes, so the hint only bounds how often a
// long wait comes back to the loop below.
inline constexpr uint32_t kMbarSuspendNs = 10u * 1000 * 1000;

// Blocks until the phase with the given parity has completed. A fresh
// barrier is in phase 0; waiting for parity 1 returns at once (the
// "previous" phase counts as complete), which is how producers start on
// empty buffers. The first test suspends the warp in hardware, so a wait
// costs a handful of issue slots, not a spin. A wait that has not ended
// after 60 s can only be a broken barrier protocol (a stage takes
// microseconds, and far less than a minute even under compute-sanitizer): it
// traps (hang_trap), so the launch fails with an error instead of hanging the process.
// The timer is read only on the slow path and then every 8th retry (if the
// hint were ignored the retries would come back-to-back). No printf: a call
// would serialize the wgmma pipeline. No `trap` either (hang_trap says why).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity, kMbarSuspendNs)) return;
  const uint64_t start = global_timer_ns();
  for (uint32_t retry = 1; !mbar_try_wait(bar, parity, kMbarSuspendNs); ++retry) {
    if ((retry & 7) == 0 && global_timer_ns() - start > 60ull * 1000 * 1000 * 1000) hang_trap();
  }
}

// Shared memory written through the generic proxy (cp.async, st.shared)
// becomes visible to the async proxy (wgmma operand reads) only after a
// proxy fence; the consumer issues it after its barrier wait.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void cp_async_wait_all_issued() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// 16-byte asynchronous global -> shared copy of a chunk that is known to be
// in range: no source-size operand, so no predicate or select per copy (the
// zero-filling form is cp_async16 in common.cuh).
__device__ __forceinline__ void cp_async16_full(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

// ---- register reallocation between warpgroups ----

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- wgmma ----

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most kPending of this warp's committed wgmma groups are
// still in flight (groups complete in commit order).
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  wgmma_wait<0>();
}

// Pins the accumulator registers at this point of the instruction stream:
// the compiler must not move reads or writes of them across the asynchronous
// products (they are written until wgmma.wait_group returns).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
// The same for register A fragments, which an issued wgmma still reads:
// keeps them allocated (not reused for other values) up to this point.
template <int M, int N>
__device__ __forceinline__ void fence_operands(uint32_t (&d)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i) fence_operands(d[i]);
}

// Shared-memory matrix descriptor for the 128-byte swizzle (layout type 1 in
// bits 62-63). Tiles are stored as column blocks of 64 elements: row r of a
// block occupies bytes [128 r, 128 r + 128), its 16-byte chunk c at chunk
// position c ^ (r % 8) (the Swizzle<3,4,3> pattern, which the hardware
// applies to address bits 4-6 from bits 7-9, hence 1024-byte aligned bases).
//   K-major operand (Q, K: the reduction dimension is contiguous): the
//     leading byte offset is unused with this swizzle (encoded 1), the stride
//     byte offset is 1024 (between groups of 8 rows).
//   MN-major operand (V for O += P V, "transposed" B): the leading byte
//     offset is the distance between 64-column blocks, the stride byte offset
//     1024 (between groups of 8 rows of the reduction dimension).
// Start addresses, offsets: bytes >> 4 in 14-bit fields.
//
// Every descriptor here has the same high word (stride 1024, 128-byte
// swizzle), so the kernel keeps only the low word (start address in bits
// 0-13, leading byte offset in bits 16-29) and moves through a tile with
// 32-bit adds on it: shared addresses are below 2^18 (228 KB), so the start
// field (address >> 4) stays below 2^14 and an add never carries into the
// leading byte offset. The wrappers below join the two words inside the asm
// statement; a 64-bit descriptor add cost the consumers ~6 instructions per
// wgmma (add with carry, moves, two R2UR) in the SASS.
inline constexpr uint32_t kDescHi = (1024u >> 4) | (1u << 30);

__device__ __forceinline__ uint32_t make_desc_lo(uint32_t smem_addr, uint32_t leading_bytes) {
  return ((smem_addr & 0x3FFFF) >> 4) | (((leading_bytes & 0x3FFFF) >> 4) << 16);
}

// D(64 x N, fp32) {=, +=} A(64 x 16) B(16 x N); A and B K-major in shared
// memory (descriptor low words). scale_d == 0 overwrites D (the first k-step
// of a product).
template <class T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint32_t desc_a, uint32_t desc_b,
                                         int scale_d);

// D(64 x N, fp32) += A(64 x 16, registers, the m16n8k16 A-fragment layout per
// warp) B(16 x N), B MN-major ("transposed") in shared memory (descriptor
// low word).
template <class T, int N>
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[N / 2], const uint32_t (&a)[4],
                                            uint32_t desc_b);

// The specialisations below are generated (one asm statement each: every
// accumulator register is its own operand, as in CUTLASS's wrappers).
template <>
__device__ __forceinline__ void wgmma_ss<__nv_bfloat16, 128>(float (&d)[64], uint32_t desc_a,
                                                             uint32_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\n"
      "mov.b64 da, {%64, %66};\nmov.b64 db, {%65, %66};\n"
      "setp.ne.b32 p, %67, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, "
      "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
      "%58, %59, "
      "%60, %61, %62, %63"
      "}, da, db, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(desc_a), "r"(desc_b), "n"(kDescHi), "r"(scale_d));
}

template <>
__device__ __forceinline__ void wgmma_ss<__half, 128>(float (&d)[64], uint32_t desc_a,
                                                      uint32_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\n"
      "mov.b64 da, {%64, %66};\nmov.b64 db, {%65, %66};\n"
      "setp.ne.b32 p, %67, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, "
      "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
      "%58, %59, "
      "%60, %61, %62, %63"
      "}, da, db, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(desc_a), "r"(desc_b), "n"(kDescHi), "r"(scale_d));
}

template <>
__device__ __forceinline__ void wgmma_rs_tb<__nv_bfloat16, 64>(float (&d)[32],
                                                               const uint32_t (&a)[4],
                                                               uint32_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\n"
      "mov.b64 db, {%36, %37};\n"
      "setp.ne.b32 p, %38, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, db, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc_b), "n"(kDescHi), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_rs_tb<__nv_bfloat16, 128>(float (&d)[64],
                                                                const uint32_t (&a)[4],
                                                                uint32_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\n"
      "mov.b64 db, {%68, %69};\n"
      "setp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, "
      "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
      "%58, %59, "
      "%60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, db, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc_b), "n"(kDescHi), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_rs_tb<__half, 64>(float (&d)[32], const uint32_t (&a)[4],
                                                        uint32_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\n"
      "mov.b64 db, {%36, %37};\n"
      "setp.ne.b32 p, %38, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, db, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc_b), "n"(kDescHi), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_rs_tb<__half, 128>(float (&d)[64], const uint32_t (&a)[4],
                                                         uint32_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\n"
      "mov.b64 db, {%68, %69};\n"
      "setp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, "
      "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
      "%58, %59, "
      "%60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, db, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc_b), "n"(kDescHi), "r"(1));
}

// D(64 x 64) {=, +=} A B with both operands in shared memory, both K-major
// (kTranspose 0: the backward's S^T = K Q^T and dP^T = V dO^T per 64-key
// warpgroup and 64-row stage) or both MN-major (1: its fused dQ = dS K),
// one asm per input type.
template <int kTranspose>
__device__ __forceinline__ void wgmma_ss_n64_bf16(float (&d)[32], uint32_t desc_a, uint32_t desc_b,
                                                  int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\n"
      "mov.b64 da, {%32, %34};\nmov.b64 db, {%33, %34};\n"
      "setp.ne.b32 p, %35, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, da, db, p, 1, 1, %36, %36;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(desc_a), "r"(desc_b), "n"(kDescHi), "r"(scale_d), "n"(kTranspose));
}

template <int kTranspose>
__device__ __forceinline__ void wgmma_ss_n64_f16(float (&d)[32], uint32_t desc_a, uint32_t desc_b,
                                                 int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\n"
      "mov.b64 da, {%32, %34};\nmov.b64 db, {%33, %34};\n"
      "setp.ne.b32 p, %35, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, da, db, p, 1, 1, %36, %36;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(desc_a), "r"(desc_b), "n"(kDescHi), "r"(scale_d), "n"(kTranspose));
}

template <class T, int kTranspose>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint32_t desc_a, uint32_t desc_b,
                                             int scale_d) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    wgmma_ss_n64_bf16<kTranspose>(d, desc_a, desc_b, scale_d);
  else
    wgmma_ss_n64_f16<kTranspose>(d, desc_a, desc_b, scale_d);
}

template <>
__device__ __forceinline__ void wgmma_ss<__nv_bfloat16, 64>(float (&d)[32], uint32_t desc_a,
                                                            uint32_t desc_b, int scale_d) {
  wgmma_ss_n64<__nv_bfloat16, 0>(d, desc_a, desc_b, scale_d);
}
template <>
__device__ __forceinline__ void wgmma_ss<__half, 64>(float (&d)[32], uint32_t desc_a,
                                                     uint32_t desc_b, int scale_d) {
  wgmma_ss_n64<__half, 0>(d, desc_a, desc_b, scale_d);
}

// A whole product over K = D on 128-byte-swizzled K-major tiles (column
// blocks of 64 elements, rows of 128 bytes): D / 16 k-steps, issued only
// (the caller fences, commits and waits). Within a column block a k-step
// moves the start address by 32 bytes; the next block is a whole column block
// of the tile further (kARows or kBRows rows x 128 bytes). The first k-step
// overwrites d.
template <class T, int N, int D, int kARows, int kBRows>
__device__ __forceinline__ void wgmma_ss_k_major(float (&d)[N / 2], uint32_t desc_a,
                                                 uint32_t desc_b) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint32_t a_off = (ks >> 2) * (kARows * 128) + (ks & 3) * 32;
    const uint32_t b_off = (ks >> 2) * (kBRows * 128) + (ks & 3) * 32;
    wgmma_ss<T, N>(d, desc_a + (a_off >> 4), desc_b + (b_off >> 4), ks > 0 ? 1 : 0);
  }
}

// d += A B over kSteps k-steps of 16: A in registers (m16n8k16 A fragments,
// one per k-step), B an MN-major row-major tile read "transposed" (desc_b's
// leading byte offset the distance between its 64-column blocks); a k-step
// is 16 rows = 2048 bytes. Issued only.
template <class T, int N, int kSteps>
__device__ __forceinline__ void wgmma_rs_tb_steps(float (&d)[N / 2], const uint32_t (&a)[kSteps][4],
                                                  uint32_t desc_b) {
#pragma unroll
  for (int kc = 0; kc < kSteps; ++kc) wgmma_rs_tb<T, N>(d, a[kc], desc_b + ((kc * 16 * 128) >> 4));
}

// D(64 x N, fp32) {=, +=} A(64 x 16) B(16 x N) with both operands MN-major
// ("transposed") in shared memory: the fused dQ = dS K of the backward
// (backward_sm90.cu), dS stored key by key (rows of 64 query rows) and K row
// by row. Descriptors as for the MN-major B above: with M = N = 64 one
// column block each, so only the start address and the stride (1024 bytes
// between groups of 8 rows of the reduction dimension) matter.
template <class T, int N>
__device__ __forceinline__ void wgmma_ss_tt(float (&d)[N / 2], uint32_t desc_a, uint32_t desc_b,
                                            int scale_d) {
  static_assert(N == 64, "only the m64n64 shape is wrapped");
  wgmma_ss_n64<T, 1>(d, desc_a, desc_b, scale_d);
}

// d {=, +=} A B over kSteps k-steps of 16 rows of both MN-major tiles (2048
// bytes each); the first k-step overwrites d. Issued only.
template <class T, int N, int kSteps>
__device__ __forceinline__ void wgmma_ss_tt_steps(float (&d)[N / 2], uint32_t desc_a,
                                                  uint32_t desc_b) {
#pragma unroll
  for (int kc = 0; kc < kSteps; ++kc)
    wgmma_ss_tt<T, N>(d, desc_a + ((kc * 16 * 128) >> 4), desc_b + ((kc * 16 * 128) >> 4),
                      kc > 0 ? 1 : 0);
}

// ---- global reductions ----

// p[0] += x, p[1] += y as one 8-byte reduction in L2 (relaxed, gpu scope; p
// 8-byte aligned); no value comes back, so the thread does not wait for it.
__device__ __forceinline__ void red_add_f32x2(float* p, float x, float y) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
}

}  // namespace moba::backends::cuda::detail::sm90

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
