// y = act(x w^T + bias) [+ residual] [then LayerNorm] on AVX-512 CPUs: float32 products, or
// bfloat16 products (AVX512-BF16) with float32 sums.
//
// Built by registry_xf/layers/cpu_linear.py with the system C++ compiler on first use; no
// torch headers: pointers, sizes and strides (in elements) come from Python.
//
// The weight (n x k) is packed once, by Python, into panels of 64 output columns, so that one
// vector load gives 16 columns' values at one k:
// - float32 products: panel p holds, for each k, the 64 columns' values ([panels][k][64]);
//   a micro-kernel step broadcasts one x value and multiply-adds it into 16 sums per vector.
// - bfloat16 products: for each pair of k (k padded to even), the 64 columns' two bfloat16
//   values side by side ([panels][k/2][64][2]), so that one vdpbf16ps multiplies a broadcast
//   pair of x by 16 columns' pairs and adds both products to 16 float32 sums.
// Columns past n are zeros.
//
// A register-blocked micro-kernel computes 6 rows x 64 columns (24 accumulators) over a slice
// of k; the sums of earlier slices wait in a float32 buffer, and after the last slice the
// epilogue adds the bias, applies the activation, adds the residual and stores float32 or
// bfloat16 columns. Rows go in blocks that fill about 384 KiB of L2, so the weight is read
// once per block:
// - float32 x is read in place (its rows contiguous); only a last micro-tile of fewer than 6
//   rows is copied, padded with zero rows;
// - for bfloat16 products x (float32 or bfloat16) is copied a block at a time into bfloat16
//   rows (rounded to nearest even while copying: no separate conversion pass), zero-padded
//   to an even k and to whole micro-tiles of rows.
//
// A LayerNorm over the n columns may follow (a post-norm transformer layer's norm after its
// residual sum): then one thread owns whole rows (pieces are blocks of rows times all the
// panels), and after the last panel's epilogue of a micro-tile it normalises those rows of
// y in place while they are still in cache (float32 mean and variance, two passes over the
// row), instead of a separate pass over the whole output.
//
// Threads take (block of rows, group of panels) pieces from a counter: OpenMP threads (the
// runtime torch has loaded), or just the caller's thread. Scratch is allocated per call and
// per thread: calls from several Python threads at once share nothing.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#ifndef __AVX512F__
#error "this kernel needs AVX-512 (compile with -march=native on a CPU that has it)"
#endif

#include "cpu_activations.h"

#ifdef __AVX512BF16__
#define RX_BF16 1
#else
#define RX_BF16 0
#endif

namespace {

constexpr int kCols = 64;         // columns per weight panel (4 vectors of 16)
constexpr int kVecs = kCols / 16;
constexpr int kRows = 6;          // rows per micro-tile
// k per slice. bfloat16: pairs; the panel streams from L2 (faster than slicing k to fit it
// in L1, whose partial sums cost more than they save); k up to 1,536 in one slice. float32:
// a micro-tile's 6 rows of x stay in L1 over a slice (x is read in place, rows apart).
constexpr int64_t kPairsL1 = 768;
constexpr int64_t kFloatsL1 = 384;
constexpr int64_t kBlockBytes = 384 << 10;  // a block of x's rows (as multiplied): in L2
constexpr int64_t kMaxBlockRows = 768;

using rx_activations::activate;  // the activation codes: cpu_activations.h

struct Problem {
    const void* x;
    int x_bf16;
    int64_t m, k, ldx;
    const void* w;  // packed panels: float32 values, or bfloat16 pairs as 32-bit words
    int w_f32;      // 1: float32 products (x and y float32), 0: bfloat16 products
    int64_t n, k_pairs, panels;
    const float* bias;      // may be null
    const float* residual;  // may be null
    int64_t ldr;
    void* y;
    int y_bf16;
    int64_t ldy;
    int act;
    int norm;                  // 1: LayerNorm each finished row of y (float32 y only)
    const float* norm_weight;  // n float32 or null (ones)
    const float* norm_bias;    // n float32 or null (zeros)
    float eps;
    int64_t block_rows, blocks, groups, panels_per_group;
    std::atomic<int64_t> next;
};

// A micro-tile's sums at the start of a slice: zeros for the first, else the earlier
// slices' sums.
inline void start_sums(bool first, const float* sums, __m512 acc[kRows][kVecs]) {
    for (int i = 0; i < kRows; ++i)
        for (int j = 0; j < kVecs; ++j)
            acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + i * kCols + 16 * j);
}

