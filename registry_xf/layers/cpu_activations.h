// Activations on 16 float32 lanes (AVX-512), shared by the CPU kernels that apply one as they
// store a product's result (cpu_linear.cpp, cpu_int8.cpp): GELU in its erf and tanh forms,
// ReLU, SiLU and tanh, with the helpers they are made of. Absolute errors are about 1e-7
// (float32's rounding near 1), with no cancellation on either side of 0.
//
// Included by the kernels' sources; registry_xf/layers/cpu_kernels.py hashes it into each
// kernel's cache key, so a change here rebuilds them.

#ifndef REGISTRY_XF_CPU_ACTIVATIONS_H
#define REGISTRY_XF_CPU_ACTIVATIONS_H

#include <immintrin.h>
#include <stdint.h>

namespace rx_activations {

// The codes the kernels' callers pass (registry_xf/layers/cpu_linear.py, cpu_int8.py).
enum Activation { kNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSilu = 4, kTanh = 5 };

inline __m512 set(float v) { return _mm512_set1_ps(v); }

// 2^w for w <= 0: 2^n 2^f with n = round(w) and f = w - n in [-1/2, 1/2] (exact), 2^f =
// e^(f ln 2) by its Taylor series to degree 6 (relative error below 1e-7, about float32's
// rounding). Below -149 the result is 0 (scalef flushes it).
inline __m512 exp2_nonpositive(__m512 w) {
    __m512 n = _mm512_roundscale_ps(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(w, n), set(0.69314718055994531f));
    __m512 p = set(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, f, set(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, f, set(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, set(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, set(0.5f));
    p = _mm512_fmadd_ps(p, f, set(1.0f));
    p = _mm512_fmadd_ps(p, f, set(1.0f));
    return _mm512_scalef_ps(p, n);
}

// 1 / d for d >= 1: the 14-bit estimate and one Newton step (about 2^-27 relative).
inline __m512 reciprocal(__m512 d) {
    __m512 x = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(x, _mm512_fnmadd_ps(d, x, set(2.0f)));
}

// y / (1 + e^-u): y times the logistic function of u (e^-u as 2^(-u log2 e); for u > 0 it
// is at most 1; for u < 0 the quotient is computed as y e^u / (1 + e^u), so 2^w never
// overflows).
inline __m512 times_sigmoid(__m512 y, __m512 u) {
    __m512 w = _mm512_mul_ps(_mm512_abs_ps(u), set(-1.44269504088896341f));
    w = _mm512_max_ps(w, set(-160.0f));  // e^-|u| below float32's least: 0
    __m512 e = exp2_nonpositive(w);
    __m512 q = _mm512_mul_ps(y, reciprocal(_mm512_add_ps(e, set(1.0f))));
    __mmask16 negative = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_mul_ps(q, negative, q, e);
}

// GELU, erf form: y/2 (1 + erf(y / sqrt 2)). With z = |y| / sqrt 2, erfc(z) = 1 - erf(z) is
// taken from Abramowitz and Stegun's formula 7.1.26: t = 1 / (1 + 0.3275911 z), a polynomial
// in t of degree 5 times e^(-z^2) (absolute error at most 1.5e-7). For y < 0 the result is
// y/2 erfc(z), for y >= 0 it is y - y/2 erfc(z): no cancellation on either side. The
// constants carry the 1 / sqrt 2 and the 1/2 (e^(-y^2/2) = 2^(-y^2 log2(e) / 2)).
inline __m512 gelu_erf(__m512 y) {
    __m512 t = reciprocal(_mm512_fmadd_ps(_mm512_abs_ps(y), set(0.3275911f * 0.70710678118654752f),
                                          set(1.0f)));
    __m512 p = set(0.5f * 1.061405429f);
    p = _mm512_fmadd_ps(p, t, set(0.5f * -1.453152027f));
    p = _mm512_fmadd_ps(p, t, set(0.5f * 1.421413741f));
    p = _mm512_fmadd_ps(p, t, set(0.5f * -0.284496736f));
    p = _mm512_fmadd_ps(p, t, set(0.5f * 0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 w = _mm512_mul_ps(_mm512_mul_ps(y, set(-0.72134752044448170f)), y);
    w = _mm512_max_ps(w, set(-160.0f));  // e^(-z^2) below float32's least: 0
    __m512 half = _mm512_mul_ps(_mm512_mul_ps(p, exp2_nonpositive(w)), y);  // y/2 erfc(z)
    __mmask16 positive = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GE_OQ);
    return _mm512_mask_sub_ps(half, positive, y, half);
}

// `activation` (an Activation code) of y; an unknown code leaves y as it is.
inline __m512 activate(__m512 y, int activation) {
    switch (activation) {
        case kGelu:
            return gelu_erf(y);
        case kGeluTanh: {  // y/2 (1 + tanh(u)) = y / (1 + e^(-2u)), u = sqrt(2/pi)(y + 0.044715 y^3)
            __m512 y3 = _mm512_mul_ps(_mm512_mul_ps(y, y), y);
            __m512 u = _mm512_fmadd_ps(y3, set(0.044715f), y);
            return times_sigmoid(y, _mm512_mul_ps(u, set(1.5957691216057308f)));
        }
        case kRelu:
            return _mm512_max_ps(y, _mm512_setzero_ps());
        case kSilu:
            return times_sigmoid(y, y);
        case kTanh:  // 2 / (1 + e^(-2y)) - 1 (absolute error about 1e-7)
            return _mm512_sub_ps(times_sigmoid(set(2.0f), _mm512_add_ps(y, y)), set(1.0f));
        default:
            return y;
    }
}

}  // namespace rx_activations

#endif  // REGISTRY_XF_CPU_ACTIVATIONS_H
