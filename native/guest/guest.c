/*
 * uffdd-guest: one small guest program that both QEMU (-kernel) and
 * uffdd-testvm (--kernel) boot, so that a postcopy migration of the same guest
 * doing the same work can be timed on both VMMs (uffdd bench --scenario
 * versus-qemu). A multiboot v1 ELF (32-bit protected mode, flat segments, no
 * paging); see README.md in this directory for the protocol.
 *
 * Command line (multiboot cmdline, QEMU -append): seed=N order=seq|rand cpus=N
 *
 *   1. (source) every vCPU writes one 32-bit word into each 4 KiB page of its
 *      slice of [2 MiB, end of RAM): word(page) = page * K + seed. The BSP
 *      prints "uffdd-guest: written ..." on COM1 when all are done.
 *   2. The BSP polls COM1's line status register for a received byte ("go"),
 *      which the host sends after the switchover; the APs wait for the BSP.
 *   3. (destination) every vCPU reads the word of each page of its slice, in
 *      ascending or LCG order, and counts the wrong ones; the BSP prints
 *      "uffdd-guest: verdict bad=B checked=C cpus=N" and writes B != 0 to the
 *      isa-debug-exit port 0xf4 (QEMU exits; uffdd-testvm stops the VM).
 *
 * Under nested KVM (kvm_pvm) the guest runs at about a million emulated
 * instructions a second, so each page costs a handful of instructions.
 */
#include <stdint.h>

#define MB_BOOT_MAGIC 0x2BADB002u
#define PAGE 4096u
#define FIRST_ADDR 0x200000u /* pages below 2 MiB hold the image and boot data */
#define K 0x9E3779B1u
#define COM1 0x3f8
#define DEBUG_EXIT 0xf4
#define TRAMPOLINE 0x8000u
#define LAPIC 0xFEE00000u
#define MAX_CPUS 8

struct multiboot_info {
	uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
};

extern const char guest_trampoline[], guest_trampoline_end[];

volatile uint32_t guest_cpus_up = 1; /* the BSP is cpu 0; APs take ids in start.S */
static volatile uint32_t written_cpus, verified_cpus, go_flag;
static volatile uint32_t bad_of[MAX_CPUS], checked_of[MAX_CPUS];
static uint32_t seed = 1, rand_order, ncpus = 1, first_page, npages;

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void pause(void)
{
	__asm__ volatile("pause" ::: "memory");
}

static void delay(uint32_t n)
{
	for (volatile uint32_t i = 0; i < n; i++)
		;
}

static void putc_serial(char c)
{
	while (!(inb(COM1 + 5) & 0x20))
		pause();
	outb(COM1, (uint8_t)c);
}

static void puts_serial(const char *s)
{
	while (*s)
		putc_serial(*s++);
}

