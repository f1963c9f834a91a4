/* The destination's fault loop in C: the common case of uffdd/importer/faultloop.py.
 *
 * One call of fp_imp_run() waits in the session's epoll set (the same one the Python
 * loop uses) and handles, without the GIL:
 *   - page faults on ABSENT or REQUESTED pages: a "req" frame, and the waiter noted;
 *   - "data" and "zero" frames on the demand lane: installed (COPY, or alias write +
 *     CONTINUE in MINOR mode; ZEROPAGE), waiters' latencies accounted;
 * and returns to Python (FP_Y_*) for everything else, leaving the input where Python's
 * own code finds it: the eventfd, uffd batches with any non-fault event (discards are
 * applied in order that way), faults on pages in any other state, frames of any other
 * shape, a failed ioctl (the pages done are marked; Python redoes the rest with its
 * errno policy), a closed demand lane. Python stays the one place for those rules.
 *
 * With this engine (uffdd/importer/cengine.py) the outstanding-request table (page ->
 * asked time and waiting threads) lives here, and FaultLoop's slow paths reach it
 * through the engine interface (fp_imp_request/installed/forget); with the Python
 * engine it is PyEngine's: one owner in either mode. Page states are the bytes of the
 * session's PageMap, written in place; the count of pages that became INSTALLED is
 * handed back in io.installed_delta, which the engine folds into the PageMap's totals
 * (PageMap.installed_in_place).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "frame.h"
#include "tenant.h"

#define API __attribute__((visibility("default")))

/* uffdd/importer/pagestate.py; a page in any state >= ST_INSTALLED (RECEIVING, a bulk
 * frame's claim, too) is never installed or requested here */
enum { ST_ABSENT = 0, ST_REQUESTED = 1, ST_INSTALLED = 2, ST_RECEIVING = 6 };

enum { /* io.dirty bits */
	FP_D_PAGES = 1,   /* installed_delta, *_pages counters */
	FP_D_FAULTS = 2,  /* faults[] */
	FP_D_LATENCY = 4, /* hist, hist_sum, tids, samples */
	FP_D_LANE = 8,    /* bytes_demand, last_progress, active_at */
};

enum {
	FP_Y_TIMEOUT = 0,
	FP_Y_WAKE = 1,      /* the eventfd is readable: Python drains it */
	FP_Y_UFFD = 2,      /* io.msgs[0..nmsgs) from io.msg_fd need Python */
	FP_Y_FRAME = 3,     /* the frame at rx_start needs Python */
	FP_Y_DEMAND = 4,    /* demand socket: io.demand_mask, EOF or error (Python decides) */
	FP_Y_INSTALLED = 5, /* pages io.y_region/y_page/y_count installed; Python has callbacks */
	FP_Y_FOLD = 6,      /* accumulators are full: fold them and call again */
	FP_Y_ERROR = 7,     /* a call failed or came back short: io.err_* (Python decides) */
};

/* io.err_op: which call FP_Y_ERROR is about. Nothing is dropped here: every errno and
 * every short read goes to Python, which applies the one policy both loops share. */
enum {
	FP_E_READ_UFFD = 1,  /* read(io.err_fd) failed with io.err_errno */
	FP_E_SHORT_UFFD = 2, /* read(io.err_fd) returned io.err_bytes: not whole messages */
	FP_E_EPOLL_WAIT = 3, /* epoll_wait failed with io.err_errno */
};

#define N_BUCKETS 18 /* metrics.LATENCY_BUCKETS + Inf */
#define N_HOW 3      /* demand, inflight, background */
#define N_TIDS 256
#define N_SAMPLES 4096
#define FP_MSG_BATCH 64

struct fp_imp_io {
	/* rx buffer: Python's bytearray; [rx_start, rx_end) holds unparsed bytes */
	uint8_t *rx;
	uint64_t rx_cap, rx_start, rx_end;
	/* yields */
	int32_t msg_fd, nmsgs;
	uint8_t msgs[FP_MSG_BATCH * 32];
	uint32_t demand_mask;
	int32_t demand_errno;
	uint64_t y_region, y_page, y_count;
	int32_t want_installed; /* Python sets 1 while it holds page callbacks */
	uint64_t remaining;     /* pages not done yet (Python sets it): 0 left -> FP_Y_FOLD */
	int32_t integrity;
	double spin_s;
	/* accumulators, folded (and zeroed) by Python; `dirty` says which groups moved */
	uint32_t dirty;
	uint64_t installed_delta;
	uint64_t faults[4]; /* missing-read, missing-write, minor-read, minor-write */
	uint64_t copy_pages, continue_pages, zero_pages; /* pages installed, partial runs too */
	uint64_t demand_pages, bytes_demand;
	uint64_t hist[N_HOW][N_BUCKETS];
	double hist_sum[N_HOW];
	uint32_t ntids;
	int32_t tids[N_TIDS];
	double tid_seconds[N_TIDS];
	uint32_t nsamples;
	float samples_us[N_SAMPLES];
	double last_progress; /* monotonic time of the last byte on the demand lane */
	double active_at;
	/* FP_Y_ERROR */
	int32_t err_op, err_errno, err_fd, pad;
	int64_t err_bytes;
};

