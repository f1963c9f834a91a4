/*
 * uffdd-testvm: a real (tiny) KVM VMM for end-to-end tests of uffdd.
 *
 * The guest is a few dozen instructions of flat 32-bit protected-mode code
 * (guest.S). Guest RAM is one memory slot at TESTVM_RAM_GPA on anonymous memory,
 * a shmem memfd or a hugetlb memfd. Each vCPU owns a contiguous slice of it.
 *
 *   source   host side fills every page but its first 8 bytes with a seeded
 *            pattern, the vCPUs write the identifying word (and the page index)
 *            of every page of their slice, the VMM hashes all RAM and exports
 *            it through libuffdd, then waits for the session to end.
 *   dest     guest RAM is registered with a userfaultfd and imported through
 *            libuffdd; the vCPUs read every page of their slice (in sequential or
 *            pseudo-random order) and compare the identifying word; afterwards
 *            the VMM hashes all RAM and compares with the source's hash.
 *   selftest the same without a daemon: fill, then verify in place, or (with
 *            --local-uffd) verify a second, uffd-registered copy whose faults a
 *            handler thread (or, with --exits, the vCPU threads) resolve with
 *            UFFDIO_COPY from the filled copy.
 *
 * See native/testvm/README.md for the page layout, output and exit codes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef TESTVM_NO_LIBUFFDD
#include "uffdd.h"
#endif

/* ---- uAPI constants newer than Debian's headers ------------------------- */
#ifndef UFFD_FEATURE_MINOR_HUGETLBFS
#define UFFD_FEATURE_MINOR_HUGETLBFS (1 << 9)
#endif
#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1 << 10)
#endif
#ifndef UFFDIO_REGISTER_MODE_MINOR
#define UFFDIO_REGISTER_MODE_MINOR ((__u64)1 << 2)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
	struct uffdio_range range;
	__u64 mode;
	__s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, 0x08, struct uffdio_poison)
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_MEMORY_EXIT_FLAG_WRITE
#define KVM_MEMORY_EXIT_FLAG_WRITE (1ULL << 1) /* proposed with KVM Userfault */
#endif
#ifndef KVM_MEMORY_EXIT_FLAG_PRIVATE
#define KVM_MEMORY_EXIT_FLAG_PRIVATE (1ULL << 3)
#endif
/* run->memory_fault lives in the same union as run->mmio (Linux >= 6.8). */
struct testvm_memory_fault {
	uint64_t flags;
	uint64_t gpa;
	uint64_t size;
};

/* ---- guest layout ------------------------------------------------------- */
#define PAGE ((uint64_t)4096)
#define TESTVM_RAM_GPA 0x40000000ULL  /* guest RAM slot: 1 GiB */
#define TESTVM_FW_SIZE (1ULL << 20)   /* firmware slot at gpa 0: code, IDT, stacks */
#define TESTVM_CODE_GPA 0x1000ULL
#define TESTVM_IDT_GPA 0x800ULL
#define TESTVM_GDT_GPA 0x500ULL
#define TESTVM_PT_GPA 0x2000ULL /* --long: PML4, PDPT at +0x1000, 4 PDs at +0x2000 */
#define TESTVM_STACK_GPA(i) (0x10000ULL + (uint64_t)(i) * 0x1000ULL + 0xff0ULL)
#define TESTVM_TSS_GPA 0xfffbd000UL
#define MAX_VCPUS 8
#define MAX_RAM (2ULL << 30)
#define GUEST_K 0x9E3779B1u
#define PORT_DONE 0x10
#define PORT_BAD 0x11
#define PORT_MCE 0x12

extern const unsigned char testvm_guest_start[], testvm_guest_end[];
extern const unsigned char testvm_guest_fill[], testvm_guest_verify_seq[],
	testvm_guest_verify_rand[], testvm_guest_mce[];
extern const unsigned char testvm_guest64_fill[], testvm_guest64_verify_seq[],
	testvm_guest64_verify_rand[], testvm_guest64_mce[];

#define GUEST_OFF(sym) ((uint64_t)((sym) - testvm_guest_start))

/* ---- small helpers ------------------------------------------------------ */
static const char *prog_role = "testvm";

static void fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fatal(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "uffdd-testvm %s: ", prog_role);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
	_exit(1); /* other threads may be blocked in KVM_RUN: do not run atexit handlers */
}

static void fatal_errno(const char *what) __attribute__((noreturn));
static void fatal_errno(const char *what)
{
	int e = errno;
	fatal("%s: %s (errno %d)", what, strerror(e), e);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t splitmix64(uint64_t x)
{
	x += 0x9E3779B97F4A7C15ULL;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
	return x ^ (x >> 31);
}

static uint64_t parse_size(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s)
		fatal("bad size '%s'", s);
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	case '\0': break;
	default: fatal("bad size '%s'", s);
	}
	if (*end == 'i' || *end == 'B')
		end++;
	if (*end == 'B')
		end++;
	if (*end)
		fatal("bad size '%s'", s);
	return v;
}

/* ---- options ------------------------------------------------------------ */
enum backing { BACK_ANON, BACK_SHMEM, BACK_HUGETLB };
enum role { ROLE_SOURCE, ROLE_DEST, ROLE_SELFTEST, ROLE_FIRECRACKER };

static struct {
	enum role role;
	const char *socket, *session, *token_hex, *peer, *expect_hash, *expect_hash_file;
	const char *strategy, *policy;
	double deadline;
	uint64_t memory;
	enum backing backing;
	int vcpus;
	uint64_t seed;
	int rand_order;
	int exits;
	int minor;
	int local_uffd;
	double timeout;
	int mce;
	int64_t corrupt_page;
	int64_t mce_page;
	int64_t poison_page;
	uint64_t lose_pages;
	int long_mode;
	/* random-order verify: each vCPU reads only this percentage of its slice, the
	 * first pages of its pseudo-random walk (the same pages for the same seed): a
	 * scattered working set (the firecracker stand-in's --working-set) */
	int working_set_pct;
} opt = {
	.memory = 64ULL << 20, .backing = BACK_ANON, .vcpus = 1, .seed = 1, .timeout = 300, .mce = 1, .corrupt_page = -1,
	.mce_page = -1, .poison_page = -1, .working_set_pct = 100,
};

static unsigned char token[64];
static size_t token_len;

/* Under --policy poison the daemon poisons pages through our uffd, and refuses an
 * import whose uffd was not given UFFD_FEATURE_POISON. */
static int wants_poison_policy(void)
{
	return opt.policy && strcmp(opt.policy, "poison") == 0;
}

/* ---- guest RAM ---------------------------------------------------------- */
struct ram {
	char *host;
	uint64_t size;
	uint64_t page_size; /* backing page size: 4 KiB or 2 MiB */
	int memfd;          /* -1 for anonymous */
};

static void ram_create(struct ram *r, uint64_t size, enum backing b, const char *name)
{
	r->size = size;
	r->memfd = -1;
	r->page_size = b == BACK_HUGETLB ? (2ULL << 20) : PAGE;
	if (b == BACK_ANON) {
		r->host = mmap(NULL, size, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (r->host == MAP_FAILED)
			fatal_errno("mmap guest RAM");
		/* 4 KiB pages only: UFFDIO_COPY installs 4 KiB pages anyway */
		madvise(r->host, size, MADV_NOHUGEPAGE);
		return;
	}
	unsigned int flags = MFD_CLOEXEC;
	if (b == BACK_HUGETLB)
		flags |= MFD_HUGETLB | MFD_HUGE_2MB;
	r->memfd = memfd_create(name, flags);
	if (r->memfd < 0)
		fatal_errno(b == BACK_HUGETLB ? "memfd_create(MFD_HUGETLB)" : "memfd_create");
	if (ftruncate(r->memfd, (off_t)size))
		fatal_errno("ftruncate guest RAM memfd");
	r->host = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, r->memfd, 0);
	if (r->host == MAP_FAILED)
		fatal_errno("mmap guest RAM memfd");
}

/*
 * Host-side part of the page contents: bytes 8..4095 of global page p are a
 * seeded sequence of 64-bit words. Bytes 0..7 are written by the guest:
 * dword 0 = p * GUEST_K + seed32 (the identifying word), dword 1 = p.
 */
static inline uint64_t page_word(uint64_t seed, uint64_t p, uint64_t i)
{
	return splitmix64(seed ^ (p << 16)) + i * 0xD6E8FEB86659FD93ULL;
}

static void host_fill(struct ram *r, uint64_t seed)
{
	uint64_t npages = r->size / PAGE;
	for (uint64_t p = 0; p < npages; p++) {
		uint64_t *w = (uint64_t *)(r->host + p * PAGE);
		uint64_t base = splitmix64(seed ^ (p << 16));
		for (uint64_t i = 1; i < PAGE / 8; i++)
			w[i] = base + i * 0xD6E8FEB86659FD93ULL;
	}
}

static inline uint32_t ident_word(uint64_t seed, uint64_t p)
{
	return (uint32_t)p * GUEST_K + (uint32_t)seed;
}

/* ---- SIGBUS guard: the VMM's own reads of guest RAM --------------------- */
/*
 * With UFFD_FEATURE_SIGBUS, a VMM access to an absent page raises SIGBUS
 * (and after UFFDIO_POISON, so does an access to a poisoned page). The VMM
 * touches guest RAM in exactly two places — the MMIO completion of a faulting
 * vCPU access and the final hash — and both run under this guard.
 */
