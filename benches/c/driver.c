/* Benchmark driver for the C API (include/webpubsub_client.h, linking the cdylib).
 *
 * Command line and output are the ones every driver shares (benches/BENCHMARKS.md):
 * one JSON result line on stdout, preceded by a START (or READY) marker line.
 * Blocking calls for sequential and fire-and-forget sends; the asynchronous API in poll
 * mode (completion callbacks on the publisher's own thread) for pipelined acked sends. */

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "webpubsub_client.h"

#define IDLE_MIDPOINT 100

struct args {
    const char *scenario;
    const char *url;
    const char *group;
    long count;
    double seconds;
    long size;
    bool binary;
    long window;
    long clients;
    long idle_ms;
    bool go;
};

static struct args A = {
    .group = "bench", .count = 1000, .seconds = 5, .size = 16, .clients = 1000, .idle_ms = 500,
};
static uint8_t *PAYLOAD;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, wps_status s) {
    fprintf(stderr, "bench-c: %s: %s (%s)\n", what, wps_status_str(s), wps_last_error_message());
    exit(1);
}

static void check(const char *what, wps_status s) {
    if (s != WPS_STATUS_OK) die(what, s);
}

static void mark(const char *line) {
    printf("%s\n", line);
    fflush(stdout);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(const double *sorted, long n, double q) {
    if (n == 0) return 0;
    long rank = (long)(q * (double)n + 0.999999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1];
}

static uint32_t data_type(void) { return A.binary ? WPS_DATA_TYPE_BINARY : WPS_DATA_TYPE_TEXT; }

static void emit_head(void) { printf("{\"driver\":\"c\",\"scenario\":\"%s\"", A.scenario); }

static void emit_tail(void) {
    printf("}\n");
    fflush(stdout);
}

/* A client with an event callback; NULL cb for none. */
static wps_client *open_client(wps_event_cb cb, void *user_data) {
    wps_client *c = NULL;
    check("wps_client_new", wps_client_new(A.url, NULL, cb, user_data, NULL, &c));
    check("wps_client_start", wps_client_start(c));
    return c;
}

static void send_one(wps_client *c, uint32_t flags) {
    check("wps_client_send_to_group",
          wps_client_send_to_group(c, A.group, data_type(), PAYLOAD, (size_t)A.size, flags, NULL));
}

/* ------------------------------------------------------------------ seq */

static void run_seq(void) {
    wps_client *c = open_client(NULL, NULL);
    double *lat = malloc(sizeof(double) * (size_t)A.count);
    long n = 0;
    mark("START");
    double cpu = cpu_now();
    double start = now(), deadline = start + A.seconds;
    while (n < A.count) {
        double t0 = now();
        if (t0 >= deadline) break;
        send_one(c, 0);
        lat[n++] = (now() - t0) * 1e6;
    }
    double elapsed = now() - start;
    qsort(lat, (size_t)n, sizeof(double), cmp_double);
    emit_head();
    printf(",\"count\":%ld,\"seconds\":%.6f,\"rate\":%.3f,\"p50_us\":%.3f,\"p99_us\":%.3f,"
           "\"cpu_s\":%.6f",
           n, elapsed, (double)n / elapsed, percentile(lat, n, 0.5), percentile(lat, n, 0.99),
           cpu_now() - cpu);
    emit_tail();
    free(lat);
    wps_client_free(c);
}

/* ------------------------------------------------------------------ pub */

/* The acked sends in flight and failed: the completions run on the publisher's thread. */
static long IN_FLIGHT, FAILED;

static void on_complete(void *user_data, const wps_completion *done) {
    (void)user_data;
    IN_FLIGHT--;
    if (done->status != WPS_STATUS_OK) FAILED++;
}

/* Runs the callbacks queued for `c`, waiting for the first when none is. */
static void dispatch_some(wps_client *c, int fd) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    size_t ran = 0;
    check("wps_client_dispatch", wps_client_dispatch(c, SIZE_MAX, &ran));
    if (ran > 0) return;
    if (poll(&p, 1, 1000) < 0 && errno != EINTR) {
        perror("bench-c: poll");
        exit(1);
    }
}

