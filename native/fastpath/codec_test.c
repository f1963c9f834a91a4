/* Test hooks: frame.h's codec, callable from Python (tests/test_fastpath_export.py checks
 * it byte for byte against protocol.pack_peer / msgpack-python, and with hostile input).
 * Tiny and side-effect free; they ship in the library so the tests exercise the very
 * code the loops are built from. */
#include "frame.h"

#define FP_API __attribute__((visibility("default")))

/* fp_put_frame_head into out (FP_MAX_FRAME_HEAD bytes); returns the frame head's size. */
FP_API uint64_t uffdd_fp_test_put_frame_head(uint8_t *out, int kind, uint64_t r, uint64_t p,
					     uint64_t n, uint64_t len, uint64_t crc)
{
	return fp_put_frame_head(out, (enum fp_kind)kind, r, p, n, len, crc);
}

/* fp_parse_header of a header body; out gets r, p, n, len, crc, have. Returns the kind. */
FP_API int uffdd_fp_test_parse_header(const uint8_t *body, uint64_t len, uint64_t out[6])
{
	struct fp_header h;
	enum fp_kind kind = fp_parse_header(body, (size_t)len, &h);
	out[0] = h.r;
	out[1] = h.p;
	out[2] = h.n;
	out[3] = h.len;
	out[4] = h.crc;
	out[5] = h.have;
	return kind;
}

/* The demand-request rule as C has it: FP_MAX_REQUEST_PAGES, and fp_req_in_region. */
FP_API uint64_t uffdd_fp_test_max_request_pages(void)
{
	return FP_MAX_REQUEST_PAGES;
}

FP_API int uffdd_fp_test_req_in_region(uint64_t p, uint64_t n, uint64_t region_pages)
{
	return fp_req_in_region(p, n, region_pages);
}