static __thread sigjmp_buf *volatile guard_jmp; /* volatile: the stores must not be elided around memcpy */
static __thread volatile void *guard_addr;

static __thread volatile int in_kvm_run;       /* this vCPU thread is inside KVM_RUN */
static __thread void *volatile kvm_sigbus_addr; /* SIGBUS KVM sent during KVM_RUN */

static void sigbus_handler(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (in_kvm_run) {
		/* KVM found a poisoned page (BUS_MCEERR_AR) while running the guest:
		 * the vCPU loop turns it into a memory error for the guest */
		kvm_sigbus_addr = si->si_addr;
		return;
	}
	if (guard_jmp) {
		guard_addr = si->si_addr;
		siglongjmp(*guard_jmp, 1);
	}
	static const char msg[] = "uffdd-testvm: SIGBUS outside a guarded guest-RAM access\n";
	ssize_t n = write(2, msg, sizeof(msg) - 1);
	(void)n;
	signal(sig, SIG_DFL);
	raise(sig);
}

static void kick_handler(int sig)
{
	(void)sig; /* only interrupts KVM_RUN (EINTR) */
}

static void install_sigbus_handler(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = sigbus_handler;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGBUS, &sa, NULL))
		fatal_errno("sigaction(SIGBUS)");
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = kick_handler; /* no SA_RESTART: KVM_RUN returns EINTR */
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL))
		fatal_errno("sigaction(SIGUSR1)");
}

/* memcpy that returns -1 instead of dying if the source or target page faults. */
static int guarded_copy(void *dst, const void *src, size_t n)
{
	sigjmp_buf jb;
	if (sigsetjmp(jb, 1)) {
		guard_jmp = NULL;
		return -1;
	}
	guard_jmp = &jb;
	memcpy(dst, src, n);
	guard_jmp = NULL;
	return 0;
}

/*
 * 64-bit hash of all guest RAM, 4 interleaved lanes. Pages that cannot be read
 * (SIGBUS: poisoned, or absent with UFFD_FEATURE_SIGBUS) are hashed as a
 * marker and counted in *unreadable.
 */
static uint64_t hash_pages(const char *base, uint64_t size, uint64_t *unreadable)
{
	uint64_t h[4] = {0x243F6A8885A308D3ULL, 0x13198A2E03707344ULL, 0xA4093822299F31D0ULL,
			 0x082EFA98EC4E6C89ULL};
	const uint64_t M = 0x9FB21C651E98DF25ULL;
	uint64_t bad = 0;
	static __thread uint64_t w[PAGE / 8];
	for (uint64_t p = 0; p < size / PAGE; p++) {
		if (guarded_copy(w, base + p * PAGE, PAGE)) {
			bad++;
			h[0] = (h[0] ^ 0xBADBADBADULL ^ p) * M;
			continue;
		}
		for (uint64_t i = 0; i < PAGE / 8; i += 4) {
			for (int j = 0; j < 4; j++) {
				h[j] = (h[j] ^ w[i + j]) * M;
				h[j] ^= h[j] >> 29;
			}
		}
	}
	if (unreadable)
		*unreadable = bad;
	uint64_t x = size;
	for (int i = 0; i < 4; i++)
		x = splitmix64(x ^ h[i]);
	return x;
}

/* ---- userfaultfd -------------------------------------------------------- */
static int uffd_create(uint64_t features, uint64_t *got)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		fatal_errno("userfaultfd (needs root or vm.unprivileged_userfaultfd=1)");
	struct uffdio_api api = {.api = UFFD_API, .features = features};
	if (ioctl(fd, UFFDIO_API, &api))
		fatal("UFFDIO_API features %#" PRIx64 ": %s", features, strerror(errno));
	if (got)
		*got = api.features;
	return fd;
}

static void uffd_register_range(int uffd, void *addr, uint64_t len, uint64_t mode)
{
	struct uffdio_register reg = {.range = {.start = (uintptr_t)addr, .len = len}, .mode = mode};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		fatal("UFFDIO_REGISTER mode %#" PRIx64 ": %s", (uint64_t)mode, strerror(errno));
}

/* The destination's uffd over guest RAM, with what the daemon checks: EVENT_REMOVE,
 * THREAD_ID, shmem/hugetlb MISSING (and MINOR in --minor mode) for a memfd, POISON under
 * the poison policy (it poisons through this uffd), SIGBUS for the vCPU-exit path. */
static struct ram guest; /* guest RAM slot at TESTVM_RAM_GPA */
static int dest_uffd(int sigbus)
{
	uint64_t features = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_THREAD_ID;
	if (guest.memfd >= 0)
		features |= opt.backing == BACK_HUGETLB ? UFFD_FEATURE_MISSING_HUGETLBFS
							: UFFD_FEATURE_MISSING_SHMEM;
	if (sigbus)
		features |= UFFD_FEATURE_SIGBUS;
	if (wants_poison_policy())
		features |= UFFD_FEATURE_POISON;
	uint64_t mode = UFFDIO_REGISTER_MODE_MISSING;
	if (opt.minor) {
		features |= opt.backing == BACK_HUGETLB ? UFFD_FEATURE_MINOR_HUGETLBFS
							: UFFD_FEATURE_MINOR_SHMEM;
		mode |= UFFDIO_REGISTER_MODE_MINOR;
	}
	int uffd = uffd_create(features, NULL);
	uffd_register_range(uffd, guest.host, guest.size, mode);
	return uffd;
}

/* ---- KVM ---------------------------------------------------------------- */
static int kvm_fd = -1, vm_fd = -1, run_size;
static char *fw;           /* firmware slot (gpa 0): code, IDT, stacks */
static int mce_supported;  /* KVM_X86_SETUP_MCE worked */
static atomic_int mce_delivered; /* #MC taken by the guest handler */

static void kvm_open(void)
{
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0) {
		int e = errno;
		fatal("cannot open /dev/kvm: %s (errno %d). uffdd-testvm needs KVM: load kvm "
		      "(kvm_intel/kvm_amd), or run where /dev/kvm exists and is writable",
		      strerror(e), e);
	}
	int v = ioctl(kvm_fd, KVM_GET_API_VERSION, 0);
	if (v != KVM_API_VERSION)
		fatal("KVM API version %d, expected %d", v, KVM_API_VERSION);
	run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size <= 0)
		fatal_errno("KVM_GET_VCPU_MMAP_SIZE");
}

static void set_slot(uint32_t slot, uint64_t gpa, void *host, uint64_t size)
{
	struct kvm_userspace_memory_region m = {
		.slot = slot, .guest_phys_addr = gpa, .memory_size = size,
		.userspace_addr = (uintptr_t)host};
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &m))
		fatal_errno("KVM_SET_USER_MEMORY_REGION");
}

/* A fresh VM with the firmware slot; guest RAM is attached with attach_ram(). */
static void vm_create(void)
{
	if (vm_fd >= 0)
		close(vm_fd);
	vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm_fd < 0)
		fatal_errno("KVM_CREATE_VM");
	ioctl(vm_fd, KVM_SET_TSS_ADDR, TESTVM_TSS_GPA); /* needed on VMX, harmless elsewhere */
	if (!fw) {
		fw = mmap(NULL, TESTVM_FW_SIZE, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
		if (fw == MAP_FAILED)
			fatal_errno("mmap firmware");
		size_t n = (size_t)(testvm_guest_end - testvm_guest_start);
		memcpy(fw + TESTVM_CODE_GPA, testvm_guest_start, n);
		/* GDT: null, flat code (selector 8; 64-bit with --long), flat data
		 * (16); interrupt delivery reloads CS from it */
		uint64_t gdt[3] = {0, 0x00CF9A000000FFFFULL, 0x00CF92000000FFFFULL};
		if (opt.long_mode)
			gdt[1] = 0x00AF9A000000FFFFULL; /* L=1, D=0 */
		memcpy(fw + TESTVM_GDT_GPA, gdt, sizeof(gdt));
		if (!opt.long_mode) {
			/* IDT: vector 18 (#MC) -> 32-bit interrupt gate to the handler */
			uint64_t h = TESTVM_CODE_GPA + GUEST_OFF(testvm_guest_mce);
			uint64_t gate = (h & 0xffff) | (8ULL << 16) | (0x8EULL << 40) |
					((h >> 16) << 48);
			memcpy(fw + TESTVM_IDT_GPA + 18 * 8, &gate, 8);
		} else {
			/* 16-byte 64-bit interrupt gate */
			uint64_t h = TESTVM_CODE_GPA + GUEST_OFF(testvm_guest64_mce);
			uint64_t gate[2] = {(h & 0xffff) | (8ULL << 16) | (0x8EULL << 40) |
						    (((h >> 16) & 0xffff) << 48),
					    h >> 32};
			memcpy(fw + TESTVM_IDT_GPA + 18 * 16, gate, 16);
			/* identity map of the low 4 GiB with 2 MiB pages */
			uint64_t *pml4 = (uint64_t *)(fw + TESTVM_PT_GPA);
			uint64_t *pdpt = (uint64_t *)(fw + TESTVM_PT_GPA + 0x1000);
			pml4[0] = (TESTVM_PT_GPA + 0x1000) | 3;
			for (uint64_t i = 0; i < 4; i++) {
				uint64_t *pd = (uint64_t *)(fw + TESTVM_PT_GPA + 0x2000 + i * 0x1000);
				pdpt[i] = (TESTVM_PT_GPA + 0x2000 + i * 0x1000) | 3;
				for (uint64_t j = 0; j < 512; j++)
					pd[j] = (i << 30) + (j << 21) + 0x83; /* P|RW|PS */
			}
		}
	}
	set_slot(0, 0, fw, TESTVM_FW_SIZE);
}

