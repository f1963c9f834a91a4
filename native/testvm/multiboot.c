/*
 * uffdd-testvm --kernel: boot a multiboot v1 ELF guest (native/guest/) and
 * migrate it, CPU state included. Included by testvm.c (it uses that file's
 * statics: opt, guest, vcpus, kvm_fd, vm_fd, ...); see native/guest/README.md.
 *
 * The machine: guest RAM is one slot at gpa 0 (--memory bytes, --backing as
 * usual); no firmware slot. The loader copies the ELF's PT_LOAD segments to
 * their physical addresses and writes the multiboot information (memory size,
 * --append command line) at MB_INFO_GPA. The BSP starts at the ELF entry in
 * flat 32-bit protected mode (eax = 0x2BADB002, ebx = information). Devices:
 *   COM1 (0x3f8..0x3ff)  output collected (and printed in the JSON result);
 *                        the line status register reports a received byte
 *                        ("go") on the destination only, RBR reads 'g'
 *   0xf4                 isa-debug-exit: the guest is done (value = its code)
 *   LAPIC ICR (MMIO 0xfee00300): INIT is ignored, a STARTUP IPI starts every
 *                        AP not started yet in real mode at vector << 12
 *
 * source: boot, run until the guest prints "uffdd-guest: written", stop the
 *         vCPUs at an instruction boundary (immediate_exit completes a pending
 *         I/O), save their registers, export RAM, print an "exported" line
 *         with the CPU state (hex), wait for the session's end, print the
 *         pattern hash.
 * dest:   set up the VM on uffd-registered RAM, print a "ready" line, read the
 *         CPU state (one hex line) from stdin, import, restore the vCPUs and
 *         run them; after the guest wrote 0xf4 and the session completed,
 *         print the result with the guest's serial output and timestamps
 *         (CLOCK_REALTIME seconds, comparable with QEMU's QMP timestamps).
 */

#define MB_HEADER_MAGIC 0x1BADB002u
#define MB_BOOT_MAGIC 0x2BADB002u
#define MB_INFO_GPA 0x7000ULL
#define MB_CMDLINE_GPA 0x7100ULL
#define MB_CMDLINE_MAX 0xe00
#define MB_PATTERN_GPA (2ULL << 20) /* the guest's pages: [2 MiB, end of RAM) */
#define MB_LAPIC_GPA 0xFEE00000ULL
#define MB_COM1 0x3f8
#define MB_DEBUG_EXIT 0xf4
#define MB_SERIAL_MAX 8192
#define MB_STATE_MAGIC 0x4d425653u /* "SVBM" */

static const char *mb_kernel_path, *mb_append = "";

struct mb_cpu_state {
	uint32_t started;
	uint32_t pad;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
};

static struct {
	uint64_t entry;
	pthread_mutex_t lock;     /* serial buffer, AP start */
	char serial[MB_SERIAL_MAX];
	size_t serial_len, line_start;
	atomic_int stopping;      /* source: save state at the next exit */
	atomic_int go_pending;    /* dest: a byte waits in COM1's receive buffer */
	atomic_int guest_exited;  /* the guest wrote the debug-exit port */
	int exit_code;
	int started[MAX_VCPUS];
	int saved[MAX_VCPUS];
	struct mb_cpu_state state[MAX_VCPUS];
	double t_written, t_stopped, t_go, t_verdict, t_exit;
	char error[200];
} mb = {.lock = PTHREAD_MUTEX_INITIALIZER};

static double wall_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- loading ------------------------------------------------------------ */
struct mb_elf32_ehdr {
	unsigned char ident[16];
	uint16_t type, machine;
	uint32_t version, entry, phoff, shoff, flags;
	uint16_t ehsize, phentsize, phnum, shentsize, shnum, shstrndx;
};

struct mb_elf32_phdr {
	uint32_t type, offset, vaddr, paddr, filesz, memsz, flags, align;
};

