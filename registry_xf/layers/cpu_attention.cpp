// Encoder attention on AVX-512 CPUs: softmax(q k^T * scale) v for every (batch, head), with
// an optional key padding mask (one row of booleans per batch entry, shared by every query).
//
// Built by registry_xf/layers/cpu_attention.py with the system C++ compiler on first use;
// no torch headers: pointers, sizes and strides (in elements) come from Python.
//
// Per (batch, head): the keys that the mask allows are gathered (masked keys add nothing to
// a softmax, so dropping them is exact), keys are packed transposed and values packed row by
// row, then for each block of queries the scores of every allowed key are computed by a
// register-blocked micro-kernel into a small buffer (L1), turned into probabilities in
// place and multiplied by the packed values by a second micro-kernel. Nothing bigger than
// one head's keys and values (L2) is touched twice. A batch entry with no allowed key gets
// zeros.
//
// Where the time goes, for heads of 32 and ~130 keys (all-MiniLM-L6-v2 on long texts, Zen 4):
// about 80% in the two micro-kernels' multiply-adds, 12% in the softmax, 5% in packing.
// Hence: a block is 16 queries (two score tiles of 8 x 48) for heads up to 32 wide, so that
// the second tile finds the keys, and the second value step the values, still in L1; each
// row's maximum is taken from the score tiles while they are in registers (no separate
// pass); the exponential is a degree-5 polynomial; without a mask float32 keys are rows
// 0 .. n-1, transposed 16 x 16 in registers (AVX-512 gathers are slow on Zen 4), and
// bfloat16 keys and values are packed with whole-vector moves (transposes and two-source
// permutes), not element by element. Work is shared among threads by (batch, head) pairs
// taken from a counter: OpenMP threads when built with -fopenmp (as registry_xf builds
// it), else threads started and joined within the call.

#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#ifndef __AVX512F__
#error "this kernel needs AVX-512 (compile with -march=native on a CPU that has it)"
#endif
// bfloat16 inputs need AVX512-BF16's dot products; without them only float32 is built.
#ifdef __AVX512BF16__
#define RX_BF16 1
#else
#define RX_BF16 0
#endif

namespace {

// Queries per score tile, and 16-key vectors per score tile: 8 x 48 scores in registers for
// heads up to 32 wide, 12 x 32 for wider ones (whose value step then takes 6 rows at a time).
// Heads up to 32 wide take two tiles of queries per block: the keys read by the first are
// still in L1 for the second, and so are the values between their two value steps.
constexpr int kRows = 16;  // the most queries per block
template <int VECS>
constexpr int block_rows = VECS > 2 ? 12 : 8;
template <int VECS>
constexpr int pair_rows = VECS > 2 ? 12 : 16;
template <int VECS>
constexpr int key_vecs = VECS > 2 ? 2 : 3;

struct Problem {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    const uint8_t* mask;  // may be null: every key allowed
    // Packed sequences (null: padded batch): sequence b is rows [offsets[b], offsets[b + 1])
    // of q, k, v and out, its own queries and keys; n_q and n_k are then the longest.
    const int64_t* offsets;
    int64_t batch, heads, kv_heads, n_q, n_k, dim;
    int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];  // batch, head, position
    int64_t mask_batch_stride, mask_key_stride;
    float scale;
    int bf16;
    std::atomic<int64_t> next;
};

// Keys and values of one (batch, head), packed. For float32 keys are stored transposed in
// groups of 16 keys (padded keys/16 x dim x 16: each of a score tile's key vectors is one
// stream); for bfloat16, transposed by pairs of dims (dim/2 x padded keys x 2)
// so that one dot-product instruction takes two dims at once; values likewise by pairs of
// keys (padded keys/2 x dim x 2) for bfloat16, plain rows (keys x dim) for float32.
// Probabilities are rows of bfloat16 for bfloat16 values, so that keys j and j+1 of a row
// are one 32-bit pair.
struct Scratch {
    float* keys_f = nullptr;
    float* values_f = nullptr;
    uint16_t* keys_h = nullptr;
    uint16_t* values_h = nullptr;
    float* scores = nullptr;       // kRows x padded keys
    uint16_t* probs_h = nullptr;   // kRows x padded keys (bfloat16)
    int32_t* index = nullptr;      // allowed keys
    bool ok = false;

