/* Unit test of the vmsim pattern and hash (vmsim/pattern.h): fixed values that
 * any other implementation (Python tests, benchmarks) must reproduce. */
#include <stdio.h>
#include <stdlib.h>

#include "../vmsim/pattern.h"

static int failures, checks;

#define CHECK(cond)                                                          \
	do {                                                                 \
		checks++;                                                    \
		if (!(cond)) {                                               \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, \
				__LINE__, #cond);                            \
			failures++;                                          \
		}                                                            \
	} while (0)

int main(void)
{
	/* first output of the reference splitmix64 generator seeded with 0 */
	CHECK(splitmix64(0) == 0xe220a8397b1dcdafull);
	/* FNV-1a 64 test vectors */
	CHECK(fnv1a64(FNV64_BASIS, "", 0) == 0xcbf29ce484222325ull);
	CHECK(fnv1a64(FNV64_BASIS, "a", 1) == 0xaf63dc4c8601ec8cull);
	CHECK(fnv1a64(FNV64_BASIS, "foobar", 6) == 0x85944171f73967e8ull);

	static uint64_t page[VMSIM_WORDS];
	pattern_fill(page, 7, 3);
	CHECK(page[0] == splitmix64(7 ^ (3 * 512 + 0)));
	CHECK(page[511] == splitmix64(7 ^ (3 * 512 + 511)));
	CHECK(pattern_check(page, 7, 3));
	CHECK(!pattern_check(page, 8, 3));
	page[100] ^= 1;
	CHECK(!pattern_check(page, 7, 3));

	/* pages 5, 16, 27, ... are zero pages */
	pattern_fill(page, 7, 16);
	for (unsigned j = 0; j < VMSIM_WORDS; j++)
		CHECK(page[j] == 0);
	CHECK(pattern_check(page, 7, 16));
	CHECK(pattern_is_zero_page(5) && !pattern_is_zero_page(6));

	printf("test_pattern: %d passed, %d failed\n", checks - failures, failures);
	return failures ? 1 : 0;
}