/* Copy the ELF's load segments into guest RAM; returns the entry point. */
static uint64_t mb_load(struct ram *r, const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		fatal("cannot open --kernel %s: %s", path, strerror(errno));
	struct stat st;
	if (fstat(fd, &st) || st.st_size < (off_t)sizeof(struct mb_elf32_ehdr) ||
	    st.st_size > (64 << 20))
		fatal("--kernel %s: not a small ELF file", path);
	size_t size = (size_t)st.st_size;
	unsigned char *img = malloc(size);
	if (!img || read(fd, img, size) != (ssize_t)size)
		fatal("cannot read --kernel %s", path);
	close(fd);
	/* the multiboot header: 4-aligned within the first 8 KiB, magic + flags + checksum */
	int found = 0;
	for (size_t off = 0; off + 12 <= size && off < 8192; off += 4) {
		uint32_t h[3];
		memcpy(h, img + off, 12);
		if (h[0] == MB_HEADER_MAGIC && h[0] + h[1] + h[2] == 0) {
			if (h[1] & (1u << 16))
				fatal("--kernel %s: a.out-kludge multiboot images are not supported", path);
			found = 1;
			break;
		}
	}
	if (!found)
		fatal("--kernel %s: no multiboot v1 header", path);
	struct mb_elf32_ehdr eh;
	memcpy(&eh, img, sizeof(eh));
	if (memcmp(eh.ident, "\177ELF", 4) || eh.ident[4] != 1 || eh.machine != 3 ||
	    eh.phentsize != sizeof(struct mb_elf32_phdr) ||
	    (uint64_t)eh.phoff + (uint64_t)eh.phnum * eh.phentsize > size)
		fatal("--kernel %s: not a 32-bit x86 ELF executable", path);
	for (unsigned i = 0; i < eh.phnum; i++) {
		struct mb_elf32_phdr ph;
		memcpy(&ph, img + eh.phoff + i * sizeof(ph), sizeof(ph));
		if (ph.type != 1 /* PT_LOAD */ || ph.memsz == 0)
			continue;
		if (ph.filesz > ph.memsz || (uint64_t)ph.offset + ph.filesz > size ||
		    (uint64_t)ph.paddr + ph.memsz > MB_PATTERN_GPA || ph.paddr < 0x100000)
			fatal("--kernel %s: segment %u outside [1 MiB, 2 MiB)", path, i);
		memcpy(r->host + ph.paddr, img + ph.offset, ph.filesz);
		memset(r->host + ph.paddr + ph.filesz, 0, ph.memsz - ph.filesz);
	}
	free(img);
	return eh.entry;
}

/* The multiboot information: memory size (flags bit 0) and command line (bit 2). */
static void mb_write_info(struct ram *r)
{
	size_t n = strlen(mb_append);
	if (n >= MB_CMDLINE_MAX)
		fatal("--append: longer than %d bytes", MB_CMDLINE_MAX - 1);
	uint32_t info[5] = {1u | 4u, 640, (uint32_t)(r->size / 1024 - 1024), 0,
			    (uint32_t)MB_CMDLINE_GPA};
	memcpy(r->host + MB_INFO_GPA, info, sizeof(info));
	memcpy(r->host + MB_CMDLINE_GPA, mb_append, n + 1);
}

static void mb_vm_create(void)
{
	vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm_fd < 0)
		fatal_errno("KVM_CREATE_VM");
	ioctl(vm_fd, KVM_SET_TSS_ADDR, TESTVM_TSS_GPA);
}

/* ---- vCPUs -------------------------------------------------------------- */
static void mb_flat_segment(struct kvm_segment *s, uint16_t sel, uint8_t type)
{
	*s = (struct kvm_segment){.base = 0, .limit = 0xffffffff, .selector = sel, .type = type,
				  .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1};
}