    Scratch(int64_t n_k, int64_t dim, bool bf16) {
        int64_t padded = (n_k + 31) / 32 * 32;
        size_t f = sizeof(float);
        scores = static_cast<float*>(aligned_alloc(64, kRows * padded * f));
        index = static_cast<int32_t*>(aligned_alloc(64, ((n_k * 4 + 63) / 64) * 64 + 64));
        if (bf16) {
            keys_h = static_cast<uint16_t*>(aligned_alloc(64, dim * padded * 2));
            values_h = static_cast<uint16_t*>(aligned_alloc(64, dim * padded * 2));
            probs_h = static_cast<uint16_t*>(aligned_alloc(64, kRows * padded * 2));
            ok = keys_h && values_h && probs_h;
        } else {
            keys_f = static_cast<float*>(aligned_alloc(64, dim * padded * f));
            values_f = static_cast<float*>(aligned_alloc(64, dim * padded * f));
            ok = keys_f && values_f;
        }
        ok = ok && scores && index;
    }
    ~Scratch() {
        free(keys_f);
        free(values_f);
        free(keys_h);
        free(values_h);
        free(scores);
        free(probs_h);
        free(index);
    }
};

// 2^t for t <= 0: 2^n * p(f), n = round(t), f = t - n in [-1/2, 1/2], p of degree 5 (fitted
// to 2^f for least relative error, which it keeps below 2e-7, about float32's rounding; one
// multiply-add fewer than the Taylor series of degree 6 that this accuracy would need).
inline __m512 exp2_nonpositive(__m512 t) {
    t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.3264724226486992e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6715132439667200e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507337568517306e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022242074651387e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314697758800190e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// Lanes of a tile's vector `c` that hold one of the `valid` scores counted from the tile's
// start (the others are padding keys, whose zero scores must not count in a row's maximum).
inline __mmask16 valid_lanes(int64_t valid, int c) {
    const int64_t left = valid - 16 * c;
    return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// Stores a tile of scores and takes its valid ones into the rows' maxima.
template <int ROWS, int VECS>
inline void store_tile(const __m512 (&acc)[ROWS][VECS], float* out, int64_t out_row,
                       int64_t valid, __m512* top) {
    __mmask16 lanes[VECS];
    for (int c = 0; c < VECS; ++c) lanes[c] = valid_lanes(valid, c);
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < VECS; ++c) {
            _mm512_storeu_ps(out + r * out_row + 16 * c, acc[r][c]);
            top[r] = _mm512_mask_max_ps(top[r], lanes[c], top[r], acc[r][c]);
        }
}

// Scores of `ROWS` queries against `VECS` x 16 packed keys (float32); each row's running
// maximum `top` takes in the tile's `valid` first scores while they are in registers.
template <int ROWS, int VECS, int DIM>
inline void score_tile_f(const float* q, int64_t q_row, const float* keys, int64_t padded,
                         float* out, int64_t out_row, int64_t valid, __m512* top) {
    __m512 acc[ROWS][VECS];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int i = 0; i < DIM; ++i) {
        __m512 key[VECS];
        for (int c = 0; c < VECS; ++c) key[c] = _mm512_load_ps(keys + (c * DIM + i) * 16);
        for (int r = 0; r < ROWS; ++r) {
            __m512 qi = _mm512_set1_ps(q[r * q_row + i]);
            for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_fmadd_ps(qi, key[c], acc[r][c]);
        }
    }
    store_tile<ROWS, VECS>(acc, out, out_row, valid, top);
}

// The same for bfloat16: two dims per instruction, float32 sums.
template <int ROWS, int VECS, int DIM>
inline void score_tile_h(const uint16_t* q, int64_t q_row, const uint16_t* keys,
                         int64_t padded, float* out, int64_t out_row, int64_t valid,
                         __m512* top) {
#if RX_BF16
    __m512 acc[ROWS][VECS];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int i = 0; i < DIM / 2; ++i) {
        __m512bh key[VECS];
        for (int c = 0; c < VECS; ++c)
            key[c] = (__m512bh)_mm512_loadu_si512(keys + (i * padded + 16 * c) * 2);
        for (int r = 0; r < ROWS; ++r) {
            uint32_t pair;
            memcpy(&pair, q + r * q_row + 2 * i, 4);
            __m512bh qi = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qi, key[c]);
        }
    }
    store_tile<ROWS, VECS>(acc, out, out_row, valid, top);
