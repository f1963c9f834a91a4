/*
 * The guest-RAM pattern and hash shared by both sides of uffdd-vmsim (and the
 * tests). Defined on 4 KiB pages whatever the backing's page size:
 *
 *   word j (8 bytes, little endian, j = 0..511) of 4 KiB page p =
 *       splitmix64(seed ^ (p * 512 + j))
 *   except every page with p % 11 == 5, which is all zeros (so the daemon's
 *   zero-page markers get exercised).
 *
 *   splitmix64(x): z = x + 0x9e3779b97f4a7c15;
 *                  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9;
 *                  z = (z ^ (z >> 27)) * 0x94d049bb133111eb;
 *                  return z ^ (z >> 31);          (all mod 2^64)
 *
 * The RAM hash is FNV-1a 64 (offset basis 0xcbf29ce484222325, prime
 * 0x100000001b3) over the bytes of RAM in address order, printed as 16 hex digits.
 */
#ifndef UFFDD_VMSIM_PATTERN_H
#define UFFDD_VMSIM_PATTERN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define VMSIM_PAGE 4096u
#define VMSIM_WORDS (VMSIM_PAGE / 8u)
#define FNV64_BASIS 0xcbf29ce484222325ull
#define FNV64_PRIME 0x100000001b3ull

static inline uint64_t splitmix64(uint64_t x)
{
	uint64_t z = x + 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline int pattern_is_zero_page(uint64_t p)
{
	return p % 11 == 5;
}

static inline uint64_t pattern_word(uint64_t seed, uint64_t p, uint64_t j)
{
	return pattern_is_zero_page(p) ? 0 : splitmix64(seed ^ (p * VMSIM_WORDS + j));
}

/* Fill 4 KiB page p at dst. */
static inline void pattern_fill(void *dst, uint64_t seed, uint64_t p)
{
	uint64_t *w = dst;
	for (uint64_t j = 0; j < VMSIM_WORDS; j++)
		w[j] = pattern_word(seed, p, j);
}

/* 1 if the 4 KiB page at src holds page p's pattern. */
static inline int pattern_check(const void *src, uint64_t seed, uint64_t p)
{
	const uint64_t *w = src;
	uint64_t diff = 0;
	for (uint64_t j = 0; j < VMSIM_WORDS; j++)
		diff |= w[j] ^ pattern_word(seed, p, j);
	return diff == 0;
}

static inline uint64_t fnv1a64(uint64_t h, const void *data, size_t n)
{
	const unsigned char *b = data;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= FNV64_PRIME;
	}
	return h;
}

#endif
