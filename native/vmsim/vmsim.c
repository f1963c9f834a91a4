/*
 * uffdd-vmsim: a multi-threaded VMM stand-in without KVM, for end-to-end tests
 * and benchmarks of uffdd.
 *
 *   uffdd-vmsim source --socket S --session ID --token HEX --memory 256M
 *               --backing anon|shmem|hugetlb --seed N [--threads N] [--timeout SEC]
 *               [--ready-file PATH]
 *     Fills guest RAM with the seeded pattern (vmsim/pattern.h) from N threads,
 *     exports it to the uffdd at S (anon: pid mode; shmem/hugetlb: memfd mode),
 *     waits for the session's completed/failed event, prints one JSON line with
 *     the RAM hash and exits 0 (completed) or 1.
 *
 *   uffdd-vmsim dest --socket S --session ID --token HEX --peer HOST:PORT
 *               --memory 256M --backing anon|shmem|hugetlb --mode missing|minor
 *               --seed N --threads N --order seq|rand [--exits]
 *               [--strategy NAME] [--policy crash|poison] [--deadline SEC]
 *               [--timeout SEC]
 *     Creates guest RAM and a userfaultfd over it, imports it into the uffdd at
 *     S, then N "vCPU" threads touch every page of their slice (in address or
 *     random order), timing each first touch and checking every byte against
 *     the pattern. Waits for the completed event, hashes RAM and prints one JSON
 *     line; exits 0 only if every page was right.
 *     --exits registers with UFFD_FEATURE_SIGBUS: an absent page raises SIGBUS
 *     in the touching thread, which asks the daemon (uffdd_resolve) and acts on
 *     the verdict, like a VMM handling a vCPU memory-fault exit.
 *
 * Exit codes: 0 ok, 1 failed/mismatch/error, 2 crash verdict, 64 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "pattern.h"
#include "uffdd.h"

/* uAPI constants newer than Debian bookworm's kernel headers. */
#ifndef UFFD_FEATURE_EVENT_REMOVE
#define UFFD_FEATURE_EVENT_REMOVE (1u << 3)
#endif
#ifndef UFFD_FEATURE_MISSING_HUGETLBFS
#define UFFD_FEATURE_MISSING_HUGETLBFS (1u << 4)
#endif
#ifndef UFFD_FEATURE_MISSING_SHMEM
#define UFFD_FEATURE_MISSING_SHMEM (1u << 5)
#endif
#ifndef UFFD_FEATURE_SIGBUS
#define UFFD_FEATURE_SIGBUS (1u << 7)
#endif
#ifndef UFFD_FEATURE_THREAD_ID
#define UFFD_FEATURE_THREAD_ID (1u << 8)
#endif
#ifndef UFFD_FEATURE_MINOR_HUGETLBFS
#define UFFD_FEATURE_MINOR_HUGETLBFS (1u << 9)
#endif
#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1u << 10)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1u << 14)
#endif
#ifndef UFFDIO_REGISTER_MODE_MINOR
#define UFFDIO_REGISTER_MODE_MINOR ((__u64)1 << 2)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004u
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21u << 26)
#endif
#ifndef BUS_MCEERR_AR
#define BUS_MCEERR_AR 4
#endif
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

#define HUGE_2M (2u << 20)

enum backing { BACKING_ANON, BACKING_SHMEM, BACKING_HUGETLB };

static struct {
	bool dest;
	const char *socket, *session, *peer, *strategy, *policy, *ready_file;
	unsigned char token[64];
	size_t token_len;
	uint64_t memory;
	enum backing backing;
	bool minor, exits, rand_order;
	bool linger;        /* test aid: ignore a failed event, so the daemon must kill us */
	int64_t reexit_page; /* test aid: report an exit for this page after installing it */
	bool pageout;       /* ... and MADV_PAGEOUT it first (swap) */
	bool populate_fails; /* ... and make it read-only, so MADV_POPULATE_WRITE fails */
	int64_t discard_after; /* test aid: discard this page after completion, then read it */
	uint64_t seed;
	unsigned threads;
	double deadline, timeout;
	uint64_t warm; /* bytes to touch and free before creating RAM (--warm-mib) */
} opt = { .threads = 1, .timeout = 600, .reexit_page = -1, .discard_after = -1 };

/* guest RAM */
static unsigned char *ram;
static int memfd = -1;
static uint64_t unit;      /* backing page size: 4 KiB or 2 MiB */
static uint64_t n_units;   /* ram size / unit */
static uint64_t n_pages;   /* ram size / 4 KiB */
static unsigned char *poisoned; /* per unit: 1 = skipped (memory error) */
static atomic_uint threads_done;
static double t_start;
static int dest_uffd = -1;

/*
 * Memory errors the vCPUs saw: the gpa of the touched unit, the address the
 * SIGBUS named and its si_code (or -1: an inject-memory-error verdict). Tests
 * check that every one is exactly at a lost page.
 */
#define MAX_MEMERR 1024
static struct memerr { uint64_t gpa, si_gpa; int code; } memerrs[MAX_MEMERR];
static atomic_uint n_memerr;

static void record_memerr(uint64_t gpa, uint64_t si_gpa, int code)
{
	unsigned i = atomic_fetch_add(&n_memerr, 1);
	if (i < MAX_MEMERR)
		memerrs[i] = (struct memerr){ gpa, si_gpa, code };
}