static void wait_for_go(void) {
    if (A.go) {
        char line[16];
        /* EOF also releases the publisher: run.py is gone or done. */
        (void)fgets(line, sizeof line, stdin);
    }
}

static void emit_pub(long sent, long acked, double elapsed, double cpu) {
    emit_head();
    printf(",\"sent\":%ld,\"acked\":%ld,\"seconds\":%.6f,\"rate\":%.3f,\"cpu_s\":%.6f", sent,
           acked, elapsed, (double)sent / elapsed, cpu_now() - cpu);
    emit_tail();
}

/* Pipelined acked sends, in poll mode, as an event loop would make them: one thread
 * starts sends while fewer than the window are in flight, hands them over together,
 * and runs the completions that came. */
static void run_pub_acked(void) {
    wps_options *o = wps_options_new();
    check("wps_options_set_dispatch_mode", wps_options_set_dispatch_mode(o, WPS_DISPATCH_POLL));
    wps_client *c = NULL;
    check("wps_client_new", wps_client_new(A.url, o, NULL, NULL, NULL, &c));
    wps_options_free(o);
    check("wps_client_start", wps_client_start(c));
    int fd = -1;
    check("wps_client_dispatch_fd", wps_client_dispatch_fd(c, &fd));
    wait_for_go();
    mark("START");
    double cpu = cpu_now();
    double start = now(), deadline = start + A.seconds;
    long sent = 0;
    while (sent < A.count && now() < deadline) {
        while (IN_FLIGHT < A.window && sent < A.count) {
            uint64_t op;
            check("wps_client_send_to_group_async",
                  wps_client_send_to_group_async(c, A.group, data_type(), PAYLOAD, (size_t)A.size,
                                                 WPS_SEND_DEFERRED, on_complete, NULL, &op));
            IN_FLIGHT++;
            sent++;
        }
        check("wps_client_flush_deferred", wps_client_flush_deferred(c));
        dispatch_some(c, fd);
    }
    while (IN_FLIGHT > 0) dispatch_some(c, fd);
    double elapsed = now() - start;
    if (FAILED > 0) {
        fprintf(stderr, "bench-c: %ld acked sends failed\n", FAILED);
        exit(1);
    }
    wps_client_free(c); /* CPU counted until everything queued is written and closed */
    emit_pub(sent, sent, elapsed, cpu);
}

/* Fire-and-forget sends, each with the blocking call (which waits only while the
 * operation queue is full); acked ones in poll mode (run_pub_acked). */
static void run_pub(void) {
    if (A.window > 0) {
        run_pub_acked();
        return;
    }
    wps_client *c = open_client(NULL, NULL);
    wait_for_go();
    mark("START");
    double cpu = cpu_now();
    double start = now(), deadline = start + A.seconds;
    long sent = 0;
    for (; sent < A.count && now() < deadline; sent++) send_one(c, WPS_SEND_FIRE_AND_FORGET);
    double elapsed = now() - start;
    wps_client_free(c); /* CPU counted until everything queued is written and closed */
    emit_pub(sent, 0, elapsed, cpu);
}

/* ------------------------------------------------------------------ sub */

struct receipts {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    double first, last;
    long count;
    long bytes;
};

static struct receipts R = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0};

/* What run.py tells the subscriber on stdin once the publisher is done: how many
 * messages it sent (-1: done, count unknown). Guarded by R.mu. */
static long SENT_TOTAL = -1;
static double SENT_AT = 0; /* 0 while the publisher runs */

static void *read_sent_count(void *unused) {
    (void)unused;
    char line[64];
    long total = -1;
    if (fgets(line, sizeof line, stdin)) {
        char *end;
        long n = strtol(line, &end, 10);
        if (end != line && n >= 0) total = n;
    }
    pthread_mutex_lock(&R.mu);
    SENT_TOTAL = total;
    SENT_AT = now();
    pthread_cond_signal(&R.cv);
    pthread_mutex_unlock(&R.mu);
    return NULL;
}