/* The BSP as a multiboot loader leaves it. */
static void mb_setup_bsp(struct vcpu *v)
{
	struct kvm_sregs sregs;
	if (ioctl(v->fd, KVM_GET_SREGS, &sregs))
		fatal_errno("KVM_GET_SREGS");
	mb_flat_segment(&sregs.cs, 8, 11);
	mb_flat_segment(&sregs.ds, 16, 3);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.cr0 = (sregs.cr0 | 1) & ~(1ULL << 31); /* PE, no paging */
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs))
		fatal_errno("KVM_SET_SREGS");
	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rflags = 2;
	regs.rax = MB_BOOT_MAGIC;
	regs.rbx = MB_INFO_GPA;
	regs.rip = mb.entry;
	if (ioctl(v->fd, KVM_SET_REGS, &regs))
		fatal_errno("KVM_SET_REGS");
}

/* An AP after INIT + STARTUP IPI: real mode at vector << 12. */
static void mb_setup_ap(struct vcpu *v, uint32_t vector)
{
	struct kvm_sregs sregs;
	if (ioctl(v->fd, KVM_GET_SREGS, &sregs))
		fatal_errno("KVM_GET_SREGS");
	sregs.cs.selector = (uint16_t)(vector << 8);
	sregs.cs.base = (uint64_t)vector << 12;
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs))
		fatal_errno("KVM_SET_SREGS");
	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rflags = 2;
	regs.rip = 0;
	if (ioctl(v->fd, KVM_SET_REGS, &regs))
		fatal_errno("KVM_SET_REGS");
}

static void *mb_vcpu_thread(void *arg);

static void mb_start_thread(struct vcpu *v)
{
	mb.started[v->id] = 1;
	if (pthread_create(&v->th, NULL, mb_vcpu_thread, v))
		fatal("pthread_create failed");
}

static void mb_startup_ipi(uint32_t vector)
{
	pthread_mutex_lock(&mb.lock);
	for (int i = 1; i < opt.vcpus && !atomic_load(&mb.stopping); i++) {
		if (mb.started[i])
			continue;
		mb_setup_ap(&vcpus[i], vector);
		mb_start_thread(&vcpus[i]);
	}
	pthread_mutex_unlock(&mb.lock);
}

/* Source: every running vCPU leaves KVM_RUN at its next instruction boundary. */
static void mb_request_stop(void)
{
	pthread_mutex_lock(&mb.lock);
	if (!atomic_exchange(&mb.stopping, 1))
		for (int i = 0; i < opt.vcpus; i++) {
			if (!mb.started[i])
				continue;
			vcpus[i].run->immediate_exit = 1;
			pthread_kill(vcpus[i].th, SIGUSR1);
		}
	pthread_mutex_unlock(&mb.lock);
}

/* One byte the guest wrote to COM1; a complete line may change the VM's course. */
static void mb_serial_out(char c)
{
	pthread_mutex_lock(&mb.lock);
	if (mb.serial_len < MB_SERIAL_MAX - 1)
		mb.serial[mb.serial_len++] = c;
	mb.serial[mb.serial_len] = 0;
	int written = 0;
	if (c == '\n') {
		const char *line = mb.serial + mb.line_start;
		fprintf(stderr, "uffdd-testvm %s: guest: %.*s", prog_role,
			(int)(mb.serial_len - mb.line_start), line);
		if (!strncmp(line, "uffdd-guest: written", 20))
			written = 1;
		else if (!strncmp(line, "uffdd-guest: verdict", 20))
			mb.t_verdict = wall_s();
		mb.line_start = mb.serial_len;
	}
	pthread_mutex_unlock(&mb.lock);
	if (written && opt.role == ROLE_SOURCE) {
		mb.t_written = wall_s();
		mb_request_stop();
	}
}

static void mb_save(struct vcpu *v)
{
	struct mb_cpu_state *s = &mb.state[v->id];
	if (ioctl(v->fd, KVM_GET_REGS, &s->regs))
		fatal_errno("KVM_GET_REGS");
	if (ioctl(v->fd, KVM_GET_SREGS, &s->sregs))
		fatal_errno("KVM_GET_SREGS");
	s->started = 1;
	mb.saved[v->id] = 1;
}

