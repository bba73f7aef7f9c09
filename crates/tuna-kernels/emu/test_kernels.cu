// test_kernels.cu: kernels that exercise the emulator itself (tests/emu_core.rs). Compiled into
// the emulator library only (never embedded for NVRTC); every symbol starts with emu_test_.
#include "common.cuh"
#include "mma.cuh"

// A parameter struct with padding, to check struct layouts beyond the ops' plain ones.
struct EmuTestParams {
    u8_t a;
    u64_t b;
    u32_t c;
    float d[3];
    bf16_t e;
};

__device__ __forceinline__ u32_t emu_gtid() {
    const u32_t lin = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const u32_t blk = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    return blk * (blockDim.x * blockDim.y * blockDim.z) + lin;
}

// out[12 * gtid ..]: threadIdx, blockIdx, blockDim, gridDim; p's fields echoed by thread 0.
extern "C" __global__ void emu_test_ids(const EmuTestParams p, u32_t* out, float* echo) {
    u32_t* o = out + 12 * (u64_t)emu_gtid();
    o[0] = threadIdx.x, o[1] = threadIdx.y, o[2] = threadIdx.z;
    o[3] = blockIdx.x, o[4] = blockIdx.y, o[5] = blockIdx.z;
    o[6] = blockDim.x, o[7] = blockDim.y, o[8] = blockDim.z;
    o[9] = gridDim.x, o[10] = gridDim.y, o[11] = gridDim.z;
    if (emu_gtid() == 0) {
        echo[0] = p.a, echo[1] = (float)p.b, echo[2] = (float)p.c;
        echo[3] = p.d[0], echo[4] = p.d[1], echo[5] = p.d[2], echo[6] = bf16_to_f32(p.e);
    }
}

// Every warp op, per thread: out[16 * gtid + k].
extern "C" __global__ void emu_test_warp(const int* in, int* out) {
    const u32_t g = emu_gtid();
    const int v = in[g];
    int* o = out + 16 * (u64_t)g;
    const unsigned full = 0xffffffffu;
    o[0] = __shfl_sync(full, v, 3);
    o[1] = __shfl_sync(full, v, 3, 8);
    o[2] = __shfl_xor_sync(full, v, 1);
    o[3] = __shfl_xor_sync(full, v, 5, 4);
    o[4] = __shfl_down_sync(full, v, 1);
    o[5] = __shfl_down_sync(full, v, 2, 8);
    o[6] = __shfl_up_sync(full, v, 2);
    o[7] = __shfl_up_sync(full, v, 1, 16);
    o[8] = (int)__ballot_sync(full, v & 1);
    o[9] = __any_sync(full, v == 7);
    o[10] = __all_sync(full, v >= 0);
    __syncwarp();
    o[11] = (int)__float_as_uint(warp_sum((float)v));
    // even lanes only, with their mask
    if ((threadIdx.x & 1) == 0) o[12] = __shfl_xor_sync(0x55555555u, v, 2);
    else o[12] = -1;
    o[13] = (int)__activemask();
    const double d = __shfl_sync(full, (double)v * 0.5, 31);
    o[14] = (int)(d * 2.0);
    o[15] = (int)__ballot_sync(full, 1);
}

// Atomics from every thread of every block.
extern "C" __global__ void emu_test_atomics(float* facc, int* iacc, unsigned* umax, unsigned long long* ucas) {
    const u32_t g = emu_gtid();
    atomicAdd(facc, 0.5f);
    atomicAdd(iacc, 1);
    atomicMax(umax, g);
    unsigned long long old = *ucas, seen;
    do {
        seen = old;
        old = atomicCAS(ucas, seen, seen + 2ull);
    } while (old != seen);
}

// y[i] = bf16(x[i]) through common.cuh's st(); also the round trip ld(bf16).
extern "C" __global__ void emu_test_bf16(u64_t n, const float* x, bf16_t* y, float* back) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < n; i += (u64_t)gridDim.x * blockDim.x) {
        st(y, i, x[i]);
        back[i] = ld(y, i);
    }
}

// Shared memory: out[0..4] (block 0, thread 0): the first word of static and dynamic shared memory
// before any write (the 0xff poison), and then, per block b, out[4 + b] = the value thread 0 left
// in static shared memory as read by the block's last thread after a barrier (b * 10 + 1: blocks
// do not share static arrays) and out[4 + nblocks + b] = dynamic likewise (b * 10 + 2).
extern "C" __global__ void emu_test_smem(u32_t* out) {
    TUNA_SHARED(u32_t, s, [4]);
    TUNA_DYN_SMEM(u32_t, dyn);
    const u32_t b = blockIdx.x, nb = gridDim.x, last = blockDim.x - 1;
    if (threadIdx.x == 0) {
        if (b == 0) {
            out[0] = s[0];
            out[1] = s[3];
            out[2] = dyn[0];
            out[3] = ((const float*)dyn)[1] != ((const float*)dyn)[1];  // NaN poison
        }
        s[0] = b * 10 + 1;
        dyn[0] = b * 10 + 2;
    }
    __syncthreads();
    if (threadIdx.x == last) {
        out[4 + b] = s[0];
        out[4 + nb + b] = dyn[0];
    }
}