struct region {
	uint64_t addr, size, page_size, pages, alias;
	int32_t uffd, hugetlb;
	uint8_t *states;
};

struct waiter {
	int32_t tid;
	int32_t next; /* index in the waiter pool, -1 ends */
	double seen;
};

struct entry { /* one outstanding page; r == UINT32_MAX: empty slot */
	uint32_t r;
	uint32_t tomb;
	uint64_t p;
	double asked;
	int32_t head; /* first waiter */
	int32_t pad;
};

struct fp_imp {
	struct fp_imp_io io;
	int epfd, wakefd, demand_fd;
	uint32_t demand_events;
	int nregions;
	struct region *regions;
	struct entry *table;
	uint64_t table_cap, table_used, table_live; /* used counts tombstones too */
	struct waiter *pool;
	int32_t pool_cap, pool_free;
	uint8_t *out;
	uint64_t out_len, out_cap;
	double bounds[N_BUCKETS - 1];
	/* The gate (zero-copy bulk receive): the fault thread holds `gate` whenever it runs
	 * (so whenever it may write a page state, in C or in Python) and lets go only while
	 * it waits in epoll_wait, and between loop turns if a receiver waits (gate_pass).
	 * A bulk receiver thread claims a frame's pages under it (fp_imp_claim), so a claim
	 * is atomic with every demand install without a round trip to the fault thread. */
	pthread_mutex_t gate, aux;
	pthread_cond_t served_cv;
	int gated, closed, waiting; /* waiting: receivers blocked on the gate (atomic) */
	uint64_t served;            /* claims done (under aux) */
};

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ table */

static uint64_t hash_rp(uint32_t r, uint64_t p)
{
	uint64_t x = p * 0x9E3779B97F4A7C15ull ^ (uint64_t)r * 0xC2B2AE3D27D4EB4Full;
	return x ^ (x >> 29);
}

static struct entry *find(struct fp_imp *s, uint32_t r, uint64_t p)
{
	uint64_t mask = s->table_cap - 1;
	for (uint64_t i = hash_rp(r, p) & mask;; i = (i + 1) & mask) {
		struct entry *e = &s->table[i];
		if (e->r == UINT32_MAX && !e->tomb)
			return NULL;
		if (e->r == r && e->p == p)
			return e;
	}
}

static int grow_table(struct fp_imp *s);

static struct entry *insert(struct fp_imp *s, uint32_t r, uint64_t p)
{
	if ((s->table_used + 1) * 2 > s->table_cap && grow_table(s) < 0)
		return NULL;
	uint64_t mask = s->table_cap - 1;
	struct entry *grave = NULL;
	for (uint64_t i = hash_rp(r, p) & mask;; i = (i + 1) & mask) {
		struct entry *e = &s->table[i];
		if (e->r == r && e->p == p)
			return e;
		if (e->r == UINT32_MAX) {
			if (e->tomb) {
				if (!grave)
					grave = e;
				continue;
			}
			if (grave) {
				e = grave;
			} else {
				s->table_used++;
			}
			e->r = r;
			e->p = p;
			e->tomb = 0;
			e->asked = 0;
			e->head = -1;
			s->table_live++;
			return e;
		}
	}
}

static void put_waiters(struct fp_imp *s, int32_t head)
{
	while (head >= 0) {
		int32_t next = s->pool[head].next;
		s->pool[head].next = s->pool_free;
		s->pool_free = head;
		head = next;
	}
}

static void remove_entry(struct fp_imp *s, struct entry *e)
{
	put_waiters(s, e->head);
	e->r = UINT32_MAX;
	e->tomb = 1;
	e->head = -1;
	s->table_live--;
}

static int grow_table(struct fp_imp *s)
{
	uint64_t cap = s->table_cap;
	if (s->table_live * 4 > cap) /* mostly live: double; mostly tombstones: rehash */
		cap *= 2;
	struct entry *old = s->table;
	uint64_t old_cap = s->table_cap;
	struct entry *t = malloc(cap * sizeof(*t));
	if (!t)
		return -1;
	for (uint64_t i = 0; i < cap; i++) {
		t[i].r = UINT32_MAX;
		t[i].tomb = 0;
		t[i].head = -1;
	}
	s->table = t;
	s->table_cap = cap;
	s->table_used = s->table_live = 0;
	for (uint64_t i = 0; i < old_cap; i++) {
		if (old[i].r == UINT32_MAX)
			continue;
		struct entry *e = insert(s, old[i].r, old[i].p);
		e->asked = old[i].asked;
		e->head = old[i].head;
	}
	free(old);
	return 0;
}