/* Port I/O of the multiboot machine; returns 1 when this vCPU is done. */
static int mb_port_io(struct vcpu *v, struct kvm_run *run)
{
	unsigned char *data = (unsigned char *)run + run->io.data_offset;
	uint16_t port = run->io.port;
	if (run->io.direction == KVM_EXIT_IO_OUT) {
		if (port == MB_COM1) {
			for (uint32_t i = 0; i < run->io.count; i++)
				mb_serial_out((char)data[i * run->io.size]);
			return 0;
		}
		if (port == MB_DEBUG_EXIT) {
			uint32_t val = 0;
			memcpy(&val, data, run->io.size < 4 ? run->io.size : 4);
			mb.exit_code = (int)val;
			mb.t_exit = wall_s();
			atomic_store(&mb.guest_exited, 1);
			return 1;
		}
		return 0; /* other serial registers: ignored */
	}
	memset(data, 0, (size_t)run->io.size * run->io.count);
	if (port == MB_COM1 + 5) { /* LSR: transmitter empty, data ready when "go" waits */
		data[0] = 0x60 | (atomic_load(&mb.go_pending) ? 1 : 0);
	} else if (port == MB_COM1) { /* RBR */
		if (atomic_exchange(&mb.go_pending, 0)) {
			data[0] = 'g';
			mb.t_go = wall_s();
		}
	}
	(void)v;
	return 0;
}

/* MMIO outside RAM: only the local APIC's ICR does something (STARTUP IPIs). */
static void mb_mmio(struct kvm_run *run)
{
	uint64_t gpa = run->mmio.phys_addr;
	if (!run->mmio.is_write) {
		memset(run->mmio.data, 0, sizeof(run->mmio.data)); /* ICR: delivery idle */
		return;
	}
	if (gpa == MB_LAPIC_GPA + 0x300 && run->mmio.len == 4) {
		uint32_t icr;
		memcpy(&icr, run->mmio.data, 4);
		if (((icr >> 8) & 7) == 6) /* STARTUP */
			mb_startup_ipi(icr & 0xff);
	}
}

static void *mb_vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	double t0 = now_s();
	char where[160];
	for (;;) {
		int r = ioctl(v->fd, KVM_RUN, 0);
		struct kvm_run *run = v->run;
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				if (atomic_load(&mb.stopping)) {
					mb_save(v);
					break;
				}
				continue;
			}
			vcpu_where(v, where, sizeof(where));
			vcpu_crash(v, "KVM_RUN: %s (exit_reason %u, %s)", strerror(errno),
				   run->exit_reason, where);
			break;
		}
		if (run->exit_reason == KVM_EXIT_IO) {
			if (mb_port_io(v, run))
				break;
			continue;
		}
		if (run->exit_reason == KVM_EXIT_MMIO) {
			uint64_t gpa = run->mmio.phys_addr;
			if (gpa >= MB_LAPIC_GPA && gpa < MB_LAPIC_GPA + 0x1000) {
				mb_mmio(run);
				continue;
			}
			vcpu_where(v, where, sizeof(where));
			vcpu_crash(v, "unexpected MMIO %s at gpa %#llx len %u (%s)",
				   run->mmio.is_write ? "write" : "read", run->mmio.phys_addr,
				   run->mmio.len, where);
			break;
		}
		if (run->exit_reason == KVM_EXIT_HLT)
			break; /* an AP that finished, or the guest gave up */
		vcpu_bad_exit(v, run);
		break;
	}
	v->seconds = now_s() - t0;
	atomic_fetch_add(&vcpus_finished, 1);
	return NULL;
}

