/*
 * Firecracker stand-in (issue 17): `uffdd-testvm firecracker`.
 *
 * Included by testvm.c (it uses that file's VM, vCPUs and SIGBUS guard). It does
 * what Firecracker 1.x does when it restores a snapshot with a "Uffd" memory
 * backend, in the same order, and then runs a real KVM guest on that memory:
 *
 *   1. guest memory: one private anonymous mapping per region
 *      (MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, with --hugetlb also
 *      MAP_HUGETLB|MAP_HUGE_2MB);
 *   2. the uffd from /dev/userfaultfd (USERFAULTFD_IOC_NEW) if that node exists,
 *      else userfaultfd(2), O_CLOEXEC|O_NONBLOCK; UFFDIO_API with features =
 *      UFFD_FEATURE_EVENT_REMOVE and nothing else; UFFDIO_REGISTER_MODE_MISSING
 *      for every region;
 *   3. connect(SOCK_STREAM) to the handover socket and ONE sendmsg: the JSON
 *      array of GuestRegionUffdMapping, no length prefix, no terminator, and
 *      SCM_RIGHTS with exactly one fd (the uffd);
 *   4. the socket stays open and is never written or read again; the uffd copy
 *      is kept;
 *   5. (the handler learns our pid from SO_PEERCRED: nothing to do here);
 *   6. --balloon: madvise(MADV_DONTNEED) of a range mid-restore, as balloon
 *      inflation does; it must read back as zeros (with --hold, "balloon" on
 *      stdin does the same at any later time).
 *
 * Differences from the real Firecracker are listed in native/testvm/README.md.
 * Page contents are the testvm pattern, written by `uffdd-testvm write-snapshot`.
 */

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << 26)
#endif

#define FC_MAX_REGIONS 8

struct fc_range {
	uint64_t off, len; /* bytes from the start of guest RAM (= of the snapshot file) */
	int set;
};

static struct {
	const char *handover, *snapshot;
	int regions;
	int hugetlb;
	struct fc_range balloon, late_balloon;
	int wait_go, hold;
} fc = {.regions = 1};

struct fc_region {
	char *host;
	uint64_t size, offset;
};
static struct fc_region fc_reg[FC_MAX_REGIONS];

/* Snapshot file contents: the testvm page pattern, word 0 and 1 included. */
static void fc_pattern_page(uint64_t seed, uint64_t p, uint64_t *w)
{
	uint64_t base = splitmix64(seed ^ (p << 16));
	for (uint64_t i = 1; i < PAGE / 8; i++)
		w[i] = base + i * 0xD6E8FEB86659FD93ULL;
	w[0] = (uint64_t)ident_word(seed, p) | (p & 0xffffffffULL) << 32;
}

static void fc_parse_range(const char *s, struct fc_range *r, const char *what)
{
	const char *colon = strchr(s, ':');
	if (!colon)
		fatal("%s wants OFFSET:LENGTH (bytes, K/M/G suffixes)", what);
	char off[64];
	size_t n = (size_t)(colon - s);
	if (n == 0 || n >= sizeof(off))
		fatal("%s: bad offset in '%s'", what, s);
	memcpy(off, s, n);
	off[n] = 0;
	r->off = parse_size(off);
	r->len = parse_size(colon + 1);
	r->set = 1;
}

