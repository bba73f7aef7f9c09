// emu.cuh: the CUDA device environment for host C++ (the EMULATED CUDA DEVICE, cargo feature
// `emulator`). build.rs compiles every kernels/*.cu as host C++ with this header first:
//
//   #include "emu.cuh"
//   namespace tuna_emu_mod_<stem> {      // each .cu keeps its own namespace, as NVRTC modules
//   #include "<stem>.cu"                  // are separate: same-named helpers never collide
//   }
//
// and registers every `extern "C" __global__` function with the runtime (emu.cpp), which runs
// a launch's blocks one after another (or on TUNA_EMU_THREADS workers), each CUDA thread of a
// block as a user-space fiber. Barriers (__syncthreads, warp ops) switch fibers; see emu.cpp.
//
// What this header maps:
// - keywords: __global__, __device__, __host__, __forceinline__, __launch_bounds__(...),
//   __constant__ (empty or `inline`); __restrict__ is a GNU C++ keyword already; `#pragma unroll`
//   is ignored (-Wno-unknown-pragmas).
// - threadIdx, blockIdx, blockDim, gridDim (per fiber, read-only), warpSize.
// - __syncthreads, __syncwarp, __shfl{,_xor,_down,_up}_sync, __ballot_sync, __any_sync,
//   __all_sync, __activemask: each call site passes its file:line for error messages.
// - the tensor-core primitives of kernels/mma.cuh (mma.sync m16n8k16 bf16, ldmatrix, cp.async):
//   mma and ldmatrix are warp ops over the full warp, cp.async a per-thread queue (emu.cpp).
// - shared memory: TUNA_SHARED(T, name, dims) (a static __shared__ array, one fresh allocation per
//   block) and TUNA_DYN_SMEM(T, name) (extern __shared__ T name[]: the launch's dyn_smem bytes,
//   one fresh allocation per block); both are filled with 0xFF bytes (NaN floats) at block start.
//   common.cuh defines both macros for NVCC/NVRTC.
// - atomics (relaxed std::atomic_ref: correct with blocks on several OS threads), bit casts,
//   fast-math intrinsics (as the precise libm function), min/max, bf16 rounding (below).
//
// Floating point is the host's: no FMA contraction (NVCC/NVRTC contract a*b+c by default) and
// glibc's libm instead of CUDA's, so results match the device to a few ulp, not bitwise.
#pragma once

#ifndef TUNA_EMULATE
#define TUNA_EMULATE 1
#endif

#include <math.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

// ---- keywords -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __managed__

#define TUNA_EMU_STR2(x) #x
#define TUNA_EMU_STR(x) TUNA_EMU_STR2(x)
#ifdef __FILE_NAME__
#define TUNA_EMU_SITE (__FILE_NAME__ ":" TUNA_EMU_STR(__LINE__))
#else
#define TUNA_EMU_SITE (__FILE__ ":" TUNA_EMU_STR(__LINE__))
#endif

namespace tuna_emu {

// ---- per-fiber state (the runtime's Thread/Block extend these) -------------------------------
struct Dim3 {
    unsigned x, y, z;
};
struct BlockCtx {
    Dim3 bid, bdim, gdim;
};
struct ThreadCtx {
    Dim3 tid;
    BlockCtx* blk;
    unsigned lin;   // x + bdim.x * (y + bdim.y * z)
    unsigned lane;  // lin % 32
};
// The fiber running on this OS thread (fibers never move between OS threads).
extern __thread ThreadCtx* cur;

// ---- runtime entry points (emu.cpp) ----------------------------------------------------------
enum WarpOpKind : int {
    OP_SHFL_IDX = 1,
    OP_SHFL_XOR,
    OP_SHFL_DOWN,
    OP_SHFL_UP,
    OP_BALLOT,
    OP_ANY,
    OP_ALL,
    OP_SYNCWARP,
    // warp-collective matrix ops (kernels/mma.cuh): the value is a pointer to the lane's own
    // MmaIo/LdmatrixIo (on its fiber stack, alive while it waits); the lane completing the op
    // computes every lane's outputs in place.
    OP_MMA_BF16,
    OP_LDMATRIX,
};
void syncthreads(const char* site);
// Joins the warp op `kind` over `mask` with this lane's value and parameter (source lane, lane
// mask or delta; width); returns this lane's result once every lane of mask has joined.
uint64_t warp_op(const char* site, int kind, unsigned mask, uint64_t v, unsigned param, unsigned width);
// A fault inside a kernel (error 3): never returns to the kernel.
[[noreturn]] void fault(const char* site, const char* what);
void* dyn_smem();
void* static_smem(const void* tag, size_t bytes, size_t align, const char* name, const char* site);

template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp ops move at most 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
inline T from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}
inline unsigned checked_width(const char* site, int w) {
    if (w < 1 || w > 32 || (w & (w - 1)) != 0) fault(site, "shuffle width must be a power of two <= 32");
    return unsigned(w);
}