static void mb_vcpus_create(void)
{
	for (int i = 0; i < opt.vcpus; i++) {
		vcpus[i].id = i;
		vcpus[i].fd = ioctl(vm_fd, KVM_CREATE_VCPU, i);
		if (vcpus[i].fd < 0)
			fatal_errno("KVM_CREATE_VCPU");
		vcpus[i].run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED,
				    vcpus[i].fd, 0);
		if (vcpus[i].run == MAP_FAILED)
			fatal_errno("mmap kvm_run");
	}
}

static void mb_join_started(void)
{
	for (int i = 0; i < opt.vcpus; i++)
		if (mb.started[i])
			pthread_join(vcpus[i].th, NULL);
}

/* ---- results ------------------------------------------------------------ */
static void mb_print_json_string(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c == '\n')
			printf("\\n");
		else if (c < 0x20 || c >= 0x7f)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	putchar('"');
}

static uint64_t mb_pattern_hash(void)
{
	return hash_pages(guest.host + MB_PATTERN_GPA, guest.size - MB_PATTERN_GPA, NULL);
}

static int mb_check_crash(void)
{
	int crashed = 0;
	for (int i = 0; i < opt.vcpus; i++)
		if (vcpus[i].crashed) {
			fprintf(stderr, "uffdd-testvm %s: vCPU %d: %s\n", prog_role, i,
				vcpus[i].crash_reason);
			crashed = 1;
		}
	return crashed;
}

static void mb_check_options(void)
{
	if (opt.memory <= MB_PATTERN_GPA + (uint64_t)opt.vcpus * PAGE)
		fatal("--kernel: --memory must be more than 2 MiB");
	if (opt.exits || opt.long_mode || opt.local_uffd)
		fatal("--kernel: --exits, --long and --local-uffd do not apply");
}

/* ---- source ------------------------------------------------------------- */
static int mb_run_source(void)
{
	mb_check_options();
	double t0 = now_s();
	kvm_open();
	mb_vm_create();
	ram_create(&guest, opt.memory, opt.backing, "testvm-ram");
	set_slot(0, 0, guest.host, guest.size);
	mb.entry = mb_load(&guest, mb_kernel_path);
	mb_write_info(&guest);
	mb_vcpus_create();
	mb_setup_bsp(&vcpus[0]);
	vcpus_running = opt.vcpus;
	pthread_mutex_lock(&mb.lock);
	mb_start_thread(&vcpus[0]);
	pthread_mutex_unlock(&mb.lock);
	/* run until the guest has written its pages, or a vCPU ended (crash, guest exit) */
	while (!atomic_load(&mb.stopping) && atomic_load(&vcpus_finished) == 0)
		usleep(2000);
	int written = atomic_load(&mb.stopping);
	mb_request_stop();
	mb_join_started();
	mb.t_stopped = wall_s();
	vcpus_running = 0;
	if (mb_check_crash() || !written || atomic_load(&mb.guest_exited)) {
		fprintf(stderr, "uffdd-testvm source: the guest did not reach \"written\":\n%s\n",
			mb.serial);
		return 1;
	}
	fprintf(stderr, "uffdd-testvm source: guest booted and wrote its pages in %.2fs\n",
		now_s() - t0);

	struct uffdd_error err;
	uffdd_client *c = uffdd_connect(opt.socket, &err);
	if (!c)
		fatal("uffdd_connect(%s): %s", opt.socket, err.message);
	struct uffdd_region reg = region_of(&guest);
	reg.gpa = 0;
	pid_t pid = guest.memfd >= 0 ? 0 : getpid();
	uint64_t pages = 0;
	if (uffdd_export(c, opt.session, token, token_len, pid, &reg, 1, &pages, &err))
		fatal("uffdd_export(session %s): %s", opt.session, err.message);
	double t_exported = wall_s();
	printf("{\"role\":\"source\",\"event\":\"exported\",\"pages\":%" PRIu64
	       ",\"t_written\":%.6f,\"t_stopped\":%.6f,\"t_exported\":%.6f,\"cpu_state\":\"",
	       pages, mb.t_written, mb.t_stopped, t_exported);
	uint32_t head[2] = {MB_STATE_MAGIC, (uint32_t)opt.vcpus};
	for (size_t i = 0; i < sizeof(head); i++)
		printf("%02x", ((unsigned char *)head)[i]);
	for (int i = 0; i < opt.vcpus; i++) {
		mb.state[i].started = (uint32_t)mb.saved[i];
		for (size_t j = 0; j < sizeof(mb.state[i]); j++)
			printf("%02x", ((unsigned char *)&mb.state[i])[j]);
	}
	printf("\"}\n");
	fflush(stdout);
	struct uffdd_event ev;
	int rc = wait_session_end(c, &ev);
	uint64_t h = mb_pattern_hash();
	printf("{\"role\":\"source\",\"pattern_hash\":\"%016" PRIx64 "\",\"pages\":%" PRIu64
	       ",\"outcome\":\"%s\",\"seconds\":%.3f,\"serial\":",
	       h, guest.size / PAGE, rc == 0 ? ev.outcome : "failed", now_s() - t0);
	mb_print_json_string(mb.serial);
	printf("}\n");
	fflush(stdout);
	uffdd_close(c);
	return rc == 0 ? 0 : 1;
}