static void attach_ram(struct ram *r)
{
	set_slot(1, TESTVM_RAM_GPA, r->host, r->size);
}

/* ---- vCPUs -------------------------------------------------------------- */
enum guest_op { OP_FILL = 1, OP_VERIFY = 2 };

/* How a memory-fault exit is turned into a verdict (daemon or local). */
enum verdict { V_RESUME = 1, V_POPULATE = 2, V_MCE = 3, V_CRASH = 4 };

struct vcpu {
	pthread_t th;
	int id, fd;
	struct kvm_run *run;
	uint64_t first, n; /* slice: global 4 KiB page index and count */
	enum guest_op op;
	/* results */
	uint64_t mismatches, exits, mce_count;
	uint64_t memfault_exits, sigbus_exits; /* subsets of exits, by kind */
	int64_t first_bad;
	uint64_t mce_gpas[16];
	int crashed;
	char crash_reason[300];
	double seconds;
#ifndef TESTVM_NO_LIBUFFDD
	uffdd_client *client;
#endif
};

static struct vcpu vcpus[MAX_VCPUS];

/* Local resolution source for selftest --local-uffd (the filled copy). */
static struct ram local_src;
static int local_uffd = -1;
static uint64_t local_mode; /* UFFDIO_REGISTER_MODE_* used */
static char *local_alias;   /* minor mode: unregistered mapping of the guest memfd */

static void vcpu_create(struct vcpu *v, int id)
{
	v->id = id;
	v->fd = ioctl(vm_fd, KVM_CREATE_VCPU, id);
	if (v->fd < 0)
		fatal_errno("KVM_CREATE_VCPU");
	v->run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED)
		fatal_errno("mmap kvm_run");
	/* Machine-check support, so that inject-memory-error can use KVM_X86_SET_MCE. */
	uint64_t mcg_cap = 0;
	mce_supported = 0;
	/* the bank count comes from KVM_CAP_MCE; the low byte of the cap is 0 */
	if (ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MCE) > 0 &&
	    ioctl(kvm_fd, KVM_X86_GET_MCE_CAP_SUPPORTED, &mcg_cap) == 0) {
		uint64_t want = (mcg_cap & ~0xffULL) | 1; /* one bank */
		if (ioctl(v->fd, KVM_X86_SETUP_MCE, &want) == 0)
			mce_supported = 1;
	}
}

static void vcpu_setup(struct vcpu *v, enum guest_op op)
{
	struct kvm_sregs sregs;
	if (ioctl(v->fd, KVM_GET_SREGS, &sregs))
		fatal_errno("KVM_GET_SREGS");
	struct kvm_segment cs = {.base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
				 .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1};
	struct kvm_segment ds = cs;
	ds.selector = 16;
	ds.type = 3;
	sregs.cs = cs;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = ds;
	sregs.cr0 |= 1; /* PE, no paging */
	if (opt.long_mode) {
		sregs.cs.db = 0;
		sregs.cs.l = 1;
		sregs.cr3 = TESTVM_PT_GPA;
		sregs.cr4 |= 1u << 5;                   /* PAE */
		sregs.cr0 |= 1u << 31;                  /* PG */
		sregs.efer |= (1u << 8) | (1u << 10);   /* LME | LMA */
	}
	sregs.gdt.base = TESTVM_GDT_GPA;
	sregs.gdt.limit = 3 * 8 - 1;
	sregs.idt.base = TESTVM_IDT_GPA;
	sregs.idt.limit = opt.long_mode ? 32 * 16 - 1 : 32 * 8 - 1;
	if (mce_supported)
		sregs.cr4 |= 1u << 6; /* CR4.MCE: deliver #MC instead of shutting down */
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs))
		fatal_errno("KVM_SET_SREGS");

	uint64_t entry;
	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rflags = 2;
	regs.rsi = TESTVM_RAM_GPA + v->first * PAGE;
	regs.rcx = v->n;
	regs.rdx = (uint32_t)(v->first * GUEST_K + (uint32_t)opt.seed);
	regs.rsp = TESTVM_STACK_GPA(v->id);
	uint32_t remaining = (uint32_t)v->n;
	if (op != OP_FILL && opt.rand_order && opt.working_set_pct < 100) {
		remaining = (uint32_t)(v->n * (uint64_t)opt.working_set_pct / 100);
		if (remaining == 0)
			remaining = 1;
	}
	memcpy(fw + regs.rsp, &remaining, 4); /* verify_rand stops when it reaches 0 */
	if (op == OP_FILL) {
		entry = GUEST_OFF(opt.long_mode ? testvm_guest64_fill : testvm_guest_fill);
		regs.rdi = v->first;
	} else if (!opt.rand_order) {
		entry = GUEST_OFF(opt.long_mode ? testvm_guest64_verify_seq
						: testvm_guest_verify_seq);
	} else {
		uint64_t mask = 1;
		while (mask < v->n)
			mask <<= 1;
		entry = GUEST_OFF(opt.long_mode ? testvm_guest64_verify_rand
						: testvm_guest_verify_rand);
		regs.rdi = mask - 1;
		regs.rbp = splitmix64(opt.seed + (uint64_t)v->id) & (mask - 1);
	}
	regs.rip = TESTVM_CODE_GPA + entry;
	if (ioctl(v->fd, KVM_SET_REGS, &regs))
		fatal_errno("KVM_SET_REGS");
	v->op = op;
	v->mismatches = v->exits = v->mce_count = 0;
	v->memfault_exits = v->sigbus_exits = 0;
	v->first_bad = -1;
	v->crashed = 0;
}