static void add_waiter(struct fp_imp *s, struct entry *e, int32_t tid, double seen)
{
	if (s->pool_free < 0) {
		int32_t cap = s->pool_cap ? s->pool_cap * 2 : 1024;
		struct waiter *pool = realloc(s->pool, (size_t)cap * sizeof(*pool));
		if (!pool)
			return; /* the thread is still woken by the install; only its sample is lost */
		for (int32_t i = s->pool_cap; i < cap; i++)
			pool[i].next = i + 1 < cap ? i + 1 : -1;
		s->pool = pool;
		s->pool_free = s->pool_cap;
		s->pool_cap = cap;
	}
	int32_t w = s->pool_free;
	s->pool_free = s->pool[w].next;
	s->pool[w].tid = tid;
	s->pool[w].seen = seen;
	s->pool[w].next = -1;
	/* append: the first waiter is the one whose fault sent the request */
	int32_t *link = &e->head;
	while (*link >= 0)
		link = &s->pool[*link].next;
	*link = w;
}

/* ------------------------------------------------------------------ accounting */

static int account(struct fp_imp *s, int how, int32_t tid, double waited)
{
	struct fp_imp_io *io = &s->io;
	int b = 0;
	io->dirty |= FP_D_LATENCY;
	while (b < N_BUCKETS - 1 && waited > s->bounds[b])
		b++;
	io->hist[how][b]++;
	io->hist_sum[how] += waited;
	if (io->nsamples < N_SAMPLES)
		io->samples_us[io->nsamples++] = (float)(waited * 1e6);
	uint32_t i = 0;
	while (i < io->ntids && io->tids[i] != tid)
		i++;
	if (i == io->ntids) {
		if (io->ntids == N_TIDS)
			return -1;
		io->tids[io->ntids++] = tid;
		io->tid_seconds[i] = 0;
	}
	io->tid_seconds[i] += waited;
	return io->nsamples == N_SAMPLES ? -1 : 0;
}

/* Pages [p, p+n) of region r are installed: states, table, waiters' latencies.
 * Returns -1 when an accumulator filled up (the caller yields FP_Y_FOLD soon). */
static int mark_installed(struct fp_imp *s, uint32_t r, uint64_t p, uint64_t n, int demand,
			  double now)
{
	struct region *rg = &s->regions[r];
	int full = 0;
	s->io.dirty |= FP_D_PAGES;
	for (uint64_t q = p; q < p + n; q++) {
		if (rg->states[q] < ST_INSTALLED) {
			rg->states[q] = ST_INSTALLED;
			s->io.installed_delta++;
		}
		if (!s->table_live)
			continue;
		struct entry *e = find(s, r, q);
		if (!e)
			continue;
		int first = 1;
		for (int32_t w = e->head; w >= 0; w = s->pool[w].next) {
			int how = !demand ? 2 : (first && e->asked <= s->pool[w].seen) ? 0 : 1;
			if (account(s, how, s->pool[w].tid, now - s->pool[w].seen) < 0)
				full = 1;
			first = 0;
		}
		remove_entry(s, e);
	}
	if (demand)
		s->io.demand_pages += n;
	if (s->io.installed_delta >= s->io.remaining)
		full = 1; /* the session may be complete: Python checks at once */
	return full ? -1 : 0;
}

/* ------------------------------------------------------------------ outbox */

static int queue_request(struct fp_imp *s, uint32_t r, uint64_t p)
{
	if (s->demand_fd < 0)
		return 0;
	if (s->out_len + FP_MAX_FRAME_HEAD > s->out_cap) {
		uint64_t cap = s->out_cap ? s->out_cap * 2 : 65536;
		uint8_t *out = realloc(s->out, cap);
		if (!out)
			return -1;
		s->out = out;
		s->out_cap = cap;
	}
	s->out_len += fp_put_frame_head(s->out + s->out_len, FP_REQ, r, p, 1, 0, 0);
	return 0;
}

/* 0, or -errno: without EPOLLOUT the rest of the outbox would never be sent, so a
 * failure is the lane's (Python drops the link, as it does for its own modify). */
static int set_demand_events(struct fp_imp *s, uint32_t events)
{
	if (s->demand_fd < 0 || events == s->demand_events)
		return 0;
	struct epoll_event ev = {.events = events, .data.fd = s->demand_fd};
	if (epoll_ctl(s->epfd, EPOLL_CTL_MOD, s->demand_fd, &ev) < 0)
		return -errno;
	s->demand_events = events;
	return 0;
}

/* 0, or -errno of a failed send or epoll_ctl (Python then drops the link). */
static int flush(struct fp_imp *s)
{
	if (s->demand_fd < 0 || !s->out_len)
		return 0;
	ssize_t n = send(s->demand_fd, s->out, s->out_len, MSG_DONTWAIT | MSG_NOSIGNAL);
	if (n < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			return -errno;
		n = 0;
	}
	memmove(s->out, s->out + n, s->out_len - (uint64_t)n);
	s->out_len -= (uint64_t)n;
	return set_demand_events(s, EPOLLIN | (s->out_len ? EPOLLOUT : 0));
}

