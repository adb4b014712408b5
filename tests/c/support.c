/* Test support for the C harness (see support.h). */
#define _GNU_SOURCE
#include "support.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- SHA-256 (FIPS 180-4) */

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const uint8_t b[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)b[4 * i] << 24 | (uint32_t)b[4 * i + 1] << 16 | (uint32_t)b[4 * i + 2] << 8 | b[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], bb = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = hh + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & bb) ^ (a & c) ^ (bb & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = bb; bb = a; a = t1 + t2;
    }
    h[0] += a; h[1] += bb; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

void sha256(const uint8_t *data, size_t len, uint8_t out[32]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t full = len / 64 * 64;
    for (size_t i = 0; i < full; i += 64) sha256_block(h, data + i);
    uint8_t tail[128] = {0};
    size_t rest = len - full;
    memcpy(tail, data + full, rest);
    tail[rest] = 0x80;
    size_t tail_len = rest + 9 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) tail[tail_len - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t i = 0; i < tail_len; i += 64) sha256_block(h, tail + i);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24); out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8); out[4 * i + 3] = (uint8_t)h[i];
    }
}

void hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *msg, size_t msg_len, uint8_t out[32]) {
    uint8_t k[64] = {0};
    if (key_len > 64) sha256(key, key_len, k);
    else memcpy(k, key, key_len);
    uint8_t *inner = malloc(64 + msg_len);
    for (int i = 0; i < 64; i++) inner[i] = k[i] ^ 0x36;
    memcpy(inner + 64, msg, msg_len);
    uint8_t ih[32];
    sha256(inner, 64 + msg_len, ih);
    free(inner);
    uint8_t outer[96];
    for (int i = 0; i < 64; i++) outer[i] = k[i] ^ 0x5c;
    memcpy(outer + 64, ih, 32);
    sha256(outer, 96, out);
}

static char *b64url(const uint8_t *d, size_t n) {
    static const char *T = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char *out = malloc(n * 4 / 3 + 4), *p = out;
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8 | d[i + 2];
        *p++ = T[v >> 18]; *p++ = T[(v >> 12) & 63]; *p++ = T[(v >> 6) & 63]; *p++ = T[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)d[i] << 16;
        *p++ = T[v >> 18]; *p++ = T[(v >> 12) & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8;
        *p++ = T[v >> 18]; *p++ = T[(v >> 12) & 63]; *p++ = T[(v >> 6) & 63];
    }
    *p = 0;
    return out;
}

char *jwt_sign(const char *key, const char *claims_json) {
    const char *header = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    char *h = b64url((const uint8_t *)header, strlen(header));
    char *c = b64url((const uint8_t *)claims_json, strlen(claims_json));
    size_t n = strlen(h) + strlen(c) + 2;
    char *signing = malloc(n);
    snprintf(signing, n, "%s.%s", h, c);
    uint8_t mac[32];
    hmac_sha256((const uint8_t *)key, strlen(key), (const uint8_t *)signing, strlen(signing), mac);
    char *s = b64url(mac, 32);
    size_t m = strlen(signing) + strlen(s) + 2;
    char *out = malloc(m);
    snprintf(out, m, "%s.%s", signing, s);
    free(h); free(c); free(signing); free(s);
    return out;
}

int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------- the emulator process */

int emulator_start(emulator *e, const char *bin, const char *const *extra_args) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    const char *argv[32] = {bin, "--host", "127.0.0.1", "--port", "0"};
    int argc = 5;
    for (int i = 0; extra_args && extra_args[i] && argc < 30; i++) argv[argc++] = extra_args[i];
    argv[argc] = NULL;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    FILE *f = fdopen(fds[0], "r");
    char line[512] = {0};
    bool ok = f && fgets(line, sizeof line, f) != NULL;
    if (f) fclose(f); /* the emulator logs to stderr only; a closed stdout is fine */
    e->pid = pid;
    char *port = ok ? strstr(line, "Port=") : NULL;
    char *key = ok ? strstr(line, "AccessKey=") : NULL;
    if (!port || !key) {
        fprintf(stderr, "emulator: unexpected first line: %s\n", line);
        emulator_stop(e);
        return -1;
    }
    e->port = atoi(port + 5);
    e->tls = strstr(line, "Endpoint=https://") != NULL;
    key += strlen("AccessKey=");
    size_t n = strcspn(key, ";\r\n");
    if (n >= sizeof e->key) n = sizeof e->key - 1;
    memcpy(e->key, key, n);
    e->key[n] = 0;
    return 0;
}

