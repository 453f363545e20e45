/* The training crop's one resize: a box of an RGB image to out_w x out_h with the antialiased bilinear
 * (triangle) filter, written straight into the batch slot, mirrored when asked.
 *
 * resize_box(src, stride, width, height, x0, y0, x1, y1, dst, out_w, out_h, flip) -> bool
 *   src: width x height RGB pixels, rows `stride` bytes apart; (x0, y0, x1, y1): the box, in pixels of src
 *   (fractional); dst: a writable C-contiguous buffer of out_h * out_w * 3 bytes. Returns False, writing
 *   nothing, when the window is narrower than the filter (the caller then asks Pillow).
 *
 * The filter is Pillow's Image.resize(BILINEAR, box=...): the same sample centres, support (widened by the
 * downscale factor) and weights, derived the same way from the box in single precision. What differs is
 * how it is evaluated, which is where Pillow spends its time (~1 ms for a 360 -> 224 px crop):
 *   - vertical pass first, row by row, fused with the horizontal pass: one intermediate row of only the
 *     columns the horizontal pass reads, in L1 cache, instead of an intermediate image;
 *   - the vertical pass runs over contiguous bytes with a constant weight per tap, which the compiler
 *     vectorises (AVX2 clone where the CPU has it); the horizontal pass has its tap count fixed per call;
 *   - the intermediate keeps 6 fraction bits (Pillow rounds it to 8-bit), so the result is within one
 *     level of Pillow's and closer to the exact filter (tests/test_data_resample.py);
 *   - no copy into Pillow's 4-byte pixels, no copy back out, and the flip is free (mirrored columns).
 * Integer arithmetic only: the pixels are the same on every machine and code path. The GIL is released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__) && !defined(MYCODIST_PORTABLE)  /* MYCODIST_PORTABLE: the plain C loops (a test builds both) */
#define USE_SSE2 1
#include <emmintrin.h>
#endif

#define VBITS 14                 /* vertical weights: sum to 1 << VBITS */
#define MID_SHIFT 8              /* intermediate = vertical sum >> 8: 6 fraction bits, <= 255 * 64 */
#define HBITS 14                 /* horizontal weights: sum to 1 << HBITS (int16 for madd) */
#define OUT_SHIFT (VBITS - MID_SHIFT + HBITS)

/* GCC builds an AVX2 copy of the vectorised loop beside the baseline one and picks at load time. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MYCODIST_PORTABLE)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

typedef struct {
    int taps;       /* every output sample reads `taps` inputs from first[o] (zero weights pad short ones) */
    int *first;     /* first input index per output sample */
    int32_t *w;     /* out * taps fixed-point weights */
} Filter;

static void filter_free(Filter *f) {  /* safe to call twice */
    free(f->first);
    free(f->w);
    f->first = NULL;
    f->w = NULL;
}

/* Weights of one axis: the triangle filter as Pillow derives it (sample centre in0 + (o + 0.5) * scale,
 * support widened by the downscale factor, bounds rounded half up and clipped to the image, weights
 * normalised to sum 1), then rounded to `bits` fraction bits. A short run of weights is padded with zeros
 * (and moved left at the image's end) so that every sample has the same tap count. -1: out of memory;
 * 0: the axis is shorter than the filter. */
static int filter_make(Filter *f, int in_size, float in0, float in1, int out_size, int bits) {
    double scale = (double)(in1 - in0) / out_size;
    double fscale = scale < 1.0 ? 1.0 : scale;
    double support = fscale;     /* the triangle's support is 1 input pixel, widened when downscaling */
    double inv = 1.0 / fscale;
    int taps = (int)ceil(support) * 2 + 2;  /* Pillow's 2 * ceil(support) + 1, and one zero: taps go in pairs */
    double *raw;
    f->first = NULL;
    f->w = NULL;
    f->taps = taps;
    if (in_size < taps) {
        return 0;
    }
    raw = malloc(sizeof(double) * (size_t)taps);
    f->first = malloc(sizeof(int) * (size_t)out_size);
    f->w = calloc((size_t)out_size * (size_t)taps, sizeof(int32_t));
    if (!raw || !f->first || !f->w) {
        free(raw);
        filter_free(f);
        return -1;
    }
    for (int o = 0; o < out_size; o++) {
        double center = in0 + (o + 0.5) * scale, total = 0.0;
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5), n, shift = 0;
        if (lo < 0) lo = 0;
        if (hi > in_size) hi = in_size;
        n = hi - lo;
        if (n > taps) n = taps;  /* cannot happen: the span is at most 2 * support + 1 */
        for (int i = 0; i < n; i++) {
            double x = (i + lo - center + 0.5) * inv;
            double v = x < 0.0 ? -x : x;
            raw[i] = v < 1.0 ? 1.0 - v : 0.0;
            total += raw[i];
        }
        if (lo + taps > in_size) {  /* keep `taps` reads inside the axis: start earlier, pad in front */
            shift = lo + taps - in_size;
            lo -= shift;
        }
        f->first[o] = lo;
        for (int i = 0; i < n; i++) {
            double v = total != 0.0 ? raw[i] / total : raw[i];
            f->w[o * taps + shift + i] = (int32_t)(v * (double)(1 << bits) + 0.5);
        }
    }
    free(raw);
    return 1;
}