static void vcpu_crash(struct vcpu *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Set when one vCPU crashed: the others stop at their next exit (they are kicked). */
static atomic_int vm_stopping;
static int vcpus_running;
static atomic_int vcpus_finished;

/*
 * Stop every vCPU; used when the session failed. Only vCPUs of the exit path
 * are kicked out of KVM_RUN with a signal: a vCPU blocked on a uffd page
 * cannot leave anyway, and signalling one made it spin in the kernel (100 %
 * sys time) in some runs on the development machines. The VMM exits instead.
 */
static void vm_stop_all(void)
{
	if (atomic_exchange(&vm_stopping, 1) == 0 && opt.exits)
		for (int i = 0; i < vcpus_running; i++) {
			vcpus[i].run->immediate_exit = 1;
			pthread_kill(vcpus[i].th, SIGUSR1);
		}
}

static void vcpu_crash(struct vcpu *v, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(v->crash_reason, sizeof(v->crash_reason), fmt, ap);
	va_end(ap);
	v->crashed = 1;
	/* stop the whole VM: kick every other vCPU out of KVM_RUN (see vm_stop_all) */
	if (atomic_exchange(&vm_stopping, 1) == 0 && opt.exits)
		for (int i = 0; i < vcpus_running; i++)
			if (&vcpus[i] != v) {
				vcpus[i].run->immediate_exit = 1;
				pthread_kill(vcpus[i].th, SIGUSR1);
			}
}

/* Dump where a vCPU stopped, for unexpected exits. */
static void vcpu_where(struct vcpu *v, char *buf, size_t n)
{
	struct kvm_regs r;
	if (ioctl(v->fd, KVM_GET_REGS, &r) == 0)
		snprintf(buf, n, "rip=%#llx rsi=%#llx rbx=%#llx rbp=%#llx rcx=%#llx", r.rip, r.rsi,
			 r.rbx, r.rbp, r.rcx);
	else
		snprintf(buf, n, "(no regs)");
}

/* A vCPU stopped for a reason its loop does not handle: say where, and crash the VM. */
static void vcpu_bad_exit(struct vcpu *v, const struct kvm_run *run)
{
	char where[160];
	vcpu_where(v, where, sizeof(where));
	if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
		vcpu_crash(v, "KVM internal error, suberror %u (%s)", run->internal.suberror,
			   where);
	else
		vcpu_crash(v, "unexpected exit reason %u (%s)", run->exit_reason, where);
}

/*
 * Local resolution (selftest --local-uffd): install the page(s) covering
 * [gpa, gpa+size) from the filled copy. EEXIST means someone else installed it.
 */
static void local_install(uint64_t off)
{
	uint64_t pg = guest.page_size;
	off &= ~(pg - 1);
	if (opt.poison_page >= 0 && off / PAGE <= (uint64_t)opt.poison_page &&
	    (uint64_t)opt.poison_page < (off + pg) / PAGE) {
		/* what the daemon's "poison" failure policy does with a lost page */
		struct uffdio_poison ps = {.range = {.start = (uintptr_t)guest.host + off, .len = pg}};
		if (ioctl(local_uffd, UFFDIO_POISON, &ps) && errno != EEXIST && errno != EAGAIN)
			fatal_errno("UFFDIO_POISON");
		return;
	}
	if (local_mode & UFFDIO_REGISTER_MODE_MINOR) {
		/* minor mode: write the page cache through a second, unregistered mapping
		 * of the memfd (pwrite does not work on hugetlbfs), then CONTINUE */
		if (!local_alias) {
			local_alias = mmap(NULL, guest.size, PROT_READ | PROT_WRITE, MAP_SHARED,
					   guest.memfd, 0);
			if (local_alias == MAP_FAILED)
				fatal_errno("mmap guest memfd alias");
		}
		memcpy(local_alias + off, local_src.host + off, pg);
		struct uffdio_continue c = {.range = {.start = (uintptr_t)guest.host + off, .len = pg}};
		if (ioctl(local_uffd, UFFDIO_CONTINUE, &c) && errno != EEXIST && errno != EAGAIN)
			fatal_errno("UFFDIO_CONTINUE");
		return;
	}
	struct uffdio_copy c = {.dst = (uintptr_t)guest.host + off,
				.src = (uintptr_t)local_src.host + off, .len = pg};
	if (ioctl(local_uffd, UFFDIO_COPY, &c) && errno != EEXIST && errno != EAGAIN)
		fatal_errno("UFFDIO_COPY");
}

static enum verdict resolve(struct vcpu *v, uint64_t gpa, uint64_t size, int write,
			    uint64_t *vaddr, uint64_t *vsize)
{
	*vaddr = (uintptr_t)guest.host + (gpa - TESTVM_RAM_GPA);
	*vsize = size;
	if (opt.role == ROLE_SELFTEST) {
		uint64_t off = gpa - TESTVM_RAM_GPA;
		if (opt.mce_page >= 0 && v->op == OP_VERIFY && off / PAGE == (uint64_t)opt.mce_page)
			return V_MCE;
		if (opt.poison_page >= 0 && off / guest.page_size ==
					    (uint64_t)opt.poison_page * PAGE / guest.page_size) {
			local_install(off); /* poisons it */
			return V_MCE;
		}
		local_install(off);
		if (((off + size - 1) & ~(guest.page_size - 1)) != (off & ~(guest.page_size - 1)))
			local_install(off + size - 1);
		return V_RESUME;
	}
#ifndef TESTVM_NO_LIBUFFDD
	struct uffdd_exit ex = {.vcpu = (uint32_t)v->id, .gpa = gpa, .size = size,
				.access = write ? UFFDD_ACCESS_WRITE : UFFDD_ACCESS_READ};
	struct uffdd_verdict vd;
	struct uffdd_error err;
	if (uffdd_resolve(v->client, opt.session, &ex, &vd, &err)) {
		vcpu_crash(v, "uffdd_resolve(gpa %#" PRIx64 ") failed: %s", gpa, err.message);
		return V_CRASH;
	}
	for (;;) {
		switch (vd.kind) {
		case UFFDD_VERDICT_RESUME:
			return V_RESUME;
		case UFFDD_VERDICT_POPULATE: {
			/* [addr, addr+size) in our address space, widened to backing pages
			 * (hugetlb ranges must be 2 MiB aligned) */
			uint64_t a = vd.addr ? vd.addr : *vaddr, n = vd.size ? vd.size : size;
			uint64_t pg = guest.page_size;
			uint64_t start = a & ~(pg - 1), end = (a + n + pg - 1) & ~(pg - 1);
			*vaddr = a;
			*vsize = n;
			if (start < (uintptr_t)guest.host || end > (uintptr_t)guest.host + guest.size) {
				vcpu_crash(v, "populate verdict outside guest RAM: %#" PRIx64 "+%" PRIu64,
					   a, n);
				return V_CRASH;
			}
			if (madvise((void *)(uintptr_t)start, end - start, MADV_POPULATE_WRITE) == 0)
				return V_RESUME;
		}
			{
				int e = errno;
				if (uffdd_populate_failed(v->client, opt.session, (uint32_t)v->id, gpa, e,
							  &vd, &err)) {
					vcpu_crash(v, "uffdd_populate_failed(gpa %#" PRIx64 ", errno %d) "
						   "failed: %s", gpa, e, err.message);
					return V_CRASH;
				}
			}
			if (vd.kind == UFFDD_VERDICT_POPULATE) {
				vcpu_crash(v, "daemon answered populate-failed with populate again");
				return V_CRASH;
			}
			continue;
		case UFFDD_VERDICT_INJECT_MEMORY_ERROR:
			return V_MCE;
		case UFFDD_VERDICT_CRASH:
		default:
			vcpu_crash(v, "daemon verdict crash for gpa %#" PRIx64 ": %s", gpa,
				   vd.reason[0] ? vd.reason : "(no reason)");
			return V_CRASH;
		}
	}
#else
	(void)v;
	(void)write;
	return V_CRASH;
#endif
}

/*
 * Inject a machine check for gpa into the vCPU: an uncorrected, action-required
 * memory error (MCi_STATUS VAL|UC|EN|MISCV|ADDRV|S|AR, MCACOD 0x134 "data read").
 * Returns 0 if KVM accepted it.
 */
static int inject_mce(struct vcpu *v, uint64_t gpa)
{
	if (!mce_supported || !opt.mce)
		return -1;
	struct kvm_x86_mce m;
	memset(&m, 0, sizeof(m));
	m.bank = 0;
	m.status = (1ULL << 63) | (1ULL << 61) | (1ULL << 60) | (1ULL << 59) | (1ULL << 58) |
		   (1ULL << 56) | (1ULL << 55) | 0x134;
	m.mcg_status = (1ULL << 0) | (1ULL << 2); /* RIPV | MCIP */
	m.addr = gpa;
	m.misc = 12; /* address LSB: 4 KiB granularity */
	return ioctl(v->fd, KVM_X86_SET_MCE, &m);
}

/*
 * The guest touched a page it must not get: record the gpa and inject a
 * machine check (the guest's #MC handler reports and stops the vCPU). If KVM
 * refuses the injection, an emulated read completes with all-ones bytes (the
 * guest reports a mismatch on this page) and the vCPU goes on.
 */
static void memory_error(struct vcpu *v, uint64_t gpa, uint64_t len, int write, int mmio)
{
	if (v->mce_count < 16)
		v->mce_gpas[v->mce_count] = gpa;
	v->mce_count++;
	int mr = inject_mce(v, gpa);
	if (getenv("TESTVM_DEBUG"))
		fprintf(stderr, "inject_mce(gpa %#" PRIx64 "): supported %d, rc %d (%s)\n", gpa,
			mce_supported, mr, mr ? strerror(errno) : "ok");
	if (mmio && !write)
		memset(v->run->mmio.data, 0xff, len);
}

/* Complete an emulated MMIO access to guest RAM once its page is present. */
static int complete_mmio(struct vcpu *v, uint64_t gpa, uint32_t len, int write)
{
	char *host = guest.host + (gpa - TESTVM_RAM_GPA);
	if (write)
		return guarded_copy(host, v->run->mmio.data, len);
	return guarded_copy(v->run->mmio.data, host, len);
}

static int in_ram(uint64_t gpa, uint64_t len)
{
	return gpa >= TESTVM_RAM_GPA && gpa + len <= TESTVM_RAM_GPA + guest.size;
}

/*
 * A memory fault of a vCPU (exits mode). mmio != 0: the access was emulated
 * and must be completed here. Returns 0 to re-enter, 1 if the vCPU is done.
 */
static int handle_memory_fault(struct vcpu *v, uint64_t gpa, uint64_t len, int write, int mmio)
{
	v->exits++;
	for (int attempt = 0;; attempt++) {
		uint64_t addr, size;
		enum verdict vd = resolve(v, gpa, len, write, &addr, &size);
		if (vd == V_CRASH)
			return 1;
		if (vd == V_MCE) {
			memory_error(v, gpa, len, write, mmio);
			return 0;
		}
		if (!mmio)
			return 0; /* KVM_EXIT_MEMORY_FAULT: the instruction is re-executed */
		if (complete_mmio(v, gpa, (uint32_t)len, write) == 0)
			return 0;
		/* still absent (a discard raced with us, or the daemon lied): ask again */
		if (attempt >= 8) {
			vcpu_crash(v, "page of gpa %#" PRIx64 " still absent after %d resume "
				   "verdicts", gpa, attempt + 1);
			return 1;
		}
	}
}

static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	double t0 = now_s();
#ifndef TESTVM_NO_LIBUFFDD
	if (opt.exits && opt.role == ROLE_DEST) {
		struct uffdd_error err;
		v->client = uffdd_connect(opt.socket, &err);
		if (!v->client) {
			vcpu_crash(v, "uffdd_connect(%s) for vCPU %d: %s", opt.socket, v->id,
				   err.message);
			return NULL;
		}
	}
#endif
	char where[160];
	for (;;) {
		in_kvm_run = 1;
		int r = ioctl(v->fd, KVM_RUN, 0);
		in_kvm_run = 0;
		struct kvm_run *run = v->run;
		if (kvm_sigbus_addr) {
			/* a poisoned page (UFFDIO_POISON) hit outside the emulator */
			uint64_t hva = (uintptr_t)kvm_sigbus_addr;
			kvm_sigbus_addr = NULL;
			if (hva >= (uintptr_t)guest.host && hva < (uintptr_t)guest.host + guest.size) {
				v->exits++;
				v->sigbus_exits++;
				memory_error(v, TESTVM_RAM_GPA + (hva - (uintptr_t)guest.host), PAGE, 0, 0);
				continue;
			}
			vcpu_crash(v, "SIGBUS at %#" PRIx64 " outside guest RAM", hva);
			break;
		}
		if (r < 0) {
			if (atomic_load(&vm_stopping)) {
				snprintf(v->crash_reason, sizeof(v->crash_reason),
					 "stopped with the VM");
				v->crashed = 2;
				break;
			}
			if (errno == EINTR || errno == EAGAIN)
				continue;
			if (errno == EFAULT && run->exit_reason == KVM_EXIT_MEMORY_FAULT && opt.exits) {
				struct testvm_memory_fault mf;
				memcpy(&mf, &run->mmio, sizeof(mf));
				if (!in_ram(mf.gpa, mf.size ? mf.size : 1)) {
					vcpu_crash(v, "memory fault outside guest RAM: gpa %#llx size %llu",
						   (unsigned long long)mf.gpa, (unsigned long long)mf.size);
					break;
				}
				v->memfault_exits++;
				if (handle_memory_fault(v, mf.gpa, mf.size ? mf.size : PAGE,
							(mf.flags & KVM_MEMORY_EXIT_FLAG_WRITE) != 0, 0))
					break;
				continue;
			}
			vcpu_where(v, where, sizeof(where));
			vcpu_crash(v, "KVM_RUN: %s (exit_reason %u, %s)", strerror(errno),
				   run->exit_reason, where);
			break;
		}
		if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT) {
			uint32_t val = 0;
			memcpy(&val, (char *)run + run->io.data_offset,
			       run->io.size < 4 ? run->io.size : 4);
			if (run->io.port == PORT_DONE)
				break;
			if (run->io.port == PORT_BAD) {
				if (v->first_bad < 0)
					v->first_bad = (int64_t)(v->first + val);
				v->mismatches++;
				continue;
			}
			if (run->io.port == PORT_MCE) {
				mce_delivered++;
				continue; /* the handler halts next */
			}
		}
		if (run->exit_reason == KVM_EXIT_HLT) {
			if (v->mce_count)
				break; /* stopped by its #MC handler */
			vcpu_where(v, where, sizeof(where));
			vcpu_crash(v, "guest halted without reporting done (%s)", where);
			break;
		}
		if (run->exit_reason == KVM_EXIT_MMIO) {
			uint64_t gpa = run->mmio.phys_addr;
			if (opt.exits && in_ram(gpa, run->mmio.len)) {
				if (handle_memory_fault(v, gpa, run->mmio.len, run->mmio.is_write, 1))
					break;
				continue;
			}
			if (in_ram(gpa, run->mmio.len)) {
				/*
				 * Without UFFD_FEATURE_SIGBUS a RAM access becomes MMIO under the
				 * emulator when the page cannot be had at all: it was poisoned
				 * (UFFDIO_POISON). If the VMM can read it now, complete it; if
				 * not, it is a memory error for the guest.
				 */
				v->exits++;
				if (complete_mmio(v, gpa, run->mmio.len, run->mmio.is_write))
					memory_error(v, gpa, run->mmio.len, run->mmio.is_write, 1);
				continue;
			}
			vcpu_where(v, where, sizeof(where));
			vcpu_crash(v, "unexpected MMIO %s at gpa %#llx len %u (%s)%s",
				   run->mmio.is_write ? "write" : "read", run->mmio.phys_addr,
				   run->mmio.len, where,
				   "");
			break;
		}
		vcpu_bad_exit(v, run);
		break;
	}
	v->seconds = now_s() - t0;