int emulator_stop(emulator *e) {
    if (e->pid <= 0) return -1;
    kill(e->pid, SIGTERM);
    int status = 0;
    for (int i = 0; i < 500; i++) {
        pid_t r = waitpid(e->pid, &status, WNOHANG);
        if (r == e->pid) {
            e->pid = 0;
            return status;
        }
        usleep(10000);
    }
    kill(e->pid, SIGKILL);
    waitpid(e->pid, &status, 0);
    e->pid = 0;
    return -1;
}

char *emulator_client_url(const emulator *e, const char *hub, const char *user, const char *roles_json) {
    char claims[1024], sub[300] = "";
    long now = (long)time(NULL);
    if (user) snprintf(sub, sizeof sub, ",\"sub\":\"%s\"", user);
    snprintf(claims, sizeof claims, "{\"aud\":\"http://127.0.0.1:%d/client/hubs/%s\",\"iat\":%ld,\"exp\":%ld%s,\"role\":%s}",
             e->port, hub, now, now + 3600, sub, roles_json ? roles_json : "[]");
    char *token = jwt_sign(e->key, claims);
    size_t n = strlen(token) + strlen(hub) + 128;
    char *url = malloc(n);
    snprintf(url, n, "%s://127.0.0.1:%d/client/hubs/%s?access_token=%s", e->tls ? "wss" : "ws", e->port, hub, token);
    free(token);
    return url;
}

/* ---------------------------------------------------------------- HTTP */

static int connect_loopback(int port) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {10, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
        close(s);
        return -1;
    }
    return s;
}

static bool write_all(int s, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(s, p, n, MSG_NOSIGNAL);
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

int http_request(int port, const char *method, const char *path, const char *bearer,
                 const char *content_type, const char *body) {
    int s = connect_loopback(port);
    if (s < 0) return -1;
    size_t blen = body ? strlen(body) : 0;
    char head[4096];
    int n = snprintf(head, sizeof head, "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\nContent-Length: %zu\r\n",
                     method, path, port, blen);
    if (bearer) n += snprintf(head + n, sizeof head - (size_t)n, "Authorization: Bearer %s\r\n", bearer);
    if (content_type) n += snprintf(head + n, sizeof head - (size_t)n, "Content-Type: %s\r\n", content_type);
    n += snprintf(head + n, sizeof head - (size_t)n, "\r\n");
    int code = -1;
    if (write_all(s, head, (size_t)n) && (!body || write_all(s, body, blen))) {
        char resp[256] = {0};
        ssize_t r = recv(s, resp, sizeof resp - 1, 0);
        if (r > 12 && strncmp(resp, "HTTP/1.", 7) == 0) code = atoi(resp + 9);
    }
    close(s);
    return code;
}

/* ---------------------------------------------------------------- upstream server */

struct upstream {
    int listen_fd;
    int port;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned release_gen;
    bool stopping;
    int active;
    struct { char name[64]; int count; char last[512]; } events[16];
    int nevents;
};

typedef struct {
    upstream *u;
    int fd;
} conn_arg;

static const char *find_header(const char *head, const char *name, char *out, size_t cap) {
    size_t nl = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p; p = strstr(p + 2, "\r\n")) {
        const char *line = p + 2;
        if (strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
            const char *v = line + nl + 1;
            while (*v == ' ') v++;
            size_t n = strcspn(v, "\r\n");
            if (n >= cap) n = cap - 1;
            memcpy(out, v, n);
            out[n] = 0;
            return out;
        }
    }
    return NULL;
}

static void copy_bounded(char *dst, size_t cap, const char *src) {
    size_t n = strnlen(src, cap - 1);
    memcpy(dst, src, n);
    dst[n] = 0;
}

static void record_event(upstream *u, const char *name, const char *body) {
    int i = 0;
    for (; i < u->nevents; i++)
        if (strcmp(u->events[i].name, name) == 0) break;
    if (i == u->nevents) {
        if (u->nevents == 16) return;
        u->nevents++;
        copy_bounded(u->events[i].name, sizeof u->events[i].name, name);
    }
    u->events[i].count++;
    copy_bounded(u->events[i].last, sizeof u->events[i].last, body);
}

