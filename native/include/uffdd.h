/*
 * libuffdd — C client of the uffdd VMM API (see README, wire protocol, section 1).
 *
 * A VMM uses this library to hand guest memory to the local uffdd daemon:
 *
 *   source host:  uffdd_connect() → uffdd_export() → uffdd_next_event() until
 *                 UFFDD_EVENT_COMPLETED / UFFDD_EVENT_FAILED / UFFDD_EVENT_CANCELLED.
 *   dest host:    create the userfaultfd(s), UFFDIO_API + UFFDIO_REGISTER them,
 *                 uffdd_connect() → uffdd_import() → run the vCPUs; vCPU-exit
 *                 faults go through uffdd_resolve(); wait for completion with
 *                 uffdd_next_event().
 *
 * Threading: a uffdd_client is NOT thread safe. Exactly one thread at a time may
 * use a client. Give every vCPU thread its own client (uffdd_connect() once per
 * thread) for uffdd_resolve()/uffdd_populate_failed(), and keep the client that
 * created the session for events. Different clients are fully independent.
 *
 * Errors are returned as values. Every call that can fail takes a
 * `struct uffdd_error *err` (may be NULL) which is filled on failure; the library
 * never prints, never aborts and never raises signals (it sends with
 * MSG_NOSIGNAL). Unless said otherwise a call returns 0 on success and -1 on
 * failure.
 *
 * File descriptors passed in regions are NOT closed or taken over: the library
 * only sends copies of them (SCM_RIGHTS); the caller keeps ownership.
 *
 * Link with: pkg-config --cflags --libs uffdd   (needs msgpack-c).
 */
#ifndef UFFDD_H
#define UFFDD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define UFFDD_VERSION_MAJOR 0
#define UFFDD_VERSION_MINOR 1

/* Longest session id the protocol allows ([A-Za-z0-9._:-]{1,128}). */
#define UFFDD_SESSION_MAX 128

/* ------------------------------------------------------------------------ */
/* Errors                                                                   */

/*
 * Error codes. Values below UFFDD_ERR_DAEMON_BASE are detected by the library;
 * the others are the daemon's error codes (the `error` string of an error reply,
 * README, wire protocol "Error reply"), mapped one to one.
 */
enum uffdd_error_code {
	UFFDD_OK = 0,
	UFFDD_ERR_SYSTEM = 1,      /* a system call failed; err->sys_errno holds errno */
	UFFDD_ERR_INVALID = 2,     /* bad argument (NULL, bad session id, too many fds, ...) */
	UFFDD_ERR_PROTOCOL = 3,    /* the daemon sent something the protocol does not allow */
	UFFDD_ERR_CLOSED = 4,      /* the daemon closed the connection */
	UFFDD_ERR_TIMEOUT = 5,     /* no reply within the reply timeout */
	UFFDD_ERR_NOMEM = 6,       /* out of memory */

	UFFDD_ERR_DAEMON_BASE = 100,
	UFFDD_ERR_BAD_FRAME = 100,       /* "bad-frame" */
	UFFDD_ERR_FRAME_TOO_LARGE = 101, /* "frame-too-large" (connection is closed) */
	UFFDD_ERR_BAD_REQUEST = 102,     /* "bad-request" */
	UFFDD_ERR_BAD_FDS = 103,         /* "bad-fds" */
	UFFDD_ERR_BAD_REGION = 104,      /* "bad-region" */
	UFFDD_ERR_UNKNOWN_SESSION = 105, /* "unknown-session" */
	UFFDD_ERR_SESSION_EXISTS = 106,  /* "session-exists" */
	UFFDD_ERR_UNAUTHORIZED = 107,    /* "unauthorized" */
	UFFDD_ERR_LIMIT = 108,           /* "limit" */
	UFFDD_ERR_INTERNAL = 109,        /* "internal" */
	UFFDD_ERR_DAEMON_OTHER = 199,    /* an error code this library does not know */
};

struct uffdd_error {
	int code;          /* enum uffdd_error_code */
	int sys_errno;     /* errno for UFFDD_ERR_SYSTEM, else 0 */
	char message[256]; /* human readable, NUL terminated; for daemon errors
	                      "<code>: <daemon message>" */
};

/* Name of an error code: the protocol string for daemon errors ("bad-fds"),
 * a short word for library errors ("system", "timeout", ...). Never NULL. */
const char *uffdd_error_name(int code);

/* ------------------------------------------------------------------------ */
/* Connection                                                               */

typedef struct uffdd_client uffdd_client;

/*
 * Connect to the daemon's VMM API socket (e.g. "/run/uffdd/vmm.sock").
 * Returns a client, or NULL with err filled (UFFDD_ERR_SYSTEM for connect()
 * failures such as ENOENT/ECONNREFUSED, UFFDD_ERR_INVALID for a path that is
 * NULL or too long, UFFDD_ERR_NOMEM). The socket is close-on-exec.
 */
