/* The leaf hashes of a block (proto/integrity.py `leaf_hashes`, `Digester`), concatenated,
 * each cut to its first hash_bytes bytes: for digests of version 4 (what writers make now)
 * each leaf's chaining value in the block's BLAKE3 tree, merged up the tree into the block's
 * BLAKE3 hash too (b3_leaves, b3_root, below); for the versions before, each leaf's SHA-256
 * (hashes).
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

/* ---------------------------------------------------------------- BLAKE3 leaf subtrees
 *
 * Digest version 4 (proto/integrity.py): a leaf's hash is its chaining value in the
 * block's own BLAKE3 tree (the 4 KiB leaf is a subtree of four 1 KiB BLAKE3 chunks, at
 * its place in the block: chunk counters from 4 x its index, no root flag), so one pass
 * over the block makes both its leaf hashes and, merged up the tree, its BLAKE3 hash. Written
 * here from the BLAKE3 specification (compression function, chunk and parent rules); the
 * tests check the merged root against the blake3 package's hash of the same bytes. */

static const uint32_t b3_iv[8] = {
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
};
enum { B3_CHUNK_START = 1, B3_CHUNK_END = 2, B3_PARENT = 4, B3_ROOT = 8 };
#define B3_CHUNK 1024
#define B3_LEAF 4096
/* Which message word each of a round's sixteen inputs is: the specification's permutation
 * applied once per round. */
static const uint8_t b3_schedule[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t
b3_rotr(uint32_t x, int n)
{
    return (x >> n) | (x << (32 - n));
}

static inline uint32_t
b3_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void
b3_store(unsigned char *out, const uint32_t cv[8])
{
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)cv[i];
        out[4 * i + 1] = (unsigned char)(cv[i] >> 8);
        out[4 * i + 2] = (unsigned char)(cv[i] >> 16);
        out[4 * i + 3] = (unsigned char)(cv[i] >> 24);
    }
}

#define B3_G(a, b, c, d, x, y)                                                                                     \
    do {                                                                                                           \
        v[a] = v[a] + v[b] + (x);                                                                                  \
        v[d] = b3_rotr(v[d] ^ v[a], 16);                                                                           \
        v[c] = v[c] + v[d];                                                                                        \
        v[b] = b3_rotr(v[b] ^ v[c], 12);                                                                           \
        v[a] = v[a] + v[b] + (y);                                                                                  \
        v[d] = b3_rotr(v[d] ^ v[a], 8);                                                                            \
        v[c] = v[c] + v[d];                                                                                        \
        v[b] = b3_rotr(v[b] ^ v[c], 7);                                                                            \
    } while (0)

/* One round: G over the state's columns, then its diagonals, with the message words the
 * round's schedule `s` picks (for either G, one lane or sixteen). */
#define B3_ROUND(G, m, s)                                                                                          \
    do {                                                                                                           \
        G(0, 4, 8, 12, (m)[(s)[0]], (m)[(s)[1]]);                                                                  \
        G(1, 5, 9, 13, (m)[(s)[2]], (m)[(s)[3]]);                                                                  \
        G(2, 6, 10, 14, (m)[(s)[4]], (m)[(s)[5]]);                                                                 \
        G(3, 7, 11, 15, (m)[(s)[6]], (m)[(s)[7]]);                                                                 \
        G(0, 5, 10, 15, (m)[(s)[8]], (m)[(s)[9]]);                                                                 \
        G(1, 6, 11, 12, (m)[(s)[10]], (m)[(s)[11]]);                                                               \
        G(2, 7, 8, 13, (m)[(s)[12]], (m)[(s)[13]]);                                                                \
        G(3, 4, 9, 14, (m)[(s)[14]], (m)[(s)[15]]);                                                                \
    } while (0)

/* The compression function, keeping the first eight output words as the new cv. */
static void
b3_compress(uint32_t cv[8], const uint32_t m[16], uint64_t counter, uint32_t block_len, uint32_t flags)
{
    uint32_t v[16] = {
        cv[0], cv[1], cv[2], cv[3], cv[4], cv[5], cv[6], cv[7], b3_iv[0], b3_iv[1], b3_iv[2], b3_iv[3],
        (uint32_t)counter, (uint32_t)(counter >> 32), block_len, flags,
    };
    for (int r = 0; r < 7; r++)
        B3_ROUND(B3_G, m, b3_schedule[r]);
    for (int i = 0; i < 8; i++)
        cv[i] = v[i] ^ v[i + 8];
}