#endif
}

template <int ROWS, int VECS, bool BF16, int DIM>
inline void score_tile(const void* q, int64_t q_row, const Scratch& s, int64_t j,
                       int64_t padded, float* out, int64_t n, __m512* top) {
    if (BF16)
        score_tile_h<ROWS, VECS, DIM>(static_cast<const uint16_t*>(q), q_row, s.keys_h + 2 * j,
                                      padded, out + j, padded, n - j, top);
    else
        score_tile_f<ROWS, VECS, DIM>(static_cast<const float*>(q), q_row, s.keys_f + j * DIM,
                                      padded, out + j, padded, n - j, top);
}

// Scores of ROWS queries against the `n` keys (padded to `padded`) into `out`, and each
// row's largest score into `top`.
template <int ROWS, bool BF16, int DIM>
void score_rows(const void* q, int64_t q_row, const Scratch& s, int64_t n, int64_t padded,
                float* out, float* top) {
    constexpr int kKeyVecs = key_vecs<DIM / 16>;
    __m512 tops[ROWS];
    for (int r = 0; r < ROWS; ++r) tops[r] = _mm512_set1_ps(-__builtin_inff());
    // Full tiles, then what is left in tiles of 2 and 1 vectors; with 3-vector tiles a
    // last single vector is taken as 2 + 2 with the tile before (wider tiles reuse more)
    int64_t full = padded;
    if (kKeyVecs == 3 && padded % 48 == 16 && padded >= 64) full = padded - 64;
    int64_t j = 0;
    for (; j + 16 * kKeyVecs <= full; j += 16 * kKeyVecs)
        score_tile<ROWS, kKeyVecs, BF16, DIM>(q, q_row, s, j, padded, out, n, tops);
    for (; kKeyVecs > 2 && j + 32 <= padded; j += 32)
        score_tile<ROWS, 2, BF16, DIM>(q, q_row, s, j, padded, out, n, tops);
    for (; j < padded; j += 16) score_tile<ROWS, 1, BF16, DIM>(q, q_row, s, j, padded, out, n, tops);
    for (int r = 0; r < ROWS; ++r) top[r] = _mm512_reduce_max_ps(tops[r]);
}

// Scores to probabilities in place over the `n` allowed keys, given their maximum `top`
// (exp(scale * (s - top)) as 2^(s * c - top * c), c = scale * log2(e)); returns 1 / their sum.
inline float softmax_row(float* row, int64_t n, float scale, float top) {
    const float c = scale * 1.44269504088896341f;
    const __m512 shift = _mm512_set1_ps(top * c), factor = _mm512_set1_ps(c);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 e = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), factor, shift));
        _mm512_storeu_ps(row + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
    if (tail) {
        __m512 e = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), factor, shift));
        e = _mm512_maskz_mov_ps(tail, e);
        _mm512_storeu_ps(row + j, e);  // zeros past the allowed keys, up to 16 x ceil(n/16)
        sum = _mm512_add_ps(sum, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

// out rows = probabilities (ROWS x n) times packed values (n x 16 VECS), times 1/sums.
template <int ROWS, int VECS>
inline void weigh_values_f(const float* probs, int64_t prob_row, const float* values,
                           int64_t n, const float* inv, float* out, int64_t out_row) {
    __m512 acc[ROWS][VECS];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
        __m512 val[VECS];
        for (int c = 0; c < VECS; ++c) val[c] = _mm512_loadu_ps(values + j * 16 * VECS + 16 * c);
        for (int r = 0; r < ROWS; ++r) {
            __m512 p = _mm512_set1_ps(probs[r * prob_row + j]);
            for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_fmadd_ps(p, val[c], acc[r][c]);
        }
    }
    for (int r = 0; r < ROWS; ++r) {
        __m512 w = _mm512_set1_ps(inv[r]);
        for (int c = 0; c < VECS; ++c)
            _mm512_storeu_ps(out + r * out_row + 16 * c, _mm512_mul_ps(acc[r][c], w));
    }
}

