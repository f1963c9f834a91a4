/*
 * End-to-end test of uffdd-vmsim and libuffdd's fd passing against a minimal
 * fake uffdd written here (no Python daemon, no network):
 *
 *   dest:   the fake receives the import with the real userfaultfd (and memfd),
 *           serves page faults with UFFDIO_COPY / ZEROPAGE / CONTINUE from the
 *           pattern, answers vCPU exits (resolve) and sends "completed";
 *   source: the fake receives the export, reads guest RAM with
 *           process_vm_readv (anon) or from the memfd, checks it against the
 *           pattern and sends "completed".
 *
 * Then vmsim's JSON line is checked (verified, hash, poisoned pages).
 * Needs root or vm.unprivileged_userfaultfd; uffdd-vmsim is found through the
 * VMSIM environment variable (set by `make check`).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <msgpack.h>

#include "../vmsim/pattern.h"

#ifndef UFFDIO_POISON
struct uffdio_poison {
	struct uffdio_range range;
	__u64 mode;
	__s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, 0x08, struct uffdio_poison)
#endif

#define TOKEN_HEX "00112233445566778899aabbccddeeff"
#define SESSION "vmsim-test"
#define SEED 42

static int failures, passes;

#define CHECK(cond, ...)                                                         \
	do {                                                                     \
		if (!(cond)) {                                                   \
			fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, \
				#cond);                                          \
			fprintf(stderr, __VA_ARGS__);                            \
			fputc('\n', stderr);                                     \
			failures++;                                              \
		}                                                                \
	} while (0)

/* ------------------------------------------------------------------------ */
/* fake daemon state, one scenario at a time */

struct fake {
	int listen_fd;
	char path[108];
	/* scenario */
	bool exits;
	uint64_t inject_unit;   /* resolve for this unit answers inject-memory-error */
	uint64_t populate_unit; /* installed, then answered with populate */
	uint64_t poison_unit;   /* a fault on it is answered with UFFDIO_POISON */
	/* learnt from the import / export */
	int uffd, memfd;
	unsigned char *memmap; /* the fake's own mapping of memfd */
	uint64_t addr, size, page_size;
	bool minor;
	pid_t pid;
	_Atomic uint64_t installed, poisoned;
	unsigned char *state; /* per unit: 0 absent, 1 installed, 2 poisoned */
	pthread_mutex_t lock;
	int main_conn; /* the connection that created the session */
	bool completed_sent;
	uint64_t source_hash;
	bool source_ok;
	atomic_bool stop;
};

static struct fake F;
static pthread_t fault_th;
static bool fault_th_running;

/* ------------------------------------------------------------------------ */
/* frames */

static int read_exact(int fd, void *buf, size_t n, int *fds, size_t *nfds)
{
	size_t got = 0;
	while (got < n) {
		union {
			char b[CMSG_SPACE(sizeof(int) * 64)];
			struct cmsghdr a;
		} ctl;
		struct iovec iov = { (char *)buf + got, n - got };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
				     .msg_controllen = sizeof(ctl.b) };
		ssize_t r = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
				size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				memcpy(fds + *nfds, CMSG_DATA(cm), k * sizeof(int));
				*nfds += k;
			}
		}
		got += (size_t)r;
	}
	return 0;
}

static void send_map(int fd, msgpack_sbuffer *sb)
{
	unsigned char hdr[4] = { (unsigned char)(sb->size >> 24), (unsigned char)(sb->size >> 16),
				 (unsigned char)(sb->size >> 8), (unsigned char)sb->size };
	pthread_mutex_lock(&F.lock);
	if (write(fd, hdr, 4) != 4 || write(fd, sb->data, sb->size) != (ssize_t)sb->size)
		fprintf(stderr, "fake: write failed: %s\n", strerror(errno));
	pthread_mutex_unlock(&F.lock);
}

static void pk_str(msgpack_packer *pk, const char *s)
{
	msgpack_pack_str(pk, strlen(s));
	msgpack_pack_str_body(pk, s, strlen(s));
}

static const msgpack_object *get(const msgpack_object *m, const char *k)
{
	if (m->type != MSGPACK_OBJECT_MAP)
		return NULL;
	for (uint32_t i = 0; i < m->via.map.size; i++) {
		const msgpack_object *key = &m->via.map.ptr[i].key;
		if (key->type == MSGPACK_OBJECT_STR && key->via.str.size == strlen(k) &&
		    !memcmp(key->via.str.ptr, k, strlen(k)))
			return &m->via.map.ptr[i].val;
	}
	return NULL;
}