/* ------------------------------------------------------------------------ */

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static const char *role(void)
{
	return opt.dest ? "dest" : "source";
}

static void json_str(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			fprintf(f, "\\%c", ch);
		else if (ch < 0x20)
			fprintf(f, "\\u%04x", ch);
		else
			fputc(ch, f);
	}
	fputc('"', f);
}

/* Print {"role": ..., "error": msg} and exit with code. */
__attribute__((noreturn, format(printf, 2, 3)))
static void die(int code, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	flockfile(stdout);
	printf("{\"role\": \"%s\", \"verified\": false, \"error\": ", role());
	json_str(stdout, msg);
	printf("}\n");
	fflush(stdout);
	funlockfile(stdout);
	exit(code);
}

__attribute__((noreturn))
static void usage(const char *msg)
{
	fprintf(stderr,
		"uffdd-vmsim: %s\n"
		"usage: uffdd-vmsim source --socket S --session ID --token HEX --memory SIZE\n"
		"                   --backing anon|shmem|hugetlb --seed N [--threads N] [--timeout SEC]\n"
		"                   [--ready-file PATH]\n"
		"       uffdd-vmsim dest --socket S --session ID --token HEX --peer HOST:PORT\n"
		"                   --memory SIZE --backing anon|shmem|hugetlb --mode missing|minor\n"
		"                   --seed N --threads N --order seq|rand [--exits]\n"
		"                   [--strategy NAME] [--policy crash|poison] [--deadline SEC]\n"
		"                   [--timeout SEC] [--warm-mib N]\n",
		msg);
	exit(64);
}

static uint64_t parse_size(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s)
		usage("bad --memory");
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	}
	if (*end == 'i')
		end++;
	if (*end == 'B')
		end++;
	if (*end)
		usage("bad --memory");
	return v;
}

static uint64_t parse_u64(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end)
		usage(what);
	return v;
}

static void parse_token(const char *hex)
{
	size_t n = strlen(hex);
	if (n % 2 || n / 2 < 16 || n / 2 > 64)
		usage("--token must be 32..128 hex digits");
	for (size_t i = 0; i < n / 2; i++) {
		unsigned int b;
		if (sscanf(hex + 2 * i, "%2x", &b) != 1)
			usage("--token must be hex");
		opt.token[i] = (unsigned char)b;
	}
	opt.token_len = n / 2;
}

static void parse_args(int argc, char **argv)
{
	if (argc < 2)
		usage("missing role");
	if (!strcmp(argv[1], "dest"))
		opt.dest = true;
	else if (strcmp(argv[1], "source"))
		usage("role must be source or dest");
	bool have_backing = false, have_seed = false;
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--exits")) {
			opt.exits = true;
			continue;
		}
		if (!strcmp(a, "--linger")) {
			opt.linger = true;
			continue;
		}
		if (!strcmp(a, "--pageout")) {
			opt.pageout = true;
			continue;
		}
		if (!strcmp(a, "--populate-fails")) {
			opt.populate_fails = true;
			continue;
		}
		if (i + 1 >= argc)
			usage("option without value");
		const char *v = argv[++i];
		if (!strcmp(a, "--socket"))
			opt.socket = v;
		else if (!strcmp(a, "--session"))
			opt.session = v;
		else if (!strcmp(a, "--token"))
			parse_token(v);
		else if (!strcmp(a, "--peer"))
			opt.peer = v;
		else if (!strcmp(a, "--memory"))
			opt.memory = parse_size(v);
		else if (!strcmp(a, "--backing")) {
			have_backing = true;
			if (!strcmp(v, "anon"))
				opt.backing = BACKING_ANON;
			else if (!strcmp(v, "shmem"))
				opt.backing = BACKING_SHMEM;
			else if (!strcmp(v, "hugetlb"))
				opt.backing = BACKING_HUGETLB;
			else
				usage("--backing must be anon, shmem or hugetlb");
		} else if (!strcmp(a, "--mode")) {
			if (!strcmp(v, "minor"))
				opt.minor = true;
			else if (strcmp(v, "missing"))
				usage("--mode must be missing or minor");
		} else if (!strcmp(a, "--seed")) {
			opt.seed = parse_u64(v, "bad --seed");
			have_seed = true;
		} else if (!strcmp(a, "--threads")) {
			opt.threads = (unsigned)parse_u64(v, "bad --threads");
			if (opt.threads < 1 || opt.threads > 1024)
				usage("--threads must be 1..1024");
		} else if (!strcmp(a, "--order")) {
			if (!strcmp(v, "rand"))
				opt.rand_order = true;
			else if (strcmp(v, "seq"))
				usage("--order must be seq or rand");
		} else if (!strcmp(a, "--strategy"))
			opt.strategy = v;
		else if (!strcmp(a, "--policy"))
			opt.policy = v;
		else if (!strcmp(a, "--deadline"))
			opt.deadline = strtod(v, NULL);
		else if (!strcmp(a, "--timeout"))
			opt.timeout = strtod(v, NULL);
		else if (!strcmp(a, "--ready-file"))
			opt.ready_file = v;
		else if (!strcmp(a, "--warm-mib"))
			opt.warm = parse_u64(v, "bad --warm-mib") << 20;
		else if (!strcmp(a, "--discard-after"))
			opt.discard_after = (int64_t)parse_u64(v, "bad --discard-after");
		else if (!strcmp(a, "--reexit-page"))
			opt.reexit_page = (int64_t)parse_u64(v, "bad --reexit-page");
		else
			usage("unknown option");
	}
	if (!opt.socket || !opt.session || !opt.token_len || !opt.memory || !have_backing ||
	    !have_seed)
		usage("--socket, --session, --token, --memory, --backing and --seed are required");
	if (opt.dest && !opt.peer)
		usage("dest needs --peer");
	if (opt.minor && opt.backing == BACKING_ANON)
		usage("--mode minor needs a memfd backing (shmem or hugetlb)");
	unit = opt.backing == BACKING_HUGETLB ? HUGE_2M : VMSIM_PAGE;
	if (opt.memory % unit)
		usage("--memory must be a multiple of the page size (2M for hugetlb)");
	n_units = opt.memory / unit;
	n_pages = opt.memory / VMSIM_PAGE;
	if (opt.threads > n_units)
		opt.threads = (unsigned)n_units;
	if (opt.reexit_page >= (int64_t)n_units || opt.discard_after >= (int64_t)n_units)
		usage("--reexit-page / --discard-after is outside guest RAM");
}

