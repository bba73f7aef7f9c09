// mma.cuh: warp-level tensor-core primitives (sm_80+), included after common.cuh:
//
//   mma_m16n8k16_bf16_f32(d, a, b, c)   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32:
//                                       D (16x8 f32) = A (16x16 bf16) * B (16x8 bf16) + C, one
//                                       warp; float d[4], const unsigned a[4], const unsigned b[2],
//                                       const float c[4] (d may be c).
//   ldmatrix_x{1,2,4}(r, row)           ldmatrix.sync.aligned.m8n8.x{1,2,4}.shared.b16: 1/2/4 8x8
//   ldmatrix_x{1,2,4}_trans(r, row)     b16 matrices from shared memory, r[i] from matrix i;
//                                       `row` is this lane's row address (lanes 8*i..8*i+7 give
//                                       the 8 rows of matrix i; 16 bytes each, 16-byte aligned).
//   cp_async_4/8/16(dst, src)           cp.async.ca (4, 8) / .cg (16) .shared.global: copy from
//                                       global src to shared dst without passing registers;
//   cp_async_commit()                   cp.async.commit_group;
//   cp_async_wait<N>()                  cp.async.wait_group N: all but the newest N committed
//                                       groups of this thread are complete (then a __syncthreads
//                                       makes them visible to the other threads);
//   cp_async_wait_all()                 cp.async.wait_all (commit, then wait for everything).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "ldmatrix"), with g = lane >> 2 and t = lane % 4; each 32-bit register holds two bf16, the
// lower-indexed element in the low half:
//   A: a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   B: b[0] = B[2t..2t+1][g] (a column pair)         b[1] = B[2t+8..2t+9][g]
//   C, D: c[0], c[1] = C[g][2t], C[g][2t+1]          c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
//   ldmatrix: r[i] = M_i[g][2t..2t+1], with .trans M_i[2t][g] | M_i[2t+1][g] << 16.
// So for a row-major 16x16 A tile in shared memory, ldmatrix_x4 with lane l pointing at
// row l % 16, column (l / 16) * 8 yields a[0..3]; for B stored as B^T (n rows of k, "col" B),
// ldmatrix_x2 with lane l pointing at n = l % 8, k = (l / 8) % 2 * 8 yields b[0..1].
//
// On the device these are inline PTX (shared-memory operands as 32-bit .shared addresses from
// cvta.to.shared). Under the emulated device (TUNA_EMULATE, crates/tuna-kernels/emu) they are
// macros onto emu.cuh's implementations, which pass the call site for error messages and check:
// mma and ldmatrix are warp ops over all 32 lanes (a lane that exited, skipped the op or runs a
// different one is a fault naming the site, never a hang); ldmatrix rows must be 16-byte aligned
// and in shared memory; cp.async operands must be aligned to the size, the destination in shared
// memory; the destination reads as NaN (0xff bytes) from the cp.async until this thread's
// wait_group/wait_all that completes it, so a kernel that skips the wait fails its test. mma sums
// the exact bf16 products in double and rounds once to f32; the device's tensor cores round
// differently internally (undocumented), so results agree to a few ulp, not bitwise.
#pragma once

#ifdef TUNA_EMULATE

#define mma_m16n8k16_bf16_f32(d, a, b, c) ::tuna_emu::mma_m16n8k16_bf16_f32(TUNA_EMU_SITE, (d), (a), (b), (c))
#define ldmatrix_x1(r, row) ::tuna_emu::ldmatrix(TUNA_EMU_SITE, 1, false, (r), (row))
#define ldmatrix_x2(r, row) ::tuna_emu::ldmatrix(TUNA_EMU_SITE, 2, false, (r), (row))
#define ldmatrix_x4(r, row) ::tuna_emu::ldmatrix(TUNA_EMU_SITE, 4, false, (r), (row))
#define ldmatrix_x1_trans(r, row) ::tuna_emu::ldmatrix(TUNA_EMU_SITE, 1, true, (r), (row))
#define ldmatrix_x2_trans(r, row) ::tuna_emu::ldmatrix(TUNA_EMU_SITE, 2, true, (r), (row))
#define ldmatrix_x4_trans(r, row) ::tuna_emu::ldmatrix(TUNA_EMU_SITE, 4, true, (r), (row))
#define cp_async_4(dst, src) ::tuna_emu::cp_async(TUNA_EMU_SITE, (dst), (src), 4, false)
#define cp_async_8(dst, src) ::tuna_emu::cp_async(TUNA_EMU_SITE, (dst), (src), 8, false)
#define cp_async_16(dst, src) ::tuna_emu::cp_async(TUNA_EMU_SITE, (dst), (src), 16, true)
__device__ __forceinline__ void cp_async_commit() { ::tuna_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
    ::tuna_emu::cp_async_wait(N);
}
__device__ __forceinline__ void cp_async_wait_all() { ::tuna_emu::cp_async_wait(-1); }

#else

// The 32-bit .shared address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned tuna_smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// The .global address of a generic pointer into global memory.
__device__ __forceinline__ unsigned long long tuna_gmem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void mma_m16n8k16_bf16_f32(float d[4], const unsigned a[4], const unsigned b[2],
                                                      const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}

__device__ __forceinline__ void ldmatrix_x1(unsigned r[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];"
                 : "=r"(r[0])
                 : "r"(tuna_smem_addr(row))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(unsigned r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(tuna_smem_addr(row))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(tuna_smem_addr(row))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x1_trans(unsigned r[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
                 : "=r"(r[0])
                 : "r"(tuna_smem_addr(row))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(tuna_smem_addr(row))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(tuna_smem_addr(row))
                 : "memory");
}

__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;"
                 :
                 : "r"(tuna_smem_addr(dst)), "l"(tuna_gmem_addr(src))
                 : "memory");
}
__device__ __forceinline__ void cp_async_8(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;"
                 :
                 : "r"(tuna_smem_addr(dst)), "l"(tuna_gmem_addr(src))
                 : "memory");
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                 :
                 : "r"(tuna_smem_addr(dst)), "l"(tuna_gmem_addr(src))
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

#endif
