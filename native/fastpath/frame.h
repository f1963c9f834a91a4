/* Peer frame headers for the fast path (libuffdd_fastpath), in C.
 *
 * A peer frame is a 4-byte big-endian length, a msgpack map (the header), then for
 * "data" frames `len` payload bytes (uffdd/protocol.py is the reference). The fast
 * path only ever needs the common, flat headers:
 *
 *     {"t": "req",  "r": R, "p": P, "n": N}
 *     {"t": "data", "r": R, "p": P, "n": N, "len": L, "crc": C}
 *     {"t": "zero", "r": R, "p": P, "n": N}
 *
 * Anything else (other kinds, other keys such as "zr" or "reason", other value types)
 * parses as FP_OTHER and is handed to the Python code, which owns every rare case.
 * Header-only, static functions: each loop that includes it gets its own copy.
 */
#ifndef UFFDD_FASTPATH_FRAME_H
#define UFFDD_FASTPATH_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Must match uffdd/_fastpath.py ABI_VERSION: a stale library is refused, not misused. */
#define FP_ABI_VERSION 2

#define FP_MAX_HEADER (64 * 1024) /* protocol.MAX_PEER_HEADER */

/* protocol.MAX_REQUEST_PAGES: a demand request asks for 1..64 pages of one region
 * (tests/test_fastpath_export.py holds the two equal, and fp_req_in_region to
 * protocol.check_req). */
#define FP_MAX_REQUEST_PAGES 64

/* protocol.check_req's rule once the region r is known to exist: pages p .. p+n of a
 * region of region_pages pages, n in 1..FP_MAX_REQUEST_PAGES. Written so that no sum
 * can overflow whatever the peer sent. */
static inline int fp_req_in_region(uint64_t p, uint64_t n, uint64_t region_pages)
{
	return n >= 1 && n <= FP_MAX_REQUEST_PAGES && p <= region_pages && n <= region_pages - p;
}

/* zlib.crc32's value, folded with PCLMULQDQ where the CPU has it (bulk.c): every
 * payload CRC of the fast path goes through it. */
uint32_t uffdd_fp_crc32(uint32_t crc, const void *buf, size_t len);

enum fp_kind { FP_OTHER = 0, FP_REQ = 1, FP_DATA = 2, FP_ZERO = 3 };

struct fp_header {
	enum fp_kind kind;
	uint64_t r, p, n, len, crc;
	unsigned have; /* bit per field seen: FP_HAVE_* */
};

#define FP_HAVE_R 1u
#define FP_HAVE_P 2u
#define FP_HAVE_N 4u
#define FP_HAVE_LEN 8u
#define FP_HAVE_CRC 16u

static inline uint32_t fp_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void fp_put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* A msgpack unsigned integer at *pp (advanced). -1: not an unsigned int or truncated. */
static inline int fp_read_uint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
	const uint8_t *p = *pp;
	if (p >= end)
		return -1;
	uint8_t b = *p++;
	size_t width;
	if (b <= 0x7f) {
		*out = b;
		*pp = p;
		return 0;
	}
	switch (b) {
	case 0xcc: width = 1; break;
	case 0xcd: width = 2; break;
	case 0xce: width = 4; break;
	case 0xcf: width = 8; break;
	default: return -1; /* negative, float, bool, nil, str...: not ours */
	}
	if ((size_t)(end - p) < width)
		return -1;
	uint64_t v = 0;
	for (size_t i = 0; i < width; i++)
		v = v << 8 | p[i];
	*out = v;
	*pp = p + width;
	return 0;
}

/* A short msgpack string (fixstr or str8) at *pp. -1 if it is something else. */
static inline int fp_read_str(const uint8_t **pp, const uint8_t *end, const uint8_t **s,
			      size_t *len)
{
	const uint8_t *p = *pp;
	if (p >= end)
		return -1;
	uint8_t b = *p++;
	if ((b & 0xe0) == 0xa0) {
		*len = b & 0x1f;
	} else if (b == 0xd9 && p < end) {
		*len = *p++;
	} else {
		return -1;
	}
	if ((size_t)(end - p) < *len)
		return -1;
	*s = p;
	*pp = p + *len;
	return 0;
}

static inline int fp_str_is(const uint8_t *s, size_t len, const char *lit)
{
	return strlen(lit) == len && memcmp(s, lit, len) == 0;
}

/* Parse a header body of `len` bytes. Returns its kind; FP_OTHER for everything the
 * fast path leaves to Python (including malformed headers: Python names the error). */