// bfloat16: keys j and j+1 per instruction (n even: a zero pair pads an odd count).
template <int ROWS, int VECS>
inline void weigh_values_h(const uint16_t* probs, int64_t prob_row, const uint16_t* values,
                           int64_t n, const float* inv, uint16_t* out, int64_t out_row) {
#if RX_BF16
    __m512 acc[ROWS][VECS];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 2) {
        __m512bh val[VECS];
        for (int c = 0; c < VECS; ++c)
            val[c] = (__m512bh)_mm512_loadu_si512(values + (j / 2) * 32 * VECS + 32 * c);
        for (int r = 0; r < ROWS; ++r) {
            uint32_t pair;
            memcpy(&pair, probs + r * prob_row + j, 4);
            __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], p, val[c]);
        }
    }
    for (int r = 0; r < ROWS; ++r) {
        __m512 w = _mm512_set1_ps(inv[r]);
        for (int c = 0; c < VECS; ++c)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_row + 16 * c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], w)));
    }
#endif
}

template <int ROWS, int VECS>
void weigh_rows(bool bf16, const Scratch& s, int row0, int64_t n, int64_t padded,
                const float* inv, void* out, int64_t out_row) {
    if (bf16)
        weigh_values_h<ROWS, VECS>(s.probs_h + row0 * padded, padded, s.values_h, n, inv + row0,
                                   static_cast<uint16_t*>(out) + row0 * out_row, out_row);
    else
        weigh_values_f<ROWS, VECS>(s.scores + row0 * padded, padded, s.values_f, n, inv + row0,
                                   static_cast<float*>(out) + row0 * out_row, out_row);
}

// Transposes 16 rows of 16 floats in registers (row k, element e to row e, element k):
// pairs of rows interleaved, then groups of four, then 128-bit lanes swapped among
// groups of four rows.
inline void transpose16(__m512 (&r)[16]) {
    __m512 t[16];
    for (int k = 0; k < 16; k += 2) {
        t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
    }
    __m512 u[16];  // lane L of u[4g + m]: element 4L + m of rows 4g .. 4g + 3
    for (int g = 0; g < 4; ++g) {
        u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
        u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int m = 0; m < 4; ++m) {
        __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);
        __m512 v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
        __m512 v2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
        __m512 v3 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
        r[m] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        r[4 + m] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        r[8 + m] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        r[12 + m] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
}

#if RX_BF16 && defined(__AVX512BW__)
// bfloat16 keys and values into their packed layouts with whole-vector moves. A key's pair
// of dims (2i, 2i + 1) is one 32-bit word of its row, so the keys' layout is the rows' words
// transposed: 16 keys x 16 words at a time, as float32 keys are. Values pair keys j and
// j + 1 element by element: one two-source permute per 16 dims of the pair of rows.
void pack_bf16(Scratch& s, const char* k, int64_t k_row, const char* v, int64_t v_row,
               int64_t n, int64_t padded, int64_t dim) {
    const int64_t words = dim / 2;
    float* keys = reinterpret_cast<float*>(s.keys_h);  // 32-bit words, moved as floats
    for (int64_t j = 0; j < padded; j += 16)
        for (int64_t i = 0; i < words; i += 16) {
            const __mmask16 take =
                words - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (words - i)) - 1);
            __m512 r[16];
            for (int64_t e = 0; e < 16; ++e)
                r[e] = j + e < n ? _mm512_maskz_loadu_ps(
                                       take, reinterpret_cast<const float*>(
                                                 k + s.index[j + e] * k_row) + i)
                                 : _mm512_setzero_ps();
            transpose16(r);
            for (int64_t e = 0; e < 16 && i + e < words; ++e)
                _mm512_store_ps(keys + (i + e) * padded + j, r[e]);
        }
    // element 2t of a pair's first 32 is row j's dim t, element 2t + 1 row j + 1's (indices
    // from 32 pick the second source); the next 32 likewise from dim 16
    alignas(64) uint16_t order[64];
    for (int t = 0; t < 32; ++t) {
        order[t] = static_cast<uint16_t>(t / 2 + (t & 1) * 32);
        order[32 + t] = static_cast<uint16_t>(16 + t / 2 + (t & 1) * 32);
    }
    const __m512i first = _mm512_load_si512(order), second = _mm512_load_si512(order + 32);
    for (int64_t j = 0; j < n; j += 2) {
        const uint16_t* a = reinterpret_cast<const uint16_t*>(v + s.index[j] * v_row);
        const uint16_t* b =
            j + 1 < n ? reinterpret_cast<const uint16_t*>(v + s.index[j + 1] * v_row) : nullptr;
        uint16_t* out = s.values_h + (j / 2) * dim * 2;
        for (int64_t i = 0; i < dim; i += 32) {
            const __mmask32 take =
                dim - i >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << (dim - i)) - 1);
            const __m512i x = _mm512_maskz_loadu_epi16(take, a + i);
            const __m512i y = b ? _mm512_maskz_loadu_epi16(take, b + i) : _mm512_setzero_si512();
            _mm512_storeu_si512(out + 2 * i, _mm512_permutex2var_epi16(x, first, y));
            if (dim - i > 16)
                _mm512_storeu_si512(out + 2 * i + 32, _mm512_permutex2var_epi16(x, second, y));
        }
    }
}
#endif