static void on_sub_event(void *user_data, const wps_event *e) {
    (void)user_data;
    if (e->kind != WPS_EVENT_GROUP_MESSAGE) return;
    double t = now();
    pthread_mutex_lock(&R.mu);
    if (R.count == 0) R.first = t;
    R.last = t;
    R.count++;
    R.bytes += (long)e->data_len;
    if (R.count >= A.count) pthread_cond_signal(&R.cv);
    pthread_mutex_unlock(&R.mu);
}

static struct timespec after_ms(long ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += (ms % 1000) * 1000000L;
    ts.tv_sec += ms / 1000 + ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    return ts;
}

static void run_sub(void) {
    wps_client *c = open_client(on_sub_event, NULL);
    check("wps_client_join_group", wps_client_join_group(c, A.group, NULL));
    pthread_t reader;
    if (pthread_create(&reader, NULL, read_sent_count, NULL) != 0) {
        fprintf(stderr, "bench-c: cannot start the stdin reader\n");
        exit(1);
    }
    pthread_detach(reader);
    mark("READY");
    double cpu = cpu_now();
    double deadline = now() + A.seconds;
    long poll_ms = A.idle_ms < 1 ? 1 : (A.idle_ms > 100 ? 100 : A.idle_ms);
    pthread_mutex_lock(&R.mu);
    for (;;) {
        double t = now();
        if (R.count >= A.count || t >= deadline) break;
        if (SENT_AT > 0) {
            if (SENT_TOTAL >= 0 && R.count >= SENT_TOTAL) break;
            double quiet_from = R.count > 0 && R.last > SENT_AT ? R.last : SENT_AT;
            if (t - quiet_from >= (double)A.idle_ms / 1000) break;
        }
        struct timespec ts = after_ms(poll_ms);
        pthread_cond_timedwait(&R.cv, &R.mu, &ts);
    }
    double span = R.count > 0 ? R.last - R.first : 0;
    long count = R.count, bytes = R.bytes;
    pthread_mutex_unlock(&R.mu);
    emit_head();
    printf(",\"received\":%ld,\"bytes\":%ld,\"seconds\":%.6f,\"rate\":%.3f,\"cpu_s\":%.6f", count,
           bytes, span, span > 0 ? (double)(count - 1) / span : 0.0, cpu_now() - cpu);
    emit_tail();
    wps_client_free(c);
}

/* ------------------------------------------------------------------ ready */

struct arrival {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool arrived;
};

static void on_ready_event(void *user_data, const wps_event *e) {
    struct arrival *a = user_data;
    if (e->kind != WPS_EVENT_GROUP_MESSAGE) return;
    pthread_mutex_lock(&a->mu);
    a->arrived = true;
    pthread_cond_signal(&a->cv);
    pthread_mutex_unlock(&a->mu);
}

static void run_ready(void) {
    double *times = malloc(sizeof(double) * (size_t)A.count);
    long n = 0;
    mark("START");
    double deadline = now() + A.seconds;
    while (n < A.count && now() < deadline) {
        struct arrival a = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false};
        double t0 = now();
        wps_client *c = open_client(on_ready_event, &a);
        check("wps_client_join_group", wps_client_join_group(c, A.group, NULL));
        send_one(c, 0);
        pthread_mutex_lock(&a.mu);
        struct timespec limit = after_ms(30000);
        while (!a.arrived) {
            if (pthread_cond_timedwait(&a.cv, &a.mu, &limit) == ETIMEDOUT) {
                fprintf(stderr, "bench-c: group message did not arrive within 30 s\n");
                exit(1);
            }
        }
        pthread_mutex_unlock(&a.mu);
        times[n++] = (now() - t0) * 1e3;
        wps_client_free(c);
    }
    qsort(times, (size_t)n, sizeof(double), cmp_double);
    double sum = 0;
    for (long i = 0; i < n; i++) sum += times[i];
    emit_head();
    printf(",\"count\":%ld,\"p50_ms\":%.4f,\"p99_ms\":%.4f,\"mean_ms\":%.4f", n,
           percentile(times, n, 0.5), percentile(times, n, 0.99), n ? sum / (double)n : 0.0);
    emit_tail();
    free(times);
}

/* ------------------------------------------------------------------ idle */

