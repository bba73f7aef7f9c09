// CPU shim of kernels/common.cuh for dev/attention_emu: one std::thread per CUDA thread.
#pragma once
#include <cmath>
#include <cstring>
#include <cstdint>
#include <barrier>
#include <atomic>
#include <algorithm>
typedef unsigned short bf16_t; typedef unsigned char u8_t; typedef unsigned int u32_t; typedef unsigned long long u64_t;
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
struct dim3_ { unsigned x, y, z; };
extern thread_local dim3_ threadIdx, blockIdx;
extern dim3_ blockDim, gridDim;
extern float* g_smem;
extern std::barrier<>* g_block_bar;
extern std::barrier<>* g_warp_bar[32];
extern float g_shfl[32][32];
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
#define TUNA_INF __int_as_float(0x7f800000)
#define TUNA_NEG_INF __int_as_float(0xff800000)
inline float bf16_to_f32(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }
inline bf16_t f32_to_bf16(float f) { unsigned u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (bf16_t)(u >> 16); }
inline float ld(const float* p, long long i) { return p[i]; }
inline float ld(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
inline void st(float* p, long long i, float v) { p[i] = v; }
inline void st(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(v); }
inline void acc(float* p, long long i, float v) { p[i] += v; }
inline void acc(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(bf16_to_f32(p[i]) + v); }
using std::min; using std::max;
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline float shfl_from(float v, int src) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    g_shfl[w][l] = v; g_warp_bar[w]->arrive_and_wait();
    float r = g_shfl[w][src]; g_warp_bar[w]->arrive_and_wait(); return r;
}
inline float __shfl_sync(unsigned, float v, int src) { return shfl_from(v, src); }
inline float __shfl_xor_sync(unsigned, float v, int o) { return shfl_from(v, (threadIdx.x & 31) ^ o); }
inline void atomicAdd(float* p, float v) { std::atomic_ref<float>(*p).fetch_add(v); }
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