// Gathers the allowed keys and values of one (batch, head) into the packed layouts. float32
// keys go in groups of 16 (group g: dim x 16 keys, contiguous, so that a score tile reads
// each of its key vectors as one stream); with no mask the allowed keys are rows 0 .. n-1,
// transposed 16 x 16 in registers, else they are gathered by index.
template <bool BF16>
void pack(const Problem& p, Scratch& s, const char* k, const char* v, int64_t n,
          int64_t padded) {
    const int64_t dim = p.dim, elem = BF16 ? 2 : 4;
    const int64_t k_row = p.k_stride[2] * elem, v_row = p.v_stride[2] * elem;
    if (!BF16) {
        const auto at = [&](int64_t j, int64_t i) { return s.keys_f + j * dim + i * 16; };
        if (!p.mask) {
            for (int64_t j = 0; j < n; j += 16)
                for (int64_t i = 0; i < dim; i += 16) {
                    __m512 r[16];
                    for (int64_t e = 0; e < 16; ++e)
                        r[e] = j + e < n ? _mm512_loadu_ps(reinterpret_cast<const float*>(
                                               k + (j + e) * k_row) + i)
                                         : _mm512_setzero_ps();
                    transpose16(r);
                    for (int e = 0; e < 16; ++e) _mm512_store_ps(at(j, i + e), r[e]);
                }
        } else {
            int64_t j = 0;
            if (p.n_k * p.k_stride[2] < (int64_t{1} << 31)) {  // 16 keys at a time, gathered
                const float* base = reinterpret_cast<const float*>(k);
                const __m512i row = _mm512_set1_epi32(static_cast<int>(p.k_stride[2]));
                for (; j + 16 <= n; j += 16) {
                    __m512i where = _mm512_mullo_epi32(_mm512_loadu_si512(s.index + j), row);
                    for (int64_t i = 0; i < dim; ++i)
                        _mm512_store_ps(at(j, i), _mm512_i32gather_ps(where, base + i, 4));
                }
            }
            for (; j < padded; ++j) {  // the last keys, then zeros up to the padded count
                const float* key =
                    j < n ? reinterpret_cast<const float*>(k + s.index[j] * k_row) : nullptr;
                for (int64_t i = 0; i < dim; ++i) at(j / 16 * 16, i)[j % 16] = key ? key[i] : 0.0f;
            }
        }
        for (int64_t j = 0; j < n; ++j) memcpy(s.values_f + j * dim, v + s.index[j] * v_row, dim * 4);
        return;
    }
#if RX_BF16 && defined(__AVX512BW__)
    pack_bf16(s, k, k_row, v, v_row, n, padded, dim);
#else
    const int64_t n_even = (n + 1) / 2 * 2;
    for (int64_t j = 0; j < n; ++j) {
        const uint16_t* key = reinterpret_cast<const uint16_t*>(k + s.index[j] * k_row);
        const uint16_t* value = reinterpret_cast<const uint16_t*>(v + s.index[j] * v_row);
        for (int64_t i = 0; i < dim; ++i) {
            s.keys_h[((i / 2) * padded + j) * 2 + (i & 1)] = key[i];
            s.values_h[((j / 2) * dim + i) * 2 + (j & 1)] = value[i];
        }
    }
    for (int64_t i = 0; i < dim / 2; ++i)
        for (int64_t j = n; j < padded; ++j) {
            s.keys_h[(i * padded + j) * 2] = 0;
            s.keys_h[(i * padded + j) * 2 + 1] = 0;
        }
    for (int64_t j = n; j < n_even; ++j)
        for (int64_t i = 0; i < dim; ++i) s.values_h[((j / 2) * dim + i) * 2 + (j & 1)] = 0;
#endif
}