#ifndef TESTVM_NO_LIBUFFDD
	if (v->client) {
		uffdd_close(v->client);
		v->client = NULL;
	}
#endif
	atomic_fetch_add(&vcpus_finished, 1);
	return NULL;
}

static void vcpus_create(int n)
{
	uint64_t npages = guest.size / PAGE;
	uint64_t per = npages / (uint64_t)n;
	for (int i = 0; i < n; i++) {
		vcpu_create(&vcpus[i], i);
		vcpus[i].first = (uint64_t)i * per;
		vcpus[i].n = i == n - 1 ? npages - vcpus[i].first : per;
	}
}

/* Run op on all vCPUs, wait for them. Returns wall seconds. */
static void vcpus_start(int n, enum guest_op op)
{
	for (int i = 0; i < n; i++)
		vcpu_setup(&vcpus[i], op);
	atomic_store(&vm_stopping, 0);
	atomic_store(&vcpus_finished, 0);
	for (int i = 0; i < n; i++)
		if (pthread_create(&vcpus[i].th, NULL, vcpu_thread, &vcpus[i]))
			fatal("pthread_create failed");
	vcpus_running = n;
}

static double vcpus_run(int n, enum guest_op op)
{
	for (int i = 0; i < n; i++)
		vcpu_setup(&vcpus[i], op);
	double t0 = now_s();
	atomic_store(&vm_stopping, 0);
	for (int i = 0; i < n; i++)
		if (pthread_create(&vcpus[i].th, NULL, vcpu_thread, &vcpus[i]))
			fatal("pthread_create failed");
	vcpus_running = n;
	for (int i = 0; i < n; i++)
		pthread_join(vcpus[i].th, NULL);
	vcpus_running = 0;
	return now_s() - t0;
}

static void vcpus_destroy(int n)
{
	for (int i = 0; i < n; i++) {
		munmap(vcpus[i].run, (size_t)run_size);
		close(vcpus[i].fd);
	}
}

struct run_totals {
	uint64_t mismatches, exits, mce_count, memfault_exits, sigbus_exits;
	int crashed;
	int64_t first_bad;
};

static uint64_t mce_log[MAX_VCPUS * 16];
static size_t mce_log_n;

static struct run_totals totals(int n)
{
	struct run_totals t = {0, 0, 0, 0, 0, 0, -1};
	mce_log_n = 0;
	for (int i = 0; i < n; i++) {
		for (uint64_t j = 0; j < vcpus[i].mce_count && j < 16; j++)
			mce_log[mce_log_n++] = vcpus[i].mce_gpas[j];
		t.mismatches += vcpus[i].mismatches;
		t.exits += vcpus[i].exits;
		t.mce_count += vcpus[i].mce_count;
		t.memfault_exits += vcpus[i].memfault_exits;
		t.sigbus_exits += vcpus[i].sigbus_exits;
		if (vcpus[i].first_bad >= 0 && (t.first_bad < 0 || vcpus[i].first_bad < t.first_bad))
			t.first_bad = vcpus[i].first_bad;
		if (vcpus[i].crashed == 2)
			continue; /* stopped because the VM stopped: not a crash of its own */
		if (vcpus[i].crashed) {
			t.crashed = 1;
			fprintf(stderr, "uffdd-testvm %s: vCPU %d: %s\n", prog_role, i,
				vcpus[i].crash_reason);
		}
	}
	return t;
}

static void print_mce_gpas_from(const uint64_t *log, size_t n)
{
	printf("\"mce_gpas\":[");
	for (size_t i = 0; log && i < n; i++)
		printf("%s%" PRIu64, i ? "," : "", log[i]);
	printf("],\"mce_delivered\":%d", mce_delivered);
}

/* ---- watchdog ----------------------------------------------------------- */
static void *watchdog_thread(void *arg)
{
	(void)arg;
	struct timespec ts = {.tv_sec = (time_t)opt.timeout,
			      .tv_nsec = (long)((opt.timeout - (double)(time_t)opt.timeout) * 1e9)};
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
	fatal("timed out after %.0f s (--timeout)%s", opt.timeout,
	      opt.role == ROLE_SOURCE ? ": the session never ended"
				      : "; a vCPU may be blocked on a page that never arrived");
	return NULL;
}

static void start_watchdog(void)
{
	pthread_t th;
	if (opt.timeout > 0 && pthread_create(&th, NULL, watchdog_thread, NULL) == 0)
		pthread_detach(th);
}

/* ---- selftest ----------------------------------------------------------- */
static int local_stop_fd = -1;
static atomic_ulong local_faults;

/* The blocking path: a handler thread resolves vCPU faults with UFFDIO_COPY. */
static void *local_handler(void *arg)
{
	(void)arg;
	struct uffd_msg msgs[32];
	struct pollfd pfd[2] = {{.fd = local_uffd, .events = POLLIN},
				{.fd = local_stop_fd, .events = POLLIN}};
	for (;;) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			fatal_errno("poll uffd");
		}
		if (pfd[1].revents)
			return NULL;
		ssize_t n = read(local_uffd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			fatal_errno("read uffd");
		}
		for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			local_faults++;
			local_install(msgs[i].arg.pagefault.address - (uintptr_t)guest.host);
		}
	}
}

/* A fresh VM whose RAM is a new, uffd-registered copy (selftest --local-uffd). */
static void local_dest_vm(int n)
{
	vcpus_destroy(n);
	vm_create();
	if (guest.host != local_src.host) {
		munmap(guest.host, guest.size);
		if (guest.memfd >= 0)
			close(guest.memfd);
	}
	if (local_uffd >= 0)
		close(local_uffd);
	if (local_alias)
		munmap(local_alias, guest.size);
	local_alias = NULL;
	ram_create(&guest, opt.memory, opt.backing, "testvm-ram-dst");
	uint64_t features = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_THREAD_ID;
	if (guest.memfd >= 0)
		features |= opt.backing == BACK_HUGETLB ? UFFD_FEATURE_MISSING_HUGETLBFS
							: UFFD_FEATURE_MISSING_SHMEM;
	if (opt.exits)
		features |= UFFD_FEATURE_SIGBUS;
	if (opt.poison_page >= 0 || wants_poison_policy())
		features |= UFFD_FEATURE_POISON;
	local_mode = UFFDIO_REGISTER_MODE_MISSING;
	if (opt.minor) {
		features |= opt.backing == BACK_HUGETLB ? UFFD_FEATURE_MINOR_HUGETLBFS
							: UFFD_FEATURE_MINOR_SHMEM;
		local_mode |= UFFDIO_REGISTER_MODE_MINOR;
	}
	local_uffd = uffd_create(features, NULL);
	uffd_register_range(local_uffd, guest.host, guest.size, local_mode);
	attach_ram(&guest);
	vcpus_create(n);
}

