/* Internal interfaces of libuffdd, shared with the C tests. Not installed. */
#ifndef UFFDD_INTERNAL_H
#define UFFDD_INTERNAL_H

#include "uffdd.h"

#define UFFDD_API __attribute__((visibility("default")))

/* Most fds one request frame may carry (README, wire protocol: limits.max_fds_per_request). */
#define UFFDD_MAX_FDS 64
/* Largest frame body the client accepts from the daemon. */
#define UFFDD_MAX_FRAME (16u << 20)

/* Wrap an already connected stream socket (tests use one end of a socketpair).
 * The client owns fd from then on. */
uffdd_client *uffdd__client_from_fd(int fd, struct uffdd_error *err);

#endif
