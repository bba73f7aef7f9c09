// test_kernels.cu: kernels that exercise the emulator itself (tests/emu_core.rs). Compiled into
// the emulator library only (never embedded for NVRTC); every symbol starts with emu_test_.
#include "common.cuh"

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
extern "C" __global__ void emu_test_smem_overrun(u32_t n, float* out) {
    TUNA_DYN_SMEM(float, dyn);
    if (threadIdx.x == 0) out[0] = dyn[n];
}