/* ---- destination -------------------------------------------------------- */
static int mb_hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* The source's "cpu_state" hex (a line on stdin: the hex itself or the JSON line). */
static void mb_read_state(void)
{
	size_t want = 8 + (size_t)opt.vcpus * sizeof(struct mb_cpu_state);
	size_t cap = 2 * want + 4096;
	char *line = malloc(cap);
	if (!line || !fgets(line, (int)cap, stdin))
		fatal("no CPU state on stdin");
	char *p = strstr(line, "\"cpu_state\":\"");
	p = p ? p + 13 : line;
	unsigned char *buf = malloc(want);
	if (!buf)
		fatal("out of memory");
	for (size_t i = 0; i < want; i++) {
		int hi = mb_hexval(p[2 * i]), lo = hi < 0 ? -1 : mb_hexval(p[2 * i + 1]);
		if (hi < 0 || lo < 0)
			fatal("CPU state on stdin: short or not hex (%d vCPUs expected)", opt.vcpus);
		buf[i] = (unsigned char)(hi << 4 | lo);
	}
	uint32_t head[2];
	memcpy(head, buf, 8);
	if (head[0] != MB_STATE_MAGIC || head[1] != (uint32_t)opt.vcpus)
		fatal("CPU state on stdin: not from a --kernel source with %d vCPUs", opt.vcpus);
	memcpy(mb.state, buf + 8, want - 8);
	free(buf);
	free(line);
}