static uint64_t get_u(const msgpack_object *m, const char *k)
{
	const msgpack_object *v = get(m, k);
	return v && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? v->via.u64 : UINT64_MAX;
}

static bool is_str(const msgpack_object *m, const char *k, const char *want)
{
	const msgpack_object *v = get(m, k);
	return v && v->type == MSGPACK_OBJECT_STR && v->via.str.size == strlen(want) &&
	       !memcmp(v->via.str.ptr, want, strlen(want));
}

static void reply_ok(int fd, uint64_t id, uint64_t pages)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, pages ? 4 : 2);
	pk_str(&pk, "id");
	msgpack_pack_uint64(&pk, id);
	pk_str(&pk, "ok");
	msgpack_pack_true(&pk);
	if (pages) {
		pk_str(&pk, "session");
		pk_str(&pk, SESSION);
		pk_str(&pk, "pages");
		msgpack_pack_uint64(&pk, pages);
	}
	send_map(fd, &sb);
	msgpack_sbuffer_destroy(&sb);
}

static void reply_verdict(int fd, uint64_t id, const char *verdict, uint64_t addr, uint64_t gpa,
			  uint64_t size)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 7);
	pk_str(&pk, "id");
	msgpack_pack_uint64(&pk, id);
	pk_str(&pk, "ok");
	msgpack_pack_true(&pk);
	pk_str(&pk, "verdict");
	pk_str(&pk, verdict);
	pk_str(&pk, "addr");
	msgpack_pack_uint64(&pk, addr);
	pk_str(&pk, "gpa");
	msgpack_pack_uint64(&pk, gpa);
	pk_str(&pk, "size");
	msgpack_pack_uint64(&pk, size);
	pk_str(&pk, "reason");
	msgpack_pack_nil(&pk);
	send_map(fd, &sb);
	msgpack_sbuffer_destroy(&sb);
}

static void send_completed(void)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	uint64_t total = F.size / F.page_size, pois = atomic_load(&F.poisoned);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 5);
	pk_str(&pk, "event");
	pk_str(&pk, "completed");
	pk_str(&pk, "session");
	pk_str(&pk, SESSION);
	pk_str(&pk, "pages_total");
	msgpack_pack_uint64(&pk, total);
	pk_str(&pk, "pages_poisoned");
	msgpack_pack_uint64(&pk, pois);
	pk_str(&pk, "outcome");
	pk_str(&pk, pois ? "completed-with-poisoned-pages" : "completed");
	send_map(F.main_conn, &sb);
	msgpack_sbuffer_destroy(&sb);
}

/* ------------------------------------------------------------------------ */
/* installing pages */

static void maybe_complete(void)
{
	uint64_t total = F.size / F.page_size;
	bool send = false;
	pthread_mutex_lock(&F.lock);
	if (!F.completed_sent && atomic_load(&F.installed) + atomic_load(&F.poisoned) == total) {
		F.completed_sent = true;
		send = true;
	}
	pthread_mutex_unlock(&F.lock);
	if (send)
		send_completed();
}

/* Install unit u the way the region's mode wants. */
static void install(uint64_t u)
{
	static __thread unsigned char buf[2u << 20] __attribute__((aligned(4096)));
	uint64_t ps = F.page_size, per = ps / VMSIM_PAGE;
	unsigned char expected = 0;
	if (!__atomic_compare_exchange_n(&F.state[u], &expected, 1, false, __ATOMIC_SEQ_CST,
					 __ATOMIC_SEQ_CST))
		return; /* someone else did it */
	bool all_zero = per == 1 && pattern_is_zero_page(u);
	int rc;
	if (u == F.poison_unit) {
		struct uffdio_poison po = { .range = { F.addr + u * ps, ps } };
		rc = ioctl(F.uffd, UFFDIO_POISON, &po);
		CHECK(rc == 0, "UFFDIO_POISON: %s", strerror(errno));
		F.state[u] = 2;
		atomic_fetch_add(&F.poisoned, 1);
		maybe_complete();
		return;
	}
	if (F.minor) {
		/* fill the page cache through our own mapping, then map it in the VMM */
		for (uint64_t i = 0; i < per; i++)
			pattern_fill(F.memmap + u * ps + i * VMSIM_PAGE, SEED, u * per + i);
		struct uffdio_continue c = { .range = { F.addr + u * ps, ps } };
		rc = ioctl(F.uffd, UFFDIO_CONTINUE, &c);
	} else if (all_zero) {
		struct uffdio_zeropage z = { .range = { F.addr + u * ps, ps } };
		rc = ioctl(F.uffd, UFFDIO_ZEROPAGE, &z);
	} else {
		for (uint64_t i = 0; i < per; i++)
			pattern_fill(buf + i * VMSIM_PAGE, SEED, u * per + i);
		struct uffdio_copy c = { .dst = F.addr + u * ps, .src = (uint64_t)(uintptr_t)buf,
					 .len = ps };
		rc = ioctl(F.uffd, UFFDIO_COPY, &c);
	}
	if (rc < 0 && errno != EEXIST)
		fprintf(stderr, "fake: install unit %" PRIu64 ": %s\n", u, strerror(errno));
	atomic_fetch_add(&F.installed, 1);
	maybe_complete();
}

