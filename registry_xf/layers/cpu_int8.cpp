// The element-wise passes around an int8 matrix product, on AVX-512 CPUs:
//
// - rx_int8_quantize: each row of float32 activations to int8 over the row's own range
//   [min, max] (with 0 inside it): the int8 codes, the row's scale and its shift, exactly as
//   registry_xf/layers/int8_linear.py's quantize_rows_shifted computes them (x / scale,
//   rounded half to even, less the shift, clamped to -127..127);
// - rx_int8_dequantize: int32 products back to float32, y = (p + shift * column sum) *
//   (row scale * column scale) + bias, then an optional activation (GELU in its erf or tanh
//   form, ReLU, SiLU, tanh) and an optional residual row added;
// - rx_int8_dequantize_quantize: the two at once, for a product whose activated result feeds
//   only the next int8 product: each row is turned into floats in a buffer (L1) and quantised
//   from there, so the float rows are never written to memory nor read back.
//
// Built by registry_xf/layers/cpu_int8.py with the system C++ compiler on first use; no torch
// headers: pointers, sizes and row strides (in elements) come from Python. Each row is
// contiguous. Rows are shared among `threads` OpenMP threads (one: no parallel region).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifndef __AVX512F__
#error "this kernel needs AVX-512 (compile with -march=native on a CPU that has it)"
#endif

#include "cpu_activations.h"

namespace {

constexpr float kLimit = 127.0f;  // symmetric int8 codes: -127..127

using rx_activations::activate;
using rx_activations::set;

inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                      : static_cast<__mmask16>((1u << left) - 1u);
}

struct Dequantize {
    const int32_t* products;
    int64_t cols;
    const float* x_scale;
    const float* shift;
    const float* column_sums;
    const float* weight_scale;
    const float* bias;
    const float* residual;  // may be null
    int64_t residual_stride;
    int activation;

    // Row `r` into `out`; returns nothing, but tracks the row's min and max in `low`, `high`
    // when `track` (for quantising it next).
    template <bool TRACK>
    inline void row(int64_t r, float* out, __m512* low, __m512* high) const {
        const int32_t* p = products + r * cols;
        const __m512 s = set(x_scale[r]);
        const __m512 sh = set(shift[r]);
        const float* res = residual ? residual + r * residual_stride : nullptr;
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 m = tail_mask(cols - c);
            __m512 y = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, p + c));
            y = _mm512_fmadd_ps(sh, _mm512_maskz_loadu_ps(m, column_sums + c), y);
            __m512 scale = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, weight_scale + c));
            y = _mm512_fmadd_ps(y, scale, _mm512_maskz_loadu_ps(m, bias + c));
            y = activate(y, activation);
            if (res) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, res + c));
            _mm512_mask_storeu_ps(out + c, m, y);
            if (TRACK) {
                *low = _mm512_mask_min_ps(*low, m, *low, y);
                *high = _mm512_mask_max_ps(*high, m, *high, y);
            }
        }
    }
};