/* `uffdd-testvm write-snapshot --out FILE --memory M --seed S` */
static int fc_write_snapshot_main(int argc, char **argv)
{
	prog_role = "write-snapshot";
	enum { W_OUT = 256, W_MEMORY, W_SEED };
	static const struct option lo[] = {{"out", required_argument, 0, W_OUT},
					   {"memory", required_argument, 0, W_MEMORY},
					   {"seed", required_argument, 0, W_SEED},
					   {0, 0, 0, 0}};
	const char *out = NULL;
	uint64_t memory = 64ULL << 20, seed = 1;
	int c;
	optind = 2;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case W_OUT: out = optarg; break;
		case W_MEMORY: memory = parse_size(optarg); break;
		case W_SEED: seed = strtoull(optarg, NULL, 0); break;
		default: return 2;
		}
	}
	if (!out || optind != argc || memory == 0 || memory % PAGE)
		fatal("usage: write-snapshot --out FILE --memory M (multiple of 4 KiB) [--seed S]");
	int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		fatal_errno("open --out");
	enum { CHUNK = 256 };
	static uint64_t buf[CHUNK * PAGE / 8];
	for (uint64_t p = 0; p < memory / PAGE;) {
		uint64_t n = memory / PAGE - p < CHUNK ? memory / PAGE - p : CHUNK;
		for (uint64_t i = 0; i < n; i++)
			fc_pattern_page(seed, p + i, buf + i * (PAGE / 8));
		size_t len = (size_t)(n * PAGE), done = 0;
		while (done < len) {
			ssize_t w = pwrite(fd, (char *)buf + done, len - done, (off_t)(p * PAGE + done));
			if (w <= 0)
				fatal_errno("pwrite snapshot");
			done += (size_t)w;
		}
		p += n;
	}
	if (close(fd))
		fatal_errno("close snapshot");
	printf("{\"role\":\"write-snapshot\",\"pages\":%" PRIu64 ",\"bytes\":%" PRIu64 "}\n",
	       memory / PAGE, memory);
	return 0;
}

/* Step 2: the uffd as Firecracker (the userfaultfd crate) makes it. */
static int fc_uffd_open(const char **from)
{
	int fd;
	if (access("/dev/userfaultfd", F_OK) == 0) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0)
			fatal_errno("open /dev/userfaultfd");
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		if (fd < 0)
			fatal_errno("USERFAULTFD_IOC_NEW");
		close(dev);
		*from = "dev";
	} else {
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
		if (fd < 0)
			fatal_errno("userfaultfd(2)");
		*from = "syscall";
	}
	struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
	if (ioctl(fd, UFFDIO_API, &api))
		fatal_errno("UFFDIO_API(UFFD_FEATURE_EVENT_REMOVE)");
	if (!(api.features & UFFD_FEATURE_EVENT_REMOVE))
		fatal("the kernel did not grant UFFD_FEATURE_EVENT_REMOVE");
	return fd;
}

/* Step 3: the one sendmsg. Returns the connected socket (kept open, never used again). */
static int fc_handover(int uffd, uint64_t page_size, size_t *payload_len)
{
	static char payload[FC_MAX_REGIONS * 160 + 8];
	size_t n = 0;
	n += (size_t)snprintf(payload + n, sizeof(payload) - n, "[");
	for (int i = 0; i < fc.regions; i++)
		n += (size_t)snprintf(payload + n, sizeof(payload) - n,
				      "%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64
				      ",\"offset\":%" PRIu64 ",\"page_size\":%" PRIu64
				      ",\"page_size_kib\":%" PRIu64 "}",
				      i ? "," : "", (uint64_t)(uintptr_t)fc_reg[i].host, fc_reg[i].size,
				      fc_reg[i].offset, page_size, page_size);
	n += (size_t)snprintf(payload + n, sizeof(payload) - n, "]");
	*payload_len = n;

	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		fatal_errno("socket(AF_UNIX)");
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(fc.handover) >= sizeof(sa.sun_path))
		fatal("--handover path too long");
	strcpy(sa.sun_path, fc.handover);
	if (connect(s, (struct sockaddr *)&sa, sizeof(sa)))
		fatal_errno("connect to the handover socket");
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	memset(&u, 0, sizeof(u));
	struct iovec iov = {.iov_base = payload, .iov_len = n};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
			     .msg_controllen = sizeof(u.buf)};
	struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &uffd, sizeof(int));
	ssize_t w = sendmsg(s, &msg, MSG_NOSIGNAL);
	if (w < 0)
		fatal_errno("sendmsg (handover)");
	if ((size_t)w != n)
		fatal("sendmsg sent %zd of %zu bytes", w, n);
	return s;
}

/* Pages of guest RAM present in our page tables (mincore), in 4 KiB units. */
static uint64_t fc_resident_pages(void)
{
	uint64_t total = 0;
	static unsigned char vec[1 << 16];
	for (int i = 0; i < fc.regions; i++) {
		uint64_t step = (uint64_t)sizeof(vec) * PAGE;
		for (uint64_t off = 0; off < fc_reg[i].size; off += step) {
			uint64_t len = fc_reg[i].size - off < step ? fc_reg[i].size - off : step;
			if (mincore(fc_reg[i].host + off, len, vec))
				fatal_errno("mincore");
			for (uint64_t j = 0; j < len / PAGE; j++)
				total += vec[j] & 1;
		}
	}
	return total;
}