/* ------------------------------------------------------------------------ */
/* memory */

/* Touch and free `opt.warm` bytes of anonymous memory, so the RAM created next gets
 * pages the hypervisor backs already. On VMs with free page reporting (these test
 * machines) a page freed a while ago costs tens of µs at its next first touch; the
 * C yardstick (refbench, -w) warms the same way before it measures. */
static void warm_memory(void)
{
	if (!opt.warm)
		return;
	void *m = mmap(NULL, opt.warm, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (m == MAP_FAILED)
		die(1, "mmap %" PRIu64 " bytes to warm: %s", opt.warm, strerror(errno));
	if (madvise(m, opt.warm, MADV_POPULATE_WRITE) < 0) {
		for (uint64_t off = 0; off < opt.warm; off += VMSIM_PAGE)
			((volatile unsigned char *)m)[off] = 1;
	}
	munmap(m, opt.warm);
}

static void create_ram(void)
{
	warm_memory();
	if (opt.backing == BACKING_ANON) {
		ram = mmap(NULL, opt.memory, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	} else {
		unsigned flags = MFD_CLOEXEC;
		if (opt.backing == BACKING_HUGETLB)
			flags |= MFD_HUGETLB | MFD_HUGE_2MB;
		memfd = memfd_create("uffdd-vmsim-ram", flags);
		if (memfd < 0)
			die(1, "memfd_create: %s", strerror(errno));
		if (ftruncate(memfd, (off_t)opt.memory) < 0)
			die(1, "ftruncate memfd: %s", strerror(errno));
		ram = mmap(NULL, opt.memory, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	}
	if (ram == MAP_FAILED)
		die(1, "mmap %" PRIu64 " bytes: %s", opt.memory, strerror(errno));
	poisoned = calloc(n_units, 1);
	if (!poisoned)
		die(1, "out of memory");
}

static uint64_t ram_hash(void)
{
	uint64_t h = FNV64_BASIS;
	for (uint64_t u = 0; u < n_units; u++)
		if (!poisoned[u])
			h = fnv1a64(h, ram + u * unit, unit);
	return h;
}

/* Unit range [lo, hi) of thread t. */
static void slice(unsigned t, uint64_t *lo, uint64_t *hi)
{
	*lo = n_units * t / opt.threads;
	*hi = n_units * (t + 1) / opt.threads;
}

/* ------------------------------------------------------------------------ */
/* events */

/*
 * The daemon stops reading our uffd once the session completed, so from then on
 * the kernel must serve every fault (a page discarded later, say): unregister
 * guest RAM at once. Never on failure: that would hand the guest zero pages.
 */
static void unregister_ram(void)
{
	static bool done;
	if (done || dest_uffd < 0)
		return;
	done = true;
	struct uffdio_range r = { .start = (uint64_t)(uintptr_t)ram, .len = opt.memory };
	if (ioctl(dest_uffd, UFFDIO_UNREGISTER, &r) < 0)
		fprintf(stderr, "uffdd-vmsim: UFFDIO_UNREGISTER: %s\n", strerror(errno));
}

/*
 * The session failed: stop the VM (exit 1) with the reason. With --linger
 * (tests of the crash policy) keep running instead, as a hung VMM would, so
 * the daemon has to kill us after its grace period.
 */
__attribute__((noreturn))
static void session_failed(const char *reason)
{
	flockfile(stdout);
	printf("{\"role\": \"dest\", \"verified\": false, \"event\": \"failed\", "
	       "\"outcome\": \"crashed\", \"lingering\": %s, \"reason\": ",
	       opt.linger ? "true" : "false");
	json_str(stdout, reason);
	printf("}\n");
	fflush(stdout);
	funlockfile(stdout);
	if (opt.linger) {
		fprintf(stderr, "uffdd-vmsim: session failed; lingering (--linger)\n");
		double until = now() + opt.timeout;
		while (now() < until)
			usleep(100000);
	}
	_exit(1);
}

/*
 * Wait for the completed/failed event of our session. Returns 1 completed,
 * 0 failed (reason in ev), -1 timeout. If stop_when_done, also returns -2 as
 * soon as all touching threads are done without an event yet.
 */
static int wait_session_end(uffdd_client *c, struct uffdd_event *ev, double until)
{
	struct uffdd_error err;
	for (;;) {
		double left = until - now();
		if (left <= 0)
			return -1;
		int ms = left > 0.1 ? 100 : (int)(left * 1000) + 1;
		int r = uffdd_next_event(c, ev, ms, &err);
		if (r < 0)
			die(1, "waiting for events: %s", err.message);
		if (r == 0)
			continue;
		if (strcmp(ev->session, opt.session))
			continue;
		if (ev->kind == UFFDD_EVENT_COMPLETED)
			return 1;
		if (ev->kind == UFFDD_EVENT_FAILED || ev->kind == UFFDD_EVENT_CANCELLED)
			return 0;
	}
}

/* ------------------------------------------------------------------------ */
/* source */

struct filler {
	pthread_t th;
	unsigned idx;
};

static void *fill_thread(void *arg)
{
	struct filler *f = arg;
	uint64_t lo, hi;
	slice(f->idx, &lo, &hi);
	uint64_t per = unit / VMSIM_PAGE;
	for (uint64_t p = lo * per; p < hi * per; p++)
		pattern_fill(ram + p * VMSIM_PAGE, opt.seed, p);
	return NULL;
}

static int run_source(void)
{
	create_ram();
	double t0 = now();
	struct filler *fs = calloc(opt.threads, sizeof(*fs));
	if (!fs)
		die(1, "out of memory");
	for (unsigned t = 0; t < opt.threads; t++) {
		fs[t].idx = t;
		if (pthread_create(&fs[t].th, NULL, fill_thread, &fs[t]))
			die(1, "pthread_create failed");
	}
	for (unsigned t = 0; t < opt.threads; t++)
		pthread_join(fs[t].th, NULL);
	free(fs);
	double fill_s = now() - t0;
	uint64_t hash = ram_hash();

	struct uffdd_error err;
	uffdd_client *c = uffdd_connect(opt.socket, &err);
	if (!c)
		die(1, "connect: %s", err.message);
	struct uffdd_region r = {
		.gpa = 0, .addr = (uint64_t)(uintptr_t)ram, .size = opt.memory, .page_size = unit,
		.offset = 0, .uffd = -1, .memfd = memfd, .mode = UFFDD_MODE_MISSING,
	};
	pid_t pid = opt.backing == BACKING_ANON ? getpid() : 0;
	uint64_t pages = 0;
	t_start = now();
	if (uffdd_export(c, opt.session, opt.token, opt.token_len, pid, &r, 1, &pages, &err) < 0)
		die(1, "export: %s", err.message);
	if (opt.ready_file) {
		/* tells a driver script that the destination may start now */
		FILE *rf = fopen(opt.ready_file, "w");
		if (!rf)
			die(1, "--ready-file %s: %s", opt.ready_file, strerror(errno));
		fprintf(rf, "%" PRIu64 "\n", pages);
		fclose(rf);
	}

	struct uffdd_event ev;
	int r_end = wait_session_end(c, &ev, now() + opt.timeout);
	double secs = now() - t_start;
	printf("{\"role\": \"source\", \"ok\": %s, \"event\": \"%s\", \"outcome\": ",
	       r_end == 1 ? "true" : "false",
	       r_end == 1 ? "completed" : r_end == 0 ? "failed" : "timeout");
	json_str(stdout, r_end == 1 ? ev.outcome : "");
	printf(", \"reason\": ");
	json_str(stdout, r_end == 0 ? ev.reason : "");
	printf(", \"pages\": %" PRIu64 ", \"export_pages\": %" PRIu64
	       ", \"threads\": %u, \"fill_seconds\": %.6f, \"seconds\": %.6f, \"hash\": \"%016" PRIx64
	       "\"}\n",
	       n_pages, pages, opt.threads, fill_s, secs, hash);
	fflush(stdout);
	uffdd_close(c);
	return r_end == 1 ? 0 : 1;
}

/* ------------------------------------------------------------------------ */
/* dest: userfaultfd */

static int create_uffd(void)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0 && (errno == EPERM || errno == ENOSYS)) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev >= 0) {
			fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
			close(dev);
		}
	}
	if (fd < 0)
		die(1, "userfaultfd: %s", strerror(errno));

	struct uffdio_api api = { .api = UFFD_API };
	api.features = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_THREAD_ID;
	if (opt.backing == BACKING_SHMEM)
		api.features |= UFFD_FEATURE_MISSING_SHMEM;
	if (opt.backing == BACKING_HUGETLB)
		api.features |= UFFD_FEATURE_MISSING_HUGETLBFS;
	if (opt.minor)
		api.features |= opt.backing == BACKING_HUGETLB ? UFFD_FEATURE_MINOR_HUGETLBFS
							      : UFFD_FEATURE_MINOR_SHMEM;
	if (opt.exits)
		api.features |= UFFD_FEATURE_SIGBUS;
	/* lets the daemon poison pages under the "poison" failure policy */
	uint64_t wanted = api.features;
	api.features |= UFFD_FEATURE_POISON;
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		/* an older kernel without POISON: retry without it */
		close(fd);
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
		struct uffdio_api api2 = { .api = UFFD_API, .features = wanted };
		if (fd < 0 || ioctl(fd, UFFDIO_API, &api2) < 0)
			die(1, "UFFDIO_API features 0x%" PRIx64 ": %s", wanted, strerror(errno));
	}

	struct uffdio_register reg = {
		.range = { .start = (uint64_t)(uintptr_t)ram, .len = opt.memory },
		.mode = UFFDIO_REGISTER_MODE_MISSING | (opt.minor ? UFFDIO_REGISTER_MODE_MINOR : 0),
	};
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		die(1, "UFFDIO_REGISTER: %s", strerror(errno));
	return fd;
}