// Where the rows of q, k, v and out of one (batch, head) start, and how many there are.
struct Rows {
    const char* q;
    const char* k;
    const char* v;
    char* out;
    int64_t n_q, n_k;
};

inline Rows rows_of(const Problem& p, int64_t b, int64_t h) {
    const int64_t elem = p.bf16 ? 2 : 4, kv = h / (p.heads / p.kv_heads);
    int64_t first = 0, n_q = p.n_q, n_k = p.n_k;
    if (p.offsets) {
        first = p.offsets[b];
        n_q = n_k = p.offsets[b + 1] - first;
    }
    const auto at = [&](const int64_t* stride, int64_t head) {
        return (b * stride[0] + head * stride[1] + first * stride[2]) * elem;
    };
    return Rows{static_cast<const char*>(p.q) + at(p.q_stride, h),
                static_cast<const char*>(p.k) + at(p.k_stride, kv),
                static_cast<const char*>(p.v) + at(p.v_stride, kv),
                static_cast<char*>(p.out) + at(p.out_stride, h),
                n_q,
                n_k};
}

// A prefetch the compiler keeps (it drops __builtin_prefetch from functions it deems pure).
inline void prefetch(const char* address) {
    asm volatile("prefetcht1 %0" : : "m"(*address));
}

// Asks for positions [from, to) of the next (batch, head)'s rows to be brought into L2:
// rows are far apart in the fused projection (one cache line or two out of every
// heads x 3), so each one read when needed would wait for memory.
inline void prefetch_rows(const Problem& p, const Rows* next, int64_t from, int64_t to) {
    if (!next) return;
    const int64_t elem = p.bf16 ? 2 : 4, bytes = p.dim * elem;
    for (int64_t i = from; i < to; ++i)
        for (int64_t off = 0; off < bytes; off += 64) {
            if (i < next->n_q) prefetch(next->q + i * p.q_stride[2] * elem + off);
            if (i < next->n_k) {
                prefetch(next->k + i * p.k_stride[2] * elem + off);
                prefetch(next->v + i * p.v_stride[2] * elem + off);
            }
        }
}

// Output rows [i0, i0 + ROWS) of one (batch, head) from its packed keys and values: scores,
// softmax, then the weighted values (in chunks of at most 24 accumulators).
template <bool BF16, int VECS, int ROWS>
void query_block(const Problem& p, Scratch& s, const char* q, int64_t i0, int64_t n,
                 int64_t padded, char* out) {
    const int64_t elem = BF16 ? 2 : 4, out_row = p.out_stride[2];
    float inv[ROWS], top[ROWS];
    constexpr int tile = ROWS < block_rows<VECS> ? ROWS : block_rows<VECS>;
    for (int row0 = 0; row0 < ROWS; row0 += tile)
        score_rows<tile, BF16, 16 * VECS>(q + (i0 + row0) * p.q_stride[2] * elem, p.q_stride[2],
                                          s, n, padded, s.scores + row0 * padded, top + row0);
    for (int r = 0; r < ROWS; ++r) {
        float* row = s.scores + r * padded;
        inv[r] = softmax_row(row, n, p.scale, top[r]);
#if RX_BF16
        if (BF16) {
            uint16_t* dst = s.probs_h + r * padded;
            for (int64_t j = 0; j < padded; j += 16)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + j)));
        }
#endif
    }
    const int64_t n_sum = BF16 ? (n + 1) / 2 * 2 : n;  // bfloat16 takes keys in pairs
    constexpr int chunk = VECS > 2 && ROWS > 1 ? ROWS / 2 : tile;
    for (int row0 = 0; row0 < ROWS; row0 += chunk)
        weigh_rows<chunk, VECS>(BF16, s, row0, n_sum, padded, inv, out + i0 * out_row * elem,
                                out_row);
}

