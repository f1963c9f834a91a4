/*
 * libuffdd: the VMM API client (README, wire protocol, section 1).
 *
 * One connection, one request in flight at a time (the client is used by one
 * thread). Frames are a big-endian u32 length and a msgpack map. Events that
 * arrive while a request waits for its reply are queued for uffdd_next_event().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <msgpack.h>

#include "internal.h"

struct uffdd_client {
	int fd;
	uint64_t next_id;
	int reply_timeout_ms;
	/* receive buffer: bytes [0, rlen) are received and not yet consumed */
	unsigned char *rbuf;
	size_t rlen, rcap;
	/* bytes at the start of rbuf that belong to the last frame returned: the
	 * msgpack objects of that frame point into them (msgpack_unpack_next does not
	 * copy strings), so they are dropped only when the next frame is read */
	size_t rconsumed;
	/* queued events, a ring */
	struct uffdd_event *evq;
	size_t evq_head, evq_count, evq_cap;
};

/* ------------------------------------------------------------------------ */
/* errors */

static const char *const daemon_codes[] = {
	"bad-frame", "frame-too-large", "bad-request", "bad-fds", "bad-region",
	"unknown-session", "session-exists", "unauthorized", "limit", "internal",
};
#define N_DAEMON_CODES (sizeof(daemon_codes) / sizeof(daemon_codes[0]))

UFFDD_API const char *uffdd_error_name(int code)
{
	switch (code) {
	case UFFDD_OK: return "ok";
	case UFFDD_ERR_SYSTEM: return "system";
	case UFFDD_ERR_INVALID: return "invalid";
	case UFFDD_ERR_PROTOCOL: return "protocol";
	case UFFDD_ERR_CLOSED: return "closed";
	case UFFDD_ERR_TIMEOUT: return "timeout";
	case UFFDD_ERR_NOMEM: return "nomem";
	case UFFDD_ERR_DAEMON_OTHER: return "daemon-error";
	}
	if (code >= UFFDD_ERR_DAEMON_BASE &&
	    code < UFFDD_ERR_DAEMON_BASE + (int)N_DAEMON_CODES)
		return daemon_codes[code - UFFDD_ERR_DAEMON_BASE];
	return "unknown";
}

__attribute__((format(printf, 3, 4)))
static int fail(struct uffdd_error *err, int code, const char *fmt, ...)
{
	if (err) {
		va_list ap;
		err->code = code;
		err->sys_errno = 0;
		va_start(ap, fmt);
		vsnprintf(err->message, sizeof(err->message), fmt, ap);
		va_end(ap);
	}
	return -1;
}

/* Fail with errno (saved before anything can clobber it). */
static int fail_sys(struct uffdd_error *err, const char *what)
{
	int e = errno;
	if (err) {
		err->code = UFFDD_ERR_SYSTEM;
		err->sys_errno = e;
		snprintf(err->message, sizeof(err->message), "%s: %s", what, strerror(e));
	}
	errno = e;
	return -1;
}

static void clear_err(struct uffdd_error *err)
{
	if (err) {
		err->code = UFFDD_OK;
		err->sys_errno = 0;
		err->message[0] = '\0';
	}
}

/* ------------------------------------------------------------------------ */
/* connection */

uffdd_client *uffdd__client_from_fd(int fd, struct uffdd_error *err)
{
	uffdd_client *c = calloc(1, sizeof(*c));
	if (!c) {
		fail(err, UFFDD_ERR_NOMEM, "out of memory");
		return NULL;
	}
	c->fd = fd;
	c->reply_timeout_ms = -1;
	clear_err(err);
	return c;
}

UFFDD_API uffdd_client *uffdd_connect(const char *socket_path, struct uffdd_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (!socket_path || !*socket_path) {
		fail(err, UFFDD_ERR_INVALID, "socket path is empty");
		return NULL;
	}
	if (strlen(socket_path) >= sizeof(sa.sun_path)) {
		fail(err, UFFDD_ERR_INVALID, "socket path longer than %zu bytes",
		     sizeof(sa.sun_path) - 1);
		return NULL;
	}
	strcpy(sa.sun_path, socket_path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fail_sys(err, "socket");
		return NULL;
	}
	while (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		if (errno == EINTR)
			continue;
		char what[160];
		snprintf(what, sizeof(what), "connect %.120s", socket_path);
		fail_sys(err, what);
		close(fd);
		return NULL;
	}
	uffdd_client *c = uffdd__client_from_fd(fd, err);
	if (!c)
		close(fd);
	return c;
}

