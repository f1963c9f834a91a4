/* The source daemon's demand lane in C (uffdd/exporter/demand.py: serve_demand is the reference).
 *
 * uffdd_fp_export_demand() answers page requests {"t":"req","r","p","n"} read from the
 * lane's socket: every request already received goes into one batch (at most
 * FPX_BATCH_PAGES pages, as the Python loop does), its pages are read (a read-only
 * mapping of a sealed memfd, pread of an unsealed one, or process_vm_readv of the
 * source VMM), and each run of zero / non-zero pages of a request is answered with a
 * "zero" marker or a "data" frame (CRC32 of the payload, 0 without integrity), all of
 * the batch with one sendmsg. The frames are byte for byte the ones the Python path
 * writes (frame.h, checked against protocol.pack_peer by tests/test_fastpath_export.py).
 *
 * Only the common case is handled here. The call returns to Python, without consuming
 * it, at the first thing it does not handle: a frame that is not a well-formed request
 * inside the session's regions (Python raises the same ProtocolError as always, sends
 * the same refusal, notices "cancel"), a page it cannot read (Python sends the "lost"
 * frames), or fault injection becoming active (ctl[FPX_CTL_PYTHON]). It also returns
 * when the peer closes the link or a socket call fails, and at least every
 * `return_ms` so Python folds the counters in and notices a lane being stopped.
 *
 * ctypes releases the GIL for the whole call. The call owns nothing: the socket is a
 * dup()ed descriptor Python closes after the lane ends (so a close() of the lane's
 * socket in another thread can never make us use a recycled descriptor number; its
 * shutdown() wakes our poll), and every buffer is Python's, pinned for the call.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "frame.h"

#define FP_API __attribute__((visibility("default")))

#define FPX_BATCH_PAGES 64 /* exporter._DEMAND_BATCH_PAGES */
_Static_assert(FPX_BATCH_PAGES >= FP_MAX_REQUEST_PAGES, "a batch must hold any one request");
/* a batch is at most 64 requests; each request at most 64 runs, but the pages of a
 * batch are at most 64, so at most 64 runs in all: one head and one payload each */
#define FPX_MAX_RUNS FPX_BATCH_PAGES

/* How a region's pages are read (ExportRegion: mapping / fd / pid). */
enum { FPX_MAP = 0, FPX_PREAD = 1, FPX_PID = 2 };

/* Shared words (ExportState.control): written by both sides without a lock. */
enum { FPX_CTL_HINT = 0, FPX_CTL_PYTHON = 1, FPX_CTL_WORDS = 2 };
#define FPX_HINT_VALID (1ull << 63)
#define FPX_HINT_REGION_SHIFT 40
#define FPX_HINT_PAGE_MASK ((1ull << FPX_HINT_REGION_SHIFT) - 1)

/* What uffdd_fp_export_demand returns. */
enum {
	FPX_TIMEOUT = 0,    /* return_ms passed: fold counters, check the lane, call again */
	FPX_HANDBACK = 1,   /* Python must handle the next frame(s) at buf[start] */
	FPX_EOF = 2,        /* the peer closed the link (or the lane was shut down) */
	FPX_RECV_ERROR = 3, /* recv failed with `error` */
	FPX_SEND_ERROR = 4, /* sendmsg failed with `error` */
};

/* Mirrors exporter._CRegion (ctypes). */
struct fpx_region {
	uint64_t pages;
	uint64_t page_size;
	uint64_t base;   /* FPX_MAP: the mapping's address; FPX_PID: the region's address in pid */
	uint64_t offset; /* FPX_PREAD: file offset of the region's first page */
	uint8_t *sent;   /* ExportState.sent row: a byte per page, 1 = sent or claimed */
	uint8_t *demanded; /* warm-restore record: 1 = recorded (NULL: not recording) */
	int32_t mode;
	int32_t fd;  /* FPX_PREAD */
	int32_t pid; /* FPX_PID */
	int32_t pad;
};