template <bool BF16, int VECS>
void one_head(const Problem& p, Scratch& s, int64_t b, int64_t h, const Rows* next) {
    const int64_t elem = BF16 ? 2 : 4, dim = p.dim;
    const Rows mine = rows_of(p, b, h);
    const char *q = mine.q, *k = mine.k, *v = mine.v;
    char* out = mine.out;
    const int64_t out_row = p.out_stride[2], n_q = mine.n_q, n_k = mine.n_k;
    int64_t n = 0;
    if (p.mask) {
        const uint8_t* m = p.mask + b * p.mask_batch_stride;
        for (int64_t j = 0; j < n_k; ++j)
            if (m[j * p.mask_key_stride]) s.index[n++] = static_cast<int32_t>(j);
    } else {
        for (int64_t j = 0; j < n_k; ++j) s.index[n++] = static_cast<int32_t>(j);
    }
    const int64_t longest = n_q > n_k ? n_q : n_k;
    if (n == 0 || n_q == 0) {  // nothing to attend to: zeros
        for (int64_t i = 0; i < n_q; ++i) memset(out + i * out_row * elem, 0, dim * elem);
        prefetch_rows(p, next, 0, longest);
        return;
    }
    const int64_t padded = (n + 15) / 16 * 16;
    pack<BF16>(p, s, k, v, n, padded);
    constexpr int kBlock = block_rows<VECS>;
    const int64_t blocks = (n_q + kBlock - 1) / kBlock;
    const int64_t per_block = (longest + blocks - 1) / blocks;
    constexpr int kPair = pair_rows<VECS>;
    for (int64_t block = 0; block < blocks;) {
        constexpr int tiles = kPair / kBlock;
        const bool two = tiles > 1 && block + tiles <= blocks && n_q >= kPair;
        const int64_t step = two ? tiles : 1;
        prefetch_rows(p, next, block * per_block, (block + step) * per_block);
        // The last block overlaps the one before (its rows come out the same).
        if (n_q < kBlock) {  // a few queries: one at a time
            for (int64_t i = 0; i < n_q; ++i)
                query_block<BF16, VECS, 1>(p, s, q, i, n, padded, out);
        } else if (two) {
            const int64_t i0 = (block + tiles) * kBlock <= n_q ? block * kBlock : n_q - kPair;
            query_block<BF16, VECS, kPair>(p, s, q, i0, n, padded, out);
        } else {
            const int64_t i0 = (block + 1) * kBlock <= n_q ? block * kBlock : n_q - kBlock;
            query_block<BF16, VECS, kBlock>(p, s, q, i0, n, padded, out);
        }
        block += step;
    }
}

template <bool BF16>
void dispatch(const Problem& p, Scratch& s, int64_t b, int64_t h, const Rows* next) {
    switch (p.dim / 16) {
        case 1: one_head<BF16, 1>(p, s, b, h, next); break;
        case 2: one_head<BF16, 2>(p, s, b, h, next); break;
        case 3: one_head<BF16, 3>(p, s, b, h, next); break;
        default: one_head<BF16, 4>(p, s, b, h, next); break;
    }
}

struct Worker {
    Problem* problem;
    int failed;
};

void* work(void* arg) {
    Worker* w = static_cast<Worker*>(arg);
    Problem& p = *w->problem;
    Scratch s(p.n_k, p.dim, p.bf16 != 0);
    if (!s.ok) {
        w->failed = 1;
        return nullptr;
    }
    const int64_t tasks = p.batch * p.heads;
    // Each thread claims its next (batch, head) before working on the current one, so
    // that it can fetch the next one's rows meanwhile.
    int64_t t = p.next.fetch_add(1, std::memory_order_relaxed);
    while (t < tasks) {
        const int64_t after = p.next.fetch_add(1, std::memory_order_relaxed);
        Rows next_rows;
        const Rows* next = nullptr;
        if (after < tasks) {
            next_rows = rows_of(p, after / p.heads, after % p.heads);
            next = &next_rows;
        }
        if (p.bf16)
            dispatch<true>(p, s, t / p.heads, t % p.heads, next);
        else
            dispatch<false>(p, s, t / p.heads, t % p.heads, next);
        t = after;
    }
    return nullptr;
}