/* ------------------------------------------------------------------------ */
/* dest: touching threads ("vCPUs") */

static __thread sigjmp_buf tls_jb;
static __thread volatile sig_atomic_t tls_armed;
static __thread void *volatile tls_addr;
static __thread volatile int tls_code;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (!tls_armed) {
		/* not ours: die the default way */
		signal(sig, SIG_DFL);
		return;
	}
	tls_armed = 0;
	tls_addr = si->si_addr;
	tls_code = si->si_code;
	siglongjmp(tls_jb, 1);
}

struct toucher {
	pthread_t th;
	unsigned idx;
	uffdd_client *c; /* --exits: this vCPU's own client */
	double *lat_us;  /* per touched unit */
	uint64_t n_lat;
	uint64_t mismatches; /* 4 KiB pages */
	uint64_t poisoned;   /* units */
	uint64_t exits, populates;
};

enum exit_action { ACT_RETRY, ACT_SKIP };

__attribute__((noreturn))
static void crash(unsigned vcpu, uint64_t gpa, const char *reason)
{
	flockfile(stdout);
	printf("{\"role\": \"dest\", \"verified\": false, \"crash\": true, \"vcpu\": %u, "
	       "\"gpa\": %" PRIu64 ", \"reason\": ",
	       vcpu, gpa);
	json_str(stdout, reason);
	printf("}\n");
	fflush(stdout);
	funlockfile(stdout);
	if (opt.linger) { /* a hung VMM acts on nothing: the daemon must kill it */
		double until = now() + opt.timeout;
		while (now() < until)
			usleep(100000);
	}
	_exit(2);
}