/* Mirrors exporter._CLane (ctypes). */
struct fpx_lane {
	const struct fpx_region *regions;
	uint64_t nregions;
	uint8_t *buf;          /* FrameSocket's receive buffer ... */
	uint64_t cap;          /* ... its size (>= max_header + 4) */
	uint64_t start, end;   /* in/out: the unread bytes are buf[start:end] */
	uint8_t *scratch;      /* where FPX_PREAD / FPX_PID pages of a batch are read to */
	uint64_t scratch_len;  /* FPX_BATCH_PAGES * the largest page size */
	uint64_t *ctl;         /* FPX_CTL_WORDS shared words */
	uint64_t max_header;   /* FrameSocket.max_header */
	uint64_t *order;       /* warm-restore record (uffdd.warmorder.Recorder): entries ... */
	uint64_t *order_count; /* ... how many were taken (atomic; may pass order_cap) ... */
	uint64_t order_cap;    /* ... and room for this many; order NULL: not recording */
	int64_t spin_ns;       /* busy-poll this long after answering before sleeping */
	int32_t fd;
	int32_t return_ms;
	int32_t integrity;
	int32_t pad;
	/* out, accumulated over the call (Python zeroes them before calling) */
	uint64_t bytes_sent, bytes_received;
	uint64_t pages_demand, pages_zero, requests, batches;
	int32_t error; /* errno of FPX_RECV_ERROR / FPX_SEND_ERROR */
	int32_t pad2;
};

struct fpx_req {
	const struct fpx_region *region;
	uint64_t r, p, n;
	const uint8_t *data; /* the request's pages, once read */
};

static int64_t fpx_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Decide about the frame at buf[start]: 1 and *req filled if it is a request this loop
 * answers (frame length in *flen); 0 if more bytes are needed to tell; -1 if Python must
 * handle it (anything else, including an out-of-bounds length or a request outside the
 * session's regions: Python refuses those with its own errors). */
static int fpx_next_req(const struct fpx_lane *l, uint64_t at, struct fpx_req *req,
			uint64_t *flen)
{
	uint64_t avail = l->end - at;
	if (avail < 4)
		return 0;
	uint64_t len = fp_be32(l->buf + at);
	if (len == 0 || len > l->max_header || len > FP_MAX_HEADER)
		return -1;
	if (avail < 4 + len)
		return 0;
	struct fp_header h;
	if (fp_parse_header(l->buf + at + 4, (size_t)len, &h) != FP_REQ)
		return -1;
	/* protocol.check_req's rule (anything else is Python's to refuse) */
	if (h.r >= l->nregions)
		return -1;
	const struct fpx_region *region = &l->regions[h.r];
	if (!fp_req_in_region(h.p, h.n, region->pages))
		return -1;
	req->region = region;
	req->r = h.r;
	req->p = h.p;
	req->n = h.n;
	req->data = NULL;
	*flen = 4 + len;
	return 1;
}

/* Every page in [p, p + len) of 8-byte aligned memory is zero? (page sizes are
 * multiples of 64) */
static int fpx_is_zero(const uint8_t *p, uint64_t len)
{
	const uint64_t *w = (const uint64_t *)(const void *)p;
	for (uint64_t i = 0; i < len / 8; i += 8) {
		uint64_t acc = w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] |
			       w[i + 6] | w[i + 7];
		if (acc)
			return 0;
	}
	return 1;
}

/* Read one request's pages; 0 or -1 (Python reads them again and sends "lost"). */
static int fpx_read(struct fpx_lane *l, struct fpx_req *q, uint64_t at)
{
	const struct fpx_region *rg = q->region;
	uint64_t off = q->p * rg->page_size, len = q->n * rg->page_size;
	if (rg->mode == FPX_MAP) {
		q->data = (const uint8_t *)(uintptr_t)rg->base + off;
		return 0;
	}
	if (at + len > l->scratch_len)
		return -1;
	uint8_t *dst = l->scratch + at;
	q->data = dst;
	if (rg->mode == FPX_PREAD) {
		uint64_t got = 0;
		while (got < len) {
			ssize_t n = pread(rg->fd, dst + got, len - got, (off_t)(rg->offset + off + got));
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				return -1; /* an error, or the VMM shrank its memfd */
			got += (uint64_t)n;
		}
		return 0;
	}
	struct iovec local = {dst, len};
	struct iovec remote = {(void *)(uintptr_t)(rg->base + off), len};
	ssize_t n = process_vm_readv(rg->pid, &local, 1, &remote, 1, 0);
	return n == (ssize_t)len ? 0 : -1;
}