UFFDD_API void uffdd_close(uffdd_client *c)
{
	if (!c)
		return;
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	free(c->rbuf);
	free(c->evq);
	free(c);
}

UFFDD_API int uffdd_fd(const uffdd_client *c)
{
	return c ? c->fd : -1;
}

UFFDD_API size_t uffdd_events_pending(const uffdd_client *c)
{
	return c ? c->evq_count : 0;
}

UFFDD_API void uffdd_set_reply_timeout(uffdd_client *c, int timeout_ms)
{
	if (c)
		c->reply_timeout_ms = timeout_ms < 0 ? -1 : timeout_ms;
}

/* ------------------------------------------------------------------------ */
/* encoding helpers */

static void pack_cstr(msgpack_packer *pk, const char *s)
{
	size_t n = strlen(s);
	msgpack_pack_str(pk, n);
	msgpack_pack_str_body(pk, s, n);
}

static void pack_kv_str(msgpack_packer *pk, const char *k, const char *v)
{
	pack_cstr(pk, k);
	pack_cstr(pk, v);
}

static void pack_kv_u64(msgpack_packer *pk, const char *k, uint64_t v)
{
	pack_cstr(pk, k);
	msgpack_pack_uint64(pk, v);
}

/* Start a frame: 4 placeholder bytes for the length, then the map header. */
static void frame_begin(msgpack_sbuffer *sb, msgpack_packer *pk, size_t map_entries)
{
	static const char zero[4];
	msgpack_sbuffer_init(sb);
	msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
	msgpack_sbuffer_write(sb, zero, 4);
	msgpack_pack_map(pk, map_entries);
}

static int frame_end(msgpack_sbuffer *sb, struct uffdd_error *err)
{
	if (!sb->data)
		return fail(err, UFFDD_ERR_NOMEM, "out of memory while encoding");
	size_t body = sb->size - 4;
	sb->data[0] = (char)(body >> 24);
	sb->data[1] = (char)(body >> 16);
	sb->data[2] = (char)(body >> 8);
	sb->data[3] = (char)body;
	return 0;
}

static int check_session(const char *s, struct uffdd_error *err)
{
	if (!s)
		return fail(err, UFFDD_ERR_INVALID, "session id is NULL");
	size_t n = strlen(s);
	if (n < 1 || n > UFFDD_SESSION_MAX)
		return fail(err, UFFDD_ERR_INVALID, "session id must be 1..%d characters",
			    UFFDD_SESSION_MAX);
	for (size_t i = 0; i < n; i++) {
		char ch = s[i];
		if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
		      (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == ':' ||
		      ch == '-'))
			return fail(err, UFFDD_ERR_INVALID,
				    "session id has a character outside [A-Za-z0-9._:-]");
	}
	return 0;
}

/* The distinct fds of one request, in order of first use. */
struct fdset {
	int fds[UFFDD_MAX_FDS];
	size_t n;
};

static int fdset_index(struct fdset *s, int fd, struct uffdd_error *err)
{
	for (size_t i = 0; i < s->n; i++)
		if (s->fds[i] == fd)
			return (int)i;
	if (s->n >= UFFDD_MAX_FDS)
		return fail(err, UFFDD_ERR_INVALID, "more than %d distinct fds in one request",
			    UFFDD_MAX_FDS);
	s->fds[s->n] = fd;
	return (int)s->n++;
}

/* ------------------------------------------------------------------------ */
/* sending */

static int send_frame(uffdd_client *c, const msgpack_sbuffer *sb, const struct fdset *fds,
		      struct uffdd_error *err)
{
	union {
		char buf[CMSG_SPACE(sizeof(int) * UFFDD_MAX_FDS)];
		struct cmsghdr align;
	} ctl;
	size_t off = 0;
	bool first = true;