#if RX_BF16
// Rows [row0, row0 + rows) of x into bfloat16 rows of `pairs` 32-bit pairs each (k padded
// with zeros to 2 x pairs); rows past `rows` up to a whole micro-tile are zeros.
void copy_rows(const Problem& p, int64_t row0, int64_t rows, uint32_t* a, int64_t pairs) {
    const int64_t k = p.k, padded_rows = (rows + kRows - 1) / kRows * kRows;
    uint16_t* out = reinterpret_cast<uint16_t*>(a);
    const int64_t width = 2 * pairs;
    for (int64_t r = 0; r < rows; ++r) {
        uint16_t* dst = out + r * width;
        if (p.x_bf16) {
            memcpy(dst, static_cast<const uint16_t*>(p.x) + (row0 + r) * p.ldx, k * 2);
        } else {
            const float* src = static_cast<const float*>(p.x) + (row0 + r) * p.ldx;
            int64_t j = 0;
            for (; j + 16 <= k; j += 16)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
            if (j < k) {
                const __mmask16 mask = static_cast<__mmask16>((1u << (k - j)) - 1);
                _mm256_mask_storeu_epi16(
                    dst + j, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + j)));
            }
        }
        if (width > k) dst[k] = 0;
    }
    if (padded_rows > rows) memset(out + rows * width, 0, (padded_rows - rows) * width * 2);
}

// Six rows x 64 columns over k pairs [0, pairs) of a slice: a points at the tile's first row
// (row stride lda pairs), w at the panel's slice. first: start from zeros, else from sums.
inline void micro_tile_bf16(const uint32_t* a, int64_t lda, const uint32_t* w, int64_t pairs,
                            bool first, const float* sums, __m512 acc[kRows][kVecs]) {
    start_sums(first, sums, acc);
    const uint32_t* a0 = a;
    const uint32_t* a3 = a + 3 * lda;
    for (int64_t q = 0; q < pairs; ++q) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + q * kCols);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + q * kCols + 16);
        const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + q * kCols + 32);
        const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + q * kCols + 48);
#define RX_ROW(i, base, off)                                                        \
    {                                                                               \
        const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(base[off + q])); \
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, w0);                             \
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, w1);                             \
        acc[i][2] = _mm512_dpbf16_ps(acc[i][2], x, w2);                             \
        acc[i][3] = _mm512_dpbf16_ps(acc[i][3], x, w3);                             \
    }
        RX_ROW(0, a0, 0)
        RX_ROW(1, a0, lda)
        RX_ROW(2, a0, 2 * lda)
        RX_ROW(3, a3, 0)
        RX_ROW(4, a3, lda)
        RX_ROW(5, a3, 2 * lda)
#undef RX_ROW
    }
}
#endif  // RX_BF16

// Six float32 rows x 64 columns over k [0, depth) of a slice: a points at the tile's first
// row at the slice's first k (row stride lda floats), w at the panel's slice.
inline void micro_tile_f32(const float* a, int64_t lda, const float* w, int64_t depth,
                           bool first, const float* sums, __m512 acc[kRows][kVecs]) {
    start_sums(first, sums, acc);
    const float* a0 = a;
    const float* a3 = a + 3 * lda;
    for (int64_t q = 0; q < depth; ++q) {
        const __m512 w0 = _mm512_loadu_ps(w + q * kCols);
        const __m512 w1 = _mm512_loadu_ps(w + q * kCols + 16);
        const __m512 w2 = _mm512_loadu_ps(w + q * kCols + 32);
        const __m512 w3 = _mm512_loadu_ps(w + q * kCols + 48);
#define RX_ROW(i, base, off)                                  \
    {                                                         \
        const __m512 x = _mm512_set1_ps(base[off + q]);       \
        acc[i][0] = _mm512_fmadd_ps(x, w0, acc[i][0]);        \
        acc[i][1] = _mm512_fmadd_ps(x, w1, acc[i][1]);        \
        acc[i][2] = _mm512_fmadd_ps(x, w2, acc[i][2]);        \
        acc[i][3] = _mm512_fmadd_ps(x, w3, acc[i][3]);        \
    }
        RX_ROW(0, a0, 0)
        RX_ROW(1, a0, lda)
        RX_ROW(2, a0, 2 * lda)
        RX_ROW(3, a3, 0)
        RX_ROW(4, a3, lda)
        RX_ROW(5, a3, 2 * lda)
#undef RX_ROW
    }
}

