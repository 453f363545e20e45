/* Region decoding of baseline and progressive JPEGs through libjpeg(-turbo)'s classic API.
 *
 * decode_region(data, k, x0, y0, x1, y1) decodes the JPEG at scale k/8 (IDCT scaling) and returns only
 * the rows y0..y1 and (at least) the columns x0..x1 of the scaled image, as RGB bytes:
 *   - jpeg_crop_scanline() limits the inverse DCT, upsampling and colour conversion to the iMCU columns
 *     that cover x0..x1 (it widens the span to iMCU boundaries and reports the real one);
 *   - jpeg_skip_scanlines() passes over the rows above y0 without inverse DCT;
 *   - jpeg_abort_decompress() stops after row y1: nothing below the box is decoded (baseline JPEGs are
 *     not even entropy-decoded there; progressive ones are read whole by jpeg_start_decompress()).
 * Decoding settings are libjpeg's defaults, which are Pillow's and simplejpeg's: accurate integer IDCT
 * (JDCT_ISLOW) and fancy (triangle-filter) chroma upsampling.
 *
 * Returns (pixels, x, y, width, height, scaled_width, scaled_height): `pixels` is width * height * 3 bytes,
 * rows of the scaled image y..y+height, columns x..x+width (x <= x0, x + width >= x1). Returns None for
 * CMYK/YCCK JPEGs (no RGB conversion in libjpeg); raises ValueError for data libjpeg rejects or warns about
 * (strict, as simplejpeg: a warning means corrupt data). The GIL is released while decoding.
 *
 * Needs libjpeg-turbo >= 1.5 (jpeg_crop_scanline, jpeg_skip_scanlines), e.g. Debian's libjpeg62-turbo-dev.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) && !defined(LIBJPEG_TURBO_VERSION)
#error "libjpeg-turbo >= 1.5 is needed (jpeg_crop_scanline, jpeg_skip_scanlines)"
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) { /* a warning: corrupt data that libjpeg would patch over */
        on_error(cinfo);
    }
}

static PyObject *decode_region(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data;
    int k, x0, y0, x1, y1;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &k, &x0, &y0, &x1, &y1)) {
        return NULL;
    }
    if (k < 1 || k > 8) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "scale must be k/8 with k in 1..8");
        return NULL;
    }
    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    /* volatile: modified after setjmp and read after a longjmp */
    PyObject *volatile out = NULL;
    PyThreadState *volatile released = NULL;

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = '\0';
    if (setjmp(err.jump)) {
        if (released != NULL) {
            PyEval_RestoreThread(released);
        }
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_XDECREF(out);
        PyErr_Format(PyExc_ValueError, "JPEG decoding failed: %s", err.message);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK ||
        cinfo.num_components == 2 || cinfo.num_components > 4) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = (unsigned int)k;
    cinfo.scale_denom = 8;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_calc_output_dimensions(&cinfo);
    const JDIMENSION full_w = cinfo.output_width, full_h = cinfo.output_height;
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if ((JDIMENSION)x1 > full_w) x1 = (int)full_w;
    if ((JDIMENSION)y1 > full_h) y1 = (int)full_h;
    if (x1 <= x0 || y1 <= y0) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "empty region");
        return NULL;
    }
    /* an upper bound of the row width, shrunk once the real one is known: jpeg_crop_scanline keeps the right
     * edge and moves the left one down to an iMCU boundary (at most max_h_samp_factor (<= 4) x 8 px away) */
    const JDIMENSION rows = (JDIMENSION)(y1 - y0);
    JDIMENSION bound = (JDIMENSION)(x1 - x0) + 64;
    if (bound > full_w) bound = full_w;
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bound * rows * 3);
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    JSAMPLE *dst = (JSAMPLE *)PyBytes_AS_STRING(out);
    JDIMENSION xoffset = (JDIMENSION)x0, width = (JDIMENSION)(x1 - x0);

    released = PyEval_SaveThread();
    jpeg_start_decompress(&cinfo);
    if (width < full_w) {
        jpeg_crop_scanline(&cinfo, &xoffset, &width);
    } else {
        xoffset = 0;
        width = full_w;
    }
    if (width > bound || xoffset + width > full_w) {
        strcpy(err.message, "unexpected crop span");
        longjmp(err.jump, 1);
    }
    if (y0 > 0) {
        JDIMENSION skipped = jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
        if (skipped != (JDIMENSION)y0) {
            strcpy(err.message, "could not skip to the region");
            longjmp(err.jump, 1);
        }
    }
    const size_t stride = (size_t)width * 3;
    for (JDIMENSION r = 0; r < rows;) {
        JSAMPROW row = dst + r * stride;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, &row, 1);
        if (got != 1) {
            strcpy(err.message, "fewer rows than the header says");
            longjmp(err.jump, 1);
        }
        r += got;
    }
    jpeg_abort_decompress(&cinfo); /* the rows below the region are never decoded */
    jpeg_destroy_decompress(&cinfo);
    PyEval_RestoreThread(released);
    released = NULL;
    PyBuffer_Release(&data);

    PyObject *pixels = out;
    if (_PyBytes_Resize(&pixels, (Py_ssize_t)(stride * rows)) < 0) {
        return NULL; /* _PyBytes_Resize freed it */
    }
    return Py_BuildValue("(NIiIIII)", pixels, xoffset, y0, width, rows, full_w, full_h);
}

static PyObject *jpeg_size(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data)) {
        return NULL;
    }
    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = '\0';
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "JPEG header: %s", err.message);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    const int convertible = !(cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK ||
                              cinfo.num_components == 2 || cinfo.num_components > 4);
    const JDIMENSION w = cinfo.image_width, h = cinfo.image_height;
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    if (!convertible) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(II)", w, h);
}

static PyMethodDef methods[] = {
    {"jpeg_size", jpeg_size, METH_VARARGS,
     "jpeg_size(data) -> (width, height) | None (CMYK/YCCK); ValueError when the header is unreadable."},
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, k, x0, y0, x1, y1) -> (rgb_bytes, x, y, width, height, scaled_width, "
     "scaled_height) | None\n\nDecode rows y0..y1 and at least columns x0..x1 of the JPEG scaled by k/8."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpegregion",
    "Region decoding of JPEGs with libjpeg-turbo's jpeg_crop_scanline / jpeg_skip_scanlines.", -1, methods,
};

PyMODINIT_FUNC PyInit__jpegregion(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
    PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER", LIBJPEG_TURBO_VERSION_NUMBER);
#endif
    return m;
}
