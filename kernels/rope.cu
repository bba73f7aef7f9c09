// rope.cu: rotary position embedding, Hugging Face Llama `rotate_half` convention (halves, not
// interleaved pairs), forward and backward, f32 and bf16 (fp32 math).
//   x, y, dy, dx: [batch, seq, heads, head_dim]; pos: [batch * seq] u32 absolute positions.
//   inv_freq[i] = 1 / theta^((2i) / D) (exponent and reciprocal in f32; the power rounded once to
//   f32 from f64, i.e. a correctly rounded f32 powf, bit-identical to the CPU's), angle =
//   (f32)pos * inv_freq[i] in f32, c = cosf(angle), s = sinf(angle); for i < D/2:
//   fwd: y[i] = x[i] c - x[i+D/2] s;  y[i+D/2] = x[i+D/2] c + x[i] s
//   bwd: dx[i] += dy[i] c + dy[i+D/2] s;  dx[i+D/2] += dy[i+D/2] c - dy[i] s   (the transpose)
// One block per token: its D/2 (cos, sin) pairs are computed once into shared memory (D floats of
// dynamic shared memory) and used by every head. Symbols: rope_{fwd,bwd}_<T>.
#include "common.cuh"

struct RopeParams {
    u32_t batch;
    u32_t seq;
    u32_t heads;
    u32_t head_dim;
    float theta;
};

template <typename T, bool BWD>
__device__ void rope_apply(const RopeParams p, const u32_t* pos, const T* in, T* out) {
    TUNA_DYN_SMEM(float, rope_cs);  // [0, D/2): cos, [D/2, D): sin
    const u32_t half = p.head_dim / 2;
    const u64_t tok = blockIdx.x;
    if (tok >= (u64_t)p.batch * p.seq) return;  // uniform across the block
    const float fpos = (float)pos[tok];
    for (u32_t i = threadIdx.x; i < half; i += blockDim.x) {
        const float e = (float)(2 * i) / (float)p.head_dim;
        const float inv_freq = 1.f / (float)pow((double)p.theta, (double)e);
        const float a = fpos * inv_freq;
        rope_cs[i] = cosf(a);
        rope_cs[half + i] = sinf(a);
    }
    __syncthreads();
    const u64_t base = tok * p.heads * p.head_dim;
    for (u32_t k = threadIdx.x; k < p.heads * half; k += blockDim.x) {
        const u32_t h = k / half, i = k - h * half;
        const u64_t o = base + (u64_t)h * p.head_dim + i;
        const float a = ld(in, o), b = ld(in, o + half), c = rope_cs[i], s = rope_cs[half + i];
        if constexpr (BWD) {
            acc(out, o, a * c + b * s);
            acc(out, o + half, b * c - a * s);
        } else {
            st(out, o, a * c - b * s);
            st(out, o + half, b * c + a * s);
        }
    }
}

#define EMIT(T, NAME)                                                                                    \
    extern "C" __global__ void rope_fwd_##NAME(const RopeParams p, const u32_t* pos, const T* x, T* y) { \
        rope_apply<T, false>(p, pos, x, y);                                                              \
    }                                                                                                    \
    extern "C" __global__ void rope_bwd_##NAME(const RopeParams p, const u32_t* pos, const T* dy, T* dx) { \
        rope_apply<T, true>(p, pos, dy, dx);                                                             \
    }
EMIT(float, f32)
EMIT(bf16_t, bf16)