/* mid[j] = the rows' bytes j under the vertical weights, rounded to 6 fraction bits: contiguous bytes and one
 * weight per tap, a loop the compiler vectorises (an AVX2 clone where the CPU has it; measured faster than
 * hand-written SSE2 multiply-adds of row pairs). Zero weights (padding) are skipped. */
VECTOR_CLONES
static void vertical_row(const uint8_t *rows, Py_ssize_t stride, const int32_t *w, int taps, int n, int32_t *acc,
                         int16_t *mid) {
    for (int j = 0; j < n; j++) {
        acc[j] = 1 << (MID_SHIFT - 1);
    }
    for (int t = 0; t < taps; t++) {
        const int32_t k = w[t];
        const uint8_t *row = rows + t * stride;
        if (k == 0) {
            continue;
        }
        for (int j = 0; j < n; j++) {
            acc[j] += (int32_t)row[j] * k;
        }
    }
    for (int j = 0; j < n; j++) {
        mid[j] = (int16_t)(acc[j] >> MID_SHIFT);
    }
}

/* One output row from one intermediate row (6 fraction bits, RGB int16): per output pixel, the taps in pairs;
 * the weights are 14-bit so a pair of pixels times a pair of weights is one multiply-add of int16 pairs.
 * The SSE2 path (every x86-64 CPU) and the portable loop compute the same integers: the sums fit in int32. */
