/* Writes into tenant memory that cannot fault the daemon (tenant.c). */
#ifndef UFFDD_FASTPATH_TENANT_H
#define UFFDD_FASTPATH_TENANT_H

#include <stddef.h>

/* Copy `len` bytes from `src` to `dst`, an address of one of the daemon's alias
 * mappings of a tenant's memory fd. 0, or the errno (EFAULT: the file no longer backs
 * that address, e.g. the VMM shrank it; ENOMEM: no memory, e.g. an empty hugetlb
 * pool), with the bytes written before it in *done. Never a SIGBUS. */
int uffdd_fp_tenant_write(void *dst, const void *src, size_t len, size_t *done);

/* The same, writing zeros. */
int uffdd_fp_tenant_zero(void *dst, size_t len, size_t *done);

/* Zero-copy bulk receive: the CRC of a frame received partly into the alias (the pages
 * with claimed[i] != 0) and partly into buf, its claimed holes zeroed in the alias, all
 * under a SIGBUS guard: 0 (CRC in *crc_out) or EFAULT. See tenant.c. */
#include <stdint.h>
int uffdd_fp_alias_verify(uint8_t *alias, const uint8_t *buf, size_t ps, size_t count,
			  const uint8_t *claimed, const uint32_t *holes, size_t nholes,
			  int with_crc, uint32_t crc, uint32_t *crc_out);

#endif