// The last rows [row0, row0 + rows) of float32 x (fewer than a micro-tile) into a, zero rows
// after them up to a whole micro-tile (row stride k).
void copy_tail_f32(const Problem& p, int64_t row0, int64_t rows, float* a) {
    const float* src = static_cast<const float*>(p.x);
    for (int64_t r = 0; r < rows; ++r) memcpy(a + r * p.k, src + (row0 + r) * p.ldx, p.k * 4);
    memset(a + rows * p.k, 0, (kRows - rows) * p.k * 4);
}

// The finished sums of rows [row, row + rows) x columns [col, col + 64) to y.
void epilogue(const Problem& p, __m512 acc[kRows][kVecs], int64_t row, int rows, int64_t col) {
    for (int j = 0; j < kVecs; ++j) {
        const int64_t c = col + 16 * j;
        if (c >= p.n) break;
        const int64_t left = p.n - c;
        const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + c) : _mm512_setzero_ps();
        for (int i = 0; i < rows; ++i) {
            __m512 v = activate(_mm512_add_ps(acc[i][j], bias), p.act);
            if (p.residual)
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.residual + (row + i) * p.ldr + c));
#if RX_BF16
            if (p.y_bf16) {
                uint16_t* dst = static_cast<uint16_t*>(p.y) + (row + i) * p.ldy + c;
                _mm256_mask_storeu_epi16(dst, mask, (__m256i)_mm512_cvtneps_pbh(v));
                continue;
            }
#endif
            _mm512_mask_storeu_ps(static_cast<float*>(p.y) + (row + i) * p.ldy + c, mask, v);
        }
    }
}

// LayerNorm of a micro-tile's float32 rows [row, row + rows) of y in place: the mean, then
// the mean of squared deviations (both in float32), then (v - mean) / sqrt(variance + eps)
// * weight + bias. The rows go side by side through each pass: independent sums in flight.
void normalise_rows(const Problem& p, int64_t row, int rows) {
    const int64_t n = p.n;
    const float inv_n = 1.0f / static_cast<float>(n);
    float* v[kRows];
    __m512 sum[kRows], mean[kRows], scale[kRows];
    for (int i = 0; i < kRows; ++i) {
        v[i] = static_cast<float*>(p.y) + (row + (i < rows ? i : 0)) * p.ldy;
        sum[i] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < n; c += 16) {
        const int64_t left = n - c;
        const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        for (int i = 0; i < kRows; ++i)
            if (i < rows) sum[i] = _mm512_add_ps(sum[i], _mm512_maskz_loadu_ps(mask, v[i] + c));
    }
    for (int i = 0; i < kRows; ++i) {
        mean[i] = _mm512_set1_ps(_mm512_reduce_add_ps(sum[i]) * inv_n);
        sum[i] = _mm512_setzero_ps();  // now the squared deviations
    }
    for (int64_t c = 0; c < n; c += 16) {
        const int64_t left = n - c;
        const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        for (int i = 0; i < kRows; ++i) {
            if (i >= rows) continue;
            const __m512 d = _mm512_maskz_sub_ps(mask, _mm512_maskz_loadu_ps(mask, v[i] + c), mean[i]);
            sum[i] = _mm512_fmadd_ps(d, d, sum[i]);
        }
    }
    for (int i = 0; i < kRows; ++i) {
        const float variance = _mm512_reduce_add_ps(sum[i]) * inv_n;
        scale[i] = _mm512_set1_ps(1.0f / __builtin_sqrtf(variance + p.eps));
    }
    for (int64_t c = 0; c < n; c += 16) {
        const int64_t left = n - c;
        const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        const __m512 weight = p.norm_weight ? _mm512_maskz_loadu_ps(mask, p.norm_weight + c)
                                            : _mm512_set1_ps(1.0f);
        const __m512 bias = p.norm_bias ? _mm512_maskz_loadu_ps(mask, p.norm_bias + c)
                                        : _mm512_setzero_ps();
        for (int i = 0; i < kRows; ++i) {
            if (i >= rows) continue;
            const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, v[i] + c), mean[i]);
            const __m512 out = _mm512_fmadd_ps(_mm512_mul_ps(d, scale[i]), weight, bias);
            _mm512_mask_storeu_ps(v[i] + c, mask, out);
        }
    }
}

