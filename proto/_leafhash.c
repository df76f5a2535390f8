/* The leaf hashes of a block (proto/integrity.py `leaf_hashes`): the SHA-256 of each leaf,
 * cut to its first hash_bytes bytes, concatenated.
 *
 * A writer hashes every byte it writes this way. In Python the loop over 4 KiB leaves held
 * the GIL for the whole block (hashlib lets go of it only for inputs of 2 KiB or more, and
 * a hand-off per leaf cost more than it saved): ~2.5 ms a 4 MiB block on this machine, while
 * the trio thread waited to answer FUSE. Here the loop runs in C, with the GIL let go for a
 * buffer larger than the caller says (one hashed on a worker thread; a thread that answers
 * requests keeps the GIL rather than wait to take it back); OpenSSL's SHA256 uses the CPU's
 * SHA instructions where it has them. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/sha.h>
#include <string.h>

static void
hash_leaves(const unsigned char *data, Py_ssize_t length, Py_ssize_t leaf_bytes, Py_ssize_t hash_bytes,
            unsigned char *out)
{
    unsigned char digest[SHA256_DIGEST_LENGTH];
    for (Py_ssize_t pos = 0; pos < length; pos += leaf_bytes, out += hash_bytes) {
        Py_ssize_t n = length - pos < leaf_bytes ? length - pos : leaf_bytes;
        SHA256(data + pos, (size_t)n, digest);
        memcpy(out, digest, (size_t)hash_bytes);
    }
}

static PyObject *
leafhash_hashes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "hashes(data, leaf_bytes, hash_bytes, nogil_above)");
        return NULL;
    }
    Py_ssize_t leaf_bytes = PyLong_AsSsize_t(args[1]);
    if (leaf_bytes == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t hash_bytes = PyLong_AsSsize_t(args[2]);
    if (hash_bytes == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t nogil_above = PyLong_AsSsize_t(args[3]);
    if (nogil_above == -1 && PyErr_Occurred())
        return NULL;
    if (leaf_bytes <= 0 || hash_bytes <= 0 || hash_bytes > SHA256_DIGEST_LENGTH) {
        PyErr_SetString(PyExc_ValueError, "leaf_bytes must be positive, hash_bytes 1 to 32");
        return NULL;
    }
    /* A bytearray cannot be resized while this export holds it, GIL or not. */
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t count = view.len / leaf_bytes + (view.len % leaf_bytes != 0);
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * hash_bytes);
    if (out != NULL) {
        unsigned char *dest = (unsigned char *)PyBytes_AS_STRING(out);
        if (view.len > nogil_above) {
            Py_BEGIN_ALLOW_THREADS
            hash_leaves(view.buf, view.len, leaf_bytes, hash_bytes, dest);
            Py_END_ALLOW_THREADS
        } else {
            hash_leaves(view.buf, view.len, leaf_bytes, hash_bytes, dest);
        }
    }
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef leafhash_methods[] = {
    {"hashes", (PyCFunction)(void (*)(void))leafhash_hashes, METH_FASTCALL,
     "hashes(data, leaf_bytes, hash_bytes, nogil_above) -> bytes: each leaf's SHA-256, cut to hash_bytes,\n"
     "concatenated; the GIL is let go while hashing data longer than nogil_above bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef leafhash_module = {
    PyModuleDef_HEAD_INIT, "_leafhash", "Leaf hashes of blocks (proto/integrity.py).", 0, leafhash_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__leafhash(void)
{
    return PyModuleDef_Init(&leafhash_module);
}