/* The chaining value of one chunk (1 to B3_CHUNK bytes) whose counter is `counter`. */
static void
b3_chunk(const unsigned char *p, size_t n, uint64_t counter, uint32_t cv[8])
{
    memcpy(cv, b3_iv, sizeof b3_iv);
    size_t blocks = n == 0 ? 1 : (n + 63) / 64;
    for (size_t b = 0; b < blocks; b++) {
        unsigned char last[64];
        const unsigned char *src = p + 64 * b;
        size_t len = b == blocks - 1 ? n - 64 * b : 64;
        if (len < 64) {
            memset(last, 0, sizeof last);
            memcpy(last, src, len);
            src = last;
        }
        uint32_t m[16];
        for (int i = 0; i < 16; i++)
            m[i] = b3_le32(src + 4 * i);
        uint32_t flags = (b == 0 ? B3_CHUNK_START : 0) | (b == blocks - 1 ? B3_CHUNK_END : 0);
        b3_compress(cv, m, counter, (uint32_t)len, flags);
    }
}

static void
b3_parent(const uint32_t left[8], const uint32_t right[8], uint32_t flags, uint32_t cv[8])
{
    uint32_t m[16];
    memcpy(m, left, 32);
    memcpy(m + 8, right, 32);
    memcpy(cv, b3_iv, sizeof b3_iv);
    b3_compress(cv, m, 0, 64, B3_PARENT | flags);
}

/* The largest power of two below `chunks` (at least 2): the left subtree's chunks. */
static size_t
b3_left(size_t chunks)
{
    size_t left = 1;
    while (left * 2 < chunks)
        left *= 2;
    return left;
}

/* The chaining value of the subtree of the n bytes at p (not the root), whose first chunk
 * has counter `first_chunk`. */
static void
b3_subtree(const unsigned char *p, size_t n, uint64_t first_chunk, uint32_t cv[8])
{
    size_t chunks = n == 0 ? 1 : (n + B3_CHUNK - 1) / B3_CHUNK;
    if (chunks == 1) {
        b3_chunk(p, n, first_chunk, cv);
        return;
    }
    size_t left = b3_left(chunks);
    uint32_t l[8], r[8];
    b3_subtree(p, left * B3_CHUNK, first_chunk, l);
    b3_subtree(p + left * B3_CHUNK, n - left * B3_CHUNK, first_chunk + left, r);
    b3_parent(l, r, 0, cv);
}

/* The node over `leaves` consecutive leaf chaining values covering `chunks` chunks; the
 * tree puts the largest power of two of chunks on the left, a multiple of four leaves'
 * chunks whenever there is more than one leaf. */
static void
b3_node(const uint32_t (*cvs)[8], size_t leaves, size_t chunks, uint32_t flags, uint32_t cv[8])
{
    if (leaves == 1) {
        memcpy(cv, cvs[0], 32);
        return;
    }
    size_t left = b3_left(chunks);
    size_t left_leaves = left / (B3_LEAF / B3_CHUNK);
    uint32_t l[8], r[8];
    b3_node(cvs, left_leaves, left, 0, l);
    b3_node(cvs + left_leaves, leaves - left_leaves, chunks - left, 0, r);
    b3_parent(l, r, flags, cv);
}

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
/* BLAKE3's compression for sixteen inputs at once, one in each 32-bit lane. */
#define X16_G(a, b, c, d, x, y)                                                                                    \
    do {                                                                                                           \
        v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), (x));                                               \
        v[d] = ROR(_mm512_xor_si512(v[d], v[a]), 16);                                                              \
        v[c] = _mm512_add_epi32(v[c], v[d]);                                                                       \
        v[b] = ROR(_mm512_xor_si512(v[b], v[c]), 12);                                                              \
        v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), (y));                                               \
        v[d] = ROR(_mm512_xor_si512(v[d], v[a]), 8);                                                               \
        v[c] = _mm512_add_epi32(v[c], v[d]);                                                                       \
        v[b] = ROR(_mm512_xor_si512(v[b], v[c]), 7);                                                               \
    } while (0)

X16 static inline void
x16_b3_compress(__m512i cv[8], const __m512i m[16], __m512i counter_lo, uint32_t block_len, uint32_t flags)
{
    __m512i v[16];
    for (int i = 0; i < 8; i++)
        v[i] = cv[i];
    for (int i = 0; i < 4; i++)
        v[8 + i] = _mm512_set1_epi32((int)b3_iv[i]);
    v[12] = counter_lo;
    v[13] = _mm512_setzero_si512();
    v[14] = _mm512_set1_epi32((int)block_len);
    v[15] = _mm512_set1_epi32((int)flags);
#pragma GCC unroll 7
    for (int r = 0; r < 7; r++)
        B3_ROUND(X16_G, m, b3_schedule[r]);
    for (int i = 0; i < 8; i++)
        cv[i] = _mm512_xor_si512(v[i], v[i + 8]);
}