// One piece: a block of rows times a group of panels. scratch: the block's rows in bfloat16
// (bfloat16 products), or a last partial micro-tile of float32 rows.
void piece(const Problem& p, int64_t block, int64_t group, void* scratch, float* sums) {
    const int64_t row0 = block * p.block_rows;
    const int64_t rows = p.m - row0 < p.block_rows ? p.m - row0 : p.block_rows;
    const int64_t tiles = (rows + kRows - 1) / kRows;
    // float32: tiles before `whole` are read in place (row stride ldx), the last from scratch
    const float* xf = static_cast<const float*>(p.x) + row0 * p.ldx;
    const int64_t whole = p.w_f32 ? rows / kRows : 0;
    if (p.w_f32 && whole < tiles)
        copy_tail_f32(p, row0 + whole * kRows, rows - whole * kRows, static_cast<float*>(scratch));
#if RX_BF16
    if (!p.w_f32) copy_rows(p, row0, rows, static_cast<uint32_t*>(scratch), p.k_pairs);
#endif
    const int64_t depth = p.w_f32 ? p.k : p.k_pairs;  // k in the weight's steps
    const int64_t slice = p.w_f32 ? kFloatsL1 : kPairsL1;
    const int64_t p0 = group * p.panels_per_group;
    const int64_t p1 = p0 + p.panels_per_group < p.panels ? p0 + p.panels_per_group : p.panels;
    __m512 acc[kRows][kVecs];
    for (int64_t panel = p0; panel < p1; ++panel) {
        const int64_t panel_offset = panel * depth * kCols;  // in the weight's steps' units
        for (int64_t q0 = 0; q0 < depth; q0 += slice) {
            const int64_t steps = depth - q0 < slice ? depth - q0 : slice;
            const bool first = q0 == 0, last = q0 + steps == depth;
            for (int64_t t = 0; t < tiles; ++t) {
                float* tile_sums = sums + t * kRows * kCols;
                if (p.w_f32) {
                    const float* w = static_cast<const float*>(p.w) + panel_offset + q0 * kCols;
                    if (t < whole)
                        micro_tile_f32(xf + t * kRows * p.ldx + q0, p.ldx, w, steps, first,
                                       tile_sums, acc);
                    else
                        micro_tile_f32(static_cast<const float*>(scratch) + q0, p.k, w, steps,
                                       first, tile_sums, acc);
                }
#if RX_BF16
                else {
                    const uint32_t* w =
                        static_cast<const uint32_t*>(p.w) + panel_offset + q0 * kCols;
                    micro_tile_bf16(static_cast<const uint32_t*>(scratch) + t * kRows * p.k_pairs
                                        + q0, p.k_pairs, w, steps, first, tile_sums, acc);
                }
#endif
                if (last) {
                    const int64_t left = rows - t * kRows;
                    const int tile_rows = left < kRows ? int(left) : kRows;
                    epilogue(p, acc, row0 + t * kRows, tile_rows, panel * kCols);
                    // the rows' last columns: normalise them (a norm: one group of panels)
                    if (p.norm && panel == p.panels - 1)
                        normalise_rows(p, row0 + t * kRows, tile_rows);
                } else {
                    for (int i = 0; i < kRows; ++i)
                        for (int j = 0; j < kVecs; ++j)
                            _mm512_storeu_ps(tile_sums + i * kCols + 16 * j, acc[i][j]);
                }
            }
        }
    }
}

int work(Problem& p) {
    const int64_t scratch_bytes =
        p.w_f32 ? kRows * p.k * 4 : p.block_rows * p.k_pairs * 4;
    void* scratch = aligned_alloc(64, (scratch_bytes + 127) / 64 * 64);
    float* sums = static_cast<float*>(aligned_alloc(64, p.block_rows * kCols * 4));
    int failed = !scratch || !sums;
    if (!failed) {
        const int64_t pieces = p.blocks * p.groups;
        for (int64_t t = p.next.fetch_add(1); t < pieces; t = p.next.fetch_add(1))
            piece(p, t / p.groups, t % p.groups, scratch, sums);
    }
    free(scratch);
    free(sums);
    return failed;
}

}  // namespace

