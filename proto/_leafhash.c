/* The leaf hashes of a block (proto/integrity.py `leaf_hashes`): the SHA-256 of each leaf,
 * cut to its first hash_bytes bytes, concatenated.
 *
 * A writer hashes every byte it writes this way. In Python the loop over 4 KiB leaves held
 * the GIL for the whole block (hashlib lets go of it only for inputs of 2 KiB or more, and
 * a hand-off per leaf cost more than it saved): ~2.5 ms a 4 MiB block on this machine, while
 * the trio thread waited to answer FUSE. Here the loop runs in C, with the GIL let go for a
 * buffer larger than the caller says (one hashed on a worker thread; a thread that answers
 * requests keeps the GIL rather than wait to take it back); OpenSSL's SHA256 uses the CPU's
 * SHA instructions where it has them.
 *
 * Where the CPU has AVX-512 (checked when the module loads), sixteen leaves are hashed at
 * once, one in each 32-bit lane of the vector registers: SHA-256 is a chain of dependent
 * steps within one message, so one message keeps few of a core's units busy, while
 * sixteen independent leaves fill them. On this project's machines (AMD EPYC, which also
 * has the SHA instructions OpenSSL uses) a 4 MiB block's leaves take 1.13 ms this way
 * against 2.2 ms one leaf at a time (docs/benchmark.md). Leaves left over (fewer than
 * sixteen full ones) go through OpenSSL. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X16 1

static const uint32_t sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};
static const uint32_t sha256_h0[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

/* Set when the module loads: whether the CPU (and the kernel, for the registers) has
 * AVX-512F and AVX-512BW. */
static int x16_ok;

#define X16 __attribute__((target("avx512f,avx512bw")))
#define ROR(x, n) _mm512_ror_epi32((x), (n))
#define XOR3 0x96 /* _mm512_ternarylogic_epi32: a ^ b ^ c */
#define CHOOSE 0xCA /* a ? b : c, bit by bit */
#define MAJORITY 0xE8

/* One 64-byte block of message schedule and rounds for sixteen states at once; w holds the
 * block's sixteen words, lane i from message i. */
X16 static inline void
x16_block(__m512i st[8], __m512i w[16])
{
    __m512i a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6], h = st[7];
#pragma GCC unroll 64
    for (int t = 0; t < 64; t++) {
        __m512i wt = w[t & 15];
        if (t >= 16) {
            __m512i w15 = w[(t - 15) & 15], w2 = w[(t - 2) & 15];
            __m512i s0 = _mm512_ternarylogic_epi32(ROR(w15, 7), ROR(w15, 18), _mm512_srli_epi32(w15, 3), XOR3);
            __m512i s1 = _mm512_ternarylogic_epi32(ROR(w2, 17), ROR(w2, 19), _mm512_srli_epi32(w2, 10), XOR3);
            wt = _mm512_add_epi32(_mm512_add_epi32(wt, s0), _mm512_add_epi32(w[(t - 7) & 15], s1));
            w[t & 15] = wt;
        }
        __m512i big_s1 = _mm512_ternarylogic_epi32(ROR(e, 6), ROR(e, 11), ROR(e, 25), XOR3);
        __m512i ch = _mm512_ternarylogic_epi32(e, f, g, CHOOSE);
        __m512i t1 = _mm512_add_epi32(_mm512_add_epi32(h, big_s1),
                                      _mm512_add_epi32(ch, _mm512_add_epi32(wt, _mm512_set1_epi32((int)sha256_k[t]))));
        __m512i big_s0 = _mm512_ternarylogic_epi32(ROR(a, 2), ROR(a, 13), ROR(a, 22), XOR3);
        __m512i maj = _mm512_ternarylogic_epi32(a, b, c, MAJORITY);
        h = g;
        g = f;
        f = e;
        e = _mm512_add_epi32(d, t1);
        d = c;
        c = b;
        b = a;
        a = _mm512_add_epi32(t1, _mm512_add_epi32(big_s0, maj));
    }
    st[0] = _mm512_add_epi32(st[0], a);
    st[1] = _mm512_add_epi32(st[1], b);
    st[2] = _mm512_add_epi32(st[2], c);
    st[3] = _mm512_add_epi32(st[3], d);
    st[4] = _mm512_add_epi32(st[4], e);
    st[5] = _mm512_add_epi32(st[5], f);
    st[6] = _mm512_add_epi32(st[6], g);
    st[7] = _mm512_add_epi32(st[7], h);
}

