// common.cuh: shared definitions for every tuna kernel.
// No CUDA headers are included (NVRTC 13.0 would need cuda_bf16.h on its include path and has
// no <stdint.h>): bf16 is a raw 16-bit type converted with PTX instructions (sm_80+).
// Built with TUNA_EMULATE (the emulated device, crates/tuna-kernels/emu/emu.cuh), the same
// sources compile as host C++: emu.cuh defines the shared-memory macros and the bf16 rounding.
#pragma once

#ifndef TUNA_EMULATE
// Shared memory, spelled as macros so that the emulator can give each block its own copy:
// TUNA_SHARED(float, s, [8][33]) is `__shared__ float s[8][33]`, TUNA_DYN_SMEM(float, smem) is
// `extern __shared__ float smem[]` (the launch's dynamic shared memory).
#define TUNA_SHARED(T, name, dims) __shared__ T name dims
#define TUNA_DYN_SMEM(T, name) extern __shared__ T name[]
#endif

typedef unsigned short bf16_t;
typedef unsigned char u8_t;
typedef unsigned int u32_t;
typedef unsigned long long u64_t;

#define TUNA_INF __int_as_float(0x7f800000)
#define TUNA_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
#ifdef TUNA_EMULATE
    return tuna_emu_f32_to_bf16_rn(f);  // bit-exact cvt.rn.bf16.f32
#else
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#endif
}

// load/store of element types as f32: `ld(p, i)` and `st(p, i, v)` are overloaded per type, so
// one kernel template serves both dtypes and the macros below only emit the extern "C" symbols.
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(v); }
// accumulate into a gradient buffer (`+=`, as every backward does)
__device__ __forceinline__ void acc(float* p, long long i, float v) { p[i] += v; }
__device__ __forceinline__ void acc(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(bf16_to_f32(p[i]) + v); }

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32 floats.
// Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : TUNA_NEG_INF;
    return warp_max(v);
}