/* Run op on the uffd-registered copy; afterwards install what nobody touched. */
static double local_dest_run(int n, enum guest_op op)
{
	pthread_t hth;
	if (local_stop_fd < 0)
		local_stop_fd = eventfd(0, EFD_CLOEXEC);
	if (!opt.exits && pthread_create(&hth, NULL, local_handler, NULL))
		fatal("pthread_create failed");
	double t = vcpus_run(n, op);
	if (!opt.exits) {
		uint64_t one = 1;
		if (write(local_stop_fd, &one, 8) != 8)
			fatal_errno("eventfd write");
		pthread_join(hth, NULL);
		if (read(local_stop_fd, &one, 8) != 8)
			fatal_errno("eventfd read");
	}
	/* the rest of the copy: what a background stream would do */
	for (uint64_t off = 0; off < guest.size; off += guest.page_size)
		local_install(off);
	return t;
}

static uint64_t saved_mce[MAX_VCPUS * 16];
static size_t saved_mce_n;

static int run_selftest(void)
{
	int n = opt.vcpus;
	double t_all = now_s();
	kvm_open();
	vm_create();
	ram_create(&guest, opt.memory, opt.backing, "testvm-ram");
	attach_ram(&guest);
	vcpus_create(n);
	double t_host = now_s();
	host_fill(&guest, opt.seed);
	t_host = now_s() - t_host;
	double t_fill = vcpus_run(n, OP_FILL);
	struct run_totals t = totals(n);
	if (t.crashed)
		return 1;
	double t_hash = now_s();
	uint64_t h_src = hash_pages(guest.host, guest.size, NULL);
	t_hash = now_s() - t_hash;
	fprintf(stderr, "selftest: host fill %.3fs, guest fill %.3fs (%.0f pages/s), hash %.3fs\n",
		t_host, t_fill, (double)(guest.size / PAGE) / t_fill, t_hash);
	if (opt.corrupt_page >= 0 && (uint64_t)opt.corrupt_page < guest.size / PAGE)
		guest.host[(uint64_t)opt.corrupt_page * PAGE] ^= 0x40; /* flip a bit of word 0 */

	uint64_t h_dst, h_wr = h_src;
	double t_verify, t_write = 0;
	uint64_t read_faults = 0, write_faults = 0, write_exits = 0, unreadable = 0;
	struct run_totals tw = {0, 0, 0, 0, 0, 0, -1};
	if (!opt.local_uffd) {
		t_verify = vcpus_run(n, OP_VERIFY);
		t = totals(n);
		h_dst = hash_pages(guest.host, guest.size, NULL);
	} else {
		local_src = guest;
		/* read faults: the vCPUs verify a copy that arrives on demand */
		local_dest_vm(n);
		t_verify = local_dest_run(n, OP_VERIFY);
		t = totals(n);
		memcpy(saved_mce, mce_log, sizeof(saved_mce));
		saved_mce_n = mce_log_n;
		read_faults = local_faults;
		h_dst = hash_pages(guest.host, guest.size, &unreadable);
		/* write faults: the vCPUs fill another copy that arrives on demand */
		local_dest_vm(n);
		t_write = local_dest_run(n, OP_FILL);
		tw = totals(n);
		write_faults = local_faults - read_faults;
		write_exits = tw.exits;
		h_wr = hash_pages(guest.host, guest.size, NULL);
	}
	int ok = !t.crashed && !tw.crashed && t.mismatches == 0 && h_dst == h_src &&
		 h_wr == h_src && t.mce_count == 0 && unreadable == 0;
	printf("{\"role\":\"selftest\",\"verified\":%s,\"vcpus\":%d,\"pages\":%" PRIu64
	       ",\"guest_mismatches\":%" PRIu64 ",\"first_mismatch\":%" PRId64 ",\"hash\":\"%016"
	       PRIx64 "\",\"source_hash\":\"%016" PRIx64 "\",\"write_hash\":\"%016" PRIx64 "\","
	       "\"exits\":%" PRIu64 ",\"write_exits\":%" PRIu64 ",\"uffd_faults\":%" PRIu64
	       ",\"write_uffd_faults\":%" PRIu64 ",\"fill_seconds\":%.3f,\"verify_seconds\":%.3f,"
	       "\"write_seconds\":%.3f,\"seconds\":%.3f,\"unreadable_pages\":%" PRIu64 ","
	       "\"memory_fault_exits\":%" PRIu64 ",\"sigbus_exits\":%" PRIu64 ",\"guest\":\"%s\",",
	       ok ? "true" : "false", n, guest.size / PAGE, t.mismatches, t.first_bad, h_dst, h_src,
	       h_wr, t.exits, write_exits, read_faults, write_faults, t_fill, t_verify, t_write,
	       now_s() - t_all, unreadable, t.memfault_exits + tw.memfault_exits,
	       t.sigbus_exits + tw.sigbus_exits, opt.long_mode ? "64" : "32");
	if (opt.local_uffd)
		print_mce_gpas_from(saved_mce, saved_mce_n);
	else
		print_mce_gpas_from(mce_log, mce_log_n);
	printf("}\n");
	fflush(stdout);
	if (!ok)
		fprintf(stderr, "uffdd-testvm selftest: FAILED: %" PRIu64 " guest mismatches "
			"(first page %" PRId64 "), %" PRIu64 " memory errors, read-copy hash %s, "
			"write-copy hash %s\n", t.mismatches, t.first_bad, t.mce_count,
			h_dst == h_src ? "matches" : "differs", h_wr == h_src ? "matches" : "differs");
	return ok ? 0 : 1;
}

/* ---- migration (libuffdd) ---------------------------------------------- */
#ifndef TESTVM_NO_LIBUFFDD
static const char *event_name(enum uffdd_event_kind k)
{
	return k == UFFDD_EVENT_COMPLETED   ? "completed"
	       : k == UFFDD_EVENT_FAILED    ? "failed"
	       : k == UFFDD_EVENT_CANCELLED ? "cancelled"
					    : "progress";
}

/* Wait for completed/failed. Returns 0 on completed, -1 otherwise (message printed). */
static int wait_session_end(uffdd_client *c, struct uffdd_event *out)
{
	for (;;) {
		struct uffdd_error err;
		int r = uffdd_next_event(c, out, -1, &err);
		if (r < 0) {
			fprintf(stderr, "uffdd-testvm %s: waiting for session events: %s\n", prog_role,
				err.message);
			return -1;
		}
		if (r == 0)
			continue;
		if (strcmp(out->session, opt.session) != 0)
			continue;
		if (out->kind == UFFDD_EVENT_COMPLETED)
			return 0;
		if (out->kind == UFFDD_EVENT_FAILED || out->kind == UFFDD_EVENT_CANCELLED) {
			fprintf(stderr, "uffdd-testvm %s: session %s %s: %s\n", prog_role, opt.session,
				event_name(out->kind), out->reason);
			return -1;
		}
	}
}

static struct uffdd_region region_of(struct ram *r)
{
	struct uffdd_region reg;
	memset(&reg, 0, sizeof(reg));
	reg.gpa = TESTVM_RAM_GPA;
	reg.addr = (uintptr_t)r->host;
	reg.size = r->size;
	reg.page_size = r->page_size;
	reg.offset = 0;
	reg.uffd = -1;
	reg.memfd = r->memfd;
	reg.mode = UFFDD_MODE_MISSING;
	return reg;
}

static int run_source(void)
{
	int n = opt.vcpus;
	double t0 = now_s();
	kvm_open();
	vm_create();
	ram_create(&guest, opt.memory, opt.backing, "testvm-ram");
	attach_ram(&guest);
	vcpus_create(n);
	host_fill(&guest, opt.seed);
	double t_fill = vcpus_run(n, OP_FILL);
	struct run_totals t = totals(n);
	if (t.crashed)
		return 1;
	/* the vCPUs are paused for good now (they reported done and their threads ended) */
	uint64_t h = hash_pages(guest.host, guest.size, NULL);
	fprintf(stderr, "uffdd-testvm source: filled %" PRIu64 " pages in %.2fs (guest %.2fs), "
		"hash %016" PRIx64 "\n", guest.size / PAGE, now_s() - t0, t_fill, h);

	struct uffdd_error err;
	uffdd_client *c = uffdd_connect(opt.socket, &err);
	if (!c)
		fatal("uffdd_connect(%s): %s", opt.socket, err.message);
	struct uffdd_region reg = region_of(&guest);
	pid_t pid = guest.memfd >= 0 ? 0 : getpid();
	uint64_t pages = 0;
	if (uffdd_export(c, opt.session, token, token_len, pid, &reg, 1, &pages, &err))
		fatal("uffdd_export(session %s): %s", opt.session, err.message);
	fprintf(stderr, "uffdd-testvm source: exported session %s (%" PRIu64 " pages, %s mode)\n",
		opt.session, pages, pid ? "pid" : "memfd");
	if (opt.lose_pages) {
		/*
		 * Fault injection: the last lose_pages pages of guest RAM become
		 * unreadable for the daemon (anon: unmapped, so process_vm_readv fails;
		 * memfd: the file is truncated, so reads through its mapping fault).
		 * The destination's failure policy has to deal with them.
		 */
		uint64_t keep = guest.size - opt.lose_pages * PAGE;
		if (guest.memfd >= 0) {
			if (ftruncate(guest.memfd, (off_t)keep))
				fatal_errno("ftruncate (--lose-pages)");
		} else if (munmap(guest.host + keep, guest.size - keep)) {
			fatal_errno("munmap (--lose-pages)");
		}
		fprintf(stderr, "uffdd-testvm source: lost the last %" PRIu64 " pages on purpose\n",
			opt.lose_pages);
	}
	/* tell the caller the export is in place before we block */
	printf("{\"role\":\"source\",\"event\":\"exported\",\"hash\":\"%016" PRIx64 "\",\"pages\":%"
	       PRIu64 "}\n", h, guest.size / PAGE);
	fflush(stdout);
	struct uffdd_event ev;
	int rc = wait_session_end(c, &ev);
	printf("{\"role\":\"source\",\"hash\":\"%016" PRIx64 "\",\"pages\":%" PRIu64
	       ",\"outcome\":\"%s\",\"seconds\":%.3f}\n",
	       h, guest.size / PAGE, rc == 0 ? ev.outcome : "failed", now_s() - t0);
	fflush(stdout);
	uffdd_close(c);
	return rc == 0 ? 0 : 1;
}