static void *fault_thread(void *arg)
{
	(void)arg;
	while (!atomic_load(&F.stop)) {
		struct pollfd p = { F.uffd, POLLIN, 0 };
		if (poll(&p, 1, 50) <= 0)
			continue;
		struct uffd_msg msgs[16];
		ssize_t r = read(F.uffd, msgs, sizeof(msgs));
		if (r <= 0)
			continue;
		for (ssize_t i = 0; i < r / (ssize_t)sizeof(msgs[0]); i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			uint64_t a = msgs[i].arg.pagefault.address;
			install((a - F.addr) / F.page_size);
		}
	}
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* requests */

static void handle_import(int conn, const msgpack_object *m, int *fds, size_t nfds)
{
	const msgpack_object *regs = get(m, "regions");
	CHECK(regs && regs->type == MSGPACK_OBJECT_ARRAY && regs->via.array.size == 1,
	      "one region");
	const msgpack_object *r = &regs->via.array.ptr[0];
	CHECK(get(m, "token") && get(m, "token")->type == MSGPACK_OBJECT_BIN, "token is bin");
	F.addr = get_u(r, "addr");
	F.size = get_u(r, "size");
	F.page_size = get_u(r, "page_size");
	F.minor = is_str(r, "mode", "minor");
	uint64_t ui = get_u(r, "uffd"), fi = get_u(r, "fd");
	CHECK(ui < nfds, "uffd index %" PRIu64 " of %zu", ui, nfds);
	F.uffd = fds[ui];
	F.memfd = fi < nfds ? fds[fi] : -1;
	CHECK(nfds == (F.memfd >= 0 ? 2u : 1u), "fd count %zu", nfds);
	if (F.minor) {
		F.memmap = mmap(NULL, F.size, PROT_READ | PROT_WRITE, MAP_SHARED, F.memfd, 0);
		CHECK(F.memmap != MAP_FAILED, "mmap memfd: %s", strerror(errno));
	}
	F.state = calloc(F.size / F.page_size, 1);
	F.main_conn = conn;
	fault_th_running = pthread_create(&fault_th, NULL, fault_thread, NULL) == 0;
	reply_ok(conn, get_u(m, "id"), F.size / F.page_size);
}

static void handle_resolve(int conn, const msgpack_object *m)
{
	uint64_t id = get_u(m, "id"), gpa = get_u(m, "gpa");
	CHECK(is_str(m, "access", "read") && get_u(m, "size") == 8 && get(m, "vcpu"),
	      "resolve fields");
	uint64_t u = gpa / F.page_size;
	if (u == F.inject_unit) {
		uint64_t total_before = atomic_load(&F.installed);
		(void)total_before;
		unsigned char expected = 0;
		if (__atomic_compare_exchange_n(&F.state[u], &expected, 2, false, __ATOMIC_SEQ_CST,
						__ATOMIC_SEQ_CST))
			atomic_fetch_add(&F.poisoned, 1);
		reply_verdict(conn, id, "inject-memory-error", 0, u * F.page_size, F.page_size);
		maybe_complete();
		return;
	}
	install(u);
	if (u == F.populate_unit)
		reply_verdict(conn, id, "populate", F.addr + u * F.page_size, u * F.page_size,
			      F.page_size);
	else
		reply_verdict(conn, id, "resume", 0, gpa, 8);
}

static void handle_export(int conn, const msgpack_object *m, int *fds, size_t nfds)
{
	const msgpack_object *regs = get(m, "regions");
	const msgpack_object *r = &regs->via.array.ptr[0];
	F.size = get_u(r, "size");
	F.page_size = get_u(r, "page_size");
	F.main_conn = conn;
	uint64_t pid = get_u(m, "pid");
	unsigned char *copy = malloc(F.size);
	if (pid != UINT64_MAX) {
		CHECK(nfds == 0, "pid mode sends no fds");
		struct iovec local = { copy, F.size };
		struct iovec remote = { (void *)(uintptr_t)get_u(r, "addr"), F.size };
		ssize_t n = process_vm_readv((pid_t)pid, &local, 1, &remote, 1, 0);
		CHECK(n == (ssize_t)F.size, "process_vm_readv: %zd %s", n, strerror(errno));
	} else {
		CHECK(nfds == 1 && get_u(r, "fd") == 0, "memfd mode sends one fd");
		void *p = mmap(NULL, F.size, PROT_READ, MAP_SHARED, fds[0], 0);
		CHECK(p != MAP_FAILED, "mmap export memfd");
		memcpy(copy, p, F.size);
		munmap(p, F.size);
	}
	bool ok = true;
	for (uint64_t p = 0; p < F.size / VMSIM_PAGE; p++)
		ok &= pattern_check(copy + p * VMSIM_PAGE, SEED, p);
	F.source_ok = ok;
	F.source_hash = fnv1a64(FNV64_BASIS, copy, F.size);
	free(copy);
	reply_ok(conn, get_u(m, "id"), F.size / F.page_size);
	atomic_store(&F.installed, F.size / F.page_size);
	send_completed();
}

static void *conn_thread(void *arg)
{
	int conn = (int)(intptr_t)arg;
	for (;;) {
		int fds[64];
		size_t nfds = 0;
		unsigned char hdr[4];
		if (read_exact(conn, hdr, 4, fds, &nfds) < 0)
			break;
		uint32_t len = (uint32_t)hdr[0] << 24 | hdr[1] << 16 | hdr[2] << 8 | hdr[3];
		char *body = malloc(len);
		if (read_exact(conn, body, len, fds, &nfds) < 0)
			break;
		msgpack_unpacked up;
		msgpack_unpacked_init(&up);
		size_t off = 0;
		CHECK(msgpack_unpack_next(&up, body, len, &off) == MSGPACK_UNPACK_SUCCESS, "frame");
		const msgpack_object *m = &up.data;
		if (is_str(m, "op", "import"))
			handle_import(conn, m, fds, nfds);
		else if (is_str(m, "op", "export"))
			handle_export(conn, m, fds, nfds);
		else if (is_str(m, "op", "resolve"))
			handle_resolve(conn, m);
		else if (is_str(m, "op", "populate-failed")) {
			CHECK(0, "populate-failed: errno %" PRIu64, get_u(m, "errno"));
			reply_verdict(conn, get_u(m, "id"), "crash", 0, 0, 0);
		} else
			CHECK(0, "unexpected op");
		msgpack_unpacked_destroy(&up);
		free(body);
	}
	close(conn);
	return NULL;
}

static void *accept_thread(void *arg)
{
	(void)arg;
	for (;;) {
		int c = accept4(F.listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0)
			return NULL;
		pthread_t th;
		pthread_create(&th, NULL, conn_thread, (void *)(intptr_t)c);
		pthread_detach(th);
	}
}

/* ------------------------------------------------------------------------ */

static char *run_vmsim(char *const argv[], int *status)
{
	int p[2];
	if (pipe(p) < 0)
		return NULL;
	pid_t pid = fork();
	if (pid == 0) {
		dup2(p[1], 1);
		close(p[0]);
		execv(argv[0], argv);
		_exit(127);
	}
	close(p[1]);
	static char out[8192];
	size_t n = 0;
	ssize_t r;
	while ((r = read(p[0], out + n, sizeof(out) - 1 - n)) > 0)
		n += (size_t)r;
	out[n] = 0;
	close(p[0]);
	waitpid(pid, status, 0);
	return out;
}

static uint64_t expected_hash(uint64_t memory, uint64_t unit, uint64_t skip_unit)
{
	static unsigned char page[VMSIM_PAGE];
	uint64_t h = FNV64_BASIS;
	for (uint64_t p = 0; p < memory / VMSIM_PAGE; p++) {
		if (p / (unit / VMSIM_PAGE) == skip_unit)
			continue;
		pattern_fill(page, SEED, p);
		h = fnv1a64(h, page, VMSIM_PAGE);
	}
	return h;
}

static void reset(void)
{
	atomic_store(&F.stop, true);
	if (fault_th_running)
		pthread_join(fault_th, NULL);
	fault_th_running = false;
	if (F.uffd > 0)
		close(F.uffd);
	if (F.memfd > 0)
		close(F.memfd);
	if (F.memmap && F.memmap != MAP_FAILED)
		munmap(F.memmap, F.size);
	free(F.state);
	int lfd = F.listen_fd;
	char path[108];
	memcpy(path, F.path, sizeof(path));
	memset(&F, 0, sizeof(F));
	F.listen_fd = lfd;
	memcpy(F.path, path, sizeof(path));
	pthread_mutex_init(&F.lock, NULL);
	F.inject_unit = F.populate_unit = F.poison_unit = UINT64_MAX;
}

static void scenario(const char *name, const char *vmsim, const char *role, const char *memory,
		     uint64_t mem_bytes, const char *backing, const char *extra[], bool exits)
{
	reset();
	uint64_t unit = !strcmp(backing, "hugetlb") ? 2u << 20 : VMSIM_PAGE;
	if (exits) {
		F.inject_unit = 7;
		F.populate_unit = 9;
	} else if (!strcmp(role, "dest") && !strcmp(backing, "anon")) {
		F.poison_unit = 7; /* the daemon's "poison" policy, seen from the VMM */
	}
	char *argv[40];
	int a = 0;
	argv[a++] = (char *)vmsim;
	argv[a++] = (char *)role;
	const char *common[] = { "--socket", F.path, "--session", SESSION, "--token", TOKEN_HEX,
				 "--memory", memory, "--backing", backing, "--seed", "42",
				 "--timeout", "60", NULL };
	for (int i = 0; common[i]; i++)
		argv[a++] = (char *)common[i];
	for (int i = 0; extra && extra[i]; i++)
		argv[a++] = (char *)extra[i];
	argv[a] = NULL;
	int status;
	char *out = run_vmsim(argv, &status);
	bool ok = out && WIFEXITED(status) && WEXITSTATUS(status) == 0;
	CHECK(ok, "%s: vmsim exit status %d, output: %s", name, status, out ? out : "");
	char want[64];
	uint64_t h = !strcmp(role, "source") ? F.source_hash
					     : expected_hash(mem_bytes, unit,
							     exits ? F.inject_unit : F.poison_unit);
	snprintf(want, sizeof(want), "\"hash\": \"%016" PRIx64 "\"", h);
	CHECK(out && strstr(out, want), "%s: want %s in %s", name, want, out ? out : "");
	if (!strcmp(role, "source"))
		CHECK(F.source_ok, "%s: exported memory does not hold the pattern", name);
	else
		CHECK(out && strstr(out, "\"verified\": true"), "%s: not verified: %s", name, out);
	if (exits)
		CHECK(out && strstr(out, "\"poisoned_pages\": 1,") && strstr(out, "\"populates\": 1,"),
		      "%s: poison/populate counts: %s", name, out);
	else if (F.poison_unit != UINT64_MAX)
		CHECK(out && strstr(out, "\"poisoned_pages\": 1,"), "%s: poisoned page: %s", name,
		      out);
	fprintf(stderr, "%s: %s", name, out ? out : "(no output)\n");
	if (ok)
		passes++;
}

static long orig_nr_hugepages = -1;

/* Reserve n free 2 MiB huge pages if we can; returns false if not available.
 * restore_hugepages() puts the old count back. */
static bool reserve_hugepages(unsigned n)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	long free_pages = 0;
	while (f && fgets(line, sizeof(line), f))
		sscanf(line, "HugePages_Free: %ld", &free_pages);
	if (f)
		fclose(f);
	if (free_pages >= (long)n)
		return true;
	f = fopen("/proc/sys/vm/nr_hugepages", "r+");
	if (!f)
		return false;
	long cur = 0;
	if (fscanf(f, "%ld", &cur) != 1)
		cur = 0;
	rewind(f);
	orig_nr_hugepages = cur;
	fprintf(f, "%ld\n", cur + (long)n - free_pages);
	fclose(f);
	f = fopen("/proc/meminfo", "r");
	while (f && fgets(line, sizeof(line), f))
		sscanf(line, "HugePages_Free: %ld", &free_pages);
	if (f)
		fclose(f);
	return free_pages >= (long)n;
}