static void putu(uint32_t v)
{
	char buf[12];
	int i = 0;
	do {
		buf[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		putc_serial(buf[--i]);
}

static void put_kv(const char *key, uint32_t v)
{
	puts_serial(key);
	putu(v);
}

static void __attribute__((noreturn)) finish(uint32_t code)
{
	outl(DEBUG_EXIT, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

static void __attribute__((noreturn)) fail(const char *why)
{
	puts_serial("uffdd-guest: error ");
	puts_serial(why);
	putc_serial('\n');
	finish(0x7f);
}

/* "key=" at the start of a token of the command line: the value's text, or 0. */
static const char *arg(const char *cmdline, const char *key)
{
	for (const char *p = cmdline; p && *p; p++) {
		if (p != cmdline && p[-1] != ' ')
			continue;
		const char *k = key, *q = p;
		while (*k && *q == *k)
			k++, q++;
		if (!*k)
			return q;
	}
	return 0;
}

static uint32_t num(const char *s, uint32_t dflt)
{
	if (!s || *s < '0' || *s > '9')
		return dflt;
	uint32_t v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (uint32_t)(*s++ - '0');
	return v;
}

static void slice(uint32_t cpu, uint32_t *first, uint32_t *n)
{
	uint32_t per = npages / ncpus;
	*first = first_page + cpu * per;
	*n = cpu == ncpus - 1 ? npages - cpu * per : per;
}

static void write_slice(uint32_t cpu)
{
	uint32_t first, n;
	slice(cpu, &first, &n);
	volatile uint32_t *w = (volatile uint32_t *)(first * PAGE);
	uint32_t v = first * K + seed;
	for (uint32_t i = 0; i < n; i++) {
		*w = v;
		w += PAGE / 4;
		v += K;
	}
}

static void verify_slice(uint32_t cpu)
{
	uint32_t first, n, bad = 0;
	slice(cpu, &first, &n);
	if (!rand_order) {
		volatile const uint32_t *w = (volatile const uint32_t *)(first * PAGE);
		uint32_t v = first * K + seed;
		for (uint32_t i = 0; i < n; i++) {
			bad += *w != v;
			w += PAGE / 4;
			v += K;
		}
	} else {
		/* full-period LCG modulo 2^k >= n: every page once, values >= n skipped */
		uint32_t mask = 1;
		while (mask < n)
			mask <<= 1;
		mask--;
		uint32_t x = (seed * 2654435761u + cpu * 40503u) & mask;
		for (uint32_t left = n; left;) {
			x = (x * 1103515245u + 12345u) & mask;
			if (x >= n)
				continue;
			uint32_t page = first + x;
			bad += *(volatile const uint32_t *)(page * PAGE) != page * K + seed;
			left--;
		}
	}
	bad_of[cpu] = bad;
	checked_of[cpu] = n;
}

static void lapic_write(uint32_t reg, uint32_t v)
{
	*(volatile uint32_t *)(LAPIC + reg) = v;
}

static void wait_icr_idle(void)
{
	for (uint32_t i = 0; i < 100000 && (*(volatile uint32_t *)(LAPIC + 0x300) & 0x1000); i++)
		pause();
}

/* INIT, SIPI, SIPI to all but self; the APs count themselves in guest_cpus_up. */
static void start_aps(void)
{
	const char *s = guest_trampoline;
	char *d = (char *)TRAMPOLINE;
	while (s < guest_trampoline_end)
		*d++ = *s++;
	lapic_write(0xF0, 0x1FF); /* spurious vector register: APIC software-enabled */
	lapic_write(0x310, 0);
	lapic_write(0x300, 0x000C4500); /* INIT, all excluding self */
	wait_icr_idle();
	delay(2000);
	for (int i = 0; i < 2 && guest_cpus_up < ncpus; i++) {
		lapic_write(0x310, 0);
		lapic_write(0x300, 0x000C4600 | (TRAMPOLINE >> 12)); /* SIPI */
		wait_icr_idle();
		delay(2000);
	}
	for (uint32_t i = 0; guest_cpus_up < ncpus; i++) {
		if (i > 20000000u)
			fail("application processors did not start");
		pause();
	}
}

void ap_main(uint32_t cpu)
{
	if (cpu >= ncpus)
		return;
	write_slice(cpu);
	__atomic_fetch_add(&written_cpus, 1, __ATOMIC_SEQ_CST);
	while (!go_flag)
		pause();
	verify_slice(cpu);
	__atomic_fetch_add(&verified_cpus, 1, __ATOMIC_SEQ_CST);
}

void bsp_main(uint32_t magic, const struct multiboot_info *mbi)
{
	if (magic != MB_BOOT_MAGIC)
		fail("not started by a multiboot loader");
	if (!(mbi->flags & 1))
		fail("no memory size from the loader");
	const char *cmdline = (mbi->flags & 4) ? (const char *)mbi->cmdline : 0;
	seed = num(arg(cmdline, "seed="), 1);
	ncpus = num(arg(cmdline, "cpus="), 1);
	const char *order = arg(cmdline, "order=");
	rand_order = order && order[0] == 'r';
	if (ncpus < 1 || ncpus > MAX_CPUS)
		fail("cpus= must be 1..8");
	uint32_t end = 0x100000u + mbi->mem_upper * 1024u;
	if (end < FIRST_ADDR + ncpus * PAGE)
		fail("too little memory");
	first_page = FIRST_ADDR / PAGE;
	npages = (end - FIRST_ADDR) / PAGE;
	if (ncpus > 1)
		start_aps();
	put_kv("uffdd-guest: started cpus=", ncpus);
	put_kv(" pages=", npages);
	puts_serial(rand_order ? " order=rand" : " order=seq");
	putc_serial('\n');

	write_slice(0);
	__atomic_fetch_add(&written_cpus, 1, __ATOMIC_SEQ_CST);
	while (written_cpus < ncpus)
		pause();
	put_kv("uffdd-guest: written pages=", npages);
	putc_serial('\n');

	/* wait for "go": a byte received on COM1, polled about once a millisecond */
	while (!(inb(COM1 + 5) & 1))
		delay(300);
	(void)inb(COM1);
	puts_serial("uffdd-guest: go\n");
	go_flag = 1;

	verify_slice(0);
	__atomic_fetch_add(&verified_cpus, 1, __ATOMIC_SEQ_CST);
	while (verified_cpus < ncpus)
		pause();
	uint32_t bad = 0, checked = 0;
	for (uint32_t i = 0; i < ncpus; i++) {
		bad += bad_of[i];
		checked += checked_of[i];
	}
	put_kv("uffdd-guest: verdict bad=", bad);
	put_kv(" checked=", checked);
	put_kv(" cpus=", ncpus);
	putc_serial('\n');
	finish(bad ? 1 : 0);
}
