/* Writes into tenant memory that can never fault the daemon.
 *
 * MINOR mode fills a page by writing the daemon's alias mapping of the VMM's memory fd,
 * then UFFDIO_CONTINUE. A plain store through that mapping raises SIGBUS if the VMM has
 * shrunk the file under it (ftruncate), or if the page cannot be allocated (hugetlb
 * pool empty): the signal kills the daemon and every tenant's session with it. Sealing
 * the memfd against shrinking is not available (only memfds made with
 * MFD_ALLOW_SEALING can be sealed, and a seal would change the tenant's file for good);
 * pwrite on the fd would silently grow the file back. process_vm_writev to our own pid
 * does the same copy through get_user_pages, which turns that fault into EFAULT (or
 * ENOMEM), returned to the caller, which fails that one session.
 *
 * The cost, measured on the MINOR bulk path (tests/bench_tenant_write.py): see the
 * README's Reliability section.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>
#include <unistd.h>

#include "tenant.h"

#define FP_EXPORT __attribute__((visibility("default")))

/* Zeros the zero writes copy from: one buffer, named many times in a local iovec. */
#define ZERO_CHUNK (64 * 1024)
#define ZERO_IOV 256 /* 16 MiB per call */
static const uint8_t zeros[ZERO_CHUNK];

/* One process_vm_writev of local[0..nlocal) (len bytes in all) to dst, retried after a
 * partial copy. */
static int write_iov(uint8_t *dst, struct iovec *local, int nlocal, size_t len, size_t *done)
{
	pid_t self = getpid();
	size_t got = 0;
	while (got < len) {
		struct iovec remote = {dst + got, len - got};
		ssize_t n = process_vm_writev(self, local, (unsigned long)nlocal, &remote, 1, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			*done += got;
			return errno;
		}
		if (n == 0) { /* cannot happen for len > 0; never spin on it */
			*done += got;
			return EIO;
		}
		got += (size_t)n;
		/* skip what was copied in the local vector */
		size_t skip = (size_t)n;
		while (nlocal > 0 && skip >= local->iov_len) {
			skip -= local->iov_len;
			local++;
			nlocal--;
		}
		if (nlocal > 0 && skip) {
			local->iov_base = (uint8_t *)local->iov_base + skip;
			local->iov_len -= skip;
		}
	}
	*done += got;
	return 0;
}

FP_EXPORT int uffdd_fp_tenant_write(void *dst, const void *src, size_t len, size_t *done)
{
	struct iovec local = {(void *)src, len};
	*done = 0;
	return len ? write_iov(dst, &local, 1, len, done) : 0;
}

FP_EXPORT int uffdd_fp_tenant_zero(void *dst, size_t len, size_t *done)
{
	uint8_t *p = dst;
	*done = 0;
	while (len) {
		struct iovec local[ZERO_IOV];
		size_t part = 0;
		int n = 0;
		while (n < ZERO_IOV && part < len) {
			size_t k = len - part < ZERO_CHUNK ? len - part : ZERO_CHUNK;
			local[n++] = (struct iovec){(void *)zeros, k};
			part += k;
		}
		int err = write_iov(p, local, n, part, done);
		if (err)
			return err;
		p += part;
		len -= part;
	}
	return 0;
}