static void fc_check_range(const struct fc_range *r, const char *what)
{
	if (!r->set)
		return;
	if (r->len == 0 || r->off % guest.page_size || r->len % guest.page_size ||
	    r->off + r->len > guest.size)
		fatal("%s: the range must lie inside guest RAM and be aligned to %" PRIu64 " bytes",
		      what, guest.page_size);
}

static int fc_in_range(const struct fc_range *r, uint64_t off)
{
	return r->set && off >= r->off && off < r->off + r->len;
}

/* Read one byte of guest RAM at off (a blocking uffd fault if absent). */
static int fc_touch(uint64_t off)
{
	char b;
	return guarded_copy(&b, guest.host + off, 1);
}

struct fc_check {
	uint64_t mismatched, unreadable, zero_pages;
	int64_t first_mismatch, first_unreadable;
};

/* Every byte of [off, off+len) against the snapshot file, or against zeros in
 * ballooned ranges (the late one once late is set). The reads fault absent pages in
 * through the handler. */
static void fc_verify(int snap, uint64_t off0, uint64_t len, int late, struct fc_check *ck)
{
	enum { CHUNK = 256 };
	static char want[CHUNK * PAGE], got[PAGE];
	static const char zero[PAGE];
	for (uint64_t off = off0; off < off0 + len;) {
		uint64_t n = off0 + len - off < CHUNK * PAGE ? off0 + len - off : CHUNK * PAGE;
		ssize_t r = pread(snap, want, (size_t)n, (off_t)off);
		if (r != (ssize_t)n)
			fatal("pread snapshot at %" PRIu64 ": %s", off, r < 0 ? strerror(errno) : "short");
		for (uint64_t p = 0; p < n / PAGE; p++) {
			uint64_t o = off + p * PAGE;
			int ballooned = fc_in_range(&fc.balloon, o) ||
					(late && fc_in_range(&fc.late_balloon, o));
			const char *exp = ballooned ? zero : want + p * PAGE;
			if (guarded_copy(got, guest.host + o, PAGE)) {
				if (ck->first_unreadable < 0)
					ck->first_unreadable = (int64_t)(o / PAGE);
				ck->unreadable++;
				continue;
			}
			if (memcmp(got, exp, PAGE)) {
				if (ck->first_mismatch < 0)
					ck->first_mismatch = (int64_t)(o / PAGE);
				ck->mismatched++;
			} else if (ballooned) {
				ck->zero_pages++;
			}
		}
		off += n;
	}
}

/* Read one command line from stdin (EOF: ""); gives up after the --timeout watchdog. */
static int fc_read_line(char *line, size_t n)
{
	size_t got = 0;
	while (got + 1 < n) {
		ssize_t r = read(0, line + got, 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0 || line[got] == '\n')
			break;
		got++;
	}
	line[got] = 0;
	return (int)got;
}

/*
 * --hold: stay alive like a running Firecracker (socket and uffd open) and obey
 * stdin: "balloon OFF:LEN" drops a range with MADV_DONTNEED and reads it back,
 * which must give zeros however late it comes (the handler's resident state);
 * "quit" or EOF exits.
 */
static void fc_hold(int snap)
{
	char line[128];
	while (fc_read_line(line, sizeof(line)) > 0) {
		if (!strncmp(line, "balloon ", 8)) {
			fc_parse_range(line + 8, &fc.late_balloon, "balloon");
			fc_check_range(&fc.late_balloon, "balloon");
			if (madvise(guest.host + fc.late_balloon.off, fc.late_balloon.len, MADV_DONTNEED))
				fatal_errno("madvise(MADV_DONTNEED) balloon");
			struct fc_check ck = {0, 0, 0, -1, -1};
			double t = now_s();
			fc_verify(snap, fc.late_balloon.off, fc.late_balloon.len, 1, &ck);
			printf("{\"role\":\"firecracker\",\"event\":\"balloon\",\"pages\":%" PRIu64
			       ",\"zero_pages\":%" PRIu64 ",\"mismatches\":%" PRIu64 ",\"unreadable\":%"
			       PRIu64 ",\"seconds\":%.3f}\n", fc.late_balloon.len / PAGE, ck.zero_pages,
			       ck.mismatched, ck.unreadable, now_s() - t);
			fflush(stdout);
		} else if (!strcmp(line, "quit")) {
			return;
		} else {
			fatal("--hold: unknown command '%s'", line);
		}
	}
}