	if (c->fd < 0)
		return fail(err, UFFDD_ERR_CLOSED, "connection is closed");
	while (off < sb->size) {
		struct iovec iov = { .iov_base = sb->data + off, .iov_len = sb->size - off };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
		if (first && fds && fds->n) {
			memset(&ctl, 0, sizeof(ctl));
			mh.msg_control = ctl.buf;
			mh.msg_controllen = CMSG_SPACE(sizeof(int) * fds->n);
			struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
			cm->cmsg_level = SOL_SOCKET;
			cm->cmsg_type = SCM_RIGHTS;
			cm->cmsg_len = CMSG_LEN(sizeof(int) * fds->n);
			memcpy(CMSG_DATA(cm), fds->fds, sizeof(int) * fds->n);
		}
		ssize_t r = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EPIPE || errno == ECONNRESET)
				return fail(err, UFFDD_ERR_CLOSED, "daemon closed the connection (%s)",
					    strerror(errno));
			return fail_sys(err, "sendmsg");
		}
		first = false;
		off += (size_t)r;
	}
	return 0;
}

/* ------------------------------------------------------------------------ */
/* receiving */

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Remaining milliseconds until deadline (-1: forever). */
static int remaining(int64_t deadline)
{
	if (deadline < 0)
		return -1;
	int64_t left = deadline - now_ms();
	return left < 0 ? 0 : (left > INT32_MAX ? INT32_MAX : (int)left);
}

/*
 * Read one frame body into *out. Returns 1 on a frame, 0 on timeout, -1 on
 * error. deadline: absolute now_ms() value, or -1 for none.
 */
static int read_frame(uffdd_client *c, int64_t deadline, msgpack_unpacked *out,
		      struct uffdd_error *err)
{
	if (c->fd < 0)
		return fail(err, UFFDD_ERR_CLOSED, "connection is closed");
	msgpack_unpacked_destroy(out); /* free the previous frame first */
	if (c->rconsumed) {
		memmove(c->rbuf, c->rbuf + c->rconsumed, c->rlen - c->rconsumed);
		c->rlen -= c->rconsumed;
		c->rconsumed = 0;
	}
	for (;;) {
		if (c->rlen >= 4) {
			uint32_t len = (uint32_t)c->rbuf[0] << 24 | (uint32_t)c->rbuf[1] << 16 |
				       (uint32_t)c->rbuf[2] << 8 | c->rbuf[3];
			if (len == 0 || len > UFFDD_MAX_FRAME)
				return fail(err, UFFDD_ERR_PROTOCOL,
					    "daemon sent a frame of %u bytes", len);
			if (c->rlen >= 4 + (size_t)len) {
				size_t off = 0;
				msgpack_unpack_return ur = msgpack_unpack_next(
					out, (const char *)c->rbuf + 4, len, &off);
				c->rconsumed = 4 + (size_t)len;
				if (ur != MSGPACK_UNPACK_SUCCESS || off != len)
					return fail(err, UFFDD_ERR_PROTOCOL,
						    "daemon sent a frame that is not one msgpack value");
				if (out->data.type != MSGPACK_OBJECT_MAP)
					return fail(err, UFFDD_ERR_PROTOCOL,
						    "daemon sent a frame that is not a map");
				return 1;
			}
			if (c->rcap < 4 + (size_t)len) {
				unsigned char *nb = realloc(c->rbuf, 4 + (size_t)len);
				if (!nb)
					return fail(err, UFFDD_ERR_NOMEM, "out of memory");
				c->rbuf = nb;
				c->rcap = 4 + (size_t)len;
			}
		}
		if (c->rcap - c->rlen < 4096) {
			size_t ncap = c->rcap ? c->rcap * 2 : 16384;
			unsigned char *nb = realloc(c->rbuf, ncap);
			if (!nb)
				return fail(err, UFFDD_ERR_NOMEM, "out of memory");
			c->rbuf = nb;
			c->rcap = ncap;
		}
		struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
		int pr = poll(&pfd, 1, remaining(deadline));
		if (pr < 0) {
			if (errno == EINTR)
				continue;
			return fail_sys(err, "poll");
		}
		if (pr == 0)
			return 0;
		ssize_t r = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, MSG_DONTWAIT);
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			if (errno == ECONNRESET)
				return fail(err, UFFDD_ERR_CLOSED, "daemon reset the connection");
			return fail_sys(err, "recv");
		}
		if (r == 0)
			return fail(err, UFFDD_ERR_CLOSED,
				    c->rlen ? "daemon closed the connection inside a frame"
					    : "daemon closed the connection");
		c->rlen += (size_t)r;
	}
}

