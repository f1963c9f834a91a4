/*
 * Unit tests of libuffdd's connection handling that the Python encoding test
 * does not reach: many queued events (ring growth and wrap-around), a reply
 * larger than the receive buffer, the fd limit, EOF inside a frame, a frame
 * length over the limit, and uffdd_fd/uffdd_events_pending. The "daemon" is a
 * thread on the other end of a socketpair.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <msgpack.h>

#include "internal.h"

static int failures, checks;

#define CHECK(cond)                                                                     \
	do {                                                                            \
		checks++;                                                               \
		if (!(cond)) {                                                          \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, \
				#cond);                                                 \
			failures++;                                                     \
		}                                                                       \
	} while (0)

static const unsigned char TOKEN[16] = "0123456789abcdef";

static void pk_str(msgpack_packer *pk, const char *s)
{
	msgpack_pack_str(pk, strlen(s));
	msgpack_pack_str_body(pk, s, strlen(s));
}

static void send_frame(int fd, msgpack_sbuffer *sb)
{
	unsigned char h[4] = { (unsigned char)(sb->size >> 24), (unsigned char)(sb->size >> 16),
			       (unsigned char)(sb->size >> 8), (unsigned char)sb->size };
	if (write(fd, h, 4) != 4 || write(fd, sb->data, sb->size) != (ssize_t)sb->size)
		perror("write");
}

static void send_progress(int fd, uint64_t n)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 4);
	pk_str(&pk, "event");
	pk_str(&pk, "progress");
	pk_str(&pk, "session");
	pk_str(&pk, "s");
	pk_str(&pk, "pages_total");
	msgpack_pack_uint64(&pk, 1000);
	pk_str(&pk, "pages_installed");
	msgpack_pack_uint64(&pk, n);
	send_frame(fd, &sb);
	msgpack_sbuffer_destroy(&sb);
}

/* Read one request frame (ignoring its content) from the client. */
static void read_request(int fd)
{
	unsigned char h[4];
	if (recv(fd, h, 4, MSG_WAITALL) != 4)
		return;
	uint32_t len = (uint32_t)h[0] << 24 | h[1] << 16 | h[2] << 8 | h[3];
	char *b = malloc(len);
	if (recv(fd, b, len, MSG_WAITALL) != (ssize_t)len)
		perror("recv");
	free(b);
}

/* --- many events queued behind a reply, then a huge reply --- */

static void *server_events(void *arg)
{
	int fd = (int)(intptr_t)arg;
	read_request(fd); /* subscribe */
	for (uint64_t i = 0; i < 5; i++)
		send_progress(fd, i);
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 2);
	pk_str(&pk, "id");
	msgpack_pack_uint64(&pk, 1);
	pk_str(&pk, "ok");
	msgpack_pack_true(&pk);
	send_frame(fd, &sb);
	msgpack_sbuffer_destroy(&sb);

	read_request(fd); /* cancel: 40 more events, then a 300 KiB reply */
	for (uint64_t i = 5; i < 45; i++)
		send_progress(fd, i);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 3);
	pk_str(&pk, "id");
	msgpack_pack_uint64(&pk, 2);
	pk_str(&pk, "ok");
	msgpack_pack_true(&pk);
	pk_str(&pk, "padding"); /* unknown fields are ignored */
	static char big[300 << 10];
	memset(big, 'x', sizeof(big));
	msgpack_pack_str(&pk, sizeof(big));
	msgpack_pack_str_body(&pk, big, sizeof(big));
	send_frame(fd, &sb);
	msgpack_sbuffer_destroy(&sb);
	/* a frame cut short by EOF */
	unsigned char partial[6] = { 0, 0, 0, 10, 0x81, 0xa1 };
	if (write(fd, partial, sizeof(partial)) != sizeof(partial))
		perror("write");
	close(fd);
	return NULL;
}

static void test_event_queue_and_big_reply(void)
{
	int sv[2];
	socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
	struct uffdd_error err;
	uffdd_client *c = uffdd__client_from_fd(sv[0], &err);
	CHECK(uffdd_fd(c) == sv[0]);
	pthread_t th;
	pthread_create(&th, NULL, server_events, (void *)(intptr_t)sv[1]);

	CHECK(uffdd_subscribe(c, "s", &err) == 0);
	CHECK(uffdd_events_pending(c) == 5);
	struct uffdd_event ev;
	/* take 3, leaving the ring's head in the middle, then queue 40 more */
	for (uint64_t i = 0; i < 3; i++) {
		CHECK(uffdd_next_event(c, &ev, 0, &err) == 1);
		CHECK(ev.kind == UFFDD_EVENT_PROGRESS && ev.pages_installed == i);
	}
	CHECK(uffdd_cancel(c, "s", &err) == 0);
	CHECK(uffdd_events_pending(c) == 42);
	for (uint64_t i = 3; i < 45; i++) {
		CHECK(uffdd_next_event(c, &ev, 0, &err) == 1);
		CHECK(ev.pages_installed == i && !strcmp(ev.session, "s") && ev.pages_total == 1000);
	}
	CHECK(uffdd_events_pending(c) == 0);
	CHECK(uffdd_next_event(c, &ev, 1000, &err) == -1);
	CHECK(err.code == UFFDD_ERR_CLOSED);
	CHECK(strstr(err.message, "inside a frame") != NULL);
	/* the client stays usable for errors after EOF */
	CHECK(uffdd_cancel(c, "s", &err) == -1);
	CHECK(err.code == UFFDD_ERR_CLOSED);
	pthread_join(th, NULL);
	uffdd_close(c);
}