static void proc_status(long *rss_kib, long *threads) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    *rss_kib = *threads = 0;
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "VmRSS:", 6) == 0) *rss_kib = strtol(line + 6, NULL, 10);
        if (strncmp(line, "Threads:", 8) == 0) *threads = strtol(line + 8, NULL, 10);
    }
    fclose(f);
}

static void run_idle(void) {
    long rss0, thr0, rss1, thr1, rss2, thr2;
    wps_client **clients = calloc((size_t)A.clients, sizeof *clients);
    proc_status(&rss0, &thr0);
    mark("START");
    double start = now();
    long first = A.clients < IDLE_MIDPOINT ? A.clients : IDLE_MIDPOINT;
    for (long i = 0; i < first; i++) clients[i] = open_client(NULL, NULL);
    proc_status(&rss1, &thr1);
    for (long i = first; i < A.clients; i++) clients[i] = open_client(NULL, NULL);
    double elapsed = now() - start;
    proc_status(&rss2, &thr2);
    long marginal = A.clients - IDLE_MIDPOINT > 0 ? A.clients - IDLE_MIDPOINT : 1;
    emit_head();
    printf(",\"clients\":%ld,\"rss_before_kib\":%ld,\"rss_mid_kib\":%ld,\"rss_after_kib\":%ld,"
           "\"threads_before\":%ld,\"threads_mid\":%ld,\"threads_after\":%ld,"
           "\"rss_per_client_kib\":%.3f,\"rss_total_per_client_kib\":%.3f,"
           "\"connect_seconds\":%.6f",
           A.clients, rss0, rss1, rss2, thr0, thr1, thr2,
           (double)(rss2 > rss1 ? rss2 - rss1 : 0) / (double)marginal,
           (double)(rss2 > rss0 ? rss2 - rss0 : 0) / (double)(A.clients > 0 ? A.clients : 1),
           elapsed);
    emit_tail();
    /* Freeing 1,000 clients one by one measures nothing; the result is out. */
    _exit(0);
}

/* ------------------------------------------------------------------ main */

static void usage(void) {
    fprintf(stderr, "usage: bench-c seq|pub|sub|ready|idle --url URL [--group G] [--count N] "
                    "[--seconds S] [--size B] [--binary] [--window W] [--clients N] "
                    "[--idle-ms MS] [--go]\n");
    exit(2);
}

static void parse(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i];
        if (strcmp(k, "--binary") == 0) { A.binary = true; continue; }
        if (strcmp(k, "--go") == 0) { A.go = true; continue; }
        if (strncmp(k, "--", 2) != 0) {
            if (A.scenario) usage();
            A.scenario = k;
            continue;
        }
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (strcmp(k, "--url") == 0) A.url = v;
        else if (strcmp(k, "--group") == 0) A.group = v;
        else if (strcmp(k, "--count") == 0) A.count = strtol(v, NULL, 10);
        else if (strcmp(k, "--seconds") == 0) A.seconds = strtod(v, NULL);
        else if (strcmp(k, "--size") == 0) A.size = strtol(v, NULL, 10);
        else if (strcmp(k, "--window") == 0) A.window = strtol(v, NULL, 10);
        else if (strcmp(k, "--clients") == 0) A.clients = strtol(v, NULL, 10);
        else if (strcmp(k, "--idle-ms") == 0) A.idle_ms = strtol(v, NULL, 10);
        else usage();
    }
    if (!A.scenario || !A.url || A.count < 1 || A.size < 0 || A.window < 0 || A.clients < 0)
        usage();
}

int main(int argc, char **argv) {
    parse(argc, argv);
    PAYLOAD = malloc((size_t)A.size + 1);
    for (long i = 0; i < A.size; i++) PAYLOAD[i] = A.binary ? (uint8_t)(i % 251) : 'x';
    if (strcmp(A.scenario, "seq") == 0) run_seq();
    else if (strcmp(A.scenario, "pub") == 0) run_pub();
    else if (strcmp(A.scenario, "sub") == 0) run_sub();
    else if (strcmp(A.scenario, "ready") == 0) run_ready();
    else if (strcmp(A.scenario, "idle") == 0) run_idle();
    else usage();
    free(PAYLOAD);
    return 0;
}