X16 static inline void
x16_b3_parent(const __m512i left[8], const __m512i right[8], __m512i cv[8])
{
    __m512i m[16];
    for (int i = 0; i < 8; i++) {
        m[i] = left[i];
        m[8 + i] = right[i];
        cv[i] = _mm512_set1_epi32((int)b3_iv[i]);
    }
    x16_b3_compress(cv, m, _mm512_setzero_si512(), 64, B3_PARENT);
}

/* Sixteen rows of sixteen 32-bit words (row i: lane i's message block) into sixteen columns
 * (column j: word j of every lane), in place: pairs of words, then of pairs, within each
 * 128-bit lane, then the 128-bit lanes across registers. */
X16 static inline void
x16_transpose(__m512i r[16])
{
    __m512i t[16], u[16];
    for (int k = 0; k < 8; k++) {
        t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    /* u[4g + q], in its 128-bit lane j: word 4j + q of rows 4g to 4g + 3. */
    for (int g = 0; g < 4; g++) {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int q = 0; q < 4; q++) {
        __m512i vlo = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x44), vhi = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xEE);
        __m512i wlo = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x44);
        __m512i whi = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xEE);
        r[q] = _mm512_shuffle_i32x4(vlo, wlo, 0x88);
        r[4 + q] = _mm512_shuffle_i32x4(vlo, wlo, 0xDD);
        r[8 + q] = _mm512_shuffle_i32x4(vhi, whi, 0x88);
        r[12 + q] = _mm512_shuffle_i32x4(vhi, whi, 0xDD);
    }
}

/* The chaining values of sixteen consecutive whole leaves, the first the block's leaf
 * number `first_leaf`, as 32 bytes each at out. */