/* A SIGBUS at fault_addr in --exits mode: ask the daemon, act on the verdict. */
static enum exit_action handle_exit(struct toucher *t, uint64_t u, void *fault_addr)
{
	struct uffdd_error err;
	struct uffdd_verdict v;
	uint64_t off = (uint64_t)((unsigned char *)fault_addr - ram);
	if (off >= opt.memory)
		crash(t->idx, 0, "SIGBUS outside guest RAM");
	struct uffdd_exit x = { .vcpu = t->idx, .gpa = off, .size = 8,
				.access = UFFDD_ACCESS_READ };
	__atomic_store_n(&t->exits, t->exits + 1, __ATOMIC_RELAXED);
	if (uffdd_resolve(t->c, opt.session, &x, &v, &err) < 0) {
		if (err.code != UFFDD_ERR_UNKNOWN_SESSION)
			die(1, "resolve gpa 0x%" PRIx64 ": %s", off, err.message);
		/* The session ended (completed: a failure stops us from the main
		 * thread): no page is absent any more, so this is a memory error. */
		v.kind = UFFDD_VERDICT_INJECT_MEMORY_ERROR;
		v.gpa = off;
	}
	for (int round = 0;; round++) {
		switch (v.kind) {
		case UFFDD_VERDICT_RESUME:
			return ACT_RETRY;
		case UFFDD_VERDICT_POPULATE: {
			if (round > 0)
				crash(t->idx, off, "daemon answered populate-failed with populate");
			uint64_t a = v.addr ? v.addr : (uint64_t)(uintptr_t)ram + (off & ~(unit - 1));
			uint64_t sz = v.size ? v.size : unit;
			uint64_t a0 = a & ~(unit - 1);
			sz = ((a + sz + unit - 1) & ~(unit - 1)) - a0;
			t->populates++;
			if (madvise((void *)(uintptr_t)a0, sz, MADV_POPULATE_WRITE) == 0)
				return ACT_RETRY;
			int e = errno;
			if (uffdd_populate_failed(t->c, opt.session, t->idx, v.gpa ? v.gpa : off, e, &v,
						  &err) < 0)
				die(1, "populate-failed: %s", err.message);
			continue;
		}
		case UFFDD_VERDICT_INJECT_MEMORY_ERROR:
			poisoned[u] = 1;
			__atomic_store_n(&t->poisoned, t->poisoned + 1, __ATOMIC_RELAXED);
			record_memerr(u * unit, v.gpa, -1);
			return ACT_SKIP;
		case UFFDD_VERDICT_CRASH:
			crash(t->idx, off, v.reason);
		}
		die(1, "unknown verdict %d", (int)v.kind);
	}
}