static void *serve_conn(void *p) {
    conn_arg *a = p;
    upstream *u = a->u;
    int fd = a->fd;
    free(a);
    char buf[65536];
    buf[0] = 0;
    size_t have = 0;
    char *end = NULL;
    while (have < sizeof buf - 1 && !(end = strstr(buf, "\r\n\r\n"))) {
        ssize_t r = recv(fd, buf + have, sizeof buf - 1 - have, 0);
        if (r <= 0) break;
        have += (size_t)r;
        buf[have] = 0;
    }
    if (end) {
        *end = 0;
        char *body = end + 4;
        char v[256];
        size_t clen = find_header(buf, "content-length", v, sizeof v) ? (size_t)atol(v) : 0;
        size_t got = have - (size_t)(body - buf);
        while (got < clen && (size_t)(body - buf) + clen < sizeof buf - 1) {
            ssize_t r = recv(fd, body + got, clen - got, 0);
            if (r <= 0) break;
            got += (size_t)r;
        }
        size_t body_len = got < clen ? got : clen;
        body[body_len] = 0;
        char type[256] = "", ctype[128] = "text/plain";
        find_header(buf, "ce-type", type, sizeof type);
        find_header(buf, "content-type", ctype, sizeof ctype);
        const char *prefix = "azure.webpubsub.user.";
        const char *name = strncmp(type, prefix, strlen(prefix)) == 0 ? type + strlen(prefix) : NULL;
        int code = 200;
        if (name) {
            pthread_mutex_lock(&u->mu);
            record_event(u, name, body);
            if (strcmp(name, "slow") == 0) {
                struct timespec dl;
                clock_gettime(CLOCK_REALTIME, &dl);
                dl.tv_sec += 5;
                unsigned gen = u->release_gen;
                while (gen == u->release_gen && !u->stopping)
                    if (pthread_cond_timedwait(&u->cv, &u->mu, &dl) != 0) break;
            }
            pthread_mutex_unlock(&u->mu);
            if (strcmp(name, "fail") == 0) code = 500;
        }
        char head[512];
        size_t blen = name && code == 200 ? body_len : 0;
        int n = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                         code, code == 200 ? "OK" : "Internal Server Error", ctype, blen);
        if (write_all(fd, head, (size_t)n)) write_all(fd, body, blen);
    }
    close(fd);
    pthread_mutex_lock(&u->mu);
    u->active--;
    pthread_cond_broadcast(&u->cv);
    pthread_mutex_unlock(&u->mu);
    return NULL;
}

static void *accept_loop(void *p) {
    upstream *u = p;
    for (;;) {
        int fd = accept4(u->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) continue;
            return NULL;
        }
        pthread_mutex_lock(&u->mu);
        bool stop = u->stopping;
        if (!stop) u->active++;
        pthread_mutex_unlock(&u->mu);
        if (stop) {
            close(fd);
            return NULL;
        }
        conn_arg *a = malloc(sizeof *a);
        a->u = u;
        a->fd = fd;
        pthread_t t;
        pthread_create(&t, NULL, serve_conn, a);
        pthread_detach(t);
    }
}

upstream *upstream_start(void) {
    upstream *u = calloc(1, sizeof *u);
    pthread_mutex_init(&u->mu, NULL);
    pthread_cond_init(&u->cv, NULL);
    u->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(u->listen_fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(u->listen_fd, 64) != 0 ||
        getsockname(u->listen_fd, (struct sockaddr *)&a, &len) != 0) {
        close(u->listen_fd);
        free(u);
        return NULL;
    }
    u->port = ntohs(a.sin_port);
    pthread_create(&u->thread, NULL, accept_loop, u);
    return u;
}

int upstream_port(const upstream *u) { return u->port; }

void upstream_release(upstream *u) {
    pthread_mutex_lock(&u->mu);
    u->release_gen++;
    pthread_cond_broadcast(&u->cv);
    pthread_mutex_unlock(&u->mu);
}

int upstream_count(upstream *u, const char *event, char *last_body, size_t cap) {
    int count = 0;
    pthread_mutex_lock(&u->mu);
    for (int i = 0; i < u->nevents; i++)
        if (strcmp(u->events[i].name, event) == 0) {
            count = u->events[i].count;
            if (last_body) snprintf(last_body, cap, "%s", u->events[i].last);
        }
    pthread_mutex_unlock(&u->mu);
    return count;
}

void upstream_stop(upstream *u) {
    pthread_mutex_lock(&u->mu);
    u->stopping = true;
    pthread_cond_broadcast(&u->cv);
    pthread_mutex_unlock(&u->mu);
    shutdown(u->listen_fd, SHUT_RDWR);
    close(u->listen_fd);
    pthread_join(u->thread, NULL);
    pthread_mutex_lock(&u->mu);
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 10;
    while (u->active > 0)
        if (pthread_cond_timedwait(&u->cv, &u->mu, &dl) != 0) break;
    int left = u->active;
    pthread_mutex_unlock(&u->mu);
    if (left == 0) {
        pthread_mutex_destroy(&u->mu);
        pthread_cond_destroy(&u->cv);
        free(u);
    }
}