/* map lookup by string key */
static const msgpack_object *map_get(const msgpack_object *m, const char *key)
{
	size_t kl = strlen(key);
	for (uint32_t i = 0; i < m->via.map.size; i++) {
		const msgpack_object *k = &m->via.map.ptr[i].key;
		if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == kl &&
		    memcmp(k->via.str.ptr, key, kl) == 0)
			return &m->via.map.ptr[i].val;
	}
	return NULL;
}

/* Copy an optional str field; nil or absent gives "". Returns -1 on wrong type. */
static int get_str(const msgpack_object *m, const char *key, char *dst, size_t cap)
{
	const msgpack_object *v = map_get(m, key);
	dst[0] = '\0';
	if (!v || v->type == MSGPACK_OBJECT_NIL)
		return 0;
	if (v->type != MSGPACK_OBJECT_STR)
		return -1;
	size_t n = v->via.str.size < cap - 1 ? v->via.str.size : cap - 1;
	memcpy(dst, v->via.str.ptr, n);
	dst[n] = '\0';
	return 0;
}

/* Optional unsigned int field: absent/nil → def. -1 on wrong type. */
static int get_u64(const msgpack_object *m, const char *key, uint64_t def, uint64_t *out)
{
	const msgpack_object *v = map_get(m, key);
	*out = def;
	if (!v || v->type == MSGPACK_OBJECT_NIL)
		return 0;
	if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
		return -1;
	*out = v->via.u64;
	return 0;
}

static bool str_eq(const msgpack_object *v, const char *s)
{
	size_t n = strlen(s);
	return v && v->type == MSGPACK_OBJECT_STR && v->via.str.size == n &&
	       memcmp(v->via.str.ptr, s, n) == 0;
}

/* Decode an event frame. Returns 1 (known kind), 0 (unknown kind: skip), -1. */
static int parse_event(const msgpack_object *m, struct uffdd_event *ev, struct uffdd_error *err)
{
	const msgpack_object *kind = map_get(m, "event");
	memset(ev, 0, sizeof(*ev));
	if (!kind || kind->type != MSGPACK_OBJECT_STR)
		return fail(err, UFFDD_ERR_PROTOCOL, "event without a str \"event\" field");
	if (str_eq(kind, "progress"))
		ev->kind = UFFDD_EVENT_PROGRESS;
	else if (str_eq(kind, "completed"))
		ev->kind = UFFDD_EVENT_COMPLETED;
	else if (str_eq(kind, "failed"))
		ev->kind = UFFDD_EVENT_FAILED;
	else if (str_eq(kind, "cancelled"))
		ev->kind = UFFDD_EVENT_CANCELLED;
	else
		return 0;
	if (get_str(m, "session", ev->session, sizeof(ev->session)) < 0 ||
	    get_u64(m, "pages_total", 0, &ev->pages_total) < 0 ||
	    get_u64(m, "pages_installed",
		    ev->kind == UFFDD_EVENT_COMPLETED ? UINT64_MAX : 0, &ev->pages_installed) < 0 ||
	    get_u64(m, "pages_poisoned", 0, &ev->pages_poisoned) < 0 ||
	    get_str(m, "outcome", ev->outcome, sizeof(ev->outcome)) < 0 ||
	    get_str(m, "reason", ev->reason, sizeof(ev->reason)) < 0)
		return fail(err, UFFDD_ERR_PROTOCOL, "event field of the wrong type");
	if (ev->kind == UFFDD_EVENT_COMPLETED && ev->pages_installed == UINT64_MAX)
		ev->pages_installed = ev->pages_total;
	return 1;
}

static int enqueue_event(uffdd_client *c, const struct uffdd_event *ev, struct uffdd_error *err)
{
	if (c->evq_count == c->evq_cap) {
		size_t ncap = c->evq_cap ? c->evq_cap * 2 : 8;
		struct uffdd_event *nq = malloc(ncap * sizeof(*nq));
		if (!nq)
			return fail(err, UFFDD_ERR_NOMEM, "out of memory");
		for (size_t i = 0; i < c->evq_count; i++)
			nq[i] = c->evq[(c->evq_head + i) % c->evq_cap];
		free(c->evq);
		c->evq = nq;
		c->evq_cap = ncap;
		c->evq_head = 0;
	}
	c->evq[(c->evq_head + c->evq_count) % c->evq_cap] = *ev;
	c->evq_count++;
	return 0;
}