static int read_expect_hash(uint64_t *out)
{
	char buf[256];
	const char *s = opt.expect_hash;
	if (!s && opt.expect_hash_file) {
		FILE *f = fopen(opt.expect_hash_file, "r");
		if (!f)
			fatal("cannot read --expect-hash-file %s: %s", opt.expect_hash_file,
			      strerror(errno));
		size_t n = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
		buf[n] = 0;
		/* accept a bare hex hash or the source's JSON line */
		char *p = strstr(buf, "\"hash\":\"");
		s = p ? p + 8 : buf;
	}
	if (!s)
		return 0;
	char *end;
	*out = strtoull(s, &end, 16);
	if (end == s)
		fatal("bad expected hash '%s'", s);
	return 1;
}

static int run_dest(void)
{
	int n = opt.vcpus;
	uint64_t expect = 0;
	int have_expect = read_expect_hash(&expect);
	double t0 = now_s();
	kvm_open();
	vm_create();
	ram_create(&guest, opt.memory, opt.backing, "testvm-ram");
	int uffd = dest_uffd(opt.exits);
	attach_ram(&guest);
	vcpus_create(n);

	struct uffdd_error err;
	uffdd_client *c = uffdd_connect(opt.socket, &err);
	if (!c)
		fatal("uffdd_connect(%s): %s", opt.socket, err.message);
	struct uffdd_region reg = region_of(&guest);
	reg.uffd = uffd;
	reg.mode = opt.minor ? UFFDD_MODE_MINOR : UFFDD_MODE_MISSING;
	struct uffdd_import_options io = {.strategy = opt.strategy, .policy = opt.policy,
					  .deadline_seconds = opt.deadline};
	uint64_t pages = 0;
	if (uffdd_import(c, opt.session, token, token_len, opt.peer, &io, &reg, 1, &pages, &err))
		fatal("uffdd_import(session %s, peer %s): %s", opt.session, opt.peer, err.message);
	fprintf(stderr, "uffdd-testvm dest: imported session %s (%" PRIu64 " pages)\n", opt.session,
		pages);

	/*
	 * Run the vCPUs and follow the session's events at the same time: if the
	 * session fails while a vCPU waits for a page, the VM has to stop (a vCPU
	 * blocked in the kernel on a page that never comes cannot finish).
	 */
	double t_start = now_s(), t_run = 0;
	vcpus_start(n, OP_VERIFY);
	struct uffdd_event ev;
	memset(&ev, 0, sizeof(ev));
	int rc = 1; /* 1: running, 0: completed, -1: failed/crashed */
	double stop_deadline = 0;
	for (;;) {
		int done = atomic_load(&vcpus_finished) == n;
		if (done && t_run == 0)
			t_run = now_s() - t_start;
		if (atomic_load(&vm_stopping)) {
			/* a vCPU crashed or the session failed: give the others 2 s to leave */
			if (stop_deadline == 0)
				stop_deadline = now_s() + (opt.exits ? 2 : 0.2);
			if (done || now_s() > stop_deadline)
				break;
			usleep(10000);
			continue;
		}
		if (rc == 0) {
			if (done)
				break;
			usleep(5000);
			continue;
		}
		int r = uffdd_next_event(c, &ev, 100, &err);
		if (r < 0) {
			fprintf(stderr, "uffdd-testvm dest: waiting for session events: %s\n", err.message);
			rc = -1;
			vm_stop_all();
		} else if (r > 0 && !strcmp(ev.session, opt.session)) {
			if (ev.kind == UFFDD_EVENT_COMPLETED) {
				rc = 0;
			} else if (ev.kind == UFFDD_EVENT_FAILED || ev.kind == UFFDD_EVENT_CANCELLED) {
				fprintf(stderr, "uffdd-testvm dest: session %s %s: %s\n", opt.session,
					event_name(ev.kind), ev.reason);
				rc = -1;
				vm_stop_all();
			}
		}
	}
	if (t_run == 0)
		t_run = now_s() - t_start;
	int all_done = atomic_load(&vcpus_finished) == n;
	if (all_done) {
		for (int i = 0; i < n; i++)
			pthread_join(vcpus[i].th, NULL);
		vcpus_running = 0;
	}
	struct run_totals t = totals(n);
	if (rc != 0 && !t.crashed && all_done == 0)
		fprintf(stderr, "uffdd-testvm dest: %d vCPU(s) still blocked, abandoning them\n",
			n - atomic_load(&vcpus_finished));
	fprintf(stderr, "uffdd-testvm dest: vCPUs ran %.2fs, session %s\n", t_run,
		rc == 0 ? "completed" : "did not complete");
	uint64_t h = 0, unreadable = 0;
	if (rc == 0)
		h = hash_pages(guest.host, guest.size, &unreadable);
	int hash_ok = rc == 0 && (!have_expect || h == expect);
	int ok = !t.crashed && rc == 0 && t.mismatches == 0 && hash_ok && unreadable == 0 &&
		 t.mce_count == 0;
	char exp_s[32];
	if (have_expect)
		snprintf(exp_s, sizeof(exp_s), "\"%016" PRIx64 "\"", expect);
	else
		snprintf(exp_s, sizeof(exp_s), "null");
	printf("{\"role\":\"dest\",\"verified\":%s,\"vcpus\":%d,\"pages\":%" PRIu64
	       ",\"guest_mismatches\":%" PRIu64 ",\"hash\":\"%016" PRIx64 "\",\"expected_hash\":%s"
	       ",\"exits\":%" PRIu64 ",\"unreadable_pages\":%" PRIu64 ",\"outcome\":\"%s\","
	       "\"vcpu_seconds\":%.3f,\"seconds\":%.3f,\"memory_fault_exits\":%" PRIu64
	       ",\"sigbus_exits\":%" PRIu64 ",\"guest\":\"%s\",",
	       ok ? "true" : "false", n, guest.size / PAGE, t.mismatches, h, exp_s, t.exits,
	       unreadable, rc == 0 ? ev.outcome : (t.crashed ? "crashed" : "failed"), t_run,
	       now_s() - t0, t.memfault_exits, t.sigbus_exits, opt.long_mode ? "64" : "32");
	print_mce_gpas_from(mce_log, mce_log_n);
	printf("}\n");
	fflush(stdout);
	if (!ok) {
		if (t.crashed)
			fprintf(stderr, "uffdd-testvm dest: VM crashed (see above)\n");
		if (t.mismatches)
			fprintf(stderr, "uffdd-testvm dest: %" PRIu64 " guest mismatches, first at page %"
				PRId64 "\n", t.mismatches, t.first_bad);
		if (rc == 0 && have_expect && h != expect)
			fprintf(stderr, "uffdd-testvm dest: RAM hash %016" PRIx64 " != source hash %016"
				PRIx64 "\n", h, expect);
		if (unreadable)
			fprintf(stderr, "uffdd-testvm dest: %" PRIu64 " guest pages unreadable (poisoned "
				"or absent) after completion\n", unreadable);
		if (t.mce_count)
			fprintf(stderr, "uffdd-testvm dest: %" PRIu64 " memory errors injected\n",
				t.mce_count);
	}
	if (t.crashed) {
		/* the VM is gone: end the migration on both hosts (best effort) */
		struct uffdd_error cerr;
		if (uffdd_cancel(c, opt.session, &cerr))
			fprintf(stderr, "uffdd-testvm dest: cancel session %s: %s\n", opt.session,
				cerr.message);
		fprintf(stderr, "uffdd-testvm dest: VM aborted\n");
		uffdd_close(c);
		return 2;
	}
	uffdd_close(c);
	return ok ? 0 : 1;
}
#endif

#ifndef TESTVM_NO_LIBUFFDD
#include "multiboot.c" /* --kernel: a multiboot guest, migrated with its CPU state */
#endif
/* The Firecracker stand-in (issue 17) lives in its own file; it uses the VM above. */
#include "fc_standin.c"