X16 static void
x16_b3_leaves(const unsigned char *data, uint32_t first_leaf, unsigned char *out)
{
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i chunk_cv[4][8], m[16];
    for (int k = 0; k < 4; k++) {
        /* Lane i's chunk k is the block's chunk 4 (first_leaf + i) + k. */
        __m512i counter = _mm512_add_epi32(_mm512_set1_epi32((int)(4 * first_leaf + (uint32_t)k)),
                                           _mm512_slli_epi32(lane, 2));
        __m512i *cv = chunk_cv[k];
        for (int i = 0; i < 8; i++)
            cv[i] = _mm512_set1_epi32((int)b3_iv[i]);
        for (int b = 0; b < 16; b++) {
            const unsigned char *at = data + k * B3_CHUNK + b * 64;
            for (int l = 0; l < 16; l++)
                m[l] = _mm512_loadu_si512((const void *)(at + l * B3_LEAF));
            x16_transpose(m);
            x16_b3_compress(cv, m, counter, 64, (b == 0 ? B3_CHUNK_START : 0) | (b == 15 ? B3_CHUNK_END : 0));
        }
    }
    __m512i low[8], high[8], leaf[8];
    x16_b3_parent(chunk_cv[0], chunk_cv[1], low);
    x16_b3_parent(chunk_cv[2], chunk_cv[3], high);
    x16_b3_parent(low, high, leaf);
    uint32_t words[8][16];
    for (int i = 0; i < 8; i++)
        _mm512_storeu_si512((void *)words[i], leaf[i]);
    for (int l = 0; l < 16; l++) {
        uint32_t cv[8];
        for (int i = 0; i < 8; i++)
            cv[i] = words[i][l];
        b3_store(out + 32 * l, cv);
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

/* The n integers after a function's first argument (a buffer) into out; the arity is
 * checked against `usage`, which a TypeError quotes. -1 with an exception set, else 0. */
static int
int_args(const char *usage, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t n, Py_ssize_t *out)
{
    if (nargs != n + 1) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsSsize_t(args[1 + i]);
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static PyObject *
leafhash_hashes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_ssize_t ints[3];
    if (int_args("hashes(data, leaf_bytes, hash_bytes, nogil_above)", args, nargs, 3, ints) < 0)
        return NULL;
    Py_ssize_t leaf_bytes = ints[0], hash_bytes = ints[1], nogil_above = ints[2];
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

/* The chaining values of the leaves of `length` bytes at data (the last leaf may be short),
 * the first being the block's leaf `first_leaf`; 32 bytes each at out. */
static void
b3_leaves(const unsigned char *data, Py_ssize_t length, uint64_t first_leaf, unsigned char *out)
{
    Py_ssize_t pos = 0;
    uint64_t leaf = first_leaf;
#ifdef HAVE_X16
    if (x16_ok && first_leaf + (uint64_t)length / B3_LEAF < (1u << 29)) {
        for (; length - pos >= 16 * B3_LEAF; pos += 16 * B3_LEAF, leaf += 16, out += 16 * 32)
            x16_b3_leaves(data + pos, (uint32_t)leaf, out);
    }
#endif
    for (; pos < length; pos += B3_LEAF, leaf++, out += 32) {
        uint32_t cv[8];
        Py_ssize_t n = length - pos < B3_LEAF ? length - pos : B3_LEAF;
        b3_subtree(data + pos, (size_t)n, leaf * (B3_LEAF / B3_CHUNK), cv);
        b3_store(out, cv);
    }
}

static PyObject *
leafhash_b3_leaves(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_ssize_t ints[3];
    if (int_args("b3_leaves(data, first_leaf, hash_bytes, nogil_above)", args, nargs, 3, ints) < 0)
        return NULL;
    Py_ssize_t first_leaf = ints[0], hash_bytes = ints[1], nogil_above = ints[2];
    if (first_leaf < 0 || first_leaf > ((Py_ssize_t)1 << 40) || hash_bytes <= 0 || hash_bytes > 32) {
        PyErr_SetString(PyExc_ValueError, "first_leaf out of range, or hash_bytes not 1 to 32");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t count = view.len / B3_LEAF + (view.len % B3_LEAF != 0);
    PyObject *cvs = PyBytes_FromStringAndSize(NULL, count * 32);
    PyObject *leaves = PyBytes_FromStringAndSize(NULL, count * hash_bytes);
    PyObject *out = NULL;
    if (cvs != NULL && leaves != NULL) {
        unsigned char *dest = (unsigned char *)PyBytes_AS_STRING(cvs);
        if (view.len > nogil_above) {
            Py_BEGIN_ALLOW_THREADS
            b3_leaves(view.buf, view.len, (uint64_t)first_leaf, dest);
            Py_END_ALLOW_THREADS
        } else {
            b3_leaves(view.buf, view.len, (uint64_t)first_leaf, dest);
        }
        unsigned char *cut = (unsigned char *)PyBytes_AS_STRING(leaves);
        for (Py_ssize_t l = 0; l < count; l++)
            memcpy(cut + l * hash_bytes, dest + 32 * l, (size_t)hash_bytes);
        out = PyTuple_Pack(2, leaves, cvs);
    }
    Py_XDECREF(cvs);
    Py_XDECREF(leaves);
    PyBuffer_Release(&view);
    return out;
}

static PyObject *
leafhash_b3_root(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_ssize_t length;
    if (int_args("b3_root(leaf_cvs, length)", args, nargs, 1, &length) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t leaves = view.len / 32;
    if (length <= B3_LEAF || view.len % 32 != 0 || leaves != (Py_ssize_t)((length + B3_LEAF - 1) / B3_LEAF)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "b3_root: 32 bytes a leaf of a block of more than one leaf");
        return NULL;
    }
    uint32_t (*cvs)[8] = PyMem_Malloc((size_t)leaves * 32);
    PyObject *out = NULL;
    if (cvs == NULL) {
        PyErr_NoMemory();
    } else {
        const unsigned char *p = view.buf;
        for (Py_ssize_t l = 0; l < leaves; l++)
            for (int i = 0; i < 8; i++)
                cvs[l][i] = b3_le32(p + 32 * l + 4 * i);
        uint32_t root[8];
        b3_node((const uint32_t(*)[8])cvs, (size_t)leaves, (size_t)((length + B3_CHUNK - 1) / B3_CHUNK), B3_ROOT, root);
        PyMem_Free(cvs);
        unsigned char bytes[32];
        b3_store(bytes, root);
        out = PyBytes_FromStringAndSize((const char *)bytes, 32);
    }
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef leafhash_methods[] = {
    {"hashes", (PyCFunction)(void (*)(void))leafhash_hashes, METH_FASTCALL,
     "hashes(data, leaf_bytes, hash_bytes, nogil_above) -> bytes: each leaf's SHA-256, cut to hash_bytes,\n"
     "concatenated; the GIL is let go while hashing data longer than nogil_above bytes."},
    {"b3_leaves", (PyCFunction)(void (*)(void))leafhash_b3_leaves, METH_FASTCALL,
     "b3_leaves(data, first_leaf, hash_bytes, nogil_above) -> (leaves, cvs): the BLAKE3 chaining value\n"
     "of each 4 KiB leaf of data as a subtree of its block's tree (the first being the block's leaf\n"
     "first_leaf), each cut to hash_bytes and concatenated, and whole (32 bytes each), for b3_root;\n"
     "the GIL is let go while hashing data longer than nogil_above bytes."},
    {"b3_root", (PyCFunction)(void (*)(void))leafhash_b3_root, METH_FASTCALL,
     "b3_root(leaf_cvs, length) -> bytes: the BLAKE3 hash of a length-byte block (more than one leaf)\n"
     "from its leaves' chaining values."},
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