/* --- a length over the limit is a protocol error --- */

static void test_frame_too_large(void)
{
	int sv[2];
	socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
	struct uffdd_error err;
	uffdd_client *c = uffdd__client_from_fd(sv[0], &err);
	unsigned char h[4] = { 0x7f, 0, 0, 0 };
	CHECK(write(sv[1], h, 4) == 4);
	struct uffdd_event ev;
	CHECK(uffdd_next_event(c, &ev, 1000, &err) == -1);
	CHECK(err.code == UFFDD_ERR_PROTOCOL);
	/* timeout with nothing to read */
	int sv2[2];
	socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv2);
	uffdd_client *c2 = uffdd__client_from_fd(sv2[0], &err);
	CHECK(uffdd_next_event(c2, &ev, 50, &err) == 0);
	CHECK(err.code == UFFDD_OK);
	uffdd_close(c);
	uffdd_close(c2);
	close(sv[1]);
	close(sv2[1]);
}

/* --- more than 64 distinct fds are refused before sending --- */

static void test_fd_limit(void)
{
	int sv[2];
	socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
	struct uffdd_error err;
	uffdd_client *c = uffdd__client_from_fd(sv[0], &err);
	struct uffdd_region r[65];
	for (int i = 0; i < 65; i++) {
		r[i] = (struct uffdd_region){ .gpa = (uint64_t)i << 12, .size = 4096,
					      .page_size = 4096, .uffd = -1, .memfd = 100 + i };
	}
	CHECK(uffdd_export(c, "s", TOKEN, 16, 0, r, 65, NULL, &err) == -1);
	CHECK(err.code == UFFDD_ERR_INVALID && strstr(err.message, "64"));
	/* 64 regions sharing 2 fds are fine to encode: they are deduplicated.
	 * (Nothing answers, so use a short timeout.) */
	int a = memfd_create("a", MFD_CLOEXEC), b = memfd_create("b", MFD_CLOEXEC);
	for (int i = 0; i < 64; i++)
		r[i].memfd = i % 2 ? a : b;
	uffdd_set_reply_timeout(c, 50);
	CHECK(uffdd_export(c, "s", TOKEN, 16, 0, r, 64, NULL, &err) == -1);
	CHECK(err.code == UFFDD_ERR_TIMEOUT);
	/* the frame arrived with exactly 2 fds */
	char buf[8192];
	union {
		char b[CMSG_SPACE(sizeof(int) * 64)];
		struct cmsghdr a;
	} ctl;
	struct iovec iov = { buf, sizeof(buf) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
			     .msg_controllen = sizeof(ctl.b) };
	CHECK(recvmsg(sv[1], &mh, MSG_CMSG_CLOEXEC) > 0);
	struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
	CHECK(cm && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len == CMSG_LEN(2 * sizeof(int)));
	if (cm) {
		int got[2];
		memcpy(got, CMSG_DATA(cm), sizeof(got));
		close(got[0]);
		close(got[1]);
	}
	close(a);
	close(b);
	uffdd_close(c);
	close(sv[1]);
}

static void test_misc(void)
{
	struct uffdd_error err;
	CHECK(uffdd_connect("/nonexistent/uffdd.sock", &err) == NULL);
	CHECK(err.code == UFFDD_ERR_SYSTEM && err.sys_errno == ENOENT);
	CHECK(!strcmp(uffdd_error_name(UFFDD_ERR_BAD_FDS), "bad-fds"));
	CHECK(!strcmp(uffdd_error_name(UFFDD_ERR_INTERNAL), "internal"));
	CHECK(!strcmp(uffdd_error_name(12345), "unknown"));
	CHECK(uffdd_fd(NULL) == -1 && uffdd_events_pending(NULL) == 0);
	uffdd_close(NULL);
	/* a NULL err is allowed everywhere */
	CHECK(uffdd_connect(NULL, NULL) == NULL);
	CHECK(uffdd_subscribe(NULL, "s", NULL) == -1);
}

int main(void)
{
	test_event_queue_and_big_reply();
	test_frame_too_large();
	test_fd_limit();
	test_misc();
	printf("test_client: %d passed, %d failed\n", checks - failures, failures);
	return failures ? 1 : 0;
}