/* sendmsg all of iov[0..cnt) (a blocking socket; poll if it is not). 0 or -errno. */
static int fpx_send_all(struct fpx_lane *l, struct iovec *iov, int cnt)
{
	while (cnt > 0) {
		struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
		ssize_t n = sendmsg(l->fd, &msg, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				struct pollfd pfd = {.fd = l->fd, .events = POLLOUT};
				if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
					return -errno;
				continue;
			}
			return -errno;
		}
		l->bytes_sent += (uint64_t)n;
		while (cnt > 0 && (uint64_t)n >= iov->iov_len) {
			n -= (ssize_t)iov->iov_len;
			iov++;
			cnt--;
		}
		if (cnt > 0 && n > 0) {
			iov->iov_base = (uint8_t *)iov->iov_base + n;
			iov->iov_len -= (size_t)n;
		}
	}
	return 0;
}

/* Record each page of the batch the first time it is demanded, in order (the Python
 * loop's Recorder.add): a byte per page says "recorded", one entry per page, region <<
 * 40 | page. The count is taken with an atomic add, so the rare second demand lane
 * (a link being replaced) cannot make two entries share a slot; a page both lanes
 * record at once appears twice, which Python drops when it writes the record. */
static void fpx_record(struct fpx_lane *l, const struct fpx_req *b, int nb)
{
	for (int i = 0; i < nb; i++) {
		uint8_t *seen = b[i].region->demanded;
		if (!seen)
			continue;
		for (uint64_t p = b[i].p; p < b[i].p + b[i].n; p++) {
			if (seen[p])
				continue;
			seen[p] = 1;
			uint64_t at = __atomic_fetch_add(l->order_count, 1, __ATOMIC_RELAXED);
			if (at < l->order_cap)
				l->order[at] = b[i].r << FPX_HINT_REGION_SHIFT | p;
		}
	}
}

/* Mark the batch's pages sent so the bulk lanes skip them, and steer bulk after the
 * last one (exporter._claim). Without the state lock: a bulk lane that claimed one of
 * these pages a moment earlier sends it too, and the destination installs a page once
 * and drops the copy (it keeps a page map; an install of a present page is a no-op).
 * The rows are never resized while a lane runs (Python pins them), a byte store
 * cannot tear, and the hint is one aligned 64-bit word, so nothing worse can happen. */
static void fpx_claim(struct fpx_lane *l, const struct fpx_req *b, int nb)
{
	for (int i = 0; i < nb; i++)
		memset(b[i].region->sent + b[i].p, 1, b[i].n);
	if (l->order)
		fpx_record(l, b, nb);
	const struct fpx_req *last = &b[nb - 1];
	uint64_t hint = FPX_HINT_VALID | last->r << FPX_HINT_REGION_SHIFT |
			((last->p + last->n) & FPX_HINT_PAGE_MASK);
	__atomic_store_n(&l->ctl[FPX_CTL_HINT], hint, __ATOMIC_RELAXED);
}

/* Answer one batch: 0, 1 (a page could not be read: nothing sent, Python takes the
 * batch), or -errno of a failed send. */
static int fpx_answer(struct fpx_lane *l, struct fpx_req *b, int nb)
{
	uint8_t heads[FPX_MAX_RUNS][FP_MAX_FRAME_HEAD];
	struct iovec iov[2 * FPX_MAX_RUNS];
	int nh = 0, ni = 0;
	uint64_t zero_pages = 0;

	fpx_claim(l, b, nb);
	uint64_t at = 0;
	for (int i = 0; i < nb; i++) {
		if (fpx_read(l, &b[i], at) < 0)
			return 1;
		at += b[i].n * b[i].region->page_size;
	}
	for (int i = 0; i < nb; i++) {
		const struct fpx_req *q = &b[i];
		uint64_t ps = q->region->page_size;
		uint64_t k = 0;
		while (k < q->n) {
			int zero = fpx_is_zero(q->data + k * ps, ps);
			uint64_t j = k + 1;
			while (j < q->n && fpx_is_zero(q->data + j * ps, ps) == zero)
				j++;
			uint8_t *h = heads[nh++];
			if (zero) {
				size_t hl = fp_put_frame_head(h, FP_ZERO, q->r, q->p + k, j - k, 0, 0);
				iov[ni++] = (struct iovec){h, hl};
				zero_pages += j - k;
			} else {
				const uint8_t *data = q->data + k * ps;
				uint64_t len = (j - k) * ps;
				uint64_t crc = l->integrity ? uffdd_fp_crc32(0, data, len) : 0;
				size_t hl = fp_put_frame_head(h, FP_DATA, q->r, q->p + k, j - k, len, crc);
				iov[ni++] = (struct iovec){h, hl};
				iov[ni++] = (struct iovec){(void *)data, len};
			}
			k = j;
		}
	}
	int rc = fpx_send_all(l, iov, ni);
	if (rc < 0)
		return rc;
	for (int i = 0; i < nb; i++)
		l->pages_demand += b[i].n;
	l->pages_zero += zero_pages;
	l->requests += (uint64_t)nb;
	l->batches++;
	return 0;
}

