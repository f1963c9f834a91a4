/* libuffdd_fastpath: the bulk lanes' per-byte work (uffdd/exporter/frames.py, uffdd/importer/faultloop.py).
 *
 * Profiles of a 1 GiB background stream put most of both daemons' CPU in work done
 * once per byte or once per page: zlib's crc32 on each side (~2.8 GB/s here, so about
 * 0.35 s of CPU per GiB on each daemon) and the source's zero-page scan, one Python
 * call per page. These are plain functions over a buffer, called through ctypes, which
 * releases the GIL for the call:
 *
 *   uffdd_fp_crc32       the CRC-32 of zlib.crc32 (same polynomial, same chaining),
 *                        by carry-less multiplication (PCLMULQDQ) where the CPU has it
 *   uffdd_fp_zero_map    which pages of a buffer are all zeros, in one call
 *   uffdd_fp_crc32_nonzero, uffdd_fp_fill_holes
 *                        a data frame with holes ("zr") in one call on either side
 *
 * Both have pure-Python references in the tests (tests/test_bulk_path.py).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <zlib.h>

#include "frame.h"

#define FP_EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------ CRC-32
 *
 * zlib's CRC is the reflected CRC-32 with P = 0x04C11DB7: crc32(c, buf) = ~raw(~c, buf)
 * where raw(s, buf) is the table-driven update. raw is linear, and a starting state s
 * is the same as XORing s into the first four bytes (little-endian), so
 *     raw(s, buf) = raw(0, buf') = M'(x) * x^32 mod P
 * depends only on M'(x) mod P, M' being buf' read as a polynomial (first bit highest).
 *
 * Folding keeps that remainder while shrinking the message: a 128-bit block X = H x^64
 * + L followed by 128 more bits is worth X x^128 = H x^192 + L x^128 there, and
 * H (x^192 mod P) + L (x^128 mod P) has degree < 128, so it is XORed into the next
 * block. In the reflected (little-endian) registers a carry-less product of two
 * 64-bit halves comes out shifted down by one bit, which the constants absorb:
 * multiplying by reflect32(x^(e-32) mod P) << 1 gives the product with x^e mod P,
 * times x^32 (still congruent, still below degree 128). Four blocks are folded in
 * parallel (64 bytes per step, e = 512 +- 32), then into one another (e = 128 +- 32);
 * the last 128 bits go through the byte-wise table, which yields raw(0, buf').
 */

static uint32_t crc_table[256];
static uint64_t k_fold4_hi, k_fold4_lo, k_fold1_hi, k_fold1_lo;
static int crc_ready; /* 1: tables set; 2: tables set and the CPU has PCLMULQDQ */

/* x^e mod P in normal (not reflected) bit order: bit i is the coefficient of x^i. */
static uint32_t xpow_mod(unsigned e)
{
	uint32_t r = 1;
	while (e--)
		r = (r & 0x80000000u) ? (r << 1) ^ 0x04C11DB7u : r << 1;
	return r;
}

static uint64_t fold_constant(unsigned e)
{
	uint32_t v = xpow_mod(e - 32), rev = 0;
	for (int i = 0; i < 32; i++)
		if (v >> i & 1)
			rev |= 1u << (31 - i);
	return (uint64_t)rev << 1;
}

static void crc_init(void)
{
	for (uint32_t n = 0; n < 256; n++) {
		uint32_t c = n;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[n] = c;
	}
	k_fold4_hi = fold_constant(512 + 64); /* multiplies the block's first (low) qword */
	k_fold4_lo = fold_constant(512);
	k_fold1_hi = fold_constant(128 + 64);
	k_fold1_lo = fold_constant(128);
	__builtin_cpu_init();
	int fast = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
	__atomic_store_n(&crc_ready, fast ? 2 : 1, __ATOMIC_RELEASE);
}

static uint32_t raw_bytes(uint32_t s, const uint8_t *p, size_t n)
{
	while (n--)
		s = crc_table[(s ^ *p++) & 0xff] ^ (s >> 8);
	return s;
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("pclmul,sse4.1")))
static inline __m128i fold(__m128i x, __m128i k)
{
	/* k: low qword multiplies x's low (first, higher-degree) qword, high qword the other */
	return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

/* raw(s, p[0..n)) for n a multiple of 16, n >= 64. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t raw_pclmul(uint32_t s, const uint8_t *p, size_t n)
{
	const __m128i k4 = _mm_set_epi64x((long long)k_fold4_lo, (long long)k_fold4_hi);
	const __m128i k1 = _mm_set_epi64x((long long)k_fold1_lo, (long long)k_fold1_hi);
	__m128i x0 = _mm_loadu_si128((const __m128i *)p);
	__m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
	__m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
	__m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
	x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)s));
	p += 64;
	n -= 64;
	while (n >= 64) {
		x0 = _mm_xor_si128(fold(x0, k4), _mm_loadu_si128((const __m128i *)p));
		x1 = _mm_xor_si128(fold(x1, k4), _mm_loadu_si128((const __m128i *)(p + 16)));
		x2 = _mm_xor_si128(fold(x2, k4), _mm_loadu_si128((const __m128i *)(p + 32)));
		x3 = _mm_xor_si128(fold(x3, k4), _mm_loadu_si128((const __m128i *)(p + 48)));
		p += 64;
		n -= 64;
	}
	__m128i x = _mm_xor_si128(fold(x0, k1), x1);
	x = _mm_xor_si128(fold(x, k1), x2);
	x = _mm_xor_si128(fold(x, k1), x3);
	while (n >= 16) {
		x = _mm_xor_si128(fold(x, k1), _mm_loadu_si128((const __m128i *)p));
		p += 16;
		n -= 16;
	}
	uint8_t last[16];
	_mm_storeu_si128((__m128i *)last, x);
	return raw_bytes(0, last, 16);
}
#endif

FP_EXPORT uint32_t uffdd_fp_crc32(uint32_t crc, const void *buf, size_t len)
{
	int ready = __atomic_load_n(&crc_ready, __ATOMIC_ACQUIRE);
	if (!ready) {
		crc_init(); /* idempotent: racing first callers compute the same tables */
		ready = __atomic_load_n(&crc_ready, __ATOMIC_ACQUIRE);
	}
	const uint8_t *p = buf;
	uint32_t s = ~crc;