// Runs every (batch, head) of `p` on up to `threads` threads; 0, or 1 when no thread could
// allocate its scratch memory.
int run(Problem& p, int threads) {
    p.next.store(0);
    const int64_t tasks = p.batch * p.heads;
    if (threads > tasks) threads = static_cast<int>(tasks);
    if (threads < 1) threads = 1;
    if (threads > 256) threads = 256;
    if (threads == 1) {  // no parallel region to start and join
        Worker w{&p, 0};
        work(&w);
        return w.failed;
    }
#ifdef _OPENMP
    // With OpenMP the threads are those of the OpenMP runtime already loaded (torch's
    // libgomp, same soname): no second pool competing with torch's for the cores.
    int done = 0;
#pragma omp parallel num_threads(threads) reduction(+ : done)
    {
        Worker w{&p, 0};
        work(&w);
        done += !w.failed;
    }
    return done == 0;
#else
    Worker workers[256];
    pthread_t ids[256];
    bool started[256] = {false};
    for (int i = 0; i < threads; ++i) workers[i] = Worker{&p, 0};
    for (int i = 1; i < threads; ++i)
        started[i] = pthread_create(&ids[i], nullptr, work, &workers[i]) == 0;
    work(&workers[0]);
    int failed = workers[0].failed;
    for (int i = 1; i < threads; ++i) {
        if (!started[i]) continue;
        pthread_join(ids[i], nullptr);
        failed &= workers[i].failed;
    }
    return failed;
#endif
}

}  // namespace

extern "C" {

// 1 when this build takes bfloat16 inputs (the CPU has AVX512-BF16).
int rx_attention_bf16(void) { return RX_BF16; }

// sizes: batch, heads, kv_heads, n_q, n_k, dim, mask batch stride, mask key stride.
// strides: (batch, head, position) in elements for q, k, v and out; each row contiguous.
// dim is 16, 32, 48 or 64; heads a multiple of kv_heads; bf16 = 1 for bfloat16 q, k, v and
// out (float32 otherwise). Returns 0; 1 when no thread could allocate its scratch memory
// (the output is then incomplete; threads that could take over the work of those that
// could not); 2 for bfloat16 in a build without it.
int rx_attention(const void* q, const void* k, const void* v, void* out, const uint8_t* mask,
                 const int64_t* sizes, const int64_t* strides, float scale, int bf16,
                 int threads) {
    if (bf16 && !RX_BF16) return 2;
    Problem p;
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.mask = mask;
    p.offsets = nullptr;
    p.batch = sizes[0];
    p.heads = sizes[1];
    p.kv_heads = sizes[2];
    p.n_q = sizes[3];
    p.n_k = sizes[4];
    p.dim = sizes[5];
    p.mask_batch_stride = sizes[6];
    p.mask_key_stride = sizes[7];
    for (int i = 0; i < 3; ++i) {
        p.q_stride[i] = strides[i];
        p.k_stride[i] = strides[3 + i];
        p.v_stride[i] = strides[6 + i];
        p.out_stride[i] = strides[9 + i];
    }
    p.scale = scale;
    p.bf16 = bf16;
    return run(p, threads);
}

// Packed sequences, one after another (an unpadded batch): sequence b is the token rows
// [offsets[b], offsets[b + 1]) of q, k, v and out, and attends to its own tokens alone.
// sizes: sequences, heads, kv_heads, dim, tokens. strides: (head, token) in elements for
// q, k, v and out. Returns 3 when the offsets do not rise from 0 to tokens; otherwise as
// rx_attention.
int rx_attention_packed(const void* q, const void* k, const void* v, void* out,
                        const int64_t* offsets, const int64_t* sizes, const int64_t* strides,
                        float scale, int bf16, int threads) {
    if (bf16 && !RX_BF16) return 2;
    int64_t longest = 0;
    if (offsets[0] != 0 || offsets[sizes[0]] != sizes[4]) return 3;
    for (int64_t b = 0; b < sizes[0]; ++b) {
        const int64_t n = offsets[b + 1] - offsets[b];
        if (n < 0) return 3;
        if (n > longest) longest = n;
    }
    Problem p;
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.mask = nullptr;
    p.offsets = offsets;
    p.batch = sizes[0];
    p.heads = sizes[1];
    p.kv_heads = sizes[2];
    p.n_q = p.n_k = longest;
    p.dim = sizes[3];
    p.mask_batch_stride = p.mask_key_stride = 0;
    for (int i = 0; i < 2; ++i) {
        p.q_stride[i + 1] = strides[i];
        p.k_stride[i + 1] = strides[2 + i];
        p.v_stride[i + 1] = strides[4 + i];
        p.out_stride[i + 1] = strides[6 + i];
    }
    p.q_stride[0] = p.k_stride[0] = p.v_stride[0] = p.out_stride[0] = 0;
    p.scale = scale;
    p.bf16 = bf16;
    return run(p, threads);
}

}  // extern "C"