/* Receive more bytes: 1 got some, 0 `until` passed, or an FPX_* status to return. */
static int fpx_fill(struct fpx_lane *l, int64_t spin_until, int64_t until)
{
	if (l->start) { /* keep the unread bytes at the front (FrameSocket._fill does too) */
		memmove(l->buf, l->buf + l->start, l->end - l->start);
		l->end -= l->start;
		l->start = 0;
	}
	if (l->end >= l->cap) /* cannot happen: a frame that large was handed back */
		return FPX_HANDBACK;
	for (;;) {
		ssize_t n = recv(l->fd, l->buf + l->end, l->cap - l->end, MSG_DONTWAIT);
		if (n > 0) {
			l->end += (uint64_t)n;
			l->bytes_received += (uint64_t)n;
			return 1;
		}
		if (n == 0)
			return FPX_EOF;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK) {
			l->error = errno;
			return FPX_RECV_ERROR;
		}
		int64_t now = fpx_now_ns();
		if (now < spin_until)
			continue; /* busy-poll: a sleeping thread's wake-up costs 25-40 us here */
		if (now >= until)
			return 0;
		struct pollfd pfd = {.fd = l->fd, .events = POLLIN};
		int ms = (int)((until - now + 999999) / 1000000);
		if (poll(&pfd, 1, ms) < 0 && errno != EINTR) {
			l->error = errno;
			return FPX_RECV_ERROR;
		}
	}
}

FP_API int uffdd_fp_export_demand(struct fpx_lane *l)
{
	int64_t until = fpx_now_ns() + (int64_t)l->return_ms * 1000000;
	int64_t spin_until = 0; /* no spinning until a request was answered */
	struct fpx_req batch[FPX_BATCH_PAGES];

	for (;;) {
		/* fault injection became active: Python serves from here on */
		if (__atomic_load_n(&l->ctl[FPX_CTL_PYTHON], __ATOMIC_RELAXED))
			return FPX_HANDBACK;
		/* The batch the Python loop would make of these bytes: the first request, then
		 * the requests already buffered while it holds fewer than FPX_BATCH_PAGES
		 * pages; one that would overflow it starts the next batch. If that Python
		 * loop would refuse (or answer itself) a frame it reads for this batch,
		 * the whole batch is its own, unanswered, so the replies are the same. */
		int nb = 0;
		uint64_t pages = 0, at = l->start, flen = 0;
		while (pages < FPX_BATCH_PAGES) {
			int got = fpx_next_req(l, at, &batch[nb], &flen);
			if (got < 0)
				return FPX_HANDBACK;
			if (got == 0 || pages + batch[nb].n > FPX_BATCH_PAGES)
				break;
			pages += batch[nb++].n;
			at += flen;
		}
		if (nb > 0) {
			int rc = fpx_answer(l, batch, nb);
			if (rc > 0)
				return FPX_HANDBACK; /* unreadable page: start unchanged, Python redoes it */
			l->start = at; /* consumed: the requests were answered (or the link broke) */
			if (rc < 0) {
				l->error = -rc;
				return FPX_SEND_ERROR;
			}
			int64_t now = fpx_now_ns();
			if (l->spin_ns > 0)
				spin_until = now + l->spin_ns;
			if (now >= until)
				return FPX_TIMEOUT;
			continue;
		}
		int rc = fpx_fill(l, spin_until, until);
		if (rc == 0)
			return FPX_TIMEOUT;
		if (rc != 1)
			return rc;
	}
}

/* Python checks it runs against this very struct layout (and not an older library). */
FP_API uint64_t uffdd_fp_export_layout(void)
{
	return (uint64_t)sizeof(struct fpx_lane) << 32 | sizeof(struct fpx_region);
}