/* A failed flush becomes the demand lane's yield (Python drops the link). */
static int flush_failed(struct fp_imp *s, int err)
{
	s->io.demand_errno = -err;
	s->io.demand_mask = EPOLLERR;
	return FP_Y_DEMAND;
}

/* ------------------------------------------------------------------ installs */

static int install_run(struct fp_imp *s, struct region *rg, uint64_t page, uint64_t count,
		       const uint8_t *src, uint64_t *done)
{
	uint64_t ps = rg->page_size;
	uint64_t dst = rg->addr + page * ps;
	*done = 0;
	if (rg->alias) {
		/* never a plain memcpy: a shrunk memfd would SIGBUS the daemon (tenant.c) */
		/* src NULL: the alias holds the data already (zero-copy bulk receive) */
		size_t wrote;
		int err = src ? uffdd_fp_tenant_write((void *)(uintptr_t)(rg->alias + page * ps),
						      src, count * ps, &wrote)
			      : 0;
		if (err) {
			errno = err; /* nothing CONTINUE'd: Python redoes the run and fails it */
			return -1;
		}
		struct uffdio_continue c = {.range = {.start = dst, .len = count * ps}};
		if (ioctl(rg->uffd, UFFDIO_CONTINUE, &c) < 0) {
			/* a partial run: the pages before the one that stopped it went in */
			*done = c.mapped > 0 ? (uint64_t)c.mapped / ps : 0;
			s->io.continue_pages += *done;
			return -1;
		}
		s->io.continue_pages += count;
	} else {
		struct uffdio_copy c = {.dst = dst, .src = (uint64_t)(uintptr_t)src,
					.len = count * ps};
		if (ioctl(rg->uffd, UFFDIO_COPY, &c) < 0) {
			*done = c.copy > 0 ? (uint64_t)c.copy / ps : 0;
			s->io.copy_pages += *done;
			return -1;
		}
		s->io.copy_pages += count;
	}
	*done = count;
	return 0;
}

static int zero_run(struct fp_imp *s, struct region *rg, uint64_t page, uint64_t count,
		    uint64_t *done)
{
	uint64_t ps = rg->page_size;
	uint64_t dst = rg->addr + page * ps;
	*done = 0;
	if (rg->alias) {
		size_t wrote;
		int err = uffdd_fp_tenant_zero((void *)(uintptr_t)(rg->alias + page * ps),
					       count * ps, &wrote);
		if (err) {
			errno = err;
			return -1;
		}
		struct uffdio_continue c = {.range = {.start = dst, .len = count * ps}};
		if (ioctl(rg->uffd, UFFDIO_CONTINUE, &c) < 0) {
			*done = c.mapped > 0 ? (uint64_t)c.mapped / ps : 0;
			s->io.zero_pages += *done;
			return -1;
		}
	} else {
		struct uffdio_zeropage z = {.range = {.start = dst, .len = count * ps}};
		if (ioctl(rg->uffd, UFFDIO_ZEROPAGE, &z) < 0) {
			*done = z.zeropage > 0 ? (uint64_t)z.zeropage / ps : 0;
			s->io.zero_pages += *done;
			return -1;
		}
	}
	s->io.zero_pages += count;
	*done = count;
	return 0;
}

/* Install a whole demand frame's run. 1: done; 0: Python must handle the frame (the
 * pages installed so far are marked, so Python's redo skips them); -1: fold needed. */
static int install_frame(struct fp_imp *s, const struct fp_header *h, const uint8_t *payload,
			 int *fold)
{
	struct region *rg = &s->regions[h->r];
	if (h->kind == FP_ZERO && rg->hugetlb)
		return 0; /* no UFFDIO_ZEROPAGE for hugetlb: Python copies a zero page */
	double now = now_s();
	uint64_t end = h->p + h->n, q = h->p;
	while (q < end) {
		if (rg->states[q] >= ST_INSTALLED) { /* installed, poisoned or discarded: skip */
			q++;
			continue;
		}
		uint64_t run = q;
		while (run < end && rg->states[run] < ST_INSTALLED)
			run++;
		uint64_t done;
		int rc = h->kind == FP_DATA
				 ? install_run(s, rg, q, run - q,
					       payload + (q - h->p) * rg->page_size, &done)
				 : zero_run(s, rg, q, run - q, &done);
		if (done && mark_installed(s, (uint32_t)h->r, q, done, 1, now) < 0)
			*fold = 1;
		if (rc < 0)
			return 0;
		if (s->io.want_installed) { /* Python has page callbacks: it checks the frame */
			s->io.y_region = h->r;
			s->io.y_page = h->p;
			s->io.y_count = h->n;
			*fold = 2;
		}
		q = run;
	}
	return 1;
}

/* Parse and install complete frames in rx. 0 when rx is exhausted (or holds a partial
 * frame); otherwise the yield to return. */
