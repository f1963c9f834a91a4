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

/* ------------------------------------------------------------------ reads in place
 *
 * Zero-copy bulk receive (MINOR mode) puts a frame's pages straight into the alias
 * with recvmsg, which the kernel copies (EFAULT, never SIGBUS). Its CRC must then be
 * read from the alias and its holes zeroed there: plain loads and stores, which a
 * shrunk memfd or an empty hugetlb pool turns into SIGBUS. They run under a guard: a
 * thread-local jump buffer, set only for the one call, and a SIGBUS handler that jumps
 * back to it (the call returns EFAULT) when this thread has a guard set, and otherwise
 * hands the signal to whoever had SIGBUS before (Python's faulthandler, or the default
 * action). The handler is (re)installed by the guarded call itself if someone replaced
 * it since, chaining to that one.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

static __thread sigjmp_buf *guard_env;
static struct sigaction prev_bus;
static pthread_mutex_t bus_lock = PTHREAD_MUTEX_INITIALIZER;

static void bus_handler(int sig, siginfo_t *si, void *uc)
{
	sigjmp_buf *env = guard_env;
	if (env && si && si->si_code > 0) { /* a fault of this thread inside a guarded call */
		guard_env = NULL;
		siglongjmp(*env, 1);
	}
	if (prev_bus.sa_flags & SA_SIGINFO) {
		if (prev_bus.sa_sigaction) {
			prev_bus.sa_sigaction(sig, si, uc);
			return;
		}
	} else if (prev_bus.sa_handler != SIG_DFL && prev_bus.sa_handler != SIG_IGN) {
		prev_bus.sa_handler(sig);
		return;
	}
	/* the default action: a fault re-executes and is fatal; a sent SIGBUS is raised */
	signal(SIGBUS, SIG_DFL);
	if (!si || si->si_code <= 0)
		raise(sig);
}

static void ensure_bus_handler(void)
{
	struct sigaction cur;
	if (sigaction(SIGBUS, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
	    cur.sa_sigaction == bus_handler)
		return;
	pthread_mutex_lock(&bus_lock);
	if (sigaction(SIGBUS, NULL, &cur) == 0 &&
	    !((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == bus_handler)) {
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = bus_handler;
		sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
		sigemptyset(&sa.sa_mask);
		prev_bus = cur;
		sigaction(SIGBUS, &sa, NULL);
	}
	pthread_mutex_unlock(&bus_lock);
}

uint32_t uffdd_fp_crc32(uint32_t crc, const void *buf, size_t len); /* bulk.c */

/* The CRC-32 (chained from `crc`, if with_crc) of a data frame of `count` pages that
 * was received partly into the alias and partly into `buf` (both indexed by the run's
 * page): page i came to alias + i*ps if claimed[i], else to buf + i*ps. The frame's
 * holes (sorted, disjoint [first, pages] pairs, checked by the caller) are zeroed in the
 * alias for claimed pages. 0, with the CRC in *crc_out; EFAULT if the alias faulted
 * (SIGBUS: the memfd shrank, or no huge page): nothing is known about the frame then. */
static __attribute__((noinline)) uint32_t verify_frame(uint8_t *alias, const uint8_t *buf,
							   size_t ps, size_t count,
							   const uint8_t *claimed,
							   const uint32_t *holes, size_t nholes,
							   int with_crc, uint32_t crc)
{
	size_t pos = 0;
	for (size_t h = 0; h <= nholes; h++) {
		size_t off = h < nholes ? holes[2 * h] : count;
		size_t n = h < nholes ? holes[2 * h + 1] : 0;
		/* data pages [pos, off): runs of one source each */
		while (with_crc && pos < off) {
			size_t end = pos + 1;
			while (end < off && claimed[end] == claimed[pos])
				end++;
			const uint8_t *base = claimed[pos] ? alias : buf;
			crc = uffdd_fp_crc32(crc, base + pos * ps, (end - pos) * ps);
			pos = end;
		}
		for (size_t i = off; i < off + n; i++)
			if (claimed[i])
				memset(alias + i * ps, 0, ps);
		pos = off + n;
	}
	return crc;
}

FP_EXPORT int uffdd_fp_alias_verify(uint8_t *alias, const uint8_t *buf, size_t ps,
				    size_t count, const uint8_t *claimed, const uint32_t *holes,
				    size_t nholes, int with_crc, uint32_t crc, uint32_t *crc_out)
{
	sigjmp_buf env;
	ensure_bus_handler();
	if (sigsetjmp(env, 1))
		return EFAULT; /* the handler cleared guard_env */
	guard_env = &env;
	uint32_t out = verify_frame(alias, buf, ps, count, claimed, holes, nholes, with_crc, crc);
	guard_env = NULL;
	*crc_out = out;
	return 0;
}