static inline enum fp_kind fp_parse_header(const uint8_t *p, size_t len, struct fp_header *h)
{
	const uint8_t *end = p + len;
	memset(h, 0, sizeof(*h));
	if (p >= end)
		return FP_OTHER;
	size_t entries;
	if ((*p & 0xf0) == 0x80) {
		entries = *p++ & 0x0f;
	} else {
		return FP_OTHER;
	}
	enum fp_kind kind = FP_OTHER;
	for (size_t i = 0; i < entries; i++) {
		const uint8_t *key;
		size_t klen;
		if (fp_read_str(&p, end, &key, &klen) < 0)
			return FP_OTHER;
		if (fp_str_is(key, klen, "t")) {
			const uint8_t *val;
			size_t vlen;
			if (fp_read_str(&p, end, &val, &vlen) < 0)
				return FP_OTHER;
			if (fp_str_is(val, vlen, "req"))
				kind = FP_REQ;
			else if (fp_str_is(val, vlen, "data"))
				kind = FP_DATA;
			else if (fp_str_is(val, vlen, "zero"))
				kind = FP_ZERO;
			else
				return FP_OTHER;
			continue;
		}
		uint64_t v;
		if (fp_read_uint(&p, end, &v) < 0)
			return FP_OTHER;
		if (fp_str_is(key, klen, "r")) {
			h->r = v; h->have |= FP_HAVE_R;
		} else if (fp_str_is(key, klen, "p")) {
			h->p = v; h->have |= FP_HAVE_P;
		} else if (fp_str_is(key, klen, "n")) {
			h->n = v; h->have |= FP_HAVE_N;
		} else if (fp_str_is(key, klen, "len")) {
			h->len = v; h->have |= FP_HAVE_LEN;
		} else if (fp_str_is(key, klen, "crc")) {
			h->crc = v; h->have |= FP_HAVE_CRC;
		} else {
			return FP_OTHER;
		}
	}
	if (p != end)
		return FP_OTHER;
	unsigned need = FP_HAVE_R | FP_HAVE_P | FP_HAVE_N;
	if (kind == FP_DATA)
		need |= FP_HAVE_LEN | FP_HAVE_CRC;
	if ((h->have & need) != need || h->n == 0)
		return FP_OTHER;
	h->kind = kind;
	return kind;
}

/* msgpack writers, minimal encodings (as msgpack-python writes them). */
static inline uint8_t *fp_put_uint(uint8_t *o, uint64_t v)
{
	if (v <= 0x7f) {
		*o++ = (uint8_t)v;
	} else if (v <= 0xff) {
		*o++ = 0xcc; *o++ = (uint8_t)v;
	} else if (v <= 0xffff) {
		*o++ = 0xcd; *o++ = (uint8_t)(v >> 8); *o++ = (uint8_t)v;
	} else if (v <= 0xffffffffu) {
		*o++ = 0xce; fp_put_be32(o, (uint32_t)v); o += 4;
	} else {
		*o++ = 0xcf;
		for (int i = 7; i >= 0; i--)
			*o++ = (uint8_t)(v >> (8 * i));
	}
	return o;
}

static inline uint8_t *fp_put_str(uint8_t *o, const char *s)
{
	size_t n = strlen(s); /* keys and kinds only: always < 32 bytes */
	*o++ = (uint8_t)(0xa0 | n);
	memcpy(o, s, n);
	return o + n;
}

#define FP_MAX_FRAME_HEAD 80 /* length prefix + the largest header we write */

/* Write a whole frame head (length prefix + header) for kind FP_REQ, FP_DATA or FP_ZERO;
 * returns its size. `len` and `crc` are used by FP_DATA only. */
static inline size_t fp_put_frame_head(uint8_t *out, enum fp_kind kind, uint64_t r, uint64_t p,
				       uint64_t n, uint64_t len, uint64_t crc)
{
	uint8_t *o = out + 4;
	*o++ = (uint8_t)(0x80 | (kind == FP_DATA ? 6 : 4));
	o = fp_put_str(o, "t");
	o = fp_put_str(o, kind == FP_REQ ? "req" : kind == FP_DATA ? "data" : "zero");
	o = fp_put_str(o, "r");
	o = fp_put_uint(o, r);
	o = fp_put_str(o, "p");
	o = fp_put_uint(o, p);
	o = fp_put_str(o, "n");
	o = fp_put_uint(o, n);
	if (kind == FP_DATA) {
		o = fp_put_str(o, "len");
		o = fp_put_uint(o, len);
		o = fp_put_str(o, "crc");
		o = fp_put_uint(o, crc);
	}
	fp_put_be32(out, (uint32_t)(o - out - 4));
	return (size_t)(o - out);
}

#endif
