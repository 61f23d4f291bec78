/* Streaming copies: large copies whose destination is not read again soon, written around the caches. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define STREAMS 1
#else
#define STREAMS 0
#endif

static void
stream_copy(char *dst, const char *src, size_t n)
{
#if STREAMS
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head > n)
        head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    for (size_t i = n >> 6; i; i--) {
        __m128i a = _mm_loadu_si128((const __m128i *)src);
        __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)dst, a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), c);
        _mm_stream_si128((__m128i *)(dst + 48), d);
        src += 64;
        dst += 64;
    }
    memcpy(dst, src, n & 63);
    /* Streaming stores are not ordered with later stores, even on x86-64: the flag raised after a copy must not
       become visible before the copied bytes. */
    _mm_sfence();
#else
    memcpy(dst, src, n);
#endif
}

static PyObject *
copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer d, s;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "copy(dst, src) takes two buffers");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &d, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &s, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&d);
        return NULL;
    }
    if (d.len != s.len) {
        PyErr_Format(PyExc_ValueError, "copy: destination of %zd bytes, source of %zd", d.len, s.len);
    } else {
        const char *dp = d.buf, *sp = s.buf;
        int apart = dp + d.len <= sp || sp + s.len <= dp;
        Py_BEGIN_ALLOW_THREADS
        if (apart)
            stream_copy(d.buf, s.buf, (size_t)d.len);
        else /* overlapping buffers: the streaming loop reads ahead of what it writes */
            memmove(d.buf, s.buf, (size_t)d.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy", (PyCFunction)(void (*)(void))copy, METH_FASTCALL,
     "copy(dst, src): copy the C-contiguous buffer src into dst (same length) with streaming stores, fenced "
     "(buffers that overlap: a plain memmove)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_stream", "Streaming copies for large destinations not read again soon.", -1, methods,
};

PyMODINIT_FUNC
PyInit__stream(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "STREAMS", STREAMS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