#if defined(USE_SSE2)
static void horizontal_row(const int16_t *mid, int base, const Filter *h, int out_w, int flip, uint8_t *out) {
    const __m128i half = _mm_set1_epi32(1 << (OUT_SHIFT - 1));
    const int pairs = h->taps / 2;
    for (int o = 0; o < out_w; o++) {
        const int16_t *p = mid + (size_t)(h->first[o] - base) * 3;
        const int32_t *k = h->w + (size_t)o * h->taps;
        __m128i acc = half;
        uint32_t rgb;
        for (int t = 0; t < pairs; t++, p += 6) {
            /* pixel 2t: R G B (R of the next, times nothing useful: lane 3 is dropped) */
            __m128i a = _mm_loadl_epi64((const __m128i *)p);
            __m128i b = _mm_loadl_epi64((const __m128i *)(p + 3));
            __m128i w = _mm_set1_epi32((int32_t)(((uint32_t)k[2 * t] & 0xffff) | ((uint32_t)k[2 * t + 1] << 16)));
            acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_unpacklo_epi16(a, b), w));
        }
        acc = _mm_srai_epi32(acc, OUT_SHIFT);
        acc = _mm_packs_epi32(acc, acc);
        rgb = (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(acc, acc));
        memcpy(out + (size_t)(flip ? out_w - 1 - o : o) * 3, &rgb, 3);
    }
}
#else
static inline uint8_t clip8(int32_t v) {
    v >>= OUT_SHIFT;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

static void horizontal_row(const int16_t *mid, int base, const Filter *h, int out_w, int flip, uint8_t *out) {
    for (int o = 0; o < out_w; o++) {
        const int16_t *p = mid + (size_t)(h->first[o] - base) * 3;
        const int32_t *k = h->w + (size_t)o * h->taps;
        int32_t r = 1 << (OUT_SHIFT - 1), g = r, b = r;
        uint8_t *d = out + (size_t)(flip ? out_w - 1 - o : o) * 3;
        for (int t = 0; t < h->taps; t++) {
            r += p[3 * t] * k[t];
            g += p[3 * t + 1] * k[t];
            b += p[3 * t + 2] * k[t];
        }
        d[0] = clip8(r);
        d[1] = clip8(g);
        d[2] = clip8(b);
    }
}
#endif

static PyObject *resize_box(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer src, dst;
    Py_ssize_t stride;
    int width, height, out_w, out_h, flip, made_h, made_v;
    double bx0, by0, bx1, by1;
    float fx0, fy0, fx1, fy1;
    Filter h = {0}, v = {0};
    int16_t *mid = NULL;
    int32_t *acc = NULL;
    PyObject *result;
    int col0, col1, n;
    if (!PyArg_ParseTuple(args, "y*niiddddw*iip", &src, &stride, &width, &height, &bx0, &by0, &bx1, &by1, &dst,
                          &out_w, &out_h, &flip)) {
        return NULL;
    }
    /* the box in single precision, as Pillow takes it, then checked: a box edge computed as (x + w) * scale
     * may exceed the image's edge by a double rounding error that single precision does not see */
    fx0 = (float)bx0, fy0 = (float)by0, fx1 = (float)bx1, fy1 = (float)by1;
    if (width < 1 || height < 1 || out_w < 1 || out_h < 1 || stride < (Py_ssize_t)width * 3
        || src.len < (Py_ssize_t)(height - 1) * stride + (Py_ssize_t)width * 3
        || dst.len < (Py_ssize_t)out_w * out_h * 3 || !PyBuffer_IsContiguous(&dst, 'C')
        || !(fx0 >= 0 && fy0 >= 0 && fx1 <= width && fy1 <= height && fx1 > fx0 && fy1 > fy0)) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError,
                        "resize_box: the source must hold height rows of width RGB pixels, the box must lie "
                        "inside it and not be empty, and the destination must hold out_h x out_w RGB pixels");
        return NULL;
    }
    made_h = filter_make(&h, width, fx0, fx1, out_w, HBITS);
    made_v = made_h > 0 ? filter_make(&v, height, fy0, fy1, out_h, VBITS) : 0;
    if (made_h < 0 || made_v < 0) {
        result = PyErr_NoMemory();
        goto done;
    }
    if (made_h == 0 || made_v == 0) {  /* narrower than the filter: the caller asks Pillow */
        result = Py_NewRef(Py_False);
        goto done;
    }
    col0 = h.first[0];  /* the columns the horizontal pass reads */
    col1 = h.first[out_w - 1] + h.taps;
    for (int o = 0; o < out_w; o++) {
        if (h.first[o] < col0) col0 = h.first[o];
        if (h.first[o] + h.taps > col1) col1 = h.first[o] + h.taps;
    }
    n = (col1 - col0) * 3;
    mid = malloc(sizeof(int16_t) * (size_t)(n + 4));  /* + the dropped lane read past the last pixel */
    acc = malloc(sizeof(int32_t) * (size_t)n);
    if (!mid || !acc) {
        result = PyErr_NoMemory();
        goto done;
    }
    memset(mid + n, 0, 4 * sizeof(int16_t));  /* read (and dropped) past the last pixel: keep it defined */
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *pixels = (const uint8_t *)src.buf + (size_t)col0 * 3;
    uint8_t *out = (uint8_t *)dst.buf;
    for (int y = 0; y < out_h; y++) {
        vertical_row(pixels + (size_t)v.first[y] * (size_t)stride, stride, v.w + (size_t)y * v.taps, v.taps, n, acc, mid);
        horizontal_row(mid, col0, &h, out_w, flip, out + (size_t)y * out_w * 3);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_True);
done:
    free(mid);
    free(acc);
    filter_free(&h);
    filter_free(&v);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {
    {"resize_box", resize_box, METH_VARARGS,
     "resize_box(src, stride, width, height, x0, y0, x1, y1, dst, out_w, out_h, flip) -> bool: the box of an "
     "RGB image resized with the antialiased bilinear filter into dst (mirrored if flip); False when the "
     "window is narrower than the filter."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_resample", NULL, -1, methods};

PyMODINIT_FUNC PyInit__resample(void) { return PyModule_Create(&module); }