uffdd_client *uffdd_connect(const char *socket_path, struct uffdd_error *err);

/* Close the connection and free the client (NULL is ignored). Sessions this
 * connection created keep running in the daemon. */
void uffdd_close(uffdd_client *c);

/*
 * The socket, for poll()/epoll (POLLIN means an event or reply may be readable).
 * Do not read or write it yourself. Events may already be queued inside the
 * client (they arrived while a call waited for its reply) without the fd being
 * readable: check uffdd_events_pending() before sleeping in poll().
 */
int uffdd_fd(const uffdd_client *c);

/* Number of events already received and queued in the client. */
size_t uffdd_events_pending(const uffdd_client *c);

/*
 * Limit how long a request waits for its reply, in milliseconds; -1 (the
 * default) waits forever. A request that times out fails with
 * UFFDD_ERR_TIMEOUT; its late reply is recognised by id and dropped.
 */
void uffdd_set_reply_timeout(uffdd_client *c, int timeout_ms);

/* ------------------------------------------------------------------------ */
/* Regions, export and import                                               */

enum uffdd_mode {
	UFFDD_MODE_MISSING = 0, /* "missing": pages installed with UFFDIO_COPY/ZEROPAGE */
	UFFDD_MODE_MINOR = 1,   /* "minor": UFFDIO_CONTINUE; needs memfd */
};

/*
 * One contiguous range of guest RAM.
 *   gpa        guest physical address of the first byte.
 *   addr       host virtual address in the VMM (import: always; export: only in
 *              pid mode, i.e. pid != 0). Ignored otherwise.
 *   size       bytes, a multiple of page_size, > 0.
 *   page_size  4096, or the huge page size (2 MiB) for hugetlb backings.
 *   offset     offset of the region inside memfd (only sent when memfd >= 0).
 *   uffd       import: the userfaultfd registered over [addr, addr+size);
 *              export: ignored (set -1).
 *   memfd      the memory fd backing the region, or -1. Export in memfd mode
 *              (pid == 0): required. Import: required for UFFDD_MODE_MINOR,
 *              optional for UFFDD_MODE_MISSING.
 *   mode       import only.
 * Several regions may share a uffd and/or memfd: every distinct fd number is
 * sent once and referenced by its index (README, wire protocol "File descriptors").
 */
struct uffdd_region {
	uint64_t gpa;
	uint64_t addr;
	uint64_t size;
	uint64_t page_size;
	uint64_t offset;
	int uffd;
	int memfd;
	enum uffdd_mode mode;
};

/*
 * Export guest memory (source VMM): op "export".
 *   session    id, [A-Za-z0-9._:-]{1,128}.
 *   token      per-session secret, 16..64 bytes (sent as msgpack bin).
 *   pid        0: memfd mode, every region needs memfd (+ offset).
 *              else: anonymous memory read with process_vm_readv from `pid`;
 *              every region needs addr, memfds are not sent.
 *   regions    n >= 1 regions.
 *   pages_out  if not NULL, receives the page count from the reply.
 * The connection that exports is subscribed to the session's events.
 * Errors: UFFDD_ERR_INVALID (checked locally: session id, token length, n,
 * missing memfd, more than 64 distinct fds), daemon errors (bad-request,
 * bad-fds, bad-region, session-exists, unauthorized, limit), connection errors.
 */
int uffdd_export(uffdd_client *c, const char *session, const void *token,
		 size_t token_len, pid_t pid, const struct uffdd_region *regions,
		 size_t n, uint64_t *pages_out, struct uffdd_error *err);

/* Optional import settings; NULL / zero fields mean "daemon default". */
struct uffdd_import_options {
	const char *strategy;    /* e.g. "continue-then-populate", "no-uffd-wait"; NULL = default */
	const char *policy;      /* "crash" | "poison"; NULL = default */
	double deadline_seconds; /* > 0: seconds a page may stay unobtainable; <= 0 = default */
};

/*
 * Import guest memory (destination VMM): op "import".
 * The uffds must already have had UFFDIO_API and UFFDIO_REGISTER done, and the
 * daemon checks it before it answers: each uffd created with O_NONBLOCK, given
 * UFFD_FEATURE_EVENT_REMOVE (plus UFFD_FEATURE_POISON for policy "poison" and
 * UFFD_FEATURE_MINOR_SHMEM / _MINOR_HUGETLBFS for minor mode, never EVENT_FORK),
 * registered by this process over every region in its mode (not WP), with no page
 * of guest RAM touched before the import (README, Security).
 *   peer       the source host's uffdd peer address, "host:port".
 *   opts       NULL for all defaults.
 *   pages_out  if not NULL, receives the page count from the reply.
 * All distinct uffds and memfds go with the request frame in one sendmsg().
 * The importing connection is subscribed to the session's events.
 * Errors: as uffdd_export().
 */