// Quantise one row whose min and max lanes are known: the codes, scale and shift, as
// quantize_rows_shifted computes them: scale = range / 254, shift = round(low / scale) +
// 127, q = clamp(round(x / scale) - shift, -127, 127). x / scale is taken as x * (1 / scale),
// which is within 2 units in the last place of the quotient, so it rounds to the same
// integer unless it lies within 2^-13 of a half; vectors with such a lane are divided.
inline void quantize_known(const float* x, int64_t cols, __m512 low_v, __m512 high_v,
                           int8_t* q, float* scale, float* shift) {
    float low = fminf(_mm512_reduce_min_ps(low_v), 0.0f);
    float high = fmaxf(_mm512_reduce_max_ps(high_v), 0.0f);
    float step = fmaxf(high - low, 1e-12f) / (2.0f * kLimit);
    float offset = nearbyintf(low / step) + kLimit;
    *scale = step;
    *shift = offset;
    const __m512 vstep = set(step), vinv = set(1.0f / step), voffset = set(offset);
    for (int64_t c = 0; c < cols; c += 16) {
        const __mmask16 m = tail_mask(cols - c);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + c);
        __m512 v = _mm512_mul_ps(xv, vinv);
        __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 off_half = _mm512_abs_ps(_mm512_sub_ps(_mm512_abs_ps(_mm512_sub_ps(v, r)), set(0.5f)));
        if (_mm512_cmp_ps_mask(off_half, set(1.0f / 8192.0f), _CMP_LT_OQ)) {
            r = _mm512_roundscale_ps(_mm512_div_ps(xv, vstep),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        v = _mm512_sub_ps(r, voffset);
        v = _mm512_min_ps(_mm512_max_ps(v, set(-kLimit)), set(kLimit));
        _mm512_mask_cvtsepi32_storeu_epi8(q + c, m, _mm512_cvtps_epi32(v));
    }
}

inline void quantize_row(const float* x, int64_t cols, int8_t* q, float* scale, float* shift) {
    __m512 low = set(INFINITY), high = set(-INFINITY);
    for (int64_t c = 0; c < cols; c += 16) {
        const __mmask16 m = tail_mask(cols - c);
        __m512 v = _mm512_maskz_loadu_ps(m, x + c);
        low = _mm512_mask_min_ps(low, m, low, v);
        high = _mm512_mask_max_ps(high, m, high, v);
    }
    quantize_known(x, cols, low, high, q, scale, shift);
}

}  // namespace

extern "C" {

// x: rows x cols float32, row stride x_stride; q: rows x cols int8 (contiguous); scale,
// shift: one float32 per row. Returns 0.
int rx_int8_quantize(const float* x, int64_t rows, int64_t cols, int64_t x_stride, int8_t* q,
                     float* scale, float* shift, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r)
        quantize_row(x + r * x_stride, cols, q + r * cols, scale + r, shift + r);
    return 0;
}

// products: rows x cols int32 (contiguous); x_scale, shift: per row; column_sums,
// weight_scale, bias: per column; residual: null or rows x cols float32 with row stride
// residual_stride; out: rows x cols float32 (contiguous); activation: a code of
// rx_activations::Activation (cpu_activations.h).
// Returns 0.
int rx_int8_dequantize(const int32_t* products, int64_t rows, int64_t cols,
                       const float* x_scale, const float* shift, const float* column_sums,
                       const float* weight_scale, const float* bias, const float* residual,
                       int64_t residual_stride, int activation, float* out, int threads) {
    const Dequantize d{products, cols, x_scale, shift, column_sums, weight_scale,
                       bias, residual, residual_stride, activation};
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) d.row<false>(r, out + r * cols, nullptr, nullptr);
    return 0;
}

// rx_int8_dequantize's result (no residual) quantised as rx_int8_quantize would: the codes
// into q (rows x cols), the scales and shifts into q_scale, q_shift. Returns 0; 1 when a
// thread could not allocate its row buffer (the output is then incomplete).
int rx_int8_dequantize_quantize(const int32_t* products, int64_t rows, int64_t cols,
                                const float* x_scale, const float* shift,
                                const float* column_sums, const float* weight_scale,
                                const float* bias, int activation, int8_t* q, float* q_scale,
                                float* q_shift, int threads) {
    const Dequantize d{products, cols, x_scale, shift, column_sums, weight_scale,
                       bias, nullptr, 0, activation};
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float* buffer = static_cast<float*>(aligned_alloc(64, ((cols * 4 + 63) / 64) * 64 + 64));
        if (!buffer) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            if (!buffer) continue;
            __m512 low = set(INFINITY), high = set(-INFINITY);
            d.row<true>(r, buffer, &low, &high);
            quantize_known(buffer, cols, low, high, q + r * cols, q_scale + r, q_shift + r);
        }
        free(buffer);
    }
    return failed;
}

}  // extern "C"