/* The SHA-256 of sixteen consecutive leaves of leaf_bytes each (a multiple of 64), each cut
 * to hash_bytes, at out. */
X16 static void
x16_leaves(const unsigned char *data, Py_ssize_t leaf_bytes, Py_ssize_t hash_bytes, unsigned char *out)
{
    /* Big-endian words: each 32-bit lane's bytes reversed. */
    const __m512i swap = _mm512_broadcast_i32x4(_mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL));
    const __m512i offsets = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)leaf_bytes));
    __m512i st[8], w[16];
    for (int i = 0; i < 8; i++)
        st[i] = _mm512_set1_epi32((int)sha256_h0[i]);
    for (Py_ssize_t pos = 0; pos < leaf_bytes; pos += 64) {
        for (int i = 0; i < 16; i++)
            w[i] = _mm512_shuffle_epi8(_mm512_i32gather_epi32(offsets, (const void *)(data + pos + 4 * i), 1), swap);
        x16_block(st, w);
    }
    /* Every leaf is as long as the others, so the padding block is the same for all: a one
     * bit, zeros, and the length in bits in the last two words. */
    uint64_t bits = (uint64_t)leaf_bytes * 8;
    w[0] = _mm512_set1_epi32((int)0x80000000u);
    for (int i = 1; i < 14; i++)
        w[i] = _mm512_setzero_si512();
    w[14] = _mm512_set1_epi32((int)(uint32_t)(bits >> 32));
    w[15] = _mm512_set1_epi32((int)(uint32_t)bits);
    x16_block(st, w);
    uint32_t words[8][16];
    for (int i = 0; i < 8; i++)
        _mm512_storeu_si512((void *)words[i], st[i]);
    for (int lane = 0; lane < 16; lane++) {
        unsigned char digest[32];
        for (int i = 0; i < 8; i++) {
            uint32_t v = words[i][lane];
            digest[4 * i] = (unsigned char)(v >> 24);
            digest[4 * i + 1] = (unsigned char)(v >> 16);
            digest[4 * i + 2] = (unsigned char)(v >> 8);
            digest[4 * i + 3] = (unsigned char)v;
        }
        memcpy(out + lane * hash_bytes, digest, (size_t)hash_bytes);
    }
}
#endif

static void
hash_leaves(const unsigned char *data, Py_ssize_t length, Py_ssize_t leaf_bytes, Py_ssize_t hash_bytes,
            unsigned char *out)
{
    unsigned char digest[SHA256_DIGEST_LENGTH];
    Py_ssize_t pos = 0;
#ifdef HAVE_X16
    /* (The gather's offsets are 32-bit: fifteen leaves must fit.) */
    if (x16_ok && leaf_bytes % 64 == 0 && leaf_bytes <= (1 << 26)) {
        for (; length - pos >= 16 * leaf_bytes; pos += 16 * leaf_bytes, out += 16 * hash_bytes)
            x16_leaves(data + pos, leaf_bytes, hash_bytes, out);
    }
#endif
    for (; pos < length; pos += leaf_bytes, out += hash_bytes) {
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

static int
leafhash_exec(PyObject *module)
{
    int lanes = 1;
#ifdef HAVE_X16
    __builtin_cpu_init();
    x16_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    lanes = x16_ok ? 16 : 1;
#endif
    return PyModule_AddIntConstant(module, "LANES", lanes);
}

static PyModuleDef_Slot leafhash_slots[] = {
    {Py_mod_exec, leafhash_exec},
    {0, NULL},
};

static struct PyModuleDef leafhash_module = {
    PyModuleDef_HEAD_INIT, "_leafhash", "Leaf hashes of blocks (proto/integrity.py).", 0, leafhash_methods,
    leafhash_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__leafhash(void)
{
    return PyModuleDef_Init(&leafhash_module);
}