static int mb_run_dest(void)
{
	mb_check_options();
	double t0 = now_s();
	kvm_open();
	mb_vm_create();
	ram_create(&guest, opt.memory, opt.backing, "testvm-ram");
	int uffd = dest_uffd(0); /* the multiboot guest takes no vCPU-exit path */
	set_slot(0, 0, guest.host, guest.size);
	mb_vcpus_create();
	struct uffdd_error err;
	uffdd_client *c = uffdd_connect(opt.socket, &err);
	if (!c)
		fatal("uffdd_connect(%s): %s", opt.socket, err.message);
	double t_ready = wall_s();
	printf("{\"role\":\"dest\",\"event\":\"ready\",\"t_ready\":%.6f}\n", t_ready);
	fflush(stdout);

	mb_read_state();
	double t_state = wall_s();
	struct uffdd_region reg = region_of(&guest);
	reg.gpa = 0;
	reg.uffd = uffd;
	reg.mode = opt.minor ? UFFDD_MODE_MINOR : UFFDD_MODE_MISSING;
	struct uffdd_import_options io = {.strategy = opt.strategy, .policy = opt.policy,
					  .deadline_seconds = opt.deadline};
	uint64_t pages = 0;
	if (uffdd_import(c, opt.session, token, token_len, opt.peer, &io, &reg, 1, &pages, &err))
		fatal("uffdd_import(session %s, peer %s): %s", opt.session, opt.peer, err.message);
	double t_accepted = wall_s();
	atomic_store(&mb.go_pending, 1); /* the host's "go": the guest runs here now */
	int running = 0;
	pthread_mutex_lock(&mb.lock);
	for (int i = 0; i < opt.vcpus; i++) {
		if (!mb.state[i].started)
			continue;
		if (ioctl(vcpus[i].fd, KVM_SET_SREGS, &mb.state[i].sregs))
			fatal_errno("KVM_SET_SREGS");
		if (ioctl(vcpus[i].fd, KVM_SET_REGS, &mb.state[i].regs))
			fatal_errno("KVM_SET_REGS");
		mb_start_thread(&vcpus[i]);
		running++;
	}
	pthread_mutex_unlock(&mb.lock);
	vcpus_running = opt.vcpus;

	/* follow the session while the vCPUs run; see run_dest for why both at once */
	struct uffdd_event ev;
	memset(&ev, 0, sizeof(ev));
	int rc = 1; /* 1: running, 0: completed, -1: failed */
	double t_completed = 0, t_vcpus_done = 0;
	for (;;) {
		int done = atomic_load(&vcpus_finished) >= running;
		if (done && t_vcpus_done == 0)
			t_vcpus_done = wall_s();
		if (rc <= 0 && (done || rc < 0))
			break;
		if (rc == 0) {
			usleep(2000);
			continue;
		}
		int r = uffdd_next_event(c, &ev, 50, &err);
		if (r < 0) {
			fprintf(stderr, "uffdd-testvm dest: waiting for session events: %s\n", err.message);
			rc = -1;
		} else if (r > 0 && !strcmp(ev.session, opt.session)) {
			if (ev.kind == UFFDD_EVENT_COMPLETED) {
				rc = 0;
				t_completed = wall_s();
			} else if (ev.kind == UFFDD_EVENT_FAILED) {
				fprintf(stderr, "uffdd-testvm dest: session %s failed: %s\n", opt.session,
					ev.reason);
				rc = -1;
			}
		}
	}
	int crashed = mb_check_crash();
	if (rc == 0)
		mb_join_started();
	uint64_t h = 0;
	double t_hash = 0;
	if (rc == 0) {
		double t = now_s();
		h = mb_pattern_hash();
		t_hash = now_s() - t;
	}
	int ok = rc == 0 && !crashed && atomic_load(&mb.guest_exited) && mb.exit_code == 0;
	printf("{\"role\":\"dest\",\"verified\":%s,\"outcome\":\"%s\",\"vcpus\":%d,\"pages\":%" PRIu64
	       ",\"pattern_hash\":\"%016" PRIx64 "\",\"guest_exit_code\":%d,\"t_ready\":%.6f,"
	       "\"t_state\":%.6f,\"t_accepted\":%.6f,\"t_completed\":%.6f,\"t_go\":%.6f,"
	       "\"t_verdict\":%.6f,\"t_guest_exit\":%.6f,\"t_vcpus_done\":%.6f,"
	       "\"hash_seconds\":%.3f,\"seconds\":%.3f,\"serial\":",
	       ok ? "true" : "false", rc == 0 ? ev.outcome : (crashed ? "crashed" : "failed"),
	       opt.vcpus, guest.size / PAGE, h, atomic_load(&mb.guest_exited) ? mb.exit_code : -1,
	       t_ready, t_state, t_accepted, t_completed, mb.t_go, mb.t_verdict, mb.t_exit,
	       t_vcpus_done, t_hash, now_s() - t0);
	mb_print_json_string(mb.serial);
	printf("}\n");
	fflush(stdout);
	if (rc != 0) {
		uffdd_close(c);
		_exit(2); /* vCPUs may still be blocked on pages that never come */
	}
	uffdd_close(c);
	return ok ? 0 : 1;
}