static int parse_rx(struct fp_imp *s)
{
	struct fp_imp_io *io = &s->io;
	while (io->rx_end - io->rx_start >= 4) {
		const uint8_t *head = io->rx + io->rx_start;
		uint64_t avail = io->rx_end - io->rx_start;
		uint32_t hlen = fp_be32(head);
		if (hlen == 0 || hlen > FP_MAX_HEADER)
			return FP_Y_FRAME; /* Python names the error */
		if (avail < 4 + (uint64_t)hlen)
			break;
		struct fp_header h;
		enum fp_kind kind = fp_parse_header(head + 4, hlen, &h);
		if (kind != FP_DATA && kind != FP_ZERO)
			return FP_Y_FRAME;
		if (h.r >= (uint64_t)s->nregions)
			return FP_Y_FRAME;
		struct region *rg = &s->regions[h.r];
		if (h.p >= rg->pages || h.n > rg->pages - h.p)
			return FP_Y_FRAME;
		uint64_t len = kind == FP_DATA ? h.len : 0;
		if (kind == FP_DATA && len != h.n * rg->page_size)
			return FP_Y_FRAME;
		if (4 + (uint64_t)hlen + len > io->rx_cap)
			return FP_Y_FRAME; /* larger than the buffer: Python refuses it */
		if (avail < 4 + hlen + len)
			break;
		const uint8_t *payload = head + 4 + hlen;
		if (kind == FP_DATA && io->integrity &&
		    uffdd_fp_crc32(0, payload, len) != h.crc)
			return FP_Y_FRAME; /* Python refetches */
		int fold = 0;
		if (!install_frame(s, &h, payload, &fold))
			return FP_Y_FRAME;
		io->rx_start += 4 + hlen + len;
		if (fold == 2)
			return FP_Y_INSTALLED;
		if (fold)
			return FP_Y_FOLD;
	}
	if (io->rx_start == io->rx_end)
		io->rx_start = io->rx_end = 0;
	return 0;
}

static int demand_readable(struct fp_imp *s, uint32_t mask)
{
	struct fp_imp_io *io = &s->io;
	if ((mask & (EPOLLERR | EPOLLHUP)) && !(mask & EPOLLIN)) {
		io->demand_mask = mask;
		return FP_Y_DEMAND;
	}
	for (;;) {
		if (io->rx_end == io->rx_cap) {
			uint64_t left = io->rx_end - io->rx_start;
			if (!io->rx_start)
				return FP_Y_FRAME; /* a frame larger than the buffer */
			memmove(io->rx, io->rx + io->rx_start, left);
			io->rx_start = 0;
			io->rx_end = left;
		}
		ssize_t n = recv(s->demand_fd, io->rx + io->rx_end, io->rx_cap - io->rx_end,
				 MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			if (errno == EINTR)
				continue;
			io->demand_errno = errno;
			io->demand_mask = mask;
			return FP_Y_DEMAND;
		}
		if (n == 0) {
			io->demand_mask = mask;
			return FP_Y_DEMAND;
		}
		io->rx_end += (uint64_t)n;
		io->bytes_demand += (uint64_t)n;
		io->dirty |= FP_D_LANE;
		io->last_progress = io->active_at = now_s();
		int y = parse_rx(s);
		if (y)
			return y;
	}
}

/* ------------------------------------------------------------------ faults */

static struct region *region_of(struct fp_imp *s, int uffd, uint64_t address, uint32_t *index)
{
	for (int i = 0; i < s->nregions; i++) {
		struct region *rg = &s->regions[i];
		if (rg->uffd == uffd && address >= rg->addr && address < rg->addr + rg->size) {
			*index = (uint32_t)i;
			return rg;
		}
	}
	return NULL;
}

/* Handle a batch of uffd messages if they are all plain faults on pages that are absent
 * or requested; otherwise hand the rest of the batch to Python. */
static int faults(struct fp_imp *s, int fd, const struct uffd_msg *msgs, int count)
{
	struct fp_imp_io *io = &s->io;
	double now = now_s();
	io->active_at = now;
	io->dirty |= FP_D_LANE;
	for (int i = 0; i < count; i++) {
		if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
			goto python; /* discards etc. first, in order: all of it to Python */
	}
	for (int i = 0; i < count; i++) {
		const struct uffd_msg *m = &msgs[i];
		uint32_t r;
		struct region *rg = region_of(s, fd, m->arg.pagefault.address, &r);
		if (!rg)
			goto rest;
		uint64_t page = (m->arg.pagefault.address - rg->addr) / rg->page_size;
		uint8_t st = rg->states[page];
		if (st > ST_REQUESTED)
			goto rest;
		struct entry *e = insert(s, r, page);
		if (!e)
			goto rest;
		if (st == ST_ABSENT) {
			rg->states[page] = ST_REQUESTED;
			e->asked = now;
			if (queue_request(s, r, page) < 0)
				goto rest;
		}
		add_waiter(s, e, (int32_t)m->arg.pagefault.feat.ptid, now);
		uint64_t flags = m->arg.pagefault.flags;
		io->dirty |= FP_D_FAULTS;
		io->faults[((flags & UFFD_PAGEFAULT_FLAG_MINOR) ? 2 : 0) +
			   ((flags & UFFD_PAGEFAULT_FLAG_WRITE) ? 1 : 0)]++;
		continue;
rest:
		msgs += i;
		count -= i;
		goto python;
	}
	return 0;
python:
	io->msg_fd = fd;
	io->nmsgs = count;
	memcpy(io->msgs, msgs, (size_t)count * sizeof(*msgs));
	return FP_Y_UFFD;
}