/* Touch unit u: time the first access, then check every byte. */
static void touch_unit(struct toucher *t, uint64_t u)
{
	unsigned char *p = ram + u * unit;
	const double t0 = now();
	volatile int attempts = 0;

	if (sigsetjmp(tls_jb, 1)) {
		void *fa = tls_addr;
		int code = tls_code;
		if (++attempts > 1000)
			crash(t->idx, u * unit, "page still absent after 1000 resumes");
		if (!opt.exits || code == BUS_MCEERR_AR) {
			/* no exit path (or the kernel says so): a poisoned page, a memory
			 * error; the test checks address and si_code */
			poisoned[u] = 1;
			__atomic_store_n(&t->poisoned, t->poisoned + 1, __ATOMIC_RELAXED);
			record_memerr(u * unit, (uint64_t)((unsigned char *)fa - ram), code);
			return;
		}
		if (handle_exit(t, u, fa) == ACT_SKIP)
			return;
	}
	tls_armed = 1;
	(void)*(volatile uint64_t *)p;
	double t1 = now();
	uint64_t bad = 0;
	uint64_t per = unit / VMSIM_PAGE;
	for (uint64_t i = 0; i < per; i++)
		bad += !pattern_check(p + i * VMSIM_PAGE, opt.seed, u * per + i);
	tls_armed = 0;
	t->mismatches += bad;
	t->lat_us[t->n_lat] = (t1 - t0) * 1e6;
	__atomic_store_n(&t->n_lat, t->n_lat + 1, __ATOMIC_RELAXED);
}

static void *touch_thread(void *arg)
{
	struct toucher *t = arg;
	uint64_t lo, hi;
	slice(t->idx, &lo, &hi);
	uint64_t n = hi - lo;
	uint64_t *order = malloc((n ? n : 1) * sizeof(*order));
	t->lat_us = malloc((n ? n : 1) * sizeof(*t->lat_us));
	if (!order || !t->lat_us)
		die(1, "out of memory");
	for (uint64_t i = 0; i < n; i++)
		order[i] = lo + i;
	if (opt.rand_order) {
		uint64_t s = opt.seed ^ (0x5851f42d4c957f2dull * (t->idx + 1));
		for (uint64_t i = n; i > 1; i--) {
			s = splitmix64(s);
			uint64_t j = s % i;
			uint64_t tmp = order[i - 1];
			order[i - 1] = order[j];
			order[j] = tmp;
		}
	}
	for (uint64_t i = 0; i < n; i++)
		touch_unit(t, order[i]);
	free(order);
	atomic_fetch_add(&threads_done, 1);
	return NULL;
}

/* /proc/self/pagemap: is the page at addr swapped out (bit 62)? */
static bool page_swapped(const void *addr)
{
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	uint64_t entry = 0;
	off_t at = (off_t)((uintptr_t)addr / VMSIM_PAGE * sizeof(entry));
	bool ok = pread(fd, &entry, sizeof(entry), at) == (ssize_t)sizeof(entry);
	close(fd);
	return ok && (entry >> 62 & 1);
}

static const char *verdict_name(enum uffdd_verdict_kind k)
{
	switch (k) {
	case UFFDD_VERDICT_RESUME: return "resume";
	case UFFDD_VERDICT_POPULATE: return "populate";
	case UFFDD_VERDICT_INJECT_MEMORY_ERROR: return "inject-memory-error";
	case UFFDD_VERDICT_CRASH: return "crash";
	}
	return "?";
}

/* --reexit-page: what happened, printed as "reexit" in the JSON line. */
static struct {
	bool done, swapped, populate_ok, bytes_ok;
	int populate_errno, reports;
	const char *verdict, *verdict2;
} rx = { .verdict = "", .verdict2 = "" };

/*
 * --reexit-page P (test aid, before the vCPUs start): touch page P so it gets
 * installed, optionally MADV_PAGEOUT it (--pageout: its PTE becomes a swap
 * entry), then report a vCPU exit for it, as KVM does when a vCPU faults on a
 * page that slow GUP could not bring in. The strategy decides: populate
 * (MADV_POPULATE_WRITE here, then the bytes are checked), or the failure policy.
 */