/* Turn an error reply into err. Always returns -1. */
static int daemon_error(const msgpack_object *m, struct uffdd_error *err)
{
	char code[64], msg[224];
	if (get_str(m, "error", code, sizeof(code)) < 0 || !code[0])
		return fail(err, UFFDD_ERR_PROTOCOL, "error reply without an \"error\" code");
	if (get_str(m, "message", msg, sizeof(msg)) < 0)
		msg[0] = '\0';
	int ec = UFFDD_ERR_DAEMON_OTHER;
	for (size_t i = 0; i < N_DAEMON_CODES; i++)
		if (strcmp(code, daemon_codes[i]) == 0)
			ec = UFFDD_ERR_DAEMON_BASE + (int)i;
	return fail(err, ec, "%s: %s", code, msg);
}

/*
 * Handle one non-reply frame. Returns 0 if it was consumed (event queued or
 * dropped), 1 if it is a reply (has "id"), -1 on error.
 */
static int classify(uffdd_client *c, const msgpack_object *m, struct uffdd_error *err)
{
	if (map_get(m, "event")) {
		struct uffdd_event ev;
		int r = parse_event(m, &ev, err);
		if (r < 0)
			return -1;
		if (r > 0 && enqueue_event(c, &ev, err) < 0)
			return -1;
		return 0;
	}
	const msgpack_object *id = map_get(m, "id");
	if (id && id->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
		return 1;
	/* An error frame without id is about the connection ("unauthorized",
	 * "frame-too-large"). */
	const msgpack_object *ok = map_get(m, "ok");
	if (ok && ok->type == MSGPACK_OBJECT_BOOLEAN && !ok->via.boolean)
		return daemon_error(m, err);
	return fail(err, UFFDD_ERR_PROTOCOL, "frame is neither an event nor a reply");
}

/*
 * Send a request (sb already framed, id already packed) and wait for its reply.
 * On success *reply holds the reply map (caller destroys it).
 */
static int transact(uffdd_client *c, uint64_t id, msgpack_sbuffer *sb, const struct fdset *fds,
		    msgpack_unpacked *reply, struct uffdd_error *err)
{
	int rc = frame_end(sb, err);
	if (rc == 0)
		rc = send_frame(c, sb, fds, err);
	msgpack_sbuffer_destroy(sb);
	if (rc < 0)
		return -1;
	int64_t deadline = c->reply_timeout_ms < 0 ? -1 : now_ms() + c->reply_timeout_ms;
	for (;;) {
		int r = read_frame(c, deadline, reply, err);
		if (r < 0)
			return -1;
		if (r == 0)
			return fail(err, UFFDD_ERR_TIMEOUT, "no reply within %d ms",
				    c->reply_timeout_ms);
		const msgpack_object *m = &reply->data;
		r = classify(c, m, err);
		if (r < 0)
			return -1;
		if (r == 0)
			continue;
		if (map_get(m, "id")->via.u64 != id)
			continue; /* late reply to an earlier, timed-out request */
		const msgpack_object *ok = map_get(m, "ok");
		if (!ok || ok->type != MSGPACK_OBJECT_BOOLEAN)
			return fail(err, UFFDD_ERR_PROTOCOL, "reply without a bool \"ok\"");
		if (!ok->via.boolean)
			return daemon_error(m, err);
		clear_err(err);
		return 0;
	}
}

static uint64_t new_id(uffdd_client *c)
{
	return ++c->next_id;
}

/* ------------------------------------------------------------------------ */
/* requests */

static int check_common(uffdd_client *c, const char *session, struct uffdd_error *err)
{
	if (!c)
		return fail(err, UFFDD_ERR_INVALID, "client is NULL");
	return check_session(session, err);
}

static int check_regions(const void *token, size_t token_len, const struct uffdd_region *r,
			 size_t n, struct uffdd_error *err)
{
	if (!token || token_len < 16 || token_len > 64)
		return fail(err, UFFDD_ERR_INVALID, "token must be 16..64 bytes");
	if (!r || n == 0)
		return fail(err, UFFDD_ERR_INVALID, "at least one region is needed");
	if (n > UINT32_MAX)
		return fail(err, UFFDD_ERR_INVALID, "too many regions");
	return 0;
}

static int reply_pages(msgpack_unpacked *reply, uint64_t *pages_out, struct uffdd_error *err)
{
	uint64_t pages;
	if (get_u64(&reply->data, "pages", 0, &pages) < 0)
		return fail(err, UFFDD_ERR_PROTOCOL, "reply field \"pages\" is not an unsigned int");
	if (pages_out)
		*pages_out = pages;
	return 0;
}

UFFDD_API int uffdd_export(uffdd_client *c, const char *session, const void *token,
			   size_t token_len, pid_t pid, const struct uffdd_region *regions,
			   size_t n, uint64_t *pages_out, struct uffdd_error *err)
{
	if (check_common(c, session, err) < 0 ||
	    check_regions(token, token_len, regions, n, err) < 0)
		return -1;
	if (pid < 0)
		return fail(err, UFFDD_ERR_INVALID, "pid is negative");
	struct fdset fds = { .n = 0 };
	int idx[n > 0 ? n : 1];
	for (size_t i = 0; i < n; i++) {
		idx[i] = -1;
		if (pid)
			continue;
		if (regions[i].memfd < 0)
			return fail(err, UFFDD_ERR_INVALID,
				    "region %zu: memfd mode (pid 0) needs a memfd", i);
		if ((idx[i] = fdset_index(&fds, regions[i].memfd, err)) < 0)
			return -1;
	}

	uint64_t id = new_id(c);
	msgpack_sbuffer sb;
	msgpack_packer pk;
	frame_begin(&sb, &pk, pid ? 6 : 5);
	pack_kv_str(&pk, "op", "export");
	pack_kv_u64(&pk, "id", id);
	pack_kv_str(&pk, "session", session);
	pack_cstr(&pk, "token");
	msgpack_pack_bin(&pk, token_len);
	msgpack_pack_bin_body(&pk, token, token_len);
	if (pid)
		pack_kv_u64(&pk, "pid", (uint64_t)pid);
	pack_cstr(&pk, "regions");
	msgpack_pack_array(&pk, n);
	for (size_t i = 0; i < n; i++) {
		const struct uffdd_region *r = &regions[i];
		msgpack_pack_map(&pk, pid ? 4 : 5);
		pack_kv_u64(&pk, "gpa", r->gpa);
		pack_kv_u64(&pk, "size", r->size);
		pack_kv_u64(&pk, "page_size", r->page_size);
		if (pid) {
			pack_kv_u64(&pk, "addr", r->addr);
		} else {
			pack_kv_u64(&pk, "fd", (uint64_t)idx[i]);
			pack_kv_u64(&pk, "offset", r->offset);
		}
	}
	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	int rc = transact(c, id, &sb, &fds, &reply, err);
	if (rc == 0)
		rc = reply_pages(&reply, pages_out, err);
	msgpack_unpacked_destroy(&reply);
	return rc;
}

UFFDD_API int uffdd_import(uffdd_client *c, const char *session, const void *token,
			   size_t token_len, const char *peer,
			   const struct uffdd_import_options *opts,
			   const struct uffdd_region *regions, size_t n,
			   uint64_t *pages_out, struct uffdd_error *err)
{
	if (check_common(c, session, err) < 0 ||
	    check_regions(token, token_len, regions, n, err) < 0)
		return -1;
	if (!peer || !*peer)
		return fail(err, UFFDD_ERR_INVALID, "peer address is empty");
	if (opts && opts->policy && strcmp(opts->policy, "crash") != 0 &&
	    strcmp(opts->policy, "poison") != 0)
		return fail(err, UFFDD_ERR_INVALID, "policy must be \"crash\" or \"poison\"");
	struct fdset fds = { .n = 0 };
	int uidx[n], midx[n];
	for (size_t i = 0; i < n; i++) {
		const struct uffdd_region *r = &regions[i];
		if (r->uffd < 0)
			return fail(err, UFFDD_ERR_INVALID, "region %zu has no uffd", i);
		if (r->mode != UFFDD_MODE_MISSING && r->mode != UFFDD_MODE_MINOR)
			return fail(err, UFFDD_ERR_INVALID, "region %zu: unknown mode %d", i,
				    (int)r->mode);
		if (r->mode == UFFDD_MODE_MINOR && r->memfd < 0)
			return fail(err, UFFDD_ERR_INVALID, "region %zu: minor mode needs a memfd",
				    i);
		if ((uidx[i] = fdset_index(&fds, r->uffd, err)) < 0)
			return -1;
		midx[i] = -1;
		if (r->memfd >= 0 && (midx[i] = fdset_index(&fds, r->memfd, err)) < 0)
			return -1;
	}
	bool has_strategy = opts && opts->strategy;
	bool has_policy = opts && opts->policy;
	bool has_deadline = opts && opts->deadline_seconds > 0;

	uint64_t id = new_id(c);
	msgpack_sbuffer sb;
	msgpack_packer pk;
	frame_begin(&sb, &pk, 6 + has_strategy + has_policy + has_deadline);
	pack_kv_str(&pk, "op", "import");
	pack_kv_u64(&pk, "id", id);
	pack_kv_str(&pk, "session", session);
	pack_cstr(&pk, "token");
	msgpack_pack_bin(&pk, token_len);
	msgpack_pack_bin_body(&pk, token, token_len);
	pack_kv_str(&pk, "peer", peer);
	if (has_strategy)
		pack_kv_str(&pk, "strategy", opts->strategy);
	if (has_policy)
		pack_kv_str(&pk, "policy", opts->policy);
	if (has_deadline) {
		pack_cstr(&pk, "deadline");
		msgpack_pack_double(&pk, opts->deadline_seconds);
	}
	pack_cstr(&pk, "regions");
	msgpack_pack_array(&pk, n);
	for (size_t i = 0; i < n; i++) {
		const struct uffdd_region *r = &regions[i];
		msgpack_pack_map(&pk, midx[i] >= 0 ? 8 : 6);
		pack_kv_u64(&pk, "gpa", r->gpa);
		pack_kv_u64(&pk, "addr", r->addr);
		pack_kv_u64(&pk, "size", r->size);
		pack_kv_u64(&pk, "page_size", r->page_size);
		pack_kv_u64(&pk, "uffd", (uint64_t)uidx[i]);
		pack_kv_str(&pk, "mode", r->mode == UFFDD_MODE_MINOR ? "minor" : "missing");
		if (midx[i] >= 0) {
			pack_kv_u64(&pk, "fd", (uint64_t)midx[i]);
			pack_kv_u64(&pk, "offset", r->offset);
		}
	}
	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	int rc = transact(c, id, &sb, &fds, &reply, err);
	if (rc == 0)
		rc = reply_pages(&reply, pages_out, err);
	msgpack_unpacked_destroy(&reply);
	return rc;
}

/* Requests whose body is {"op", "id", "session"} and whose reply has no fields. */
static int simple_request(uffdd_client *c, const char *op, const char *session,
			  struct uffdd_error *err)
{
	if (check_common(c, session, err) < 0)
		return -1;
	uint64_t id = new_id(c);
	msgpack_sbuffer sb;
	msgpack_packer pk;
	frame_begin(&sb, &pk, 3);
	pack_kv_str(&pk, "op", op);
	pack_kv_u64(&pk, "id", id);
	pack_kv_str(&pk, "session", session);
	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	int rc = transact(c, id, &sb, NULL, &reply, err);
	msgpack_unpacked_destroy(&reply);
	return rc;
}

UFFDD_API int uffdd_subscribe(uffdd_client *c, const char *session, struct uffdd_error *err)
{
	return simple_request(c, "subscribe", session, err);
}

UFFDD_API int uffdd_cancel(uffdd_client *c, const char *session, struct uffdd_error *err)
{
	return simple_request(c, "cancel", session, err);
}

static int parse_verdict(const msgpack_object *m, struct uffdd_verdict *out,
			 struct uffdd_error *err)
{
	const msgpack_object *v = map_get(m, "verdict");
	memset(out, 0, sizeof(*out));
	if (str_eq(v, "resume"))
		out->kind = UFFDD_VERDICT_RESUME;
	else if (str_eq(v, "populate"))
		out->kind = UFFDD_VERDICT_POPULATE;
	else if (str_eq(v, "inject-memory-error"))
		out->kind = UFFDD_VERDICT_INJECT_MEMORY_ERROR;
	else if (str_eq(v, "crash"))
		out->kind = UFFDD_VERDICT_CRASH;
	else
		return fail(err, UFFDD_ERR_PROTOCOL, "reply has no known \"verdict\"");
	if (get_u64(m, "addr", 0, &out->addr) < 0 || get_u64(m, "gpa", 0, &out->gpa) < 0 ||
	    get_u64(m, "size", 0, &out->size) < 0 ||
	    get_str(m, "reason", out->reason, sizeof(out->reason)) < 0)
		return fail(err, UFFDD_ERR_PROTOCOL, "verdict field of the wrong type");
	return 0;
}

static const char *access_name(enum uffdd_access a)
{
	switch (a) {
	case UFFDD_ACCESS_READ: return "read";
	case UFFDD_ACCESS_WRITE: return "write";
	case UFFDD_ACCESS_EXEC: return "exec";
	}
	return NULL;
}

UFFDD_API int uffdd_resolve(uffdd_client *c, const char *session, const struct uffdd_exit *exit,
			    struct uffdd_verdict *out, struct uffdd_error *err)
{
	if (check_common(c, session, err) < 0)
		return -1;
	if (!exit || !out)
		return fail(err, UFFDD_ERR_INVALID, "exit or verdict is NULL");
	const char *access = access_name(exit->access);
	if (!access)
		return fail(err, UFFDD_ERR_INVALID, "unknown access %d", (int)exit->access);
	uint64_t id = new_id(c);
	msgpack_sbuffer sb;
	msgpack_packer pk;
	frame_begin(&sb, &pk, 8);
	pack_kv_str(&pk, "op", "resolve");
	pack_kv_u64(&pk, "id", id);
	pack_kv_str(&pk, "session", session);
	pack_kv_u64(&pk, "vcpu", exit->vcpu);
	if (exit->use_addr)
		pack_kv_u64(&pk, "addr", exit->addr);
	else
		pack_kv_u64(&pk, "gpa", exit->gpa);
	pack_kv_u64(&pk, "size", exit->size);
	pack_kv_str(&pk, "access", access);
	pack_kv_u64(&pk, "flags", exit->flags);
	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	int rc = transact(c, id, &sb, NULL, &reply, err);
	if (rc == 0)
		rc = parse_verdict(&reply.data, out, err);
	msgpack_unpacked_destroy(&reply);
	return rc;
}

UFFDD_API int uffdd_populate_failed(uffdd_client *c, const char *session, uint32_t vcpu,
				    uint64_t gpa, int errno_value, struct uffdd_verdict *out,
				    struct uffdd_error *err)
{
	if (check_common(c, session, err) < 0)
		return -1;
	if (!out)
		return fail(err, UFFDD_ERR_INVALID, "verdict is NULL");
	if (errno_value < 0)
		return fail(err, UFFDD_ERR_INVALID, "errno is negative");
	uint64_t id = new_id(c);
	msgpack_sbuffer sb;
	msgpack_packer pk;
	frame_begin(&sb, &pk, 6);
	pack_kv_str(&pk, "op", "populate-failed");
	pack_kv_u64(&pk, "id", id);
	pack_kv_str(&pk, "session", session);
	pack_kv_u64(&pk, "vcpu", vcpu);
	pack_kv_u64(&pk, "gpa", gpa);
	pack_kv_u64(&pk, "errno", (uint64_t)errno_value);
	msgpack_unpacked reply;
	msgpack_unpacked_init(&reply);
	int rc = transact(c, id, &sb, NULL, &reply, err);
	if (rc == 0)
		rc = parse_verdict(&reply.data, out, err);
	msgpack_unpacked_destroy(&reply);
	return rc;
}

/* ------------------------------------------------------------------------ */
/* events */

UFFDD_API int uffdd_next_event(uffdd_client *c, struct uffdd_event *ev, int timeout_ms,
			       struct uffdd_error *err)
{
	if (!c || !ev)
		return fail(err, UFFDD_ERR_INVALID, "client or event is NULL");
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	for (;;) {
		if (c->evq_count) {
			*ev = c->evq[c->evq_head];
			c->evq_head = (c->evq_head + 1) % c->evq_cap;
			c->evq_count--;
			clear_err(err);
			return 1;
		}
		msgpack_unpacked m;
		msgpack_unpacked_init(&m);
		int r = read_frame(c, deadline, &m, err);
		if (r > 0)
			r = classify(c, &m.data, err); /* a reply (1) is dropped */
		msgpack_unpacked_destroy(&m);
		if (r < 0)
			return -1;
		if (r == 0 && c->evq_count == 0 && remaining(deadline) == 0) {
			clear_err(err);
			return 0;
		}
	}
}