static int uffd_error(struct fp_imp *s, int op, int fd, int err, ssize_t bytes)
{
	s->io.err_op = op;
	s->io.err_fd = fd;
	s->io.err_errno = err;
	s->io.err_bytes = bytes;
	return FP_Y_ERROR;
}

static int uffd_readable(struct fp_imp *s, int fd)
{
	struct uffd_msg msgs[FP_MSG_BATCH];
	for (;;) {
		ssize_t n = read(fd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
				return 0; /* nothing (left) to read: uffd.read_events says [] too */
			return uffd_error(s, FP_E_READ_UFFD, fd, errno, -1);
		}
		if (n % (ssize_t)sizeof(msgs[0])) /* the stream lost alignment: fatal in Python */
			return uffd_error(s, FP_E_SHORT_UFFD, fd, 0, n);
		int count = (int)(n / (ssize_t)sizeof(msgs[0]));
		int y = faults(s, fd, msgs, count);
		if (y)
			return y;
		if (count < FP_MSG_BATCH)
			return 0;
	}
}

static int is_uffd(struct fp_imp *s, int fd)
{
	for (int i = 0; i < s->nregions; i++)
		if (s->regions[i].uffd == fd)
			return 1;
	return 0;
}

/* ------------------------------------------------------------------ the loop */

API int fp_imp_run(struct fp_imp *s, double timeout_s)
{
	struct fp_imp_io *io = &s->io;
	double start = now_s();
	double deadline = start + timeout_s;
	struct epoll_event events[16];
	int y = parse_rx(s); /* a frame Python left complete in rx */
	if (y)
		return y;
	for (;;) {
		int err = flush(s);
		if (err < 0)
			return flush_failed(s, err);
		double now = now_s();
		int wait_ms = 0;
		if (now < deadline) {
			/* spin only while a vCPU waits for a reply (the table is not empty) */
			int spinning = io->spin_s > 0 && s->table_live && now < io->active_at + io->spin_s;
			wait_ms = spinning ? 0 : (int)((deadline - now) * 1000) + 1;
		}
		if (s->gated)
			pthread_mutex_unlock(&s->gate); /* receivers may claim while we sleep */
		int n = epoll_wait(s->epfd, events, 16, wait_ms);
		if (s->gated)
			pthread_mutex_lock(&s->gate);
		if (n < 0 && errno != EINTR)
			return uffd_error(s, FP_E_EPOLL_WAIT, s->epfd, errno, -1);
		for (int i = 0; i < n; i++) {
			int fd = events[i].data.fd;
			if (fd == s->wakefd) {
				y = FP_Y_WAKE;
			} else if (fd == s->demand_fd) {
				y = demand_readable(s, events[i].events);
			} else if (is_uffd(s, fd)) {
				y = uffd_readable(s, fd);
			} else {
				y = 0; /* stale: a demand socket Python replaced */
			}
			if (y) {
				/* a request queued before the yield goes out now; if that fails,
				 * the next call's first flush fails the same way and reports it */
				(void)flush(s);
				return y;
			}
		}
		if (n <= 0 && now_s() >= deadline)
			return FP_Y_TIMEOUT;
	}
}

/* ------------------------------------------------------------------ Python's API */

API struct fp_imp *fp_imp_new(int epfd, int wakefd, int nregions, const double *bounds)
{
	struct fp_imp *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->epfd = epfd;
	s->wakefd = wakefd;
	s->demand_fd = -1;
	s->nregions = nregions;
	s->regions = calloc((size_t)nregions, sizeof(*s->regions));
	s->table_cap = 1024;
	s->table = malloc(s->table_cap * sizeof(*s->table));
	s->pool_free = -1;
	if (!s->regions || !s->table) {
		free(s->regions);
		free(s->table);
		free(s);
		return NULL;
	}
	for (uint64_t i = 0; i < s->table_cap; i++) {
		s->table[i].r = UINT32_MAX;
		s->table[i].tomb = 0;
		s->table[i].head = -1;
	}
	memcpy(s->bounds, bounds, sizeof(s->bounds));
	pthread_mutex_init(&s->gate, NULL);
	pthread_mutex_init(&s->aux, NULL);
	pthread_cond_init(&s->served_cv, NULL);
	return s;
}

API void fp_imp_free(struct fp_imp *s)
{
	if (!s)
		return;
	free(s->regions);
	free(s->table);
	free(s->pool);
	free(s->out);
	pthread_mutex_destroy(&s->gate);
	pthread_mutex_destroy(&s->aux);
	pthread_cond_destroy(&s->served_cv);
	free(s);
}