// ---- faults (error 3) ---------------------------------------------------------------------------
// Threads 16.. return before the __syncthreads that threads 0..15 reach.
extern "C" __global__ void emu_test_exit_before_sync(float* out) {
    if (threadIdx.x >= 16) return;
    __syncthreads();
    out[threadIdx.x] = 1.f;
}
// Odd and even threads at two different __syncthreads.
extern "C" __global__ void emu_test_two_syncs(float* out) {
    if (threadIdx.x & 1) {
        __syncthreads();
        out[threadIdx.x] = 1.f;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2.f;
    }
}
// Odd lanes exit, even lanes shuffle with a full mask.
extern "C" __global__ void emu_test_shfl_exited(float* out) {
    if (threadIdx.x & 1) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 2);
}
// In every warp, lanes 0..15 wait at __syncthreads, lanes 16..31 at __syncwarp: a deadlock.
extern "C" __global__ void emu_test_deadlock(float* out) {
    if ((threadIdx.x & 31) < 16) __syncthreads();
    else __syncwarp();
    out[threadIdx.x] = 1.f;
}
// __trap() in one thread of block 1.
extern "C" __global__ void emu_test_trap(float* out) {
    if (blockIdx.x == 1 && threadIdx.x == 5) __trap();
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1.f;
}
// A kernel with __launch_bounds__(64): larger blocks are invalid launches (error 2).
extern "C" __global__ void __launch_bounds__(64) emu_test_bounds(float* out) { out[threadIdx.x] = 1.f; }
// Reads dynamic shared memory one float past its end (only AddressSanitizer sees this; the test
// runs it only when TUNA_EMU_EXPECT_ASAN_ABORT is set, expecting the process to abort).
// (u32_t as in emu_test_smem: NVRTC wants every extern __shared__ `dyn` of a module to agree)
extern "C" __global__ void emu_test_smem_overrun(u32_t n, float* out) {
    TUNA_DYN_SMEM(u32_t, dyn);
    if (threadIdx.x == 0) out[0] = __uint_as_float(dyn[n]);
}

// ---- tensor-core primitives (kernels/mma.cuh) -----------------------------------------------------
// One mma per warp: warp w reads A_w (16x16 bf16, row-major), B_w (16x8 bf16, k x n row-major),
// C_w (16x8 f32), builds its fragments by lane index from the PTX manual's formulas and writes
// D_w = A_w * B_w + C_w (16x8 f32, row-major) back by the accumulator layout.
extern "C" __global__ void emu_test_mma(const bf16_t* a, const bf16_t* b, const float* c, float* d) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    a += w * 256, b += w * 128, c += w * 128, d += w * 128;
    unsigned af[4], bfr[2];
    float cf[4], df[4];
    for (int r = 0; r < 4; ++r) {  // a_{2r}, a_{2r+1}
        const int row = g + (r & 1) * 8, col = t * 2 + (r >> 1) * 8;
        af[r] = (unsigned)a[row * 16 + col] | (unsigned)a[row * 16 + col + 1] << 16;
    }
    for (int r = 0; r < 2; ++r) {  // b_{2r}, b_{2r+1}: rows (k) 2t, 2t+1 (+8), column g
        const int k = t * 2 + r * 8;
        bfr[r] = (unsigned)b[k * 8 + g] | (unsigned)b[(k + 1) * 8 + g] << 16;
    }
    for (int i = 0; i < 4; ++i) cf[i] = c[(g + (i >> 1) * 8) * 8 + t * 2 + (i & 1)];
    mma_m16n8k16_bf16_f32(df, af, bfr, cf);
    for (int i = 0; i < 4; ++i) d[(g + (i >> 1) * 8) * 8 + t * 2 + (i & 1)] = df[i];
}