static void restore_hugepages(void)
{
	if (orig_nr_hugepages < 0)
		return;
	FILE *f = fopen("/proc/sys/vm/nr_hugepages", "w");
	if (f) {
		fprintf(f, "%ld\n", orig_nr_hugepages);
		fclose(f);
	}
}

int main(void)
{
	const char *vmsim = getenv("VMSIM");
	if (!vmsim || access(vmsim, X_OK) != 0) {
		fprintf(stderr, "test_vmsim: set VMSIM to the uffdd-vmsim binary\n");
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	char dir[] = "/tmp/uffdd-vmsim-test-XXXXXX";
	if (!mkdtemp(dir))
		return 1;
	snprintf(F.path, sizeof(F.path), "%s/vmm.sock", dir);
	F.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	strcpy(sa.sun_path, F.path);
	if (bind(F.listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(F.listen_fd, 128) < 0) {
		perror("bind/listen");
		return 1;
	}
	pthread_t th;
	pthread_create(&th, NULL, accept_thread, NULL);

	const char *d1[] = { "--peer", "127.0.0.1:1", "--mode", "missing", "--threads", "4",
			     "--order", "seq", NULL };
	scenario("dest anon missing seq x4", vmsim, "dest", "8M", 8 << 20, "anon", d1, false);
	const char *d2[] = { "--peer", "127.0.0.1:1", "--mode", "missing", "--threads", "3",
			     "--order", "rand", NULL };
	scenario("dest shmem missing rand x3", vmsim, "dest", "8M", 8 << 20, "shmem", d2, false);
	const char *d3[] = { "--peer", "127.0.0.1:1", "--mode", "minor", "--threads", "2",
			     "--order", "rand", NULL };
	scenario("dest shmem minor rand x2", vmsim, "dest", "8M", 8 << 20, "shmem", d3, false);
	const char *d4[] = { "--peer", "127.0.0.1:1", "--mode", "missing", "--threads", "2",
			     "--order", "seq", "--exits", NULL };
	scenario("dest anon exits x2", vmsim, "dest", "4M", 4 << 20, "anon", d4, true);
	const char *d5[] = { "--peer", "127.0.0.1:1", "--mode", "minor", "--threads", "2",
			     "--order", "rand", "--exits", NULL };
	scenario("dest shmem minor exits x2", vmsim, "dest", "4M", 4 << 20, "shmem", d5, true);
	const char *d8[] = { "--peer", "127.0.0.1:1", "--mode", "missing", "--threads", "64",
			     "--order", "rand", NULL };
	scenario("dest anon missing rand x64", vmsim, "dest", "16M", 16 << 20, "anon", d8, false);
	const char *s1[] = { "--threads", "3", NULL };
	scenario("source anon (pid mode)", vmsim, "source", "8M", 8 << 20, "anon", s1, false);
	scenario("source shmem (memfd mode)", vmsim, "source", "8M", 8 << 20, "shmem", s1, false);
	if (reserve_hugepages(8)) {
		const char *d6[] = { "--peer", "127.0.0.1:1", "--mode", "missing", "--threads",
				     "2", "--order", "rand", NULL };
		scenario("dest hugetlb missing", vmsim, "dest", "8M", 8 << 20, "hugetlb", d6,
			 false);
		const char *d7[] = { "--peer", "127.0.0.1:1", "--mode", "minor", "--threads",
				     "2", "--order", "seq", NULL };
		scenario("dest hugetlb minor", vmsim, "dest", "8M", 8 << 20, "hugetlb", d7, false);
		scenario("source hugetlb", vmsim, "source", "8M", 8 << 20, "hugetlb", s1, false);
	} else {
		fprintf(stderr, "test_vmsim: no 2 MiB huge pages, hugetlb scenarios skipped\n");
	}
	reset();
	restore_hugepages();
	unlink(F.path);
	rmdir(dir);
	printf("test_vmsim: %d passed, %d failed\n", passes, failures);
	return failures ? 1 : 0;
}
