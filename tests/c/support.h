/* Test support for the C harness: JWT signing, a tiny HTTP client, the emulator
 * process and a tiny upstream (event handler) server. Loopback only. */
#ifndef WPS_TEST_SUPPORT_H
#define WPS_TEST_SUPPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* HMAC-SHA256 of msg with key; out receives 32 bytes. */
void hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *msg, size_t msg_len, uint8_t out[32]);
/* SHA-256 of data; out receives 32 bytes. */
void sha256(const uint8_t *data, size_t len, uint8_t out[32]);

/* Signs an HS256 JWT. claims_json is the payload object; returns a malloc'd string. */
char *jwt_sign(const char *key, const char *claims_json);

/* A running emulator process. */
typedef struct {
    pid_t pid;
    int port;
    int tls;
    char key[256];
} emulator;

/* Starts `bin` on 127.0.0.1 port 0 (extra args may be NULL-terminated list); 0 on success. */
int emulator_start(emulator *e, const char *bin, const char *const *extra_args);
/* Stops it (SIGTERM, then waits); returns the exit status or -1. */
int emulator_stop(emulator *e);
/* A client URL for `hub` with a token for `user` (NULL = anonymous) and a JSON array of
 * roles; wss:// when the emulator serves TLS. */
char *emulator_client_url(const emulator *e, const char *hub, const char *user, const char *roles_json);

/* Sends an HTTP request to 127.0.0.1:port; returns the status code or -1. Optional body and
 * bearer token; content_type may be NULL. */
int http_request(int port, const char *method, const char *path, const char *bearer,
                 const char *content_type, const char *body);

/* The upstream server: echoes the body of user events (invoke replies), answers the
 * event "fail" with HTTP 500 and holds "slow" until released (or 5 s). */
typedef struct upstream upstream;
upstream *upstream_start(void);
int upstream_port(const upstream *u);
/* Releases the "slow" requests held so far. */
void upstream_release(upstream *u);
/* Number of user events named `event` received so far, and the last body seen. */
int upstream_count(upstream *u, const char *event, char *last_body, size_t cap);
void upstream_stop(upstream *u);

/* Monotonic milliseconds. */
int64_t now_ms(void);

#endif