/* ------------------------------------------------------------------ the gate */

/* The fault thread takes the gate once, before its loop's first turn. */
API void fp_imp_gate_enter(struct fp_imp *s)
{
	pthread_mutex_lock(&s->gate);
	s->gated = 1;
}

/* Between turns: if a receiver waits for the gate, let it claim first (bounded: 2 ms,
 * then the turn goes on and the receiver gets the gate at the next epoll_wait). */
API void fp_imp_gate_pass(struct fp_imp *s)
{
	if (!__atomic_load_n(&s->waiting, __ATOMIC_ACQUIRE))
		return;
	pthread_mutex_lock(&s->aux);
	uint64_t seen = s->served;
	pthread_mutex_unlock(&s->gate);
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_nsec += 2000000;
	if (until.tv_nsec >= 1000000000) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000;
	}
	while (s->served == seen && __atomic_load_n(&s->waiting, __ATOMIC_ACQUIRE))
		if (pthread_cond_timedwait(&s->served_cv, &s->aux, &until) == ETIMEDOUT)
			break;
	pthread_mutex_unlock(&s->aux);
	pthread_mutex_lock(&s->gate);
}

/* The fault thread's loop ends: no more claims; the gate is let go for good. */
API void fp_imp_gate_close(struct fp_imp *s)
{
	if (!s->gated)
		return;
	s->closed = 1;
	s->gated = 0;
	pthread_mutex_unlock(&s->gate);
}

/* A bulk receiver (any thread): claim pages [p, p+n) of region r for a zero-copy
 * receive: each absent or requested page becomes RECEIVING (mask[i] = 1), the rest
 * stay (mask[i] = 0). Returns how many were claimed, or -1 once the gate is closed
 * (the caller receives the old way). Page totals do not move: RECEIVING is not done. */
API int64_t fp_imp_claim(struct fp_imp *s, uint32_t r, uint64_t p, uint64_t n, uint8_t *mask)
{
	__atomic_add_fetch(&s->waiting, 1, __ATOMIC_ACQ_REL);
	pthread_mutex_lock(&s->gate);
	__atomic_sub_fetch(&s->waiting, 1, __ATOMIC_ACQ_REL);
	int64_t claimed = -1;
	if (!s->closed && r < (uint32_t)s->nregions && p <= s->regions[r].pages &&
	    n <= s->regions[r].pages - p) {
		uint8_t *st = s->regions[r].states;
		claimed = 0;
		for (uint64_t i = 0; i < n; i++) {
			int mine = st[p + i] <= ST_REQUESTED;
			if (mine)
				st[p + i] = ST_RECEIVING;
			mask[i] = (uint8_t)mine;
			claimed += mine;
		}
	}
	pthread_mutex_unlock(&s->gate);
	pthread_mutex_lock(&s->aux);
	s->served++;
	pthread_cond_broadcast(&s->served_cv);
	pthread_mutex_unlock(&s->aux);
	return claimed;
}

/* Python checks its mirror of struct fp_imp_io against this (uffdd/importer/fastimport.py). */
API uint64_t fp_imp_io_size(void)
{
	return sizeof(struct fp_imp_io);
}

API struct fp_imp_io *fp_imp_io(struct fp_imp *s)
{
	return &s->io;
}

API void fp_imp_region(struct fp_imp *s, int i, uint64_t addr, uint64_t size,
		       uint64_t page_size, int uffd, uint64_t alias, int hugetlb, uint8_t *states)
{
	struct region *rg = &s->regions[i];
	rg->addr = addr;
	rg->size = size;
	rg->page_size = page_size;
	rg->pages = size / page_size;
	rg->uffd = uffd;
	rg->alias = alias;
	rg->hugetlb = hugetlb;
	rg->states = states;
}

API void fp_imp_region_moved(struct fp_imp *s, int i, uint64_t addr)
{
	s->regions[i].addr = addr;
}

/* A new demand lane (fd registered for EPOLLIN by Python), or -1: the outbox is
 * dropped and every outstanding page is asked for again on the new lane. */
API int fp_imp_set_demand(struct fp_imp *s, int fd)
{
	s->demand_fd = fd;
	s->demand_events = EPOLLIN;
	s->out_len = 0;
	if (fd < 0)
		return 0;
	for (uint64_t i = 0; i < s->table_cap; i++)
		if (s->table[i].r != UINT32_MAX &&
		    queue_request(s, s->table[i].r, s->table[i].p) < 0)
			return -1;
	return 0;
}

/* Python asks for a page (a vCPU exit, a refetch): mark it requested, note when. */
API int fp_imp_request(struct fp_imp *s, uint32_t r, uint64_t p, double asked)
{
	struct entry *e = insert(s, r, p);
	if (!e)
		return -1;
	s->regions[r].states[p] = ST_REQUESTED;
	e->asked = asked;
	return queue_request(s, r, p);
}