template <class T>
inline T shfl_idx(const char* site, unsigned mask, T v, int src, int width = 32) {
    return from_bits<T>(warp_op(site, OP_SHFL_IDX, mask, to_bits(v), unsigned(src), checked_width(site, width)));
}
template <class T>
inline T shfl_xor(const char* site, unsigned mask, T v, int lane_mask, int width = 32) {
    return from_bits<T>(warp_op(site, OP_SHFL_XOR, mask, to_bits(v), unsigned(lane_mask), checked_width(site, width)));
}
template <class T>
inline T shfl_down(const char* site, unsigned mask, T v, unsigned delta, int width = 32) {
    return from_bits<T>(warp_op(site, OP_SHFL_DOWN, mask, to_bits(v), delta, checked_width(site, width)));
}
template <class T>
inline T shfl_up(const char* site, unsigned mask, T v, unsigned delta, int width = 32) {
    return from_bits<T>(warp_op(site, OP_SHFL_UP, mask, to_bits(v), delta, checked_width(site, width)));
}
inline unsigned ballot(const char* site, unsigned mask, int pred) {
    return unsigned(warp_op(site, OP_BALLOT, mask, pred != 0, 0, 32));
}
inline int any(const char* site, unsigned mask, int pred) { return int(warp_op(site, OP_ANY, mask, pred != 0, 0, 32)); }
inline int all(const char* site, unsigned mask, int pred) { return int(warp_op(site, OP_ALL, mask, pred != 0, 0, 32)); }
inline void syncwarp(const char* site, unsigned mask = 0xffffffffu) { (void)warp_op(site, OP_SYNCWARP, mask, 0, 0, 32); }
unsigned activemask();

// ---- tensor-core primitives (kernels/mma.cuh maps the device spellings onto these) -------------
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}
// .shared.b16 and cp.async.{ca,cg}.shared.global; semantics and checks in emu.cpp.
struct MmaIo {
    uint32_t a[4], b[2];
    float c[4], d[4];
};
struct LdmatrixIo {
    const void* row;  // this lane's row address (used by lanes 0..8*num-1)
    uint32_t r[4];
};
inline void mma_m16n8k16_bf16_f32(const char* site, float* d, const unsigned* a, const unsigned* b, const float* c) {
    MmaIo io;
    for (int i = 0; i < 4; ++i) io.a[i] = a[i], io.c[i] = c[i];
    io.b[0] = b[0], io.b[1] = b[1];
    (void)warp_op(site, OP_MMA_BF16, 0xffffffffu, reinterpret_cast<uintptr_t>(&io), 0, 32);
    for (int i = 0; i < 4; ++i) d[i] = io.d[i];  // after reading c: d may be c
}
inline void ldmatrix(const char* site, unsigned num, bool trans, unsigned* r, const void* row) {
    LdmatrixIo io;
    io.row = row;
    (void)warp_op(site, OP_LDMATRIX, 0xffffffffu, reinterpret_cast<uintptr_t>(&io), num | (trans ? 16u : 0u), 32);
    for (unsigned i = 0; i < num; ++i) r[i] = io.r[i];
}
// cp.async of `bytes` (4, 8 or 16; `cg`: the .cg variant, 16 only) from global `src` to shared
// `dst`; commit_group; wait_group(n) (n < 0: wait_all, i.e. commit + wait_group 0).
void cp_async(const char* site, void* dst, const void* src, unsigned bytes, bool cg);
void cp_async_commit();
void cp_async_wait(int n);

// Storage of a static __shared__ array: one per block and declaration (keyed by `tag`).
template <class A>
inline A& shared_array(const void* tag, const char* name, const char* site) {
    return *static_cast<A*>(static_smem(tag, sizeof(A), alignof(A), name, site));
}

}  // namespace tuna_emu

// ---- CUDA built-ins ---------------------------------------------------------------------------
#define threadIdx (static_cast<const ::tuna_emu::Dim3&>(::tuna_emu::cur->tid))
#define blockIdx (static_cast<const ::tuna_emu::Dim3&>(::tuna_emu::cur->blk->bid))
#define blockDim (static_cast<const ::tuna_emu::Dim3&>(::tuna_emu::cur->blk->bdim))
#define gridDim (static_cast<const ::tuna_emu::Dim3&>(::tuna_emu::cur->blk->gdim))
#define warpSize 32

#define __syncthreads() ::tuna_emu::syncthreads(TUNA_EMU_SITE)
#define __syncwarp(...) ::tuna_emu::syncwarp(TUNA_EMU_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::tuna_emu::shfl_idx(TUNA_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::tuna_emu::shfl_xor(TUNA_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::tuna_emu::shfl_down(TUNA_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::tuna_emu::shfl_up(TUNA_EMU_SITE, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::tuna_emu::ballot(TUNA_EMU_SITE, (mask), (pred))
#define __any_sync(mask, pred) ::tuna_emu::any(TUNA_EMU_SITE, (mask), (pred))
#define __all_sync(mask, pred) ::tuna_emu::all(TUNA_EMU_SITE, (mask), (pred))
#define __activemask() ::tuna_emu::activemask()
#define __trap() ::tuna_emu::fault(TUNA_EMU_SITE, "__trap()")
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define __threadfence_block() std::atomic_thread_fence(std::memory_order_seq_cst)

