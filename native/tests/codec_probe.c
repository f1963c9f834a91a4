/*
 * uffdd-codec-probe: drives libuffdd against a fake daemon so that
 * tests/test_native_encoding.py can check every request frame (and its fds)
 * with Python's msgpack and feed Python-encoded replies and events back.
 *
 *   uffdd-codec-probe SOCKET SCENARIO
 *
 * Every result is one JSON line on stdout. fds sent are memfds whose names
 * ("uffd-a", "mem-a", ...) the fake daemon reads from /proc/self/fd, so it can
 * check which fd a region's index points at.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "uffdd.h"

static const unsigned char TOKEN[16] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0xff };

static void json_str(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			printf("\\%c", ch);
		else if (ch < 0x20)
			printf("\\u%04x", ch);
		else
			putchar(ch);
	}
	putchar('"');
}

static void print_err(const char *what, const struct uffdd_error *e)
{
	printf("{\"call\": \"%s\", \"rc\": -1, \"code\": %d, \"name\": ", what, e->code);
	json_str(uffdd_error_name(e->code));
	printf(", \"sys_errno\": %d, \"message\": ", e->sys_errno);
	json_str(e->message);
	printf("}\n");
	fflush(stdout);
}

static void print_ok(const char *what, const char *extra)
{
	printf("{\"call\": \"%s\", \"rc\": 0%s}\n", what, extra ? extra : "");
	fflush(stdout);
}

static void print_verdict(const char *what, const struct uffdd_verdict *v)
{
	static const char *const kinds[] = { "?", "resume", "populate", "inject-memory-error",
					     "crash" };
	printf("{\"call\": \"%s\", \"rc\": 0, \"verdict\": \"%s\", \"addr\": %llu, \"gpa\": %llu, "
	       "\"size\": %llu, \"reason\": ",
	       what, kinds[v->kind], (unsigned long long)v->addr, (unsigned long long)v->gpa,
	       (unsigned long long)v->size);
	json_str(v->reason);
	printf("}\n");
	fflush(stdout);
}

static void print_event(const struct uffdd_event *ev)
{
	static const char *const kinds[] = { "?", "progress", "completed", "failed", "cancelled" };
	printf("{\"call\": \"event\", \"event\": \"%s\", \"session\": ", kinds[ev->kind]);
	json_str(ev->session);
	printf(", \"pages_total\": %llu, \"pages_installed\": %llu, \"pages_poisoned\": %llu, "
	       "\"outcome\": ",
	       (unsigned long long)ev->pages_total, (unsigned long long)ev->pages_installed,
	       (unsigned long long)ev->pages_poisoned);
	json_str(ev->outcome);
	printf(", \"reason\": ");
	json_str(ev->reason);
	printf("}\n");
	fflush(stdout);
}

static int named_fd(const char *name)
{
	int fd = memfd_create(name, MFD_CLOEXEC);
	if (fd < 0) {
		perror("memfd_create");
		exit(3);
	}
	return fd;
}

static void print_pages(const char *what, int rc, uint64_t pages, const struct uffdd_error *e)
{
	char extra[64];
	if (rc < 0) {
		print_err(what, e);
		return;
	}
	snprintf(extra, sizeof(extra), ", \"pages\": %llu", (unsigned long long)pages);
	print_ok(what, extra);
}

/* Print every event until the connection closes or 2 s pass without one. */
static void drain_events(uffdd_client *c, int timeout_ms)
{
	struct uffdd_event ev;
	struct uffdd_error e;
	for (;;) {
		int r = uffdd_next_event(c, &ev, timeout_ms, &e);
		if (r == 1) {
			print_event(&ev);
			continue;
		}
		if (r == 0)
			print_ok("next_event", ", \"timeout\": true");
		else
			print_err("next_event", &e);
		return;
	}
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s SOCKET SCENARIO\n", argv[0]);
		return 2;
	}
	const char *sc = argv[2];
	struct uffdd_error e;
	uffdd_client *c = uffdd_connect(argv[1], &e);
	if (!c) {
		print_err("connect", &e);
		return 1;
	}
	uint64_t pages = 0;
	int rc;
	struct uffdd_verdict v;

	if (!strcmp(sc, "export-memfd")) {
		int a = named_fd("mem-a"), b = named_fd("mem-b");
		struct uffdd_region r[3] = {
			{ .gpa = 0, .size = 1 << 20, .page_size = 4096, .memfd = a, .offset = 0,
			  .uffd = -1 },
			{ .gpa = 1ull << 32, .size = 2 << 20, .page_size = 2 << 20, .memfd = b,
			  .offset = 0, .uffd = -1 },
			{ .gpa = 1 << 20, .size = 1 << 20, .page_size = 4096, .memfd = a,
			  .offset = 1 << 20, .uffd = -1 },
		};
		rc = uffdd_export(c, "vm42-mig7", TOKEN, sizeof(TOKEN), 0, r, 3, &pages, &e);
		print_pages("export", rc, pages, &e);
	} else if (!strcmp(sc, "export-pid")) {
		struct uffdd_region r[2] = {
			{ .gpa = 0, .addr = 140212345671680ull, .size = 1 << 20,
			  .page_size = 4096, .memfd = -1, .uffd = -1 },
			{ .gpa = 4294967296ull, .addr = 0x7f0000000000ull, .size = 4096,
			  .page_size = 4096, .memfd = -1, .uffd = -1 },
		};
		rc = uffdd_export(c, "vm42.pid", TOKEN, sizeof(TOKEN), 1234, r, 2, &pages, &e);
		print_pages("export", rc, pages, &e);
	} else if (!strcmp(sc, "import")) {
		int ua = named_fd("uffd-a"), ub = named_fd("uffd-b"), ma = named_fd("mem-a");
		struct uffdd_region r[3] = {
			{ .gpa = 0, .addr = 0x7f0000000000ull, .size = 1 << 20, .page_size = 4096,
			  .uffd = ua, .memfd = -1, .mode = UFFDD_MODE_MISSING },
			{ .gpa = 1 << 20, .addr = 0x7f0000100000ull, .size = 1 << 20,
			  .page_size = 4096, .uffd = ua, .memfd = ma, .offset = 4096,
			  .mode = UFFDD_MODE_MINOR },
			{ .gpa = 1ull << 32, .addr = 0x7f1000000000ull, .size = 2 << 20,
			  .page_size = 2 << 20, .uffd = ub, .memfd = ma, .offset = 8192,
			  .mode = UFFDD_MODE_MISSING },
		};
		struct uffdd_import_options o = { .strategy = "no-uffd-wait", .policy = "poison",
						  .deadline_seconds = 2.5 };
		rc = uffdd_import(c, "vm42-mig7", TOKEN, sizeof(TOKEN), "127.0.0.1:4460", &o, r, 3,
				  &pages, &e);
		print_pages("import", rc, pages, &e);
	} else if (!strcmp(sc, "import-defaults")) {
		int ua = named_fd("uffd-a");
		struct uffdd_region r = { .gpa = 0, .addr = 0x7f0000000000ull, .size = 8192,
					  .page_size = 4096, .uffd = ua, .memfd = -1 };
		rc = uffdd_import(c, "s", TOKEN, sizeof(TOKEN), "[::1]:4460", NULL, &r, 1, &pages,
				  &e);
		print_pages("import", rc, pages, &e);
	} else if (!strcmp(sc, "resolve")) {
		struct uffdd_exit x = { .vcpu = 3, .gpa = 0x1000, .size = 8,
					.access = UFFDD_ACCESS_WRITE };
		if (uffdd_resolve(c, "vm42-mig7", &x, &v, &e) < 0)
			print_err("resolve", &e);
		else
			print_verdict("resolve", &v);
		struct uffdd_exit y = { .vcpu = 0, .addr = 0x7f0000002000ull, .use_addr = 1,
					.size = 1, .access = UFFDD_ACCESS_EXEC, .flags = 5 };
		if (uffdd_resolve(c, "vm42-mig7", &y, &v, &e) < 0)
			print_err("resolve", &e);
		else
			print_verdict("resolve", &v);
		/* events that arrived meanwhile were queued */
		printf("{\"call\": \"pending\", \"rc\": 0, \"pending\": %zu}\n",
		       uffdd_events_pending(c));
		drain_events(c, 0);
	} else if (!strcmp(sc, "populate-failed")) {
		if (uffdd_populate_failed(c, "vm42-mig7", 1, 0x2000, EFAULT, &v, &e) < 0)
			print_err("populate-failed", &e);
		else
			print_verdict("populate-failed", &v);
	} else if (!strcmp(sc, "subscribe")) {
		if (uffdd_subscribe(c, "vm42-mig7", &e) < 0)
			print_err("subscribe", &e);
		else
			print_ok("subscribe", NULL);
		drain_events(c, 2000);
	} else if (!strcmp(sc, "cancel")) {
		if (uffdd_cancel(c, "vm42-mig7", &e) < 0)
			print_err("cancel", &e);
		else
			print_ok("cancel", NULL);
	} else if (!strcmp(sc, "timeout")) {
		struct uffdd_exit x = { .vcpu = 1, .gpa = 0x3000, .size = 4,
					.access = UFFDD_ACCESS_READ };
		uffdd_set_reply_timeout(c, 200);
		if (uffdd_resolve(c, "vm42-mig7", &x, &v, &e) < 0)
			print_err("resolve", &e);
		else
			print_verdict("resolve", &v);
		uffdd_set_reply_timeout(c, -1);
		if (uffdd_resolve(c, "vm42-mig7", &x, &v, &e) < 0)
			print_err("resolve", &e);
		else
			print_verdict("resolve", &v);
	} else if (!strcmp(sc, "invalid")) {
		/* checked locally, nothing is sent */
		struct uffdd_region r = { .size = 4096, .page_size = 4096, .uffd = -1, .memfd = -1 };
		rc = uffdd_export(c, "bad session!", TOKEN, sizeof(TOKEN), 0, &r, 1, NULL, &e);
		print_pages("export-bad-session", rc, 0, &e);
		rc = uffdd_export(c, "ok", TOKEN, 8, 0, &r, 1, NULL, &e);
		print_pages("export-short-token", rc, 0, &e);
		rc = uffdd_export(c, "ok", TOKEN, sizeof(TOKEN), 0, &r, 1, NULL, &e);
		print_pages("export-no-memfd", rc, 0, &e);
		if (uffdd_cancel(c, "vm42-mig7", &e) < 0)
			print_err("cancel", &e);
		else
			print_ok("cancel", NULL);
	} else {
		fprintf(stderr, "unknown scenario %s\n", sc);
		uffdd_close(c);
		return 2;
	}
	uffdd_close(c);
	return 0;
}