#if defined(__x86_64__)
	if (ready == 2 && len >= 64) {
		size_t bulk = len & ~(size_t)15;
		s = raw_pclmul(s, p, bulk);
		p += bulk;
		len -= bulk;
	}
#endif
	if (len > 4096) /* no PCLMULQDQ: zlib's (sliced) loop beats ours */
		return (uint32_t)crc32_z(~s, p, len);
	return ~raw_bytes(s, p, len);
}

/* ------------------------------------------------------------------ zero pages */

static int page_is_zero(const uint8_t *p, size_t len)
{
	const uint8_t *end = p + len;
	/* most data pages differ from zero in their first bytes */
	uint64_t head;
	if (len >= 8) {
		memcpy(&head, p, 8);
		if (head)
			return 0;
	}
	while ((size_t)(end - p) >= 64) {
		uint64_t w[8];
		memcpy(w, p, 64);
		if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7])
			return 0;
		p += 64;
	}
	while (p < end)
		if (*p++)
			return 0;
	return 1;
}

/* out[i] = 1 if page i of buf (len / page_size pages) is all zeros, else 0.
 * Returns the number of zero pages, or -1 for a page size of 0. */
FP_EXPORT long uffdd_fp_zero_map(const void *buf, size_t len, size_t page_size, uint8_t *out)
{
	if (!page_size)
		return -1;
	const uint8_t *p = buf;
	size_t pages = len / page_size;
	long zeros = 0;
	for (size_t i = 0; i < pages; i++) {
		out[i] = (uint8_t)page_is_zero(p + i * page_size, page_size);
		zeros += out[i];
	}
	return zeros;
}

/* ------------------------------------------------------------------ runs with holes
 *
 * A bulk data frame carries the non-zero pages of a run and leaves short zero runs out
 * as holes ("zr"): the source checksums only the pages it sends, the destination puts
 * them in place and zero-fills the holes. One call per frame instead of one per piece
 * (the stand-in guest has a zero page every 11 pages: ~47 pieces per 2 MiB chunk).
 */

/* The CRC-32 of the pages i in [first, end) of buf whose zmap[i] is 0, in order. */
FP_EXPORT uint32_t uffdd_fp_crc32_nonzero(uint32_t crc, const void *buf, size_t page_size,
					  const uint8_t *zmap, size_t first, size_t end)
{
	const uint8_t *p = buf;
	size_t i = first;
	while (i < end) {
		if (zmap[i]) {
			i++;
			continue;
		}
		size_t j = i + 1;
		while (j < end && !zmap[j])
			j++;
		crc = uffdd_fp_crc32(crc, p + i * page_size, (j - i) * page_size);
		i = j;
	}
	return crc;
}

/* Zero-fill the holes of a run of `count` pages in buf (holes: `nholes` pairs of
 * [first page, pages], sorted, disjoint and inside the run: the caller checked) and
 * return the CRC-32, chained from `crc`, of the pages between them (with_crc != 0;
 * else `crc` unchanged). A hole out of order or outside the run stops the work there
 * and returns `crc` as it was passed (the caller checks holes before calling). */
FP_EXPORT uint32_t uffdd_fp_fill_holes(void *buf, size_t page_size, size_t count,
				       const uint32_t *holes, size_t nholes, int with_crc,
				       uint32_t crc)
{
	uint8_t *p = buf;
	const uint32_t crc0 = crc;
	size_t pos = 0;
	for (size_t h = 0; h <= nholes; h++) {
		size_t off = h < nholes ? holes[2 * h] : count;
		size_t n = h < nholes ? holes[2 * h + 1] : 0;
		if (off < pos || off + n > count)
			return crc0;
		if (with_crc && off > pos)
			crc = uffdd_fp_crc32(crc, p + pos * page_size, (off - pos) * page_size);
		if (n)
			memset(p + off * page_size, 0, n * page_size);
		pos = off + n;
	}
	return crc;
}