// Shared memory (see common.cuh for the device definitions). The tag's address identifies the
// declaration (one per function, or per template instance, as a static __shared__ is).
#define TUNA_SHARED(T, name, dims)                                                                    \
    static char name##_tuna_emu_tag;                                                                 \
    T(&name) dims = ::tuna_emu::shared_array<T dims>(&name##_tuna_emu_tag, #name, TUNA_EMU_SITE)
#define TUNA_DYN_SMEM(T, name) T* const name = static_cast<T*>(::tuna_emu::dyn_smem())

// ---- bit casts and intrinsics -----------------------------------------------------------------
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline double __longlong_as_double(long long i) { return std::bit_cast<double>(i); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }

// fast-math intrinsics: the precise function (the device's approximations differ by a few ulp)
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x != x ? 0.f : (x < 0.f ? 0.f : (x > 1.f ? 1.f : x)); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
template <class T>
inline T __ldg(const T* p) {
    return *p;
}

// CUDA's min/max: any mix of arithmetic types, in their common type; fminf/fmaxf semantics
// (a NaN operand is ignored) for floating point.
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) return std::fmin((C)a, (C)b);
    else return (C)a < (C)b ? (C)a : (C)b;
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) return std::fmax((C)a, (C)b);
    else return (C)a < (C)b ? (C)b : (C)a;
}

// ---- atomics: relaxed, as CUDA's (return the old value) ---------------------------------------
template <class T>
inline T atomicAdd(T* p, std::type_identity_t<T> v) {
    return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicSub(T* p, std::type_identity_t<T> v) {
    return std::atomic_ref<T>(*p).fetch_sub(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicExch(T* p, std::type_identity_t<T> v) {
    return std::atomic_ref<T>(*p).exchange(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicCAS(T* p, std::type_identity_t<T> cmp, std::type_identity_t<T> v) {
    std::atomic_ref<T>(*p).compare_exchange_strong(cmp, v, std::memory_order_relaxed);
    return cmp;  // the old value either way
}
template <class T>
inline T atomicMax(T* p, std::type_identity_t<T> v) {
    std::atomic_ref<T> a(*p);
    T old = a.load(std::memory_order_relaxed);
    while (old < v && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
    }
    return old;
}
template <class T>
inline T atomicMin(T* p, std::type_identity_t<T> v) {
    std::atomic_ref<T> a(*p);
    T old = a.load(std::memory_order_relaxed);
    while (v < old && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
    }
    return old;
}
template <class T>
inline T atomicAnd(T* p, std::type_identity_t<T> v) {
    return std::atomic_ref<T>(*p).fetch_and(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicOr(T* p, std::type_identity_t<T> v) {
    return std::atomic_ref<T>(*p).fetch_or(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicXor(T* p, std::type_identity_t<T> v) {
    return std::atomic_ref<T>(*p).fetch_xor(v, std::memory_order_relaxed);
}

// ---- bf16 -------------------------------------------------------------------------------------
// f32 -> bf16 as `cvt.rn.bf16.f32`: round to nearest, ties to even (subnormals kept, overflow to
// inf); a NaN becomes the canonical NaN 0x7fff (as PTX's conversions to 16-bit floats and
// cuda_bf16.hpp's host path do), never an infinity.
inline unsigned short tuna_emu_f32_to_bf16_rn(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// ---- kernel registration (used by the generated module files) ---------------------------------
namespace tuna_emu {

struct KernelEntry {
    const char* name;
    void (*run)(void* const* args);  // calls the kernel with the values args[i] point at
    unsigned nparams;
    const unsigned* param_sizes;
    unsigned max_threads;  // __launch_bounds__ (0: none)
};
struct StructEntry {
    const char* name;
    unsigned long long size, align;
    size_t nfields;
    const unsigned long long* offsets;
};
struct Module {
    const char* file;
    const KernelEntry* kernels;
    size_t nkernels;
    const StructEntry* structs;
    size_t nstructs;
};

template <class T>
inline T load_arg(const void* p) {
    static_assert(std::is_trivially_copyable_v<T>, "kernel arguments are copied bytewise");
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

template <auto F>
struct Kern;
template <class... A, void (*F)(A...)>
struct Kern<F> {
    static constexpr unsigned arity = sizeof...(A);
    static constexpr unsigned sizes[sizeof...(A) + 1] = {(unsigned)sizeof(A)..., 0u};
    template <size_t... I>
    static void call(void* const* args, std::index_sequence<I...>) {
        F(load_arg<std::remove_cv_t<A>>(args[I])...);
    }
    static void run(void* const* args) { call(args, std::index_sequence_for<A...>{}); }
};

}  // namespace tuna_emu

#define TUNA_EMU_KERNEL(fn, bounds) \
    {#fn, &::tuna_emu::Kern<&fn>::run, ::tuna_emu::Kern<&fn>::arity, ::tuna_emu::Kern<&fn>::sizes, (bounds)}