// ldmatrix, all six variants: src holds four 8x8 bf16 matrices (row-major, 256 values), copied to
// shared memory with a row stride of 24 values (48 bytes) in reverse row order, so every lane's
// address matters. out[(v * 32 + lane) * 4 + i] = register i of variant v (x1, x2, x4, x1.trans,
// x2.trans, x4.trans); registers a variant does not write stay 0xdeadbeef. Lanes beyond 8 * num
// pass a null address (ignored).
extern "C" __global__ void emu_test_ldmatrix(const bf16_t* src, unsigned* out) {
    TUNA_SHARED(bf16_t, s, [32 * 24]);
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) s[(31 - i / 8) * 24 + i % 8] = src[i];
    __syncwarp();
    const bf16_t* row = &s[(31 - lane) * 24];  // row lane % 8 of matrix lane / 8
    for (int v = 0; v < 6; ++v) {
        unsigned r[4] = {0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu};
        const int num = 1 << (v % 3);
        const bf16_t* p = lane < 8 * num ? row : nullptr;
        switch (v) {
            case 0: ldmatrix_x1(r, p); break;
            case 1: ldmatrix_x2(r, p); break;
            case 2: ldmatrix_x4(r, p); break;
            case 3: ldmatrix_x1_trans(r, p); break;
            case 4: ldmatrix_x2_trans(r, p); break;
            default: ldmatrix_x4_trans(r, p); break;
        }
        for (int i = 0; i < 4; ++i) out[(v * 32 + lane) * 4 + i] = r[i];
    }
}

// cp.async, one warp, each lane 16 bytes per group (float s[2][128]; out is float[4][128]):
// mode 0: group 0 = one cp_async_16 into s[0], group 1 = cp_async_8 + 2 x cp_async_4 into s[1];
//   after wait<1>: out[0] = own s[0] (landed), out[1] = own s[1] (pending: NaN); after
//   wait_all and a barrier: out[2], out[3] = the next lane's s[0], s[1].
// mode 1: the classic bug: commit and __syncthreads but no wait; out[0] = own s[0] (NaN).
// mode 2: a misaligned source (faults); mode 3: a destination in global memory (faults).
extern "C" __global__ void emu_test_cp_async(const float* src, float* out, int mode) {
    TUNA_SHARED(float, s, [2][128]);
    const int lane = threadIdx.x, o = lane * 4, n = ((lane + 1) & 31) * 4;
    if (mode == 2) cp_async_16(&s[0][o], src + o + 1);
    if (mode == 3) cp_async_16(out + o, src + o);
    cp_async_16(&s[0][o], src + o);
    cp_async_commit();
    if (mode == 1) {
        __syncthreads();
        for (int i = 0; i < 4; ++i) out[o + i] = s[0][o + i];
        return;
    }
    cp_async_8(&s[1][o], src + 128 + o);
    cp_async_4(&s[1][o + 2], src + 128 + o + 2);
    cp_async_4(&s[1][o + 3], src + 128 + o + 3);
    cp_async_commit();
    cp_async_wait<1>();
    for (int i = 0; i < 4; ++i) out[o + i] = s[0][o + i], out[128 + o + i] = s[1][o + i];
    cp_async_wait_all();
    __syncthreads();
    for (int i = 0; i < 4; ++i) out[256 + o + i] = s[0][n + i], out[384 + o + i] = s[1][n + i];
}

// Misuse of the warp-collective ops (faults). mode 0: lane 5 returns before the mma; mode 1: odd
// lanes reach a different mma call site; mode 2: lanes 16.. wait at __syncthreads instead (a
// deadlock); mode 3: lane 3's ldmatrix row is 2 bytes off; mode 4: lane 9's row is in global
// memory (x2: lanes 0..15 give rows).
extern "C" __global__ void emu_test_mma_misuse(int mode, float* out) {
    TUNA_SHARED(bf16_t, s, [16 * 8]);
    const int lane = threadIdx.x & 31;
    if (mode >= 3) {
        for (int i = lane; i < 128; i += 32) s[i] = f32_to_bf16(1.f);
        __syncwarp();
    }
    unsigned a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u}, b[2] = {0x3f803f80u, 0x3f803f80u}, r[4];
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    if (mode == 0) {
        if (lane == 5) return;
        mma_m16n8k16_bf16_f32(d, a, b, d);
    } else if (mode == 1) {
        if (lane & 1) mma_m16n8k16_bf16_f32(d, a, b, d);
        else mma_m16n8k16_bf16_f32(d, a, b, d);
    } else if (mode == 2) {
        if (lane >= 16) __syncthreads();
        else mma_m16n8k16_bf16_f32(d, a, b, d);
    } else if (mode == 3) {
        ldmatrix_x4(r, (const char*)&s[(lane & 15) * 8] + (lane == 3 ? 2 : 0));
        d[0] = (float)r[0];
    } else {
        ldmatrix_x2(r, lane == 9 ? (const void*)out : (const void*)&s[(lane & 15) * 8]);
        d[0] = (float)r[0];
    }
    out[threadIdx.x] = d[0];
}