/* Python read a fault on an absent or requested page (a batch it handled). */
API int fp_imp_fault(struct fp_imp *s, uint32_t r, uint64_t p, int32_t tid, double seen)
{
	struct entry *e = insert(s, r, p);
	if (!e)
		return -1;
	if (s->regions[r].states[p] == ST_ABSENT) {
		s->regions[r].states[p] = ST_REQUESTED;
		e->asked = seen;
		if (queue_request(s, r, p) < 0)
			return -1;
	}
	if (!e->asked) /* a page a bulk frame is being received into: waits from now */
		e->asked = seen;
	add_waiter(s, e, tid, seen);
	return 0;
}

/* Python installed pages (bulk, or a slow path): like a demand install here. */
API int fp_imp_installed(struct fp_imp *s, uint32_t r, uint64_t p, uint64_t n, int demand)
{
	return mark_installed(s, r, p, n, demand, now_s());
}

/* Is a fault or a demand-lane event ready (anything but the eventfd)? */
static int demand_waiting(struct fp_imp *s)
{
	struct epoll_event events[8];
	int n = epoll_wait(s->epfd, events, 8, 0);
	for (int i = 0; i < n; i++)
		if (events[i].data.fd != s->wakefd)
			return 1;
	return 0;
}

/* Install data for pages [p, p+n) of region r from `src` (the run's first page): every
 * page still absent or requested, in contiguous runs, one ioctl each. Returns the page
 * where it stopped: p + n when all went in, else the first page of the run that failed
 * (its pages done so far are installed and marked), errno in *err, for Python's rules.
 * *installed: how many pages this call installed. With `slice` > 0 (bulk), installs
 * go at most `slice` pages at a time, and before each piece but the first the call
 * returns early (err 0) if a fault or demand reply is waiting: a vCPU never waits
 * behind more than one slice of bulk copying. In MINOR mode, src NULL says the alias
 * holds the run's data already (zero-copy bulk receive): CONTINUE only. */
API uint64_t fp_imp_install(struct fp_imp *s, uint32_t r, uint64_t p, uint64_t n,
			    const uint8_t *src, int demand, uint64_t slice, int *err,
			    uint64_t *installed)
{
	struct region *rg = &s->regions[r];
	uint64_t end = p + n, q = p;
	double now = now_s();
	*err = 0;
	*installed = 0;
	while (q < end) {
		if (rg->states[q] >= ST_INSTALLED) {
			q++;
			continue;
		}
		uint64_t run = q;
		uint64_t limit = slice && end - q > slice ? q + slice : end;
		while (run < limit && rg->states[run] < ST_INSTALLED)
			run++;
		if (slice && q > p && demand_waiting(s))
			return q; /* a vCPU's fault or a demand reply first; Python calls again */
		uint64_t done;
		int rc = install_run(s, rg, q, run - q, src ? src + (q - p) * rg->page_size : NULL,
				     &done);
		if (done) {
			mark_installed(s, r, q, done, demand, now);
			*installed += done;
		}
		if (rc < 0) {
			*err = errno;
			return q + done;
		}
		q = run;
	}
	return end;
}

/* Forget outstanding pages [p, p+n) (discarded, poisoned, given up); n == 0: all. */
API void fp_imp_forget(struct fp_imp *s, uint32_t r, uint64_t p, uint64_t n)
{
	for (uint64_t i = 0; i < s->table_cap && s->table_live; i++) {
		struct entry *e = &s->table[i];
		if (e->r == UINT32_MAX)
			continue;
		if (n == 0 || (e->r == r && e->p >= p && e->p < p + n))
			remove_entry(s, e);
	}
}

API uint64_t fp_imp_outstanding(struct fp_imp *s)
{
	return s->table_live;
}

/* When page (r, p) was asked for, or -1 if it is not outstanding. */
API double fp_imp_asked(struct fp_imp *s, uint32_t r, uint64_t p)
{
	struct entry *e = s->table_live ? find(s, r, p) : NULL;
	return e ? e->asked : -1.0;
}

/* Up to `cap` outstanding pages asked for before `before` (oldest first is not
 * promised); with out == NULL, only the oldest asked time is returned in *oldest. */
API int fp_imp_expired(struct fp_imp *s, double before, uint32_t *out_r, uint64_t *out_p,
		       int cap, double *oldest)
{
	int n = 0;
	*oldest = -1.0;
	for (uint64_t i = 0; i < s->table_cap; i++) {
		struct entry *e = &s->table[i];
		if (e->r == UINT32_MAX)
			continue;
		if (*oldest < 0 || e->asked < *oldest)
			*oldest = e->asked;
		if (out_r && e->asked < before && n < cap) {
			out_r[n] = e->r;
			out_p[n] = e->p;
			n++;
		}
	}
	return n;
}

/* The outbox's unsent bytes (a cancel goes after them, to keep the framing). */
API uint64_t fp_imp_outbox(struct fp_imp *s, uint8_t *buf, uint64_t cap)
{
	uint64_t n = s->out_len < cap ? s->out_len : cap;
	memcpy(buf, s->out, n);
	return n;
}