/* ---- main --------------------------------------------------------------- */
static void usage(FILE *f)
{
	fprintf(f,
		"usage:\n"
		"  uffdd-testvm selftest [--memory 64M] [--vcpus N] [--backing anon|shmem|hugetlb]\n"
		"                        [--seed S] [--order seq|rand] [--corrupt-page P]\n"
		"                        [--local-uffd [--exits] [--mode minor] [--mce-page P] [--poison-page P]]\n"
		"  uffdd-testvm source --socket S --session ID --token HEX --memory M --backing B\n"
		"                      --vcpus N --seed S [--lose-pages N]\n"
		"  uffdd-testvm dest --socket S --session ID --token HEX --peer HOST:PORT --memory M\n"
		"                    --backing B --vcpus N --seed S --order seq|rand [--exits]\n"
		"                    [--mode missing|minor] [--expect-hash HEX | --expect-hash-file F]\n"
		"                    [--strategy NAME] [--policy crash|poison] [--deadline SECONDS]\n"
		"                    [--no-mce]\n"
		"  uffdd-testvm firecracker --handover SOCKET --snapshot FILE ...  (README: Firecracker stand-in)\n"
		"  uffdd-testvm write-snapshot --out FILE --memory M [--seed S]\n"
		"common: [--timeout SECONDS] (default 300; 0 = none)\n"
		"        [--long] (64-bit long-mode guest instead of 32-bit protected mode)\n"
		"        [--kernel ELF [--append CMDLINE]] (source/dest: boot a multiboot v1 guest,\n"
		"        native/guest/; dest reads the source's CPU state from stdin)\n");
}

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static void parse_token(const char *s)
{
	size_t n = strlen(s);
	if (n % 2 || n / 2 < 16 || n / 2 > 64)
		fatal("--token must be 32..128 hex digits (16..64 bytes)");
	for (size_t i = 0; i < n / 2; i++) {
		int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
		if (hi < 0 || lo < 0)
			fatal("--token: not hex");
		token[i] = (unsigned char)(hi << 4 | lo);
	}
	token_len = n / 2;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	const char *cmd = argv[1];
	if (!strcmp(cmd, "firecracker"))
		return fc_main(argc, argv);
	if (!strcmp(cmd, "write-snapshot"))
		return fc_write_snapshot_main(argc, argv);
	if (!strcmp(cmd, "source"))
		opt.role = ROLE_SOURCE;
	else if (!strcmp(cmd, "dest"))
		opt.role = ROLE_DEST;
	else if (!strcmp(cmd, "selftest"))
		opt.role = ROLE_SELFTEST;
	else if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help")) {
		usage(stdout);
		return 0;
	} else {
		usage(stderr);
		return 2;
	}
	prog_role = cmd;
	enum { O_SOCKET = 256, O_SESSION, O_TOKEN, O_PEER, O_MEMORY, O_BACKING, O_VCPUS, O_SEED,
	       O_ORDER, O_EXITS, O_MODE, O_LOCAL, O_EXPECT, O_EXPECT_FILE, O_STRATEGY, O_POLICY,
	       O_DEADLINE, O_TIMEOUT, O_MCE, O_CORRUPT, O_MCE_PAGE, O_POISON_PAGE, O_LOSE, O_LONG, O_HELP,
	       O_MB_KERNEL, O_MB_APPEND };
	static const struct option lo[] = {
		{"socket", required_argument, 0, O_SOCKET},
		{"session", required_argument, 0, O_SESSION},
		{"token", required_argument, 0, O_TOKEN},
		{"peer", required_argument, 0, O_PEER},
		{"memory", required_argument, 0, O_MEMORY},
		{"backing", required_argument, 0, O_BACKING},
		{"vcpus", required_argument, 0, O_VCPUS},
		{"seed", required_argument, 0, O_SEED},
		{"order", required_argument, 0, O_ORDER},
		{"exits", no_argument, 0, O_EXITS},
		{"mode", required_argument, 0, O_MODE},
		{"local-uffd", no_argument, 0, O_LOCAL},
		{"expect-hash", required_argument, 0, O_EXPECT},
		{"expect-hash-file", required_argument, 0, O_EXPECT_FILE},
		{"strategy", required_argument, 0, O_STRATEGY},
		{"policy", required_argument, 0, O_POLICY},
		{"deadline", required_argument, 0, O_DEADLINE},
		{"timeout", required_argument, 0, O_TIMEOUT},
		{"no-mce", no_argument, 0, O_MCE},
		{"corrupt-page", required_argument, 0, O_CORRUPT},
		{"mce-page", required_argument, 0, O_MCE_PAGE},
		{"poison-page", required_argument, 0, O_POISON_PAGE},
		{"lose-pages", required_argument, 0, O_LOSE},
		{"long", no_argument, 0, O_LONG},
		{"help", no_argument, 0, O_HELP},
		{"kernel", required_argument, 0, O_MB_KERNEL},
		{"append", required_argument, 0, O_MB_APPEND},
		{0, 0, 0, 0}};
	int c;
	optind = 2;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case O_SOCKET: opt.socket = optarg; break;
		case O_SESSION: opt.session = optarg; break;
		case O_TOKEN: opt.token_hex = optarg; break;
		case O_PEER: opt.peer = optarg; break;
		case O_MEMORY: opt.memory = parse_size(optarg); break;
		case O_BACKING:
			if (!strcmp(optarg, "anon")) opt.backing = BACK_ANON;
			else if (!strcmp(optarg, "shmem")) opt.backing = BACK_SHMEM;
			else if (!strcmp(optarg, "hugetlb")) opt.backing = BACK_HUGETLB;
			else fatal("--backing must be anon, shmem or hugetlb");
			break;
		case O_VCPUS: opt.vcpus = atoi(optarg); break;
		case O_SEED: opt.seed = strtoull(optarg, NULL, 0); break;
		case O_ORDER:
			if (!strcmp(optarg, "seq")) opt.rand_order = 0;
			else if (!strcmp(optarg, "rand")) opt.rand_order = 1;
			else fatal("--order must be seq or rand");
			break;
		case O_EXITS: opt.exits = 1; break;
		case O_MODE:
			if (!strcmp(optarg, "missing")) opt.minor = 0;
			else if (!strcmp(optarg, "minor")) opt.minor = 1;
			else fatal("--mode must be missing or minor");
			break;
		case O_LOCAL: opt.local_uffd = 1; break;
		case O_EXPECT: opt.expect_hash = optarg; break;
		case O_EXPECT_FILE: opt.expect_hash_file = optarg; break;
		case O_STRATEGY: opt.strategy = optarg; break;
		case O_POLICY: opt.policy = optarg; break;
		case O_DEADLINE: opt.deadline = atof(optarg); break;
		case O_TIMEOUT: opt.timeout = atof(optarg); break;
		case O_MCE: opt.mce = 0; break;
		case O_CORRUPT: opt.corrupt_page = strtoll(optarg, NULL, 0); break;
		case O_MCE_PAGE: opt.mce_page = strtoll(optarg, NULL, 0); break;
		case O_POISON_PAGE: opt.poison_page = strtoll(optarg, NULL, 0); break;
		case O_LOSE: opt.lose_pages = strtoull(optarg, NULL, 0); break;
		case O_LONG: opt.long_mode = 1; break;
		case O_HELP: usage(stdout); return 0;
#ifndef TESTVM_NO_LIBUFFDD
		case O_MB_KERNEL: mb_kernel_path = optarg; break;
		case O_MB_APPEND: mb_append = optarg; break;
#endif
		default: usage(stderr); return 2;
		}
	}
	if (optind != argc)
		fatal("unexpected argument '%s'", argv[optind]);
	if (opt.vcpus < 1 || opt.vcpus > MAX_VCPUS)
		fatal("--vcpus must be 1..%d", MAX_VCPUS);
	uint64_t gran = opt.backing == BACK_HUGETLB ? (2ULL << 20) : PAGE;
	if (opt.memory == 0 || opt.memory % gran || opt.memory > MAX_RAM)
		fatal("--memory must be a multiple of %" PRIu64 " KiB, at most 2 GiB", gran >> 10);
	if (opt.memory / PAGE < (uint64_t)opt.vcpus)
		fatal("--memory too small for %d vCPUs", opt.vcpus);
	if (opt.lose_pages && (opt.role != ROLE_SOURCE || opt.lose_pages * PAGE >= opt.memory ||
			       (opt.lose_pages * PAGE) % gran))
		fatal("--lose-pages: source only, fewer pages than guest RAM, whole backing pages");
	if (opt.minor && opt.backing == BACK_ANON)
		fatal("--mode minor needs --backing shmem or hugetlb");
	if (opt.role == ROLE_SELFTEST && (opt.exits || opt.minor) && !opt.local_uffd)
		fatal("--exits and --mode minor need --local-uffd in selftest");
	if (opt.role != ROLE_SELFTEST) {
#ifdef TESTVM_NO_LIBUFFDD
		fatal("built without libuffdd: only selftest is available");
#else
		if (!opt.socket || !opt.session || !opt.token_hex)
			fatal("--socket, --session and --token are required");
		if (opt.role == ROLE_DEST && !opt.peer)
			fatal("--peer is required");
		parse_token(opt.token_hex);
#endif
	}
#ifndef TESTVM_NO_LIBUFFDD
	if (mb_kernel_path && opt.role == ROLE_SELFTEST)
		fatal("--kernel: source and dest only");
#endif
	install_sigbus_handler();
	start_watchdog();
	if (opt.role == ROLE_SELFTEST)
		return run_selftest();
#ifndef TESTVM_NO_LIBUFFDD
	if (mb_kernel_path)
		return opt.role == ROLE_SOURCE ? mb_run_source() : mb_run_dest();
	if (opt.role == ROLE_SOURCE)
		return run_source();
	return run_dest();
#else
	return 2;
#endif
}