static void fc_usage(FILE *f)
{
	fprintf(f,
		"usage: uffdd-testvm firecracker --handover SOCKET --snapshot FILE [--regions N]\n"
		"           [--vcpus K] [--hugetlb] [--seed S] [--order seq|rand] [--long]\n"
		"           [--balloon OFF:LEN] [--wait-go] [--hold] [--timeout S]\n"
		"           [--working-set PCT]  (with --order rand: each vCPU reads only PCT%%\n"
		"           of its pages, the same scattered ones for the same --seed)\n");
}

static int fc_main(int argc, char **argv)
{
	prog_role = "firecracker";
	opt.role = ROLE_FIRECRACKER;
	enum { F_HANDOVER = 256, F_SNAPSHOT, F_REGIONS, F_VCPUS, F_HUGETLB, F_SEED, F_ORDER,
	       F_LONG, F_BALLOON, F_HOLD, F_WAIT_GO, F_TIMEOUT, F_WORKING_SET, F_HELP };
	static const struct option lo[] = {
		{"handover", required_argument, 0, F_HANDOVER},
		{"snapshot", required_argument, 0, F_SNAPSHOT},
		{"regions", required_argument, 0, F_REGIONS},
		{"vcpus", required_argument, 0, F_VCPUS},
		{"hugetlb", no_argument, 0, F_HUGETLB},
		{"seed", required_argument, 0, F_SEED},
		{"order", required_argument, 0, F_ORDER},
		{"long", no_argument, 0, F_LONG},
		{"balloon", required_argument, 0, F_BALLOON},
		{"hold", no_argument, 0, F_HOLD},
		{"wait-go", no_argument, 0, F_WAIT_GO},
		{"timeout", required_argument, 0, F_TIMEOUT},
		{"working-set", required_argument, 0, F_WORKING_SET},
		{"help", no_argument, 0, F_HELP},
		{0, 0, 0, 0}};
	int c;
	optind = 2;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case F_HANDOVER: fc.handover = optarg; break;
		case F_SNAPSHOT: fc.snapshot = optarg; break;
		case F_REGIONS: fc.regions = atoi(optarg); break;
		case F_VCPUS: opt.vcpus = atoi(optarg); break;
		case F_HUGETLB: fc.hugetlb = 1; break;
		case F_SEED: opt.seed = strtoull(optarg, NULL, 0); break;
		case F_ORDER:
			if (!strcmp(optarg, "seq")) opt.rand_order = 0;
			else if (!strcmp(optarg, "rand")) opt.rand_order = 1;
			else fatal("--order must be seq or rand");
			break;
		case F_LONG: opt.long_mode = 1; break;
		case F_BALLOON: fc_parse_range(optarg, &fc.balloon, "--balloon"); break;
		case F_HOLD: fc.hold = 1; break;
		case F_WAIT_GO: fc.wait_go = 1; break;
		case F_TIMEOUT: opt.timeout = atof(optarg); break;
		case F_WORKING_SET: opt.working_set_pct = atoi(optarg); break;
		case F_HELP: fc_usage(stdout); return 0;
		default: fc_usage(stderr); return 2;
		}
	}
	if (optind != argc || !fc.handover || !fc.snapshot) {
		fc_usage(stderr);
		return 2;
	}
	if (fc.regions < 1 || fc.regions > FC_MAX_REGIONS)
		fatal("--regions must be 1..%d", FC_MAX_REGIONS);
	if (opt.vcpus < 1 || opt.vcpus > MAX_VCPUS)
		fatal("--vcpus must be 1..%d", MAX_VCPUS);
	if (opt.working_set_pct < 1 || opt.working_set_pct > 100)
		fatal("--working-set must be 1..100");
	if (opt.working_set_pct < 100 && (!opt.rand_order || fc.balloon.set))
		fatal("--working-set needs --order rand and no --balloon");
	uint64_t pg = fc.hugetlb ? (2ULL << 20) : PAGE;

	/* The snapshot file gives guest RAM's size, as the snapshot state does for
	 * Firecracker; regions split it evenly (the last takes the remainder). */
	int snap = open(fc.snapshot, O_RDONLY | O_CLOEXEC);
	if (snap < 0)
		fatal_errno("open --snapshot");
	struct stat st;
	if (fstat(snap, &st))
		fatal_errno("fstat --snapshot");
	uint64_t total = (uint64_t)st.st_size;
	if (total == 0 || total % pg || total > MAX_RAM || total / pg < (uint64_t)fc.regions)
		fatal("snapshot size %" PRIu64 ": must be a non-zero multiple of %" PRIu64
		      " bytes, at most 2 GiB, at least one page per region", total, pg);
	if (total / PAGE < (uint64_t)opt.vcpus)
		fatal("snapshot too small for %d vCPUs", opt.vcpus);

	install_sigbus_handler();
	start_watchdog();
	double t0 = now_s();
	kvm_open();
	vm_create();

	/* Step 1. The regions are laid out back to back inside one reservation so that
	 * testvm's vCPU code can treat guest RAM as one range; each region is still its
	 * own mmap with Firecracker's flags. */
	size_t resv = (size_t)(total + pg);
	char *r0 = mmap(NULL, resv, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (r0 == MAP_FAILED)
		fatal_errno("mmap reservation");
	char *base = (char *)(((uintptr_t)r0 + pg - 1) & ~(uintptr_t)(pg - 1));
	int mflags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED;
	if (fc.hugetlb)
		mflags |= MAP_HUGETLB | MAP_HUGE_2MB;
	uint64_t per = (total / (uint64_t)fc.regions) & ~(pg - 1), off = 0;
	for (int i = 0; i < fc.regions; i++) {
		fc_reg[i].offset = off;
		fc_reg[i].size = i == fc.regions - 1 ? total - off : per;
		fc_reg[i].host = mmap(base + off, fc_reg[i].size, PROT_READ | PROT_WRITE, mflags, -1, 0);
		if (fc_reg[i].host == MAP_FAILED)
			fatal_errno(fc.hugetlb ? "mmap region (MAP_HUGETLB)" : "mmap region");
		off += fc_reg[i].size;
	}
	guest.host = base;
	guest.size = total;
	guest.page_size = pg;
	guest.memfd = -1;
	fc_check_range(&fc.balloon, "--balloon");

	/* Step 2. */
	const char *uffd_from;
	int uffd = fc_uffd_open(&uffd_from);
	for (int i = 0; i < fc.regions; i++)
		uffd_register_range(uffd, fc_reg[i].host, fc_reg[i].size, UFFDIO_REGISTER_MODE_MISSING);

	/* Step 3 and 4: hand over; keep the socket and our uffd for the VM's life. */
	size_t payload_len;
	int sock = fc_handover(uffd, pg, &payload_len);
	double t_handover = now_s();
	printf("{\"role\":\"firecracker\",\"event\":\"handover\",\"pid\":%d,\"regions\":%d,"
	       "\"pages\":%" PRIu64 ",\"payload_bytes\":%zu,\"uffd_from\":\"%s\"}\n",
	       (int)getpid(), fc.regions, total / PAGE, payload_len, uffd_from);
	fflush(stdout);
	if (fc.wait_go) {
		/* the test does something between the handover and the guest's start */
		char line[64];
		if (fc_read_line(line, sizeof(line)) <= 0 || strcmp(line, "go"))
			fatal("--wait-go: stdin ended or said '%s' instead of \"go\"", line);
	}

	/* Step 6, mid-restore: the first page of the range is faulted in (so it held
	 * snapshot bytes), then the range is dropped as balloon inflation does. */
	uint64_t resident_before_balloon = 0;
	if (fc.balloon.set) {
		if (fc_touch(fc.balloon.off))
			fatal("first page of --balloon unreadable");
		resident_before_balloon = fc_resident_pages();
		if (madvise(guest.host + fc.balloon.off, fc.balloon.len, MADV_DONTNEED))
			fatal_errno("madvise(MADV_DONTNEED) --balloon");
	}

	/* The guest: one KVM slot per region, contiguous guest-physical RAM. */
	for (int i = 0; i < fc.regions; i++)
		set_slot((uint32_t)(1 + i), TESTVM_RAM_GPA + fc_reg[i].offset, fc_reg[i].host,
			 fc_reg[i].size);
	int n = opt.vcpus;
	vcpus_create(n);
	double t_run = vcpus_run(n, OP_VERIFY);
	struct run_totals t = totals(n);

	/* The guest read word 0 of every page; in the ballooned range it must read 0. */
	uint64_t expected_guest_mismatches = 0;
	if (fc.balloon.set)
		for (uint64_t o = fc.balloon.off; o < fc.balloon.off + fc.balloon.len; o += PAGE)
			expected_guest_mismatches += ident_word(opt.seed, o / PAGE) != 0;

	double t_verify = now_s();
	struct fc_check ck = {0, 0, 0, -1, -1};
	fc_verify(snap, 0, total, 0, &ck);
	double verify_s = now_s() - t_verify;

	uint64_t balloon_pages = (fc.balloon.set ? fc.balloon.len / PAGE : 0);
	int guest_ok = t.mismatches == expected_guest_mismatches;
	int ok = !t.crashed && guest_ok && ck.mismatched == 0 && ck.unreadable == 0 &&
		 t.mce_count == 0 && ck.zero_pages == balloon_pages;
	printf("{\"role\":\"firecracker\",\"verified\":%s,\"vcpus\":%d,\"regions\":%d,"
	       "\"working_set_pct\":%d,"
	       "\"page_size\":%" PRIu64 ",\"pages\":%" PRIu64 ",\"guest_mismatches\":%" PRIu64
	       ",\"expected_guest_mismatches\":%" PRIu64 ",\"first_guest_mismatch\":%" PRId64
	       ",\"host_mismatches\":%" PRIu64 ",\"first_host_mismatch\":%" PRId64
	       ",\"unreadable_pages\":%" PRIu64 ",\"first_unreadable\":%" PRId64
	       ",\"balloon_pages\":%" PRIu64 ",\"balloon_zero_pages\":%" PRIu64
	       ",\"resident_before_balloon\":%" PRIu64 ",\"exits\":%" PRIu64
	       ",\"crashed\":%s,\"vcpu_seconds\":%.3f,\"verify_seconds\":%.3f"
	       ",\"restore_seconds\":%.3f,\"seconds\":%.3f,\"uffd_from\":\"%s\",\"guest\":\"%s\",",
	       ok ? "true" : "false", n, fc.regions, opt.working_set_pct, pg, total / PAGE, t.mismatches,
	       expected_guest_mismatches, t.first_bad, ck.mismatched, ck.first_mismatch,
	       ck.unreadable, ck.first_unreadable, balloon_pages, ck.zero_pages,
	       resident_before_balloon, t.exits, t.crashed ? "true" : "false", t_run, verify_s,
	       t_verify + verify_s - t_handover, now_s() - t0, uffd_from,
	       opt.long_mode ? "64" : "32");
	print_mce_gpas_from(mce_log, mce_log_n);
	printf("}\n");
	fflush(stdout);
	if (!ok)
		fprintf(stderr, "uffdd-testvm firecracker: NOT byte-exact: %" PRIu64 " pages differ "
			"(first %" PRId64 "), %" PRIu64 " unreadable (first %" PRId64 "), guest saw %"
			PRIu64 " bad words (expected %" PRIu64 "), %" PRIu64 " memory errors, %" PRIu64
			" of %" PRIu64 " ballooned pages zero\n", ck.mismatched, ck.first_mismatch,
			ck.unreadable, ck.first_unreadable, t.mismatches, expected_guest_mismatches,
			t.mce_count, ck.zero_pages, balloon_pages);
	int rc = t.crashed ? 2 : ok ? 0 : 1;
	if (fc.hold)
		fc_hold(snap);
	/* Firecracker closes the socket and the uffd only when it exits: so do we. */
	(void)sock;
	(void)uffd;
	return rc;
}