static void reexit(uffdd_client *c)
{
	uint64_t u = (uint64_t)opt.reexit_page;
	double lat;
	struct toucher tm = { .idx = opt.threads, .c = c, .lat_us = &lat };
	touch_unit(&tm, u);
	unsigned char *p = ram + u * unit;
	if (opt.pageout) {
		/* A page installed a moment ago may still sit in a per-CPU LRU batch,
		 * where MADV_PAGEOUT skips it without an error: try again, briefly. */
		for (int tries = 0; tries < 100 && !rx.swapped; tries++) {
			if (madvise(p, unit, MADV_PAGEOUT) < 0)
				die(1, "MADV_PAGEOUT: %s", strerror(errno));
			rx.swapped = page_swapped(p);
			if (!rx.swapped)
				usleep(10000);
		}
	}
	/* A real populate failure: MADV_POPULATE_WRITE on a read-only mapping fails
	 * (EINVAL on 6.18). */
	if (opt.populate_fails && mprotect(p, unit, PROT_READ) < 0)
		die(1, "mprotect: %s", strerror(errno));
	struct uffdd_error err;
	struct uffdd_verdict v;
	struct uffdd_exit x = { .vcpu = opt.threads, .gpa = u * unit, .size = 8,
				.access = UFFDD_ACCESS_WRITE };
	/* A resume verdict re-enters the vCPU; the kernel still cannot map the page
	 * (that is the case we stand in for), so the vCPU exits once more. */
	for (rx.reports = 1;; rx.reports++) {
		if (uffdd_resolve(c, opt.session, &x, &v, &err) < 0)
			die(1, "resolve (reexit) gpa 0x%" PRIx64 ": %s", x.gpa, err.message);
		if (v.kind != UFFDD_VERDICT_RESUME || rx.reports == 2)
			break;
	}
	rx.done = true;
	rx.verdict = verdict_name(v.kind);
	if (v.kind == UFFDD_VERDICT_POPULATE) {
		if (madvise(p, unit, MADV_POPULATE_WRITE) == 0) {
			rx.populate_ok = true;
		} else {
			rx.populate_errno = errno;
			if (uffdd_populate_failed(c, opt.session, x.vcpu, x.gpa, errno, &v, &err) < 0)
				die(1, "populate-failed: %s", err.message);
			rx.verdict2 = verdict_name(v.kind);
		}
	}
	if (opt.populate_fails && mprotect(p, unit, PROT_READ | PROT_WRITE) < 0)
		die(1, "mprotect: %s", strerror(errno));
	if (v.kind == UFFDD_VERDICT_CRASH)
		crash(x.vcpu, x.gpa, v.reason);
	if (v.kind == UFFDD_VERDICT_INJECT_MEMORY_ERROR) {
		poisoned[u] = 1;
		record_memerr(x.gpa, v.gpa, -1);
		return;
	}
	bool ok = true;
	uint64_t per = unit / VMSIM_PAGE;
	for (uint64_t i = 0; i < per; i++)
		ok = ok && pattern_check(p + i * VMSIM_PAGE, opt.seed, u * per + i);
	rx.bytes_ok = ok;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double percentile(const double *v, uint64_t n, double q)
{
	if (!n)
		return 0;
	uint64_t i = (uint64_t)(q * (double)(n - 1) + 0.5);
	return v[i < n ? i : n - 1];
}

static int run_dest(void)
{
	create_ram();
	int uffd = create_uffd();
	dest_uffd = uffd;

	struct sigaction sa = { .sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO | SA_NODEFER };
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGBUS, &sa, NULL) < 0)
		die(1, "sigaction: %s", strerror(errno));

	struct uffdd_error err;
	uffdd_client *c = uffdd_connect(opt.socket, &err);
	if (!c)
		die(1, "connect: %s", err.message);
	struct toucher *ts = calloc(opt.threads, sizeof(*ts));
	if (!ts)
		die(1, "out of memory");
	if (opt.exits) {
		for (unsigned t = 0; t < opt.threads; t++) {
			ts[t].c = uffdd_connect(opt.socket, &err);
			if (!ts[t].c)
				die(1, "connect (vcpu %u): %s", t, err.message);
		}
	}
	struct uffdd_region r = {
		.gpa = 0, .addr = (uint64_t)(uintptr_t)ram, .size = opt.memory, .page_size = unit,
		.offset = 0, .uffd = uffd, .memfd = memfd,
		.mode = opt.minor ? UFFDD_MODE_MINOR : UFFDD_MODE_MISSING,
	};
	struct uffdd_import_options io = { .strategy = opt.strategy, .policy = opt.policy,
					   .deadline_seconds = opt.deadline };
	uint64_t pages = 0;
	t_start = now();
	if (uffdd_import(c, opt.session, opt.token, opt.token_len, opt.peer, &io, &r, 1, &pages,
			 &err) < 0)
		die(1, "import: %s", err.message);
	/* We keep our own uffd open: if the daemon died, faults must block (and be
	 * seen), never be silently zero-filled. */
	if (opt.reexit_page >= 0)
		reexit(c);

	double t_touch = now();
	for (unsigned t = 0; t < opt.threads; t++) {
		ts[t].idx = t;
		if (pthread_create(&ts[t].th, NULL, touch_thread, &ts[t]))
			die(1, "pthread_create failed");
	}
	/* Watch events while the vCPUs run: a failed session must not leave them
	 * blocked forever. */
	struct uffdd_event ev, done_ev;
	memset(&done_ev, 0, sizeof(done_ev));
	int end = -2;
	double until = now() + opt.timeout;
	double touch_s = 0;
	while (atomic_load(&threads_done) < opt.threads) {
		if (now() > until) {
			/* say how far the vCPUs got (counters read while they still run) */
			uint64_t touched = 0, pois = 0, ex = 0;
			for (unsigned t = 0; t < opt.threads; t++) {
				touched += __atomic_load_n(&ts[t].n_lat, __ATOMIC_RELAXED);
				pois += __atomic_load_n(&ts[t].poisoned, __ATOMIC_RELAXED);
				ex += __atomic_load_n(&ts[t].exits, __ATOMIC_RELAXED);
			}
			die(1, "timeout: vCPU threads still touching after %.0f s (%" PRIu64 " of %" PRIu64
			    " units touched, %" PRIu64 " poisoned, %" PRIu64 " exits)",
			    opt.timeout, touched, n_units, pois, ex);
		}
		int rr = uffdd_next_event(c, &ev, 20, &err);
		if (rr < 0)
			die(1, "waiting for events: %s", err.message);
		if (rr == 1 && !strcmp(ev.session, opt.session)) {
			if (ev.kind == UFFDD_EVENT_FAILED || ev.kind == UFFDD_EVENT_CANCELLED)
				session_failed(ev.reason);
			if (ev.kind == UFFDD_EVENT_COMPLETED) {
				end = 1;
				done_ev = ev;
				unregister_ram();
			}
		}
	}
	touch_s = now() - t_touch;
	for (unsigned t = 0; t < opt.threads; t++)
		pthread_join(ts[t].th, NULL);
	if (end != 1) {
		end = wait_session_end(c, &ev, until);
		if (end == 0)
			session_failed(ev.reason);
		if (end == 1) {
			done_ev = ev;
			unregister_ram();
		}
	}
	double secs = now() - t_start;

	uint64_t n_lat = 0, mism = 0, pois = 0, exits = 0, pops = 0;
	for (unsigned t = 0; t < opt.threads; t++) {
		n_lat += ts[t].n_lat;
		mism += ts[t].mismatches;
		pois += ts[t].poisoned;
		exits += ts[t].exits;
		pops += ts[t].populates;
	}
	double *lat = malloc((n_lat ? n_lat : 1) * sizeof(*lat));
	if (!lat)
		die(1, "out of memory");
	uint64_t k = 0;
	for (unsigned t = 0; t < opt.threads; t++) {
		memcpy(lat + k, ts[t].lat_us, ts[t].n_lat * sizeof(*lat));
		k += ts[t].n_lat;
		free(ts[t].lat_us);
	}
	qsort(lat, n_lat, sizeof(*lat), cmp_double);
	/* --discard-after: a page the guest gives back after completion (balloon) must
	 * read as zeros, served by the kernel: it hangs if guest RAM were still
	 * registered, since nobody reads the uffd any more. */
	int discard_zero = -1;
	if (end == 1 && opt.discard_after >= 0) {
		uint64_t u = (uint64_t)opt.discard_after;
		unsigned char *p = ram + u * unit;
		if (madvise(p, unit, memfd >= 0 ? MADV_REMOVE : MADV_DONTNEED) < 0)
			die(1, "discard after completion: %s", strerror(errno));
		discard_zero = 1;
		for (uint64_t i = 0; i < unit; i++)
			discard_zero &= p[i] == 0;
		poisoned[u] = 1; /* left out of the hash: it is zeros now, not the source's */
	}
	uint64_t hash = end == 1 ? ram_hash() : 0;
	bool verified = end == 1 && mism == 0;
	printf("{\"role\": \"dest\", \"verified\": %s, \"pages\": %" PRIu64
	       ", \"mismatches\": %" PRIu64 ", \"poisoned_pages\": %" PRIu64
	       ", \"threads\": %u, \"fault_latency_p50_us\": %.2f, \"fault_latency_p90_us\": %.2f"
	       ", \"fault_latency_p99_us\": %.2f, \"faults_per_second\": %.1f"
	       ", \"touch_seconds\": %.6f, \"seconds\": %.6f, \"exits\": %" PRIu64
	       ", \"populates\": %" PRIu64 ", \"event\": \"%s\", \"reason\": ",
	       verified ? "true" : "false", n_pages, mism, pois * (unit / VMSIM_PAGE),
	       opt.threads, percentile(lat, n_lat, 0.50), percentile(lat, n_lat, 0.90),
	       percentile(lat, n_lat, 0.99), touch_s > 0 ? (double)n_lat / touch_s : 0.0, touch_s,
	       secs, exits, pops, end == 1 ? "completed" : end == 0 ? "failed" : "timeout");
	json_str(stdout, end == 0 ? ev.reason : "");
	printf(", \"outcome\": ");
	json_str(stdout, end == 1 ? done_ev.outcome : "");
	printf(", \"daemon_pages_poisoned\": %" PRIu64 ", \"memory_errors\": [",
	       done_ev.pages_poisoned);
	unsigned nm = atomic_load(&n_memerr);
	for (unsigned i = 0; i < nm && i < MAX_MEMERR; i++)
		printf("%s{\"gpa\": %" PRIu64 ", \"si_gpa\": %" PRIu64 ", \"code\": %d}",
		       i ? ", " : "", memerrs[i].gpa, memerrs[i].si_gpa, memerrs[i].code);
	printf("]");
	if (discard_zero >= 0)
		printf(", \"discard_after\": {\"page\": %" PRId64 ", \"zero\": %s}",
		       opt.discard_after, discard_zero ? "true" : "false");
	if (rx.done)
		printf(", \"reexit\": {\"page\": %" PRId64 ", \"swapped\": %s, \"verdict\": \"%s\", "
		       "\"populate_ok\": %s, \"populate_errno\": %d, \"verdict2\": \"%s\", "
		       "\"bytes_ok\": %s, \"reports\": %d}",
		       opt.reexit_page, rx.swapped ? "true" : "false", rx.verdict,
		       rx.populate_ok ? "true" : "false", rx.populate_errno, rx.verdict2,
		       rx.bytes_ok ? "true" : "false", rx.reports);
	printf(", \"hash\": \"%016" PRIx64 "\"}\n", hash);
	fflush(stdout);
	free(lat);
	for (unsigned t = 0; t < opt.threads; t++)
		uffdd_close(ts[t].c);
	free(ts);
	uffdd_close(c);
	return verified ? 0 : 1;
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	return opt.dest ? run_dest() : run_source();
}
