// mma_gemm.cu: a tensor-core bf16 GEMM, C = A * B^T, built from kernels/mma.cuh's primitives:
// cp.async into double-buffered shared memory, ldmatrix fragments, mma.sync m16n8k16 with f32
// accumulators. It is the reference use of those primitives (checked against the CPU on the
// emulated device by tests/emu_core.rs, and compiled by NVRTC/ptxas with every kernel, which
// checks mma.cuh's PTX).
#include "common.cuh"
#include "mma.cuh"

// Block tile 64x64 of C, K in chunks of 32; 4 warps in a 2x2 grid, each 32x32 of C (2 x 4 mma
// tiles of 16x8). Shared rows are padded to 40 bf16 (80 bytes: 16-byte aligned, and ldmatrix's
// 8 row addresses fall into different bank groups).
#define MMA_GEMM_BM 64
#define MMA_GEMM_BN 64
#define MMA_GEMM_BK 32
#define MMA_GEMM_LD 40

// Both operands' double buffers in one 16-byte-aligned object (cp.async.cg and ldmatrix need
// 16-byte-aligned addresses; a plain bf16 array only promises 2).
struct alignas(16) MmaGemmSmem {
    bf16_t a[2][MMA_GEMM_BM][MMA_GEMM_LD];
    bf16_t b[2][MMA_GEMM_BN][MMA_GEMM_LD];
};

// One chunk: 64 rows x 32 bf16 of A (rows m0..) and of B (rows n0..), 16-byte copies, 2+2 per
// thread.
__device__ __forceinline__ void mma_gemm_load(bf16_t (*as)[MMA_GEMM_LD], bf16_t (*bs)[MMA_GEMM_LD], const bf16_t* a,
                                              const bf16_t* b, int k, int m0, int n0, int k0) {
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int idx = threadIdx.x + i * 128, row = idx >> 2, seg = (idx & 3) * 8;
        cp_async_16(&as[row][seg], a + (long long)(m0 + row) * k + k0 + seg);
        cp_async_16(&bs[row][seg], b + (long long)(n0 + row) * k + k0 + seg);
    }
}

// c[m][n] = sum_k a[m][k] * b[n][k] (f32): a is m x k, b is n x k, both row-major bf16, c is m x n
// row-major f32. Grid (n / 64, m / 64), block 128. m and n must be multiples of 64, k of 32, a and
// b 16-byte aligned, and the grid no larger than the matrices (anything else traps).
extern "C" __global__ void __launch_bounds__(128)
    mma_gemm_bf16_nt(const bf16_t* a, const bf16_t* b, float* c, int m, int n, int k) {
    TUNA_SHARED(MmaGemmSmem, sm, [1]);
    bf16_t(*as)[MMA_GEMM_BM][MMA_GEMM_LD] = sm[0].a;
    bf16_t(*bs)[MMA_GEMM_BN][MMA_GEMM_LD] = sm[0].b;
    if (m % MMA_GEMM_BM || n % MMA_GEMM_BN || k % MMA_GEMM_BK || ((unsigned long long)a | (unsigned long long)b) % 16 ||
        blockDim.x != 128 || blockDim.y != 1 || blockDim.z != 1 || gridDim.x * MMA_GEMM_BN > (unsigned)n ||
        gridDim.y * MMA_GEMM_BM > (unsigned)m || gridDim.z != 1)
        __trap();
    const int m0 = blockIdx.y * MMA_GEMM_BM, n0 = blockIdx.x * MMA_GEMM_BN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    float acc[2][4][4];
    #pragma unroll
    for (int i = 0; i < 2; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

    const int chunks = k / MMA_GEMM_BK;
    mma_gemm_load(as[0], bs[0], a, b, k, m0, n0, 0);
    cp_async_commit();
    for (int ch = 0; ch < chunks; ++ch) {
        const int buf = ch & 1;
        if (ch + 1 < chunks) {
            // the other buffer was last read in iteration ch-1, before its closing barrier
            mma_gemm_load(as[buf ^ 1], bs[buf ^ 1], a, b, k, m0, n0, (ch + 1) * MMA_GEMM_BK);
            cp_async_commit();
            cp_async_wait<1>();  // chunk ch has landed, ch+1 may still be in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // every thread's copies of chunk ch are visible
        #pragma unroll
        for (int kk = 0; kk < MMA_GEMM_BK; kk += 16) {
            unsigned af[2][4], bfr[4][2];
            #pragma unroll
            for (int i = 0; i < 2; ++i)  // A 16x16: lane -> row lane % 16, col (lane / 16) * 8
                ldmatrix_x4(af[i], &as[buf][wm + i * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
            #pragma unroll
            for (int j = 0; j < 4; j += 2) {  // two n8 x k16 B tiles: lanes 0-15 tile j, 16-31 tile j+1
                unsigned r[4];
                ldmatrix_x4(r, &bs[buf][wn + j * 8 + (lane >> 4) * 8 + (lane & 7)][kk + ((lane >> 3) & 1) * 8]);
                bfr[j][0] = r[0], bfr[j][1] = r[1], bfr[j + 1][0] = r[2], bfr[j + 1][1] = r[3];
            }
            #pragma unroll
            for (int i = 0; i < 2; ++i)
                #pragma unroll
                for (int j = 0; j < 4; ++j) mma_m16n8k16_bf16_f32(acc[i][j], af[i], bfr[j], acc[i][j]);
        }
        __syncthreads();  // done reading buf before iteration ch+1 refills it
    }
    const int g = lane >> 2, t = lane & 3;
    #pragma unroll
    for (int i = 0; i < 2; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = m0 + wm + i * 16 + g + (r >> 1) * 8, col = n0 + wn + j * 8 + t * 2 + (r & 1);
                c[(long long)row * n + col] = acc[i][j][r];
            }
}