extern "C" {

// 1 when this build has bfloat16 products (the CPU has AVX512-BF16); float32 always.
int rx_linear_has_bf16(void) { return RX_BF16; }

// Columns per weight panel: the packed weight is [ceil(n / 64)][k][64] float32, or
// [ceil(n / 64)][ceil(k / 2)][64][2] bfloat16.
int rx_linear_panel_width(void) { return kCols; }

// sizes: m, k, n, ldx, ldr, ldy (row strides in elements; rows contiguous).
// x: m x k float32 (x_bf16 = 0) or bfloat16 (1); w: the packed weight, float32 (w_f32 = 1)
// or bfloat16 (0); bias: n float32 or null; residual: m x n float32 or null; y: m x n
// float32 (y_bf16 = 0) or bfloat16 (1).
// act: 0 none, 1 GELU (erf), 2 GELU (tanh), 3 ReLU, applied before the residual is added.
// norm 1: then a LayerNorm of each row of y (float32 y only) with norm_weight and norm_bias
// (n float32 each, or null) and eps.
// Returns 0; 1 when no thread could allocate its scratch memory (y incomplete); 2 for
// bfloat16 products or a bfloat16 y in a build without AVX512-BF16; 3 for a norm on a
// bfloat16 y; 4 for float32 products with a bfloat16 x.
int rx_linear(const void* x, int x_bf16, const void* w, int w_f32, const float* bias,
              const float* residual, void* y, int y_bf16, const int64_t* sizes, int act,
              int threads, int norm, const float* norm_weight, const float* norm_bias,
              float eps) {
    if (!RX_BF16 && (!w_f32 || y_bf16)) return 2;
    if (norm && y_bf16) return 3;
    if (w_f32 && x_bf16) return 4;
    Problem p;
    p.x = x;
    p.x_bf16 = x_bf16;
    p.m = sizes[0];
    p.k = sizes[1];
    p.n = sizes[2];
    p.ldx = sizes[3];
    p.ldr = sizes[4];
    p.ldy = sizes[5];
    p.w = w;
    p.w_f32 = w_f32;
    p.k_pairs = (p.k + 1) / 2;
    p.panels = (p.n + kCols - 1) / kCols;
    p.bias = bias;
    p.residual = residual;
    p.y = y;
    p.y_bf16 = y_bf16;
    p.act = act;
    p.norm = norm;
    p.norm_weight = norm_weight;
    p.norm_bias = norm_bias;
    p.eps = eps;
    if (threads < 1) threads = 1;
    if (threads > 256) threads = 256;
    const int64_t tiles = (p.m + kRows - 1) / kRows;
    // Rows per block: as many whole micro-tiles as fit kBlockBytes (the weight is read once
    // per block). With several threads, equal shares: the panels split in as many groups as
    // threads where the rows fit one block and no norm needs whole rows, else a multiple of
    // the threads in blocks.
    const int64_t row_bytes = w_f32 ? 4 * p.k : 4 * p.k_pairs;
    int64_t block_tiles = kBlockBytes / row_bytes / kRows;
    if (block_tiles > kMaxBlockRows / kRows) block_tiles = kMaxBlockRows / kRows;
    if (block_tiles < 1) block_tiles = 1;
    int64_t blocks = (tiles + block_tiles - 1) / block_tiles;
    int64_t groups = 1;
    if (threads > 1) {
        if (blocks == 1 && p.panels >= threads && !norm) {
            groups = threads;
        } else {
            blocks = (blocks + threads - 1) / threads * threads;
            if (blocks > tiles) blocks = tiles;
        }
    }
    block_tiles = (tiles + blocks - 1) / blocks;
    p.block_rows = block_tiles * kRows;
    p.blocks = (tiles + block_tiles - 1) / block_tiles;
    p.panels_per_group = (p.panels + groups - 1) / groups;
    p.groups = (p.panels + p.panels_per_group - 1) / p.panels_per_group;
    p.next.store(0);
    const int64_t pieces = p.blocks * p.groups;
    if (threads > pieces) threads = static_cast<int>(pieces);
    if (threads == 1) return work(p);
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : failed)
    failed += work(p);
#else
    failed = work(p);
#endif
    return failed == threads ? 1 : 0;
}

}  // extern "C"