int uffdd_import(uffdd_client *c, const char *session, const void *token,
		 size_t token_len, const char *peer,
		 const struct uffdd_import_options *opts,
		 const struct uffdd_region *regions, size_t n,
		 uint64_t *pages_out, struct uffdd_error *err);

/* Subscribe this connection to a session's events (op "subscribe"). */
int uffdd_subscribe(uffdd_client *c, const char *session, struct uffdd_error *err);

/* End a session on both sides (op "cancel"). */
int uffdd_cancel(uffdd_client *c, const char *session, struct uffdd_error *err);

/* ------------------------------------------------------------------------ */
/* vCPU exits                                                               */

enum uffdd_access {
	UFFDD_ACCESS_READ = 0,
	UFFDD_ACCESS_WRITE = 1,
	UFFDD_ACCESS_EXEC = 2,
};

/* A vCPU memory-fault exit. */
struct uffdd_exit {
	uint32_t vcpu;
	uint64_t gpa;     /* faulting guest physical address (used unless use_addr) */
	uint64_t addr;    /* faulting host address in the VMM (used if use_addr) */
	int use_addr;     /* nonzero: send "addr" instead of "gpa" */
	uint64_t size;    /* access size in bytes */
	enum uffdd_access access;
	uint64_t flags;   /* sent as is; 0 unless you know better */
};

enum uffdd_verdict_kind {
	UFFDD_VERDICT_RESUME = 1,              /* re-enter the vCPU */
	UFFDD_VERDICT_POPULATE = 2,            /* MADV_POPULATE_WRITE [addr, addr+size), then
	                                          resume; on failure uffdd_populate_failed() */
	UFFDD_VERDICT_INJECT_MEMORY_ERROR = 3, /* inject a machine check for [gpa, gpa+size) */
	UFFDD_VERDICT_CRASH = 4,               /* stop the VM; reason says why */
};

struct uffdd_verdict {
	enum uffdd_verdict_kind kind;
	uint64_t addr;
	uint64_t gpa;
	uint64_t size;
	char reason[256]; /* "" when the daemon sent nil */
};

/*
 * Ask the daemon what to do about a vCPU exit (op "resolve"). Blocks until the
 * verdict arrives (the daemon may fetch the page first). Events that arrive
 * meanwhile are queued. Errors: daemon errors (unknown-session, bad-request,
 * ...), connection errors, UFFDD_ERR_PROTOCOL for an unknown verdict.
 */
int uffdd_resolve(uffdd_client *c, const char *session,
		  const struct uffdd_exit *exit, struct uffdd_verdict *out,
		  struct uffdd_error *err);

/*
 * Report that MADV_POPULATE_WRITE after a POPULATE verdict failed with
 * errno_value (op "populate-failed"); the daemon answers with a new verdict
 * (never POPULATE).
 */
int uffdd_populate_failed(uffdd_client *c, const char *session, uint32_t vcpu,
			  uint64_t gpa, int errno_value,
			  struct uffdd_verdict *out, struct uffdd_error *err);

/* ------------------------------------------------------------------------ */
/* Events                                                                   */

enum uffdd_event_kind {
	UFFDD_EVENT_PROGRESS = 1,
	UFFDD_EVENT_COMPLETED = 2,
	UFFDD_EVENT_FAILED = 3,
	UFFDD_EVENT_CANCELLED = 4, /* ended by a cancel (of either VMM): terminal, as FAILED */
};

struct uffdd_event {
	enum uffdd_event_kind kind;
	char session[UFFDD_SESSION_MAX + 1];
	uint64_t pages_total;     /* progress, completed */
	uint64_t pages_installed; /* progress (completed: = pages_total if absent) */
	uint64_t pages_poisoned;  /* completed (progress: if sent) */
	char outcome[64];         /* completed: "completed" | "completed-with-poisoned-pages" */
	char reason[256];         /* failed, cancelled */
};

/*
 * Wait for the next event of any session this connection is subscribed to.
 * Queued events are returned first, in arrival order.
 *   timeout_ms  0: do not wait; -1: wait forever; else milliseconds.
 * Returns 1 with *ev filled, 0 on timeout, -1 on error (UFFDD_ERR_CLOSED when
 * the daemon closed the connection). Unknown event kinds are skipped. A reply
 * frame arriving here (a late reply to a timed-out request) is dropped.
 */
int uffdd_next_event(uffdd_client *c, struct uffdd_event *ev, int timeout_ms,
		     struct uffdd_error *err);

#ifdef __cplusplus
}
#endif

#endif /* UFFDD_H */
