/* The C test harness: drives the real library (cdylib) against the real emulator.
 * Plain C11 + pthreads, no framework. Prints "ok - NAME" / "FAIL - NAME" per test and
 * a final "N passed, N failed" line; exits non-zero on failure.
 *
 * Usage: harness EMULATOR_BIN EXAMPLE_BIN TLS_DIR
 * (TLS_DIR holds ca.pem, cert.pem and key.pem: a test CA and a 127.0.0.1 server
 * certificate it signed; run.sh makes them with openssl.) */
#define _GNU_SOURCE
#include "webpubsub_client.h"
#include "support.h"

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *HUB = "chat";
static const char *ALL_ROLES = "[\"webpubsub.joinLeaveGroup\",\"webpubsub.sendToGroup\"]";
static const char *CHAT_ONLY = "[\"webpubsub.joinLeaveGroup.chat\",\"webpubsub.sendToGroup.chat\"]";
static const int64_t WAIT_MS = 10000;

static emulator EMU;
static const char *EMULATOR_BIN;
static upstream *UP;
static const char *EXAMPLE_BIN;
static const char *SELF;
static const char *TLS_DIR;

/* ------------------------------------------------------------------ checks */

#define CHECK(cond)                                                                     \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "  %s:%d: check failed: %s (last error: %s)\n", __FILE__,   \
                    __LINE__, #cond, wps_last_error_message());                         \
            return false;                                                               \
        }                                                                               \
    } while (0)

#define CHECK_STATUS(expr, want)                                                        \
    do {                                                                                \
        wps_status s_ = (expr);                                                         \
        if (s_ != (want)) {                                                             \
            fprintf(stderr, "  %s:%d: %s returned %u (%s: %s), expected %s\n", __FILE__, \
                    __LINE__, #expr, s_, wps_status_str(s_), wps_last_error_message(),  \
                    #want);                                                             \
            return false;                                                               \
        }                                                                               \
    } while (0)

#define CHECK_OK(expr) CHECK_STATUS(expr, WPS_STATUS_OK)

/* ------------------------------------------------------------------ event recorder */

typedef struct {
    uint32_t kind;
    char connection_id[128], user_id[64], group[64], from_user_id[64], message[256], error_name[64], service_message[256];
    /* Whether the string was set: NULL (absent) is not "". */
    bool has_user_id, has_from_user_id, has_message, has_error_name, has_service_message;
    bool has_ack_id;
    uint64_t ack_id;
    uint32_t data_type;
    char data[512];
    size_t data_len;
    bool has_sequence_id;
    uint64_t sequence_id;
    uint16_t close_code;
    wps_status status;
} event_copy;

enum { MAX_EVENTS = 512 };

/* What the recorder's callback does when a group message with data "ping" or "die" arrives. */
typedef struct recorder {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    event_copy events[MAX_EVENTS];
    int count;
    int freed;                 /* user_data_free calls */
    int calls_after_free;      /* callbacks after user_data_free: must stay 0 */
    int in_flight;             /* callbacks running right now */
    wps_client *self;          /* for actions from inside callbacks */
    wps_status inner_status;   /* status of the call made inside the callback */
    int inner_calls;
    pthread_t thread;          /* the dispatcher thread that delivered the first event */
    bool foreign_thread;       /* a callback ran on a thread not named wps-dispatch-* */
    bool thread_set, thread_changed;
} recorder;

static recorder *recorder_new(void) {
    recorder *r = calloc(1, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    return r;
}

static void recorder_delete(recorder *r) {
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

/* Copies a string of the library's ("" for NULL); false when it was NULL (absent). */
static bool copy_str(char *dst, size_t cap, const char *src) {
    snprintf(dst, cap, "%s", src ? src : "");
    return src != NULL;
}

static void on_event(void *user_data, const wps_event *ev) {
    recorder *r = user_data;
    pthread_mutex_lock(&r->mu);
    if (r->freed) r->calls_after_free++;
    if (!r->thread_set) {
        r->thread = pthread_self();
        r->thread_set = true;
    } else if (!pthread_equal(r->thread, pthread_self())) {
        r->thread_changed = true;
    }
    r->in_flight++;
    char name[32] = "";
    pthread_getname_np(pthread_self(), name, sizeof name);
    if (strncmp(name, "wps-dispatch-", 13) != 0) r->foreign_thread = true;
    if (r->count < MAX_EVENTS) {
        event_copy *e = &r->events[r->count];
        memset(e, 0, sizeof *e);
        e->kind = ev->kind;
        copy_str(e->connection_id, sizeof e->connection_id, ev->connection_id);
        e->has_user_id = copy_str(e->user_id, sizeof e->user_id, ev->user_id);
        copy_str(e->group, sizeof e->group, ev->group);
        e->has_from_user_id = copy_str(e->from_user_id, sizeof e->from_user_id, ev->from_user_id);
        e->has_message = copy_str(e->message, sizeof e->message, ev->message);
        e->has_error_name = copy_str(e->error_name, sizeof e->error_name, ev->error_name);
        e->has_service_message = copy_str(e->service_message, sizeof e->service_message, ev->service_message);
        e->has_ack_id = ev->has_ack_id;
        e->ack_id = ev->ack_id;
        e->data_type = ev->data_type;
        e->data_len = ev->data_len < sizeof e->data - 1 ? ev->data_len : sizeof e->data - 1;
        if (e->data_len) memcpy(e->data, ev->data, e->data_len);
        e->has_sequence_id = ev->has_sequence_id;
        e->sequence_id = ev->sequence_id;
        e->close_code = ev->close_code;
        e->status = ev->status;
        r->count++;
    }
    wps_client *self = r->self;
    pthread_mutex_unlock(&r->mu);

    bool ping = ev->kind == WPS_EVENT_GROUP_MESSAGE && ev->data_len == 4 && memcmp(ev->data, "ping", 4) == 0;
    bool die = ev->kind == WPS_EVENT_GROUP_MESSAGE && ev->data_len == 3 && memcmp(ev->data, "die", 3) == 0;
    bool stop = ev->kind == WPS_EVENT_GROUP_MESSAGE && ev->data_len == 4 && memcmp(ev->data, "stop", 4) == 0;
    if (self && ping) {
        /* A blocking call from inside a callback: the ack is resolved by the reader task. */
        wps_ack_result ack;
        wps_status s = wps_client_send_to_group(self, "chat", WPS_DATA_TYPE_TEXT, (const uint8_t *)"pong", 4, 0, &ack);
        if (s == WPS_STATUS_OK && (!ack.has_ack_id || wps_client_state(self) != WPS_STATE_CONNECTED)) s = WPS_STATUS_INTERNAL;
        pthread_mutex_lock(&r->mu);
        r->inner_status = s;
        r->inner_calls++;
        pthread_mutex_unlock(&r->mu);
    } else if (self && stop) {
        /* Blocks until stopped; the stopped event is queued behind this callback. */
        wps_status st = wps_client_stop(self);
        if (st == WPS_STATUS_OK && wps_client_state(self) != WPS_STATE_STOPPED) st = WPS_STATUS_INTERNAL;
        pthread_mutex_lock(&r->mu);
        r->inner_status = st;
        r->inner_calls++;
        pthread_mutex_unlock(&r->mu);
    } else if (self && die) {
        pthread_mutex_lock(&r->mu);
        r->self = NULL;
        pthread_mutex_unlock(&r->mu);
        wps_client_free(self); /* deferred: this callback is still running */
        pthread_mutex_lock(&r->mu);
        r->inner_calls++;
        r->inner_status = r->freed ? WPS_STATUS_INTERNAL : WPS_STATUS_OK; /* finalizer must not have run yet */
        pthread_mutex_unlock(&r->mu);
    }
    pthread_mutex_lock(&r->mu);
    r->in_flight--;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static void on_user_data_free(void *user_data) {
    recorder *r = user_data;
    pthread_mutex_lock(&r->mu);
    r->freed++;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static bool timed_wait(pthread_cond_t *cv, pthread_mutex_t *mu, int64_t deadline) {
    int64_t left = deadline - now_ms();
    if (left <= 0) return false;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t ns = ts.tv_nsec + (left % 1000) * 1000000;
    ts.tv_sec += left / 1000 + ns / 1000000000;
    ts.tv_nsec = ns % 1000000000;
    pthread_cond_timedwait(cv, mu, &ts);
    return true;
}

/* Index of the first event at or after `from` of `kind` (and data, when given); waits up to WAIT_MS. */
static int wait_event(recorder *r, int from, uint32_t kind, const char *data) {
    int64_t deadline = now_ms() + WAIT_MS;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        for (int i = from; i < r->count; i++) {
            event_copy *e = &r->events[i];
            if (e->kind == kind && (!data || (e->data_len == strlen(data) && memcmp(e->data, data, e->data_len) == 0))) {
                pthread_mutex_unlock(&r->mu);
                return i;
            }
        }
        if (!timed_wait(&r->cv, &r->mu, deadline)) break;
    }
    pthread_mutex_unlock(&r->mu);
    return -1;
}

static int count_kind(recorder *r, uint32_t kind) {
    int n = 0;
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->count; i++) n += r->events[i].kind == kind;
    pthread_mutex_unlock(&r->mu);
    return n;
}

static int event_count(recorder *r) {
    pthread_mutex_lock(&r->mu);
    int n = r->count;
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* Waits until the action inside a callback finished; returns its status. */
static wps_status wait_inner(recorder *r) {
    int64_t deadline = now_ms() + WAIT_MS;
    pthread_mutex_lock(&r->mu);
    while (r->inner_calls == 0 && timed_wait(&r->cv, &r->mu, deadline)) {
    }
    wps_status s = r->inner_calls == 1 ? r->inner_status : WPS_STATUS_INTERNAL;
    pthread_mutex_unlock(&r->mu);
    return s;
}

static bool wait_freed(recorder *r) {
    int64_t deadline = now_ms() + WAIT_MS;
    pthread_mutex_lock(&r->mu);
    while (r->freed == 0 && timed_wait(&r->cv, &r->mu, deadline)) {
    }
    bool ok = r->freed == 1;
    pthread_mutex_unlock(&r->mu);
    return ok;
}

/* ------------------------------------------------------------------ completion recorder */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int calls;
    wps_status status;
    uint64_t op_id, ack_id;
    bool has_ack_id, is_duplicated, message_set;
    char error_name[64], service_message[256];
    uint32_t data_type;
    char data[512];
    size_t data_len;
} completion;

static void completion_init(completion *c) {
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
}

static void completion_destroy(completion *c) {
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
}

static void on_complete(void *user_data, const wps_completion *done) {
    completion *c = user_data;
    pthread_mutex_lock(&c->mu);
    c->calls++;
    c->status = done->status;
    c->op_id = done->op_id;
    c->has_ack_id = done->has_ack_id;
    c->ack_id = done->ack_id;
    c->is_duplicated = done->is_duplicated;
    c->message_set = done->error_message != NULL;
    copy_str(c->error_name, sizeof c->error_name, done->error_name);
    copy_str(c->service_message, sizeof c->service_message, done->service_message);
    c->data_type = done->data_type;
    c->data_len = done->data_len < sizeof c->data - 1 ? done->data_len : sizeof c->data - 1;
    if (c->data_len) memcpy(c->data, done->data, c->data_len);
    c->data[c->data_len] = 0;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static bool wait_completion(completion *c) {
    int64_t deadline = now_ms() + WAIT_MS;
    pthread_mutex_lock(&c->mu);
    while (c->calls == 0 && timed_wait(&c->cv, &c->mu, deadline)) {
    }
    bool ok = c->calls == 1;
    pthread_mutex_unlock(&c->mu);
    return ok;
}

/* ------------------------------------------------------------------ helpers */

static wps_options *test_options(void) {
    wps_options *o = wps_options_new();
    wps_options_set_user_agent(o, "webpubsub-c-harness/1.0");
    wps_options_set_reconnect_retry(o, UINT32_MAX, 100, 1000, WPS_RETRY_FIXED);
    wps_options_set_recovery(o, 10000, 100);
    wps_options_set_start_timeout_ms(o, 5000);
    wps_options_set_ack_timeout_ms(o, 5000);
    return o;
}

/* A started client for `user` with `roles` recording into a new recorder. */
static wps_client *connect_client(const char *user, const char *roles, recorder **rec) {
    char *url = emulator_client_url(&EMU, HUB, user, roles);
    wps_options *o = test_options();
    *rec = recorder_new();
    wps_client *c = NULL;
    wps_status s = wps_client_new(url, o, on_event, *rec, on_user_data_free, &c);
    wps_options_free(o);
    free(url);
    if (s != WPS_STATUS_OK) {
        fprintf(stderr, "  wps_client_new: %s\n", wps_last_error_message());
        return NULL;
    }
    s = wps_client_start(c);
    if (s != WPS_STATUS_OK) {
        fprintf(stderr, "  wps_client_start: %s (%s)\n", wps_status_str(s), wps_last_error_message());
        wps_client_free(c);
        return NULL;
    }
    return c;
}

/* Frees a client and checks its finalizer ran exactly once, before free returned. */
static bool free_client(wps_client *c, recorder *r) {
    wps_client_free(c);
    pthread_mutex_lock(&r->mu);
    bool ok = r->freed == 1 && r->in_flight == 0 && !r->foreign_thread;
    pthread_mutex_unlock(&r->mu);
    if (!ok) fprintf(stderr, "  client teardown: freed %d, in flight %d, foreign thread %d\n", r->freed, r->in_flight, r->foreign_thread);
    recorder_delete(r);
    return ok;
}

static bool connection_id(wps_client *c, char *buf, size_t cap) {
    size_t len = 0;
    return wps_client_connection_id(c, buf, cap, &len) == WPS_STATUS_OK && len == strlen(buf);
}

static bool send_text(wps_client *c, const char *group, const char *text, uint32_t flags) {
    return wps_client_send_to_group(c, group, WPS_DATA_TYPE_TEXT, (const uint8_t *)text, strlen(text), flags, NULL) == WPS_STATUS_OK;
}

static int thread_count(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int n = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "Threads:", 8) == 0) n = atoi(line + 8);
    if (f) fclose(f);
    return n;
}

/* ------------------------------------------------------------------ tests */

static bool test_status_strings(void) {
    CHECK(strcmp(wps_version(), WPS_VERSION) == 0);
    CHECK(strcmp(wps_status_str(WPS_STATUS_OK), "ok") == 0);
    CHECK(strcmp(wps_status_str(12345), "unknown status") == 0);
    for (uint32_t s = 0; s <= WPS_STATUS_INTERRUPTED; s++) CHECK(strcmp(wps_status_str(s), "unknown status") != 0);
    CHECK(strcmp(wps_last_error_message(), "") == 0);
    CHECK(strcmp(wps_last_error_name(), "") == 0);
    CHECK(strcmp(wps_last_error_service_message(), "") == 0);
    return true;
}

static void on_count_free(void *user_data) { *(int *)user_data += 1; }

static void on_credential_unused(void *user_data, wps_credential_result *result) {
    (void)user_data;
    (void)result;
}

static bool test_null_and_invalid_arguments(void) {
    const char bad_utf8[] = {(char)0xff, (char)0xfe, 0};
    wps_client *c = NULL;
    wps_client *idle = NULL;
    CHECK_OK(wps_client_new("ws://127.0.0.1:1/client/hubs/x", NULL, NULL, NULL, NULL, &idle));
    CHECK_STATUS(wps_client_new(NULL, NULL, NULL, NULL, NULL, &c), WPS_STATUS_NULL_ARG);
    CHECK(strlen(wps_last_error_message()) > 0);
    /* The texts stay valid across every call returning no status, as one printf takes them. */
    const char *message = wps_last_error_message();
    const char *name = wps_last_error_name();
    CHECK(wps_status_str(WPS_STATUS_NULL_ARG) && wps_last_error_service_message() && wps_version());
    CHECK(wps_client_state(NULL) == WPS_STATE_STOPPED && wps_invoke_response_data(NULL, NULL) == NULL);
    CHECK(wps_client_state(idle) == WPS_STATE_STOPPED && wps_invoke_response_data_type(NULL) == WPS_DATA_TYPE_TEXT);
    wps_invoke_response_free(NULL);
    wps_options_free(wps_options_new());
    wps_client_free(NULL);
    wps_client_free(idle);
    CHECK(message == wps_last_error_message() && strcmp(message, "`url` is NULL") == 0 && strcmp(name, "") == 0);
    CHECK_STATUS(wps_client_new(bad_utf8, NULL, NULL, NULL, NULL, &c), WPS_STATUS_INVALID_UTF8);
    CHECK_STATUS(wps_client_new("ws://127.0.0.1:1/client/hubs/x", NULL, NULL, NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_new("not a url", NULL, NULL, NULL, NULL, &c), WPS_STATUS_INVALID_ARGUMENT);
    CHECK(c == NULL);
    CHECK_STATUS(wps_client_new_with_credential(NULL, NULL, NULL, NULL, NULL, NULL, NULL, &c), WPS_STATUS_NULL_ARG);
    /* On failure nothing is taken over: no finalizer runs. */
    int finalized = 0;
    CHECK_STATUS(wps_client_new("not a url", NULL, NULL, &finalized, on_count_free, &c), WPS_STATUS_INVALID_ARGUMENT);
    wps_options *refused = wps_options_new();
    CHECK_OK(wps_options_set_keep_alive(refused, 1000, 1000));
    CHECK_STATUS(wps_client_new_with_credential(on_credential_unused, &finalized, on_count_free, refused, NULL, &finalized,
                                                on_count_free, &c),
                 WPS_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(wps_client_new_with_credential(on_credential_unused, &finalized, on_count_free, NULL, NULL, &finalized,
                                                on_count_free, NULL),
                 WPS_STATUS_NULL_ARG);
    wps_options_free(refused);
    CHECK(finalized == 0 && c == NULL);
    CHECK_STATUS(wps_client_start(NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_stop(NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_start_async(NULL, NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_stop_async(NULL, NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK(wps_client_state(NULL) == WPS_STATE_STOPPED);
    size_t len = 0;
    CHECK_STATUS(wps_client_connection_id(NULL, NULL, 0, &len), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_join_group(NULL, "g", NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_leave_group(NULL, "g", NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_to_group(NULL, "g", 0, NULL, 0, 0, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_event(NULL, "e", 0, NULL, 0, 0, NULL), WPS_STATUS_NULL_ARG);
    wps_invoke_response *resp = NULL;
    CHECK_STATUS(wps_client_invoke_event(NULL, "e", 0, NULL, 0, 0, &resp), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_join_group_async(NULL, "g", NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_leave_group_async(NULL, "g", NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_to_group_async(NULL, "g", 0, NULL, 0, 0, NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_event_async(NULL, "e", 0, NULL, 0, 0, NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_invoke_event_async(NULL, "e", 0, NULL, 0, 0, NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_cancel(NULL, 1), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_to_group_with_ack_id(NULL, "g", 0, NULL, 0, 0, 1, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_event_with_ack_id(NULL, "e", 0, NULL, 0, 0, 1, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_to_group_with_ack_id_async(NULL, "g", 0, NULL, 0, 0, 1, NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_event_with_ack_id_async(NULL, "e", 0, NULL, 0, 0, 1, NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK(strcmp(wps_last_error_message(), "`client` is NULL") == 0);
    wps_ack_record record;
    CHECK_STATUS(wps_client_dispatch_records(NULL, 1, &record, 1, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_dispatch_records(NULL, 1, NULL, 1, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_dispatch_mode(NULL, WPS_DISPATCH_POLL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_auto_reconnect(NULL, true), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_auto_rejoin_groups(NULL, true), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_message_retry(NULL, 1, 1, 1, WPS_RETRY_FIXED), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_reconnect_retry(NULL, 1, 1, 1, WPS_RETRY_FIXED), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_keep_alive(NULL, 1, 2), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_ack_timeout_ms(NULL, 1), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_start_timeout_ms(NULL, 1), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_recovery(NULL, 1, 1), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_sequence_ack_interval_ms(NULL, 1), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_add_ca_pem(NULL, (const uint8_t *)"x", 1), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_user_agent(NULL, "ua"), WPS_STATUS_NULL_ARG);
    CHECK(strcmp(wps_last_error_message(), "`options` is NULL") == 0);
    wps_client_free(NULL);
    wps_options_free(NULL);
    wps_invoke_response_free(NULL);
    CHECK(wps_invoke_response_data(NULL, &len) == NULL && len == 0);
    CHECK(wps_invoke_response_data_type(NULL) == WPS_DATA_TYPE_TEXT);
    CHECK_STATUS(wps_credential_result_set_url(NULL, "ws://x"), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_credential_result_set_error(NULL, "no"), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_set_log_callback(NULL, NULL, 99), WPS_STATUS_INVALID_ARGUMENT);

    /* Arguments of a real (unstarted) client. */
    char *url = emulator_client_url(&EMU, HUB, "alice", ALL_ROLES);
    recorder *r = recorder_new();
    CHECK_OK(wps_client_new(url, NULL, on_event, r, on_user_data_free, &c));
    free(url);
    CHECK(wps_client_state(c) == WPS_STATE_STOPPED);
    CHECK_STATUS(wps_client_connection_id(c, NULL, 0, &len), WPS_STATUS_NOT_CONNECTED);
    /* A NULL name is an error naming it, never "". */
    const uint8_t *x = (const uint8_t *)"x";
    wps_invoke_response *none = NULL;
    CHECK_STATUS(wps_client_join_group(c, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_leave_group(c, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_join_group_async(c, NULL, on_complete, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_leave_group_async(c, NULL, on_complete, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_to_group_async(c, NULL, WPS_DATA_TYPE_TEXT, x, 1, 0, on_complete, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_to_group_with_ack_id(c, NULL, WPS_DATA_TYPE_TEXT, x, 1, 0, 1, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_to_group_with_ack_id_async(c, NULL, WPS_DATA_TYPE_TEXT, x, 1, 0, 1, on_complete, NULL, NULL),
                 WPS_STATUS_NULL_ARG);
    CHECK(strcmp(wps_last_error_message(), "`group` is NULL") == 0);
    CHECK_STATUS(wps_client_send_event(c, NULL, WPS_DATA_TYPE_TEXT, x, 1, 0, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_event_async(c, NULL, WPS_DATA_TYPE_TEXT, x, 1, 0, on_complete, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_event_with_ack_id(c, NULL, WPS_DATA_TYPE_TEXT, x, 1, 0, 1, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_event_with_ack_id_async(c, NULL, WPS_DATA_TYPE_TEXT, x, 1, 0, 1, on_complete, NULL, NULL),
                 WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_invoke_event(c, NULL, WPS_DATA_TYPE_TEXT, x, 1, 0, &none), WPS_STATUS_NULL_ARG);
    CHECK(strcmp(wps_last_error_message(), "`event` is NULL") == 0 && none == NULL);
    CHECK_STATUS(wps_client_join_group(c, bad_utf8, NULL), WPS_STATUS_INVALID_UTF8);
    CHECK_STATUS(wps_client_leave_group_async(c, bad_utf8, on_complete, NULL, NULL), WPS_STATUS_INVALID_UTF8);
    CHECK_STATUS(wps_client_send_to_group(c, "g", WPS_DATA_TYPE_TEXT, NULL, 5, 0, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_send_to_group(c, "g", WPS_DATA_TYPE_TEXT, (const uint8_t *)bad_utf8, 2, 0, NULL), WPS_STATUS_INVALID_UTF8);
    CHECK_STATUS(wps_client_send_to_group(c, "g", 77, (const uint8_t *)"x", 1, 0, NULL), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(wps_client_send_to_group(c, "g", WPS_DATA_TYPE_TEXT, (const uint8_t *)"x", 1, 0x80, NULL), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(wps_client_send_event(c, "e", WPS_DATA_TYPE_TEXT, (const uint8_t *)"x", 1, WPS_SEND_NO_ECHO, NULL), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(wps_client_send_event(c, bad_utf8, WPS_DATA_TYPE_TEXT, (const uint8_t *)"x", 1, 0, NULL), WPS_STATUS_INVALID_UTF8);
    CHECK_STATUS(wps_client_invoke_event(c, "e", WPS_DATA_TYPE_TEXT, (const uint8_t *)"x", 1, 0, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_invoke_event_async(c, NULL, 0, NULL, 0, 0, NULL, NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_cancel(c, 424242), WPS_STATUS_INVALID_ARGUMENT);
    /* Not started: operations fail with a status, never hang; `out` is written
     * whatever the outcome (no ackId here), also when a bad argument fails the call. */
    wps_ack_result stale = {.ack_id = 7, .has_ack_id = true, .is_duplicated = true};
    CHECK_STATUS(wps_client_join_group(c, "g", &stale), WPS_STATUS_ILLEGAL_STATE);
    CHECK(!stale.has_ack_id && stale.ack_id == 0 && !stale.is_duplicated);
    stale = (wps_ack_result){.ack_id = 7, .has_ack_id = true, .is_duplicated = true};
    CHECK_STATUS(wps_client_send_to_group(c, NULL, WPS_DATA_TYPE_TEXT, (const uint8_t *)"x", 1, 0, &stale), WPS_STATUS_NULL_ARG);
    CHECK(!stale.has_ack_id && stale.ack_id == 0 && !stale.is_duplicated);
    CHECK_OK(wps_client_stop(c));
    CHECK(free_client(c, r));
    return true;
}

static bool test_options_setters(void) {
    wps_options *o = wps_options_new();
    CHECK(o != NULL);
    CHECK_OK(wps_options_set_protocol(o, WPS_PROTOCOL_JSON));
    CHECK_STATUS(wps_options_set_protocol(o, 9), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_OK(wps_options_set_auto_reconnect(o, false));
    CHECK_OK(wps_options_set_auto_rejoin_groups(o, false));
    CHECK_OK(wps_options_set_message_retry(o, 2, 10, 100, WPS_RETRY_EXPONENTIAL));
    CHECK_STATUS(wps_options_set_message_retry(o, 2, 10, 100, 7), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_OK(wps_options_set_reconnect_retry(o, UINT32_MAX, 10, 100, WPS_RETRY_FIXED));
    CHECK_OK(wps_options_set_keep_alive(o, 0, 0));
    CHECK_OK(wps_options_set_ack_timeout_ms(o, 1000));
    CHECK_STATUS(wps_options_set_ack_timeout_ms(o, 0), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_OK(wps_options_set_start_timeout_ms(o, 1000));
    CHECK_OK(wps_options_set_recovery(o, 1000, 100));
    CHECK_STATUS(wps_options_set_recovery(o, 1000, 0), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_OK(wps_options_set_sequence_ack_interval_ms(o, 500));
    CHECK_OK(wps_options_set_event_backlog_bytes(o, 0));
    CHECK_OK(wps_options_set_event_backlog_bytes(o, SIZE_MAX));
    CHECK_STATUS(wps_options_set_event_backlog_bytes(NULL, 1), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_add_ca_pem(o, NULL, 3), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_add_ca_pem(o, NULL, 0), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(wps_options_set_start_timeout_ms(o, 0), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(wps_options_set_sequence_ack_interval_ms(o, 0), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(wps_options_set_reconnect_retry(o, 1, 1, 1, 2), WPS_STATUS_INVALID_ARGUMENT);
    /* a keep-alive timeout not longer than its interval is refused when the client is made */
    wps_options *ka = wps_options_new();
    CHECK_OK(wps_options_set_keep_alive(ka, 1000, 1000));
    wps_client *ka_client = NULL;
    CHECK_STATUS(wps_client_new("ws://127.0.0.1:1/client/hubs/x?access_token=t", ka, NULL, NULL, NULL, &ka_client), WPS_STATUS_INVALID_ARGUMENT);
    CHECK(ka_client == NULL && strstr(wps_last_error_message(), "keep_alive_timeout") != NULL);
    wps_options_free(ka);
    CHECK_STATUS(wps_options_set_protocol(NULL, 0), WPS_STATUS_NULL_ARG);
    /* the user agent: any printable ASCII, checked when the client is made */
    const char bad_ua[] = {'a', 1, 0};
    CHECK_OK(wps_options_set_user_agent(o, NULL));
    CHECK_OK(wps_options_set_user_agent(o, bad_ua));
    wps_client *ua_client = NULL;
    CHECK_STATUS(wps_client_new("ws://127.0.0.1:1/client/hubs/x?access_token=t", o, NULL, NULL, NULL, &ua_client), WPS_STATUS_INVALID_ARGUMENT);
    CHECK(ua_client == NULL);
    const char bad_utf8[] = {(char)0xc3, 0};
    CHECK_STATUS(wps_options_set_user_agent(o, bad_utf8), WPS_STATUS_INVALID_UTF8);
    CHECK_OK(wps_options_set_user_agent(o, "harness/1.0 (C)"));
    /* the proxy: NULL (the environment's), "" (none) or an http:// URL, checked at once */
    CHECK_STATUS(wps_options_set_proxy(NULL, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_options_set_proxy(o, "socks5://127.0.0.1:1080"), WPS_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(wps_last_error_message(), "only http:// proxies") != NULL);
    CHECK_STATUS(wps_options_set_proxy(o, "http://proxy:99999"), WPS_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(wps_options_set_proxy(o, bad_utf8), WPS_STATUS_INVALID_UTF8);
    CHECK_OK(wps_options_set_proxy(o, "http://user:secret@proxy.example:3128"));
    CHECK_OK(wps_options_set_proxy(o, ""));
    CHECK_OK(wps_options_set_proxy(o, NULL));
    /* a CA that is not PEM is refused when the client is made */
    const char *junk = "not a certificate";
    CHECK_OK(wps_options_add_ca_pem(o, (const uint8_t *)junk, strlen(junk)));
    wps_client *c = NULL;
    wps_status s = wps_client_new("wss://127.0.0.1:1/client/hubs/x?access_token=t", o, NULL, NULL, NULL, &c);
    if (s != WPS_STATUS_INVALID_ARGUMENT) fprintf(stderr, "  junk CA: %s: %s\n", wps_status_str(s), wps_last_error_message());
    CHECK(s == WPS_STATUS_INVALID_ARGUMENT && c == NULL);
    wps_options_free(o);
    return true;
}

/* ------------------------------------------------------------------ a slow consumer */

enum { SLOW_MESSAGES = 300, SLOW_BYTES = 4096 };

/* The messages a slow callback has seen (their numbers, in arrival order). */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int seen[SLOW_MESSAGES];
    int count;
    bool wrong;  /* a message of the wrong size, or too many */
} slow_consumer;

/* Sends SLOW_MESSAGES messages of SLOW_BYTES to `group`, numbered from 0, all but the
 * last fire-and-forget (acked, it is there once they all are). */
static bool publish_numbered(wps_client *pub, const char *group) {
    static char body[SLOW_BYTES + 1];
    memset(body, '.', SLOW_BYTES);
    for (int n = 0; n < SLOW_MESSAGES; n++) {
        snprintf(body, sizeof body, "%05d", n);
        body[5] = '.';
        uint32_t flags = n + 1 < SLOW_MESSAGES ? WPS_SEND_FIRE_AND_FORGET : 0;
        if (!send_text(pub, group, body, flags)) return false;
    }
    return true;
}

static void on_event_slowly(void *user_data, const wps_event *ev) {
    slow_consumer *s = user_data;
    if (ev->kind != WPS_EVENT_GROUP_MESSAGE) return;
    struct timespec nap = {0, 1000000};
    nanosleep(&nap, NULL);  /* 1 ms a message: far slower than they come */
    pthread_mutex_lock(&s->mu);
    if (ev->data_len != SLOW_BYTES || s->count == SLOW_MESSAGES) {
        s->wrong = true;
    } else {
        s->seen[s->count++] = atoi((const char *)ev->data);
    }
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* A callback far slower than the messages, with a 16 KiB backlog: the client's reading
 * pauses and resumes many times; every message arrives once, in order. */
static bool test_slow_consumer(void) {
    slow_consumer s = {.count = 0, .wrong = false};
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.cv, NULL);
    char *url = emulator_client_url(&EMU, HUB, "slow", ALL_ROLES);
    wps_options *o = test_options();
    CHECK_OK(wps_options_set_event_backlog_bytes(o, 16 * 1024));
    wps_client *sub = NULL;
    wps_status created = wps_client_new(url, o, on_event_slowly, &s, NULL, &sub);
    wps_options_free(o);
    free(url);
    CHECK_OK(created);
    CHECK_OK(wps_client_start(sub));
    CHECK_OK(wps_client_join_group(sub, "slow", NULL));
    recorder *rp;
    wps_client *pub = connect_client("publisher", ALL_ROLES, &rp);
    CHECK(pub != NULL);
    CHECK(publish_numbered(pub, "slow"));
    int64_t deadline = now_ms() + 60000;
    pthread_mutex_lock(&s.mu);
    while (s.count < SLOW_MESSAGES && !s.wrong && timed_wait(&s.cv, &s.mu, deadline)) {
    }
    int count = s.count;
    bool in_order = !s.wrong;
    for (int n = 0; n < count; n++) in_order = in_order && s.seen[n] == n;
    pthread_mutex_unlock(&s.mu);
    wps_client_free(sub);
    pthread_cond_destroy(&s.cv);
    pthread_mutex_destroy(&s.mu);
    if (count != SLOW_MESSAGES || !in_order) fprintf(stderr, "  %d of %d messages, in order: %d\n", count, SLOW_MESSAGES, in_order);
    CHECK(count == SLOW_MESSAGES && in_order);
    return free_client(pub, rp);
}

/* A callback held in its first message until released. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int count;
    bool released;
    int freed;
} held_consumer;

static void on_event_held(void *user_data, const wps_event *ev) {
    held_consumer *h = user_data;
    if (ev->kind != WPS_EVENT_GROUP_MESSAGE) return;
    pthread_mutex_lock(&h->mu);
    h->count++;
    pthread_cond_broadcast(&h->cv);
    while (!h->released) pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
}

static void on_held_free(void *user_data) {
    held_consumer *h = user_data;
    pthread_mutex_lock(&h->mu);
    h->freed++;
    pthread_mutex_unlock(&h->mu);
}

/* A started client of `user` joined to "paused", with a 16 KiB backlog. */
static wps_client *paused_client(const char *user, bool poll, held_consumer *h) {
    char *url = emulator_client_url(&EMU, HUB, user, ALL_ROLES);
    wps_options *o = test_options();
    wps_options_set_event_backlog_bytes(o, 16 * 1024);
    if (poll) wps_options_set_dispatch_mode(o, WPS_DISPATCH_POLL);
    wps_client *c = NULL;
    wps_status s = wps_client_new(url, o, on_event_held, h, on_held_free, &c);
    wps_options_free(o);
    free(url);
    if (s == WPS_STATUS_OK) s = wps_client_start(c);
    if (s == WPS_STATUS_OK) s = wps_client_join_group(c, "paused", NULL);
    if (s != WPS_STATUS_OK) fprintf(stderr, "  paused client: %s\n", wps_last_error_message());
    return s == WPS_STATUS_OK ? c : NULL;
}

/* Clients whose reading is paused with events waiting: a poll-mode one never dispatched,
 * and one whose callback is held. The stop of the second does not wait for its callback,
 * the frees return at once; both finalizers run, and nothing leaks (ASan, valgrind). */
static bool test_free_while_paused(void) {
    held_consumer polled_h = {.count = 0, .released = false, .freed = 0};
    held_consumer held_h = {.count = 0, .released = false, .freed = 0};
    held_consumer *both[] = {&polled_h, &held_h};
    for (int i = 0; i < 2; i++) {
        pthread_mutex_init(&both[i]->mu, NULL);
        pthread_cond_init(&both[i]->cv, NULL);
    }
    wps_client *polled = paused_client("paused-poll", true, &polled_h);
    CHECK(polled != NULL);
    wps_client *held = paused_client("paused-thread", false, &held_h);
    CHECK(held != NULL);
    recorder *rp;
    wps_client *pub = connect_client("publisher", ALL_ROLES, &rp);
    CHECK(pub != NULL);
    CHECK(publish_numbered(pub, "paused"));
    int64_t deadline = now_ms() + WAIT_MS;
    pthread_mutex_lock(&held_h.mu);
    while (held_h.count == 0 && timed_wait(&held_h.cv, &held_h.mu, deadline)) {
    }
    bool in_callback = held_h.count == 1;
    pthread_mutex_unlock(&held_h.mu);
    CHECK(in_callback);
    int64_t started = now_ms();
    CHECK_OK(wps_client_stop(held));
    int64_t took = now_ms() - started;
    /* Released first: the polled client's finalizer may go to the held one's thread. */
    pthread_mutex_lock(&held_h.mu);
    held_h.released = true;
    pthread_cond_broadcast(&held_h.cv);
    pthread_mutex_unlock(&held_h.mu);
    started = now_ms();
    wps_client_free(polled);
    wps_client_free(held);
    took += now_ms() - started;
    if (took >= 5000) fprintf(stderr, "  stop and frees took %lld ms\n", (long long)took);
    CHECK(took < 5000);
    CHECK(polled_h.freed == 1 && polled_h.count == 0);
    CHECK(held_h.freed == 1);
    for (int i = 0; i < 2; i++) {
        pthread_cond_destroy(&both[i]->cv);
        pthread_mutex_destroy(&both[i]->mu);
    }
    return free_client(pub, rp);
}

/* The chat: two users, every data type, echo and no-echo, acks, a server message. */
static bool test_chat(void) {
    recorder *ra, *rb;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    wps_client *b = connect_client("bob", CHAT_ONLY, &rb);
    CHECK(b);
    int i = wait_event(ra, 0, WPS_EVENT_CONNECTED, NULL);
    CHECK(i >= 0);
    char id[128];
    CHECK(connection_id(a, id, sizeof id));
    CHECK(strcmp(ra->events[i].connection_id, id) == 0);
    CHECK(ra->events[i].has_user_id && strcmp(ra->events[i].user_id, "alice") == 0);
    CHECK(wps_client_state(a) == WPS_STATE_CONNECTED);
    CHECK_STATUS(wps_client_start(a), WPS_STATUS_ILLEGAL_STATE);
    size_t need = 0;
    char tiny[4];
    CHECK_STATUS(wps_client_connection_id(a, tiny, sizeof tiny, &need), WPS_STATUS_INVALID_ARGUMENT);
    CHECK(need == strlen(id));

    wps_ack_result ack = {0};
    CHECK_OK(wps_client_join_group(a, "chat", &ack));
    CHECK(ack.has_ack_id && ack.ack_id > 0 && !ack.is_duplicated);
    CHECK_OK(wps_client_join_group(b, "chat", NULL));

    /* text, with echo */
    CHECK_OK(wps_client_send_to_group(a, "chat", WPS_DATA_TYPE_TEXT, (const uint8_t *)"hello bob", 9, 0, &ack));
    CHECK(ack.has_ack_id);
    i = wait_event(rb, 0, WPS_EVENT_GROUP_MESSAGE, "hello bob");
    CHECK(i >= 0);
    event_copy *e = &rb->events[i];
    CHECK(strcmp(e->group, "chat") == 0 && e->has_from_user_id && strcmp(e->from_user_id, "alice") == 0);
    CHECK(e->data_type == WPS_DATA_TYPE_TEXT && e->has_sequence_id && e->sequence_id > 0);
    CHECK(wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, "hello bob") >= 0);

    /* no echo: alice must not see "quiet" but does see the "loud" sent after it */
    CHECK(send_text(a, "chat", "quiet", WPS_SEND_NO_ECHO));
    CHECK(send_text(a, "chat", "loud", 0));
    int loud = wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, "loud");
    CHECK(loud >= 0);
    CHECK(wait_event(rb, 0, WPS_EVENT_GROUP_MESSAGE, "quiet") >= 0);
    pthread_mutex_lock(&ra->mu);
    bool quiet_seen = false;
    for (int k = 0; k <= loud; k++) quiet_seen |= ra->events[k].data_len == 5 && memcmp(ra->events[k].data, "quiet", 5) == 0;
    pthread_mutex_unlock(&ra->mu);
    CHECK(!quiet_seen);

    /* json and binary from bob, fire-and-forget */
    const char *json = "{\"n\":1,\"s\":\"x\"}";
    CHECK_OK(wps_client_send_to_group(b, "chat", WPS_DATA_TYPE_JSON, (const uint8_t *)json, strlen(json), WPS_SEND_FIRE_AND_FORGET, &ack));
    CHECK(!ack.has_ack_id);
    i = wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, json);
    CHECK(i >= 0 && ra->events[i].data_type == WPS_DATA_TYPE_JSON && strcmp(ra->events[i].from_user_id, "bob") == 0);
    const uint8_t bin[] = {0, 1, 2, 0xff, 0xfe, 0};
    CHECK_OK(wps_client_send_to_group(b, "chat", WPS_DATA_TYPE_BINARY, bin, sizeof bin, 0, NULL));
    int64_t deadline = now_ms() + WAIT_MS;
    bool got_bin = false;
    while (!got_bin && now_ms() < deadline) {
        i = wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, NULL);
        pthread_mutex_lock(&ra->mu);
        for (int k = 0; k < ra->count; k++)
            got_bin |= ra->events[k].data_type == WPS_DATA_TYPE_BINARY && ra->events[k].data_len == sizeof bin &&
                       memcmp(ra->events[k].data, bin, sizeof bin) == 0;
        if (!got_bin) timed_wait(&ra->cv, &ra->mu, deadline);
        pthread_mutex_unlock(&ra->mu);
    }
    CHECK(got_bin);

    /* anonymous: no user id (NULL, not "") in its connected event nor in its messages */
    recorder *rn;
    wps_client *n = connect_client(NULL, ALL_ROLES, &rn);
    CHECK(n);
    i = wait_event(rn, 0, WPS_EVENT_CONNECTED, NULL);
    CHECK(i >= 0 && !rn->events[i].has_user_id);
    CHECK(send_text(n, "chat", "from nobody", 0));
    i = wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, "from nobody");
    CHECK(i >= 0 && !ra->events[i].has_from_user_id);
    CHECK(free_client(n, rn));

    /* a message from the server (REST) */
    char path[512], aud[600], claims[800];
    snprintf(path, sizeof path, "/api/hubs/%s/connections/%s/:send?api-version=2024-12-01", HUB, id);
    snprintf(aud, sizeof aud, "http://127.0.0.1:%d%s", EMU.port, path);
    snprintf(claims, sizeof claims, "{\"aud\":\"%s\",\"iat\":%ld,\"exp\":%ld}", aud, (long)time(NULL), (long)time(NULL) + 600);
    char *token = jwt_sign(EMU.key, claims);
    int code = http_request(EMU.port, "POST", path, token, "text/plain", "from the server");
    free(token);
    if (code != 202) fprintf(stderr, "  REST send answered %d\n", code);
    CHECK(code == 202);
    i = wait_event(ra, 0, WPS_EVENT_SERVER_MESSAGE, "from the server");
    CHECK(i >= 0 && ra->events[i].data_type == WPS_DATA_TYPE_TEXT);

    /* leave: bob no longer receives */
    CHECK_OK(wps_client_leave_group(b, "chat", &ack));
    CHECK(ack.has_ack_id);
    CHECK(send_text(a, "chat", "bob left", 0));
    CHECK(wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, "bob left") >= 0);
    CHECK(send_text(b, "chat", "still allowed to send", 0));
    CHECK(wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, "still allowed to send") >= 0);
    pthread_mutex_lock(&rb->mu);
    bool leaked = false;
    for (int k = 0; k < rb->count; k++) leaked |= rb->events[k].data_len == 8 && memcmp(rb->events[k].data, "bob left", 8) == 0;
    bool one_thread = !rb->thread_changed;
    pthread_mutex_unlock(&rb->mu);
    CHECK(!leaked);
    CHECK(one_thread);

    /* ack errors: bob may only join "chat"; the refused ackId is reported */
    CHECK_STATUS(wps_client_join_group(b, "secret", NULL), WPS_STATUS_ACK_ERROR);
    CHECK(strcmp(wps_last_error_name(), "Forbidden") == 0);
    CHECK(strcmp(wps_last_error_service_message(), "The client does not have permission to join group 'secret'.") == 0);
    CHECK(strstr(wps_last_error_message(), wps_last_error_service_message()) != NULL);
    wps_ack_result refused = {0};
    CHECK_STATUS(wps_client_join_group(b, "secret", &refused), WPS_STATUS_ACK_ERROR);
    CHECK(refused.has_ack_id && refused.ack_id > 0 && !refused.is_duplicated);
    completion done;
    completion_init(&done);
    uint64_t op = 0;
    CHECK_OK(wps_client_join_group_async(b, "secret", on_complete, &done, &op));
    CHECK(wait_completion(&done));
    CHECK(done.status == WPS_STATUS_ACK_ERROR && strcmp(done.error_name, "Forbidden") == 0 && done.op_id == op);
    CHECK(done.has_ack_id && done.ack_id > refused.ack_id);
    CHECK(done.message_set);
    CHECK(strcmp(done.service_message, "The client does not have permission to join group 'secret'.") == 0);
    completion_destroy(&done);

    /* stop: the stopped event, then operations fail */
    CHECK_OK(wps_client_stop(b));
    CHECK(wait_event(rb, 0, WPS_EVENT_STOPPED, NULL) >= 0);
    CHECK(wps_client_state(b) == WPS_STATE_STOPPED);
    CHECK(wps_client_join_group(b, "chat", NULL) != WPS_STATUS_OK);
    CHECK(free_client(b, rb));
    CHECK(free_client(a, ra));
    return true;
}

/* Every operation in its asynchronous form, and the upstream ones in both forms. */
static bool test_async_and_upstream(void) {
    recorder *ra;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    completion c[5];
    uint64_t ops[5] = {0};
    for (int k = 0; k < 5; k++) completion_init(&c[k]);
    CHECK_OK(wps_client_join_group_async(a, "room", on_complete, &c[0], &ops[0]));
    CHECK(wait_completion(&c[0]));
    CHECK(c[0].status == WPS_STATUS_OK && c[0].has_ack_id && c[0].op_id == ops[0] && !c[0].message_set);
    CHECK_OK(wps_client_send_to_group_async(a, "room", WPS_DATA_TYPE_TEXT, (const uint8_t *)"async hi", 8, 0, on_complete, &c[1], &ops[1]));
    CHECK(wait_completion(&c[1]));
    CHECK(c[1].status == WPS_STATUS_OK && c[1].has_ack_id && c[1].ack_id != c[0].ack_id && ops[1] != ops[0]);
    CHECK(wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, "async hi") >= 0);
    const char *json = "{\"k\":[1,2]}";
    CHECK_OK(wps_client_send_event_async(a, "evt", WPS_DATA_TYPE_JSON, (const uint8_t *)json, strlen(json), 0, on_complete, &c[2], &ops[2]));
    CHECK(wait_completion(&c[2]));
    CHECK(c[2].status == WPS_STATUS_OK && c[2].has_ack_id);
    char body[512];
    CHECK(upstream_count(UP, "evt", body, sizeof body) == 1);
    CHECK(strcmp(body, json) == 0);
    CHECK_OK(wps_client_invoke_event_async(a, "echo", WPS_DATA_TYPE_TEXT, (const uint8_t *)"ping?", 5, 0, on_complete, &c[3], &ops[3]));
    CHECK(wait_completion(&c[3]));
    CHECK(c[3].status == WPS_STATUS_OK && c[3].data_type == WPS_DATA_TYPE_TEXT && strcmp(c[3].data, "ping?") == 0);
    CHECK_OK(wps_client_leave_group_async(a, "room", on_complete, &c[4], NULL));
    CHECK(wait_completion(&c[4]));
    CHECK(c[4].status == WPS_STATUS_OK);

    /* stop and start without blocking: each completes once its state is reached */
    completion life[2];
    for (int k = 0; k < 2; k++) completion_init(&life[k]);
    CHECK_OK(wps_client_stop_async(a, on_complete, &life[0], NULL));
    CHECK(wait_completion(&life[0]));
    CHECK(life[0].status == WPS_STATUS_OK && wps_client_state(a) == WPS_STATE_STOPPED);
    CHECK(wait_event(ra, 0, WPS_EVENT_STOPPED, NULL) >= 0);
    CHECK_OK(wps_client_start_async(a, on_complete, &life[1], NULL));
    CHECK(wait_completion(&life[1]));
    CHECK(life[1].status == WPS_STATUS_OK && wps_client_state(a) == WPS_STATE_CONNECTED);
    for (int k = 0; k < 2; k++) completion_destroy(&life[k]);

    /* blocking send_event and invoke */
    wps_ack_result ack;
    CHECK_OK(wps_client_send_event(a, "evt", WPS_DATA_TYPE_TEXT, (const uint8_t *)"second", 6, 0, &ack));
    CHECK(ack.has_ack_id);
    CHECK(upstream_count(UP, "evt", body, sizeof body) == 2 && strcmp(body, "second") == 0);
    CHECK_OK(wps_client_send_event(a, "evt", WPS_DATA_TYPE_TEXT, (const uint8_t *)"third", 5, WPS_SEND_FIRE_AND_FORGET, &ack));
    CHECK(!ack.has_ack_id);
    wps_invoke_response *resp = NULL;
    const uint8_t bin[] = {9, 0, 8};
    CHECK_OK(wps_client_invoke_event(a, "echo", WPS_DATA_TYPE_BINARY, bin, sizeof bin, 0, &resp));
    size_t len = 0;
    const uint8_t *data = wps_invoke_response_data(resp, &len);
    CHECK(wps_invoke_response_data_type(resp) == WPS_DATA_TYPE_BINARY && len == sizeof bin && memcmp(data, bin, len) == 0);
    wps_invoke_response_free(resp);
    resp = NULL;
    CHECK_STATUS(wps_client_invoke_event(a, "fail", WPS_DATA_TYPE_TEXT, (const uint8_t *)"x", 1, 0, &resp), WPS_STATUS_INVOKE_ERROR);
    CHECK(resp == NULL);
    CHECK(strcmp(wps_last_error_name(), "InternalServerError") == 0);
    CHECK(strlen(wps_last_error_service_message()) > 0 && strstr(wps_last_error_message(), wps_last_error_service_message()) != NULL);
    /* caller-chosen ackIds: a repeat is reported as a duplicate, not an error */
    CHECK_OK(wps_client_send_to_group_with_ack_id(a, "room", WPS_DATA_TYPE_TEXT, (const uint8_t *)"once", 4, 0, 1000, &ack));
    CHECK(ack.has_ack_id && ack.ack_id == 1000 && !ack.is_duplicated);
    CHECK_OK(wps_client_send_to_group_with_ack_id(a, "room", WPS_DATA_TYPE_TEXT, (const uint8_t *)"once", 4, 0, 1000, &ack));
    CHECK(ack.ack_id == 1000 && ack.is_duplicated);
    CHECK_STATUS(wps_client_send_to_group_with_ack_id(a, "room", WPS_DATA_TYPE_TEXT, (const uint8_t *)"zero", 4, 0, 0, &ack), WPS_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(wps_last_error_message(), "at least 1") != NULL && !ack.has_ack_id);
    CHECK_OK(wps_client_send_event_with_ack_id(a, "evt", WPS_DATA_TYPE_TEXT, (const uint8_t *)"e", 1, 0, 1001, &ack));
    CHECK(ack.ack_id == 1001 && !ack.is_duplicated);
    completion d[2];
    completion_init(&d[0]);
    completion_init(&d[1]);
    CHECK_OK(wps_client_send_event_with_ack_id_async(a, "evt", WPS_DATA_TYPE_TEXT, (const uint8_t *)"e", 1, 0, 1001, on_complete, &d[0], NULL));
    CHECK(wait_completion(&d[0]));
    CHECK(d[0].status == WPS_STATUS_OK && d[0].ack_id == 1001 && d[0].is_duplicated);
    CHECK_OK(wps_client_send_to_group_with_ack_id_async(a, "room", WPS_DATA_TYPE_TEXT, (const uint8_t *)"x", 1, 0, 1002, on_complete, &d[1], NULL));
    CHECK(wait_completion(&d[1]));
    CHECK(d[1].status == WPS_STATUS_OK && d[1].ack_id == 1002 && !d[1].is_duplicated);
    completion_destroy(&d[0]);
    completion_destroy(&d[1]);
    for (int k = 0; k < 5; k++) completion_destroy(&c[k]);
    CHECK(free_client(a, ra));
    return true;
}

/* Cancel: the completion reports CANCELLED exactly once; an invocation is abandoned. */
static bool test_cancel(void) {
    recorder *ra;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    int before = upstream_count(UP, "slow", NULL, 0);
    completion c;
    completion_init(&c);
    uint64_t op = 0;
    CHECK_OK(wps_client_invoke_event_async(a, "slow", WPS_DATA_TYPE_TEXT, (const uint8_t *)"zz", 2, 0, on_complete, &c, &op));
    int64_t deadline = now_ms() + WAIT_MS;
    while (upstream_count(UP, "slow", NULL, 0) == before && now_ms() < deadline) usleep(5000);
    CHECK(upstream_count(UP, "slow", NULL, 0) == before + 1);
    CHECK_OK(wps_client_cancel(a, op));
    CHECK(wait_completion(&c));
    CHECK(c.status == WPS_STATUS_CANCELLED && c.op_id == op);
    CHECK_STATUS(wps_client_cancel(a, op), WPS_STATUS_INVALID_ARGUMENT);
    upstream_release(UP);
    /* the connection is still usable and the cancelled op never completes again */
    CHECK_OK(wps_client_join_group(a, "after-cancel", NULL));
    pthread_mutex_lock(&c.mu);
    int calls = c.calls;
    pthread_mutex_unlock(&c.mu);
    CHECK(calls == 1);
    /* an invocation timing out */
    CHECK_STATUS(wps_client_invoke_event(a, "slow", WPS_DATA_TYPE_TEXT, (const uint8_t *)"t", 1, 200, &(wps_invoke_response *){NULL}), WPS_STATUS_TIMEOUT);
    completion_destroy(&c);
    CHECK(free_client(a, ra));
    return true;
}

/* Many operations racing with cancel and free: every completion arrives exactly once. */
enum { RACE_OPS = 200 };

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int calls[RACE_OPS];
    wps_status status[RACE_OPS];
    int total;
} race;

typedef struct {
    race *r;
    int index;
} race_slot;

static void on_race_complete(void *user_data, const wps_completion *done) {
    race_slot *slot = user_data;
    race *r = slot->r;
    pthread_mutex_lock(&r->mu);
    r->calls[slot->index]++;
    r->status[slot->index] = done->status;
    r->total++;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static bool test_completion_races(void) {
    recorder *ra;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    race *r = calloc(1, sizeof *r);
    race_slot *slots = calloc(RACE_OPS, sizeof *slots);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    wps_status cancel[RACE_OPS];
    uint64_t ids[RACE_OPS];
    /* first half: cancel every other one right away, wait for all */
    for (int k = 0; k < RACE_OPS / 2; k++) {
        slots[k] = (race_slot){r, k};
        CHECK_OK(wps_client_send_to_group_async(a, "race", WPS_DATA_TYPE_TEXT, (const uint8_t *)"r", 1, 0, on_race_complete, &slots[k], &ids[k]));
        cancel[k] = k % 2 ? wps_client_cancel(a, ids[k]) : WPS_STATUS_INVALID_ARGUMENT;
    }
    int64_t deadline = now_ms() + WAIT_MS;
    pthread_mutex_lock(&r->mu);
    while (r->total < RACE_OPS / 2 && timed_wait(&r->cv, &r->mu, deadline)) {
    }
    pthread_mutex_unlock(&r->mu);
    for (int k = 0; k < RACE_OPS / 2; k++) {
        CHECK(r->calls[k] == 1);
        if (cancel[k] == WPS_STATUS_OK) CHECK(r->status[k] == WPS_STATUS_CANCELLED);
        else CHECK(r->status[k] == WPS_STATUS_OK);
    }
    /* second half: free while they are in flight; all completed when free returns */
    for (int k = RACE_OPS / 2; k < RACE_OPS; k++) {
        slots[k] = (race_slot){r, k};
        CHECK_OK(wps_client_send_to_group_async(a, "race", WPS_DATA_TYPE_TEXT, (const uint8_t *)"r", 1, 0, on_race_complete, &slots[k], NULL));
    }
    CHECK(free_client(a, ra));
    pthread_mutex_lock(&r->mu);
    int total = r->total;
    pthread_mutex_unlock(&r->mu);
    CHECK(total == RACE_OPS);
    for (int k = RACE_OPS / 2; k < RACE_OPS; k++) {
        CHECK(r->calls[k] == 1);
        if (r->status[k] != WPS_STATUS_OK && r->status[k] != WPS_STATUS_STOPPED) fprintf(stderr, "  op %d: %s\n", k, wps_status_str(r->status[k]));
        CHECK(r->status[k] == WPS_STATUS_OK || r->status[k] == WPS_STATUS_STOPPED);
    }
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
    free(slots);
    return true;
}

/* Calls from inside callbacks: a blocking send from a group-message callback. */
static bool test_call_inside_callback(void) {
    recorder *ra, *rb;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    wps_client *b = connect_client("bob", CHAT_ONLY, &rb);
    CHECK(b);
    pthread_mutex_lock(&rb->mu);
    rb->self = b;
    pthread_mutex_unlock(&rb->mu);
    CHECK_OK(wps_client_join_group(a, "chat", NULL));
    CHECK_OK(wps_client_join_group(b, "chat", NULL));
    CHECK(send_text(a, "chat", "ping", 0));
    CHECK(wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, "pong") >= 0);
    CHECK_OK(wait_inner(rb));
    /* a stop from inside a callback */
    pthread_mutex_lock(&rb->mu);
    rb->inner_calls = 0;
    pthread_mutex_unlock(&rb->mu);
    CHECK(send_text(a, "chat", "stop", 0));
    CHECK_OK(wait_inner(rb));
    CHECK(wait_event(rb, 0, WPS_EVENT_STOPPED, NULL) >= 0);
    pthread_mutex_lock(&rb->mu);
    rb->self = NULL;
    pthread_mutex_unlock(&rb->mu);
    CHECK(free_client(b, rb));
    CHECK(free_client(a, ra));
    return true;
}

/* wps_client_free from inside the client's own callback defers the teardown. */
static bool test_free_inside_callback(void) {
    recorder *ra, *rv;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    wps_client *v = connect_client("victim", ALL_ROLES, &rv);
    CHECK(v);
    CHECK_OK(wps_client_join_group(a, "chat", NULL));
    CHECK_OK(wps_client_join_group(v, "chat", NULL));
    completion pending;
    completion_init(&pending);
    CHECK_OK(wps_client_invoke_event_async(v, "slow", WPS_DATA_TYPE_TEXT, (const uint8_t *)"p", 1, 0, on_complete, &pending, NULL));
    pthread_mutex_lock(&rv->mu);
    rv->self = v;
    pthread_mutex_unlock(&rv->mu);
    CHECK(send_text(a, "chat", "die", 0));
    CHECK(wait_freed(rv));
    CHECK_OK(wait_inner(rv));
    CHECK(wait_completion(&pending));
    CHECK(pending.status == WPS_STATUS_STOPPED);
    pthread_mutex_lock(&rv->mu);
    bool ok = rv->inner_calls == 1 && rv->inner_status == WPS_STATUS_OK && rv->calls_after_free == 0 && rv->in_flight == 0;
    pthread_mutex_unlock(&rv->mu);
    CHECK(ok);
    /* more traffic to the group: nothing reaches the freed client's callback */
    CHECK(send_text(a, "chat", "after", 0));
    CHECK(wait_event(ra, 0, WPS_EVENT_GROUP_MESSAGE, "after") >= 0);
    pthread_mutex_lock(&rv->mu);
    ok = rv->calls_after_free == 0 && rv->freed == 1;
    pthread_mutex_unlock(&rv->mu);
    CHECK(ok);
    upstream_release(UP);
    recorder_delete(rv);
    completion_destroy(&pending);
    CHECK(free_client(a, ra));
    return true;
}

/* wps_client_free from inside a completion callback of the same client. */
typedef struct {
    completion done;
    wps_client *client;
} free_on_complete;

static void on_complete_free(void *user_data, const wps_completion *done) {
    free_on_complete *f = user_data;
    wps_client_free(f->client); /* deferred: this completion is still running */
    on_complete(&f->done, done);
}

static bool test_free_inside_completion(void) {
    recorder *ra;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    free_on_complete f = {.client = a};
    completion_init(&f.done);
    CHECK_OK(wps_client_join_group_async(a, "g2", on_complete_free, &f, NULL));
    CHECK(wait_completion(&f.done));
    CHECK(f.done.status == WPS_STATUS_OK);
    CHECK(wait_freed(ra));
    pthread_mutex_lock(&ra->mu);
    bool ok = ra->calls_after_free == 0 && ra->in_flight == 0;
    pthread_mutex_unlock(&ra->mu);
    CHECK(ok);
    completion_destroy(&f.done);
    recorder_delete(ra);
    return true;
}

/* A user_data_free finalizer that calls back into its own client while wps_client_free
 * runs it: the calls get statuses (a start is refused: the client is being freed), and
 * a second free of the same handle is detected and ignored rather than freeing it twice
 * (asan and valgrind report a double free otherwise). Both for a free outside callbacks
 * and for one deferred by a callback. */
typedef struct {
    wps_client *client;
    int freed, events, done;
    wps_status start, join_async, stop;
} reentering;

static void on_free_reenter(void *user_data) {
    reentering *f = user_data;
    f->freed++;
    f->start = wps_client_start(f->client);
    f->join_async = wps_client_join_group_async(f->client, "g", NULL, NULL, NULL);
    f->stop = wps_client_stop(f->client);
    wps_client_free(f->client); /* the second free of this handle */
    __atomic_store_n(&f->done, 1, __ATOMIC_RELEASE);
}

static void on_event_free_self(void *user_data, const wps_event *ev) {
    reentering *f = user_data;
    f->events++;
    if (ev->kind == WPS_EVENT_CONNECTED) wps_client_free(f->client); /* deferred */
}

static bool reentering_client(reentering *f, wps_event_cb on_ev) {
    char *url = emulator_client_url(&EMU, HUB, "alice", ALL_ROLES);
    wps_options *o = test_options();
    wps_status s = wps_client_new(url, o, on_ev, f, on_free_reenter, &f->client);
    wps_options_free(o);
    free(url);
    return s == WPS_STATUS_OK;
}

static bool test_finalizer_reenters_its_client(void) {
    reentering f = {.start = 99, .join_async = 99, .stop = 99};
    CHECK(reentering_client(&f, NULL));
    CHECK_OK(wps_client_start(f.client));
    wps_client_free(f.client);
    CHECK(f.freed == 1 && f.done);
    CHECK(f.start == WPS_STATUS_STOPPED && f.join_async == WPS_STATUS_STOPPED && f.stop == WPS_STATUS_OK);

    reentering g = {.start = 99, .join_async = 99, .stop = 99};
    CHECK(reentering_client(&g, on_event_free_self));
    CHECK_OK(wps_client_start(g.client));
    int64_t deadline = now_ms() + WAIT_MS;
    while (!__atomic_load_n(&g.done, __ATOMIC_ACQUIRE) && now_ms() < deadline) usleep(1000);
    CHECK(__atomic_load_n(&g.done, __ATOMIC_ACQUIRE) && g.freed == 1 && g.events == 1);
    CHECK(g.start == WPS_STATUS_STOPPED && g.join_async == WPS_STATUS_STOPPED && g.stop == WPS_STATUS_OK);
    return true;
}

/* wps_client_free with pending operations: each completes exactly once before it returns. */
static bool test_free_with_pending(void) {
    recorder *ra;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    completion slow, joined;
    completion_init(&slow);
    completion_init(&joined);
    CHECK_OK(wps_client_invoke_event_async(a, "slow", WPS_DATA_TYPE_TEXT, (const uint8_t *)"p", 1, 0, on_complete, &slow, NULL));
    CHECK_OK(wps_client_join_group_async(a, "g1", on_complete, &joined, NULL));
    int events_before = event_count(ra);
    wps_client_free(a);
    pthread_mutex_lock(&ra->mu);
    bool ok = ra->freed == 1 && ra->in_flight == 0 && ra->calls_after_free == 0;
    int events_after = ra->count;
    pthread_mutex_unlock(&ra->mu);
    CHECK(ok);
    CHECK(slow.calls == 1 && slow.status == WPS_STATUS_STOPPED);
    CHECK(joined.calls == 1);
    upstream_release(UP);
    /* nothing more arrives */
    usleep(100000);
    CHECK(event_count(ra) == events_after && events_after >= events_before);
    CHECK(slow.calls == 1 && joined.calls == 1);
    completion_destroy(&slow);
    completion_destroy(&joined);
    recorder_delete(ra);
    return true;
}

/* The credential callback: called for every new connection, errors surface. */
typedef struct {
    pthread_mutex_t mu;
    int calls, freed;
    int null_refusals; /* calls that saw NULL answers refused with their reason */
    int mode; /* 0: good url; 1: error; 2: no answer; 3: good url first then no roles; 4: free the client;
                 5: good url first then an error naming the call */
    wps_client *client;
} cred_state;

static void on_credential(void *user_data, wps_credential_result *result) {
    cred_state *s = user_data;
    pthread_mutex_lock(&s->mu);
    int n = ++s->calls, mode = s->mode;
    pthread_mutex_unlock(&s->mu);
    if (mode == 1) {
        wps_credential_result_set_error(result, "no token for you");
        return;
    }
    if (mode == 2) return;
    if (mode == 5 && n > 1) {
        char error[64];
        snprintf(error, sizeof error, "the token service answered 401 (call %d)", n);
        wps_credential_result_set_error(result, error);
        return;
    }
    if (mode == 4) {
        wps_client_free(s->client); /* deferred: the credential call is still running */
        wps_credential_result_set_error(result, "freed");
        return;
    }
    /* NULL answers are refused, with their reason, and leave the request unanswered. */
    bool refused = wps_credential_result_set_url(result, NULL) == WPS_STATUS_NULL_ARG &&
                   strcmp(wps_last_error_message(), "`url` is NULL") == 0 &&
                   wps_credential_result_set_error(result, NULL) == WPS_STATUS_NULL_ARG &&
                   strcmp(wps_last_error_message(), "`message` is NULL") == 0;
    pthread_mutex_lock(&s->mu);
    s->null_refusals += refused;
    pthread_mutex_unlock(&s->mu);
    char *url = emulator_client_url(&EMU, HUB, "carol", mode == 3 && n > 1 ? "[]" : ALL_ROLES);
    wps_status s1 = wps_credential_result_set_url(result, url);
    wps_status s2 = wps_credential_result_set_url(result, url); /* a second answer is refused */
    if (s1 != WPS_STATUS_OK || s2 != WPS_STATUS_ILLEGAL_STATE) fprintf(stderr, "  credential result: %u %u\n", s1, s2);
    free(url);
}

static void on_credential_free(void *user_data) {
    cred_state *s = user_data;
    pthread_mutex_lock(&s->mu);
    s->freed++;
    pthread_mutex_unlock(&s->mu);
}

static bool test_credential_errors(void) {
    for (int mode = 1; mode <= 2; mode++) {
        cred_state cs = {.mode = mode};
        pthread_mutex_init(&cs.mu, NULL);
        wps_options *o = test_options();
        wps_options_set_reconnect_retry(o, 0, 10, 10, WPS_RETRY_FIXED);
        wps_client *c = NULL;
        CHECK_OK(wps_client_new_with_credential(on_credential, &cs, on_credential_free, o, NULL, NULL, NULL, &c));
        wps_options_free(o);
        CHECK_STATUS(wps_client_start(c), WPS_STATUS_CREDENTIAL_FAILED);
        if (mode == 1) CHECK(strstr(wps_last_error_message(), "no token for you") != NULL);
        wps_client_free(c);
        CHECK(cs.calls >= 1 && cs.freed == 1);
        pthread_mutex_destroy(&cs.mu);
    }
    /* the client freed from inside its own credential callback */
    cred_state cs = {.mode = 4};
    pthread_mutex_init(&cs.mu, NULL);
    recorder *r = recorder_new();
    wps_client *fc = NULL;
    CHECK_OK(wps_client_new_with_credential(on_credential, &cs, on_credential_free, NULL, on_event, r, on_user_data_free, &fc));
    cs.client = fc;
    CHECK(wps_client_start(fc) != WPS_STATUS_OK);
    CHECK(wait_freed(r));
    int64_t deadline = now_ms() + WAIT_MS;
    for (;;) {
        pthread_mutex_lock(&cs.mu);
        int freed = cs.freed;
        pthread_mutex_unlock(&cs.mu);
        if (freed == 1 || now_ms() > deadline) break;
        usleep(1000);
    }
    CHECK(cs.freed == 1 && cs.calls == 1);
    recorder_delete(r);
    pthread_mutex_destroy(&cs.mu);
    /* a bad token and an unreachable server */
    wps_options *o = test_options();
    wps_options_set_reconnect_retry(o, 0, 10, 10, WPS_RETRY_FIXED);
    char url[256];
    snprintf(url, sizeof url, "ws://127.0.0.1:%d/client/hubs/chat?access_token=bad", EMU.port);
    wps_client *c = NULL;
    CHECK_OK(wps_client_new(url, o, NULL, NULL, NULL, &c));
    CHECK_STATUS(wps_client_start(c), WPS_STATUS_CONNECT_FAILED);
    wps_client_free(c);
    CHECK_OK(wps_client_new("ws://127.0.0.1:1/client/hubs/chat?access_token=x", o, NULL, NULL, NULL, &c));
    CHECK_STATUS(wps_client_start(c), WPS_STATUS_CONNECT_FAILED);
    wps_client_free(c);
    wps_options_free(o);
    return true;
}

static int emulator_post(const char *conn, const char *action) {
    char path[512];
    snprintf(path, sizeof path, "/_emulator/hubs/%s/connections/%s/%s", HUB, conn, action);
    return http_request(EMU.port, "POST", path, NULL, NULL, NULL);
}

/* Sends "unacked" to group "held" of a new client whose ack the emulator swallows, and
 * waits until it is delivered (so the service took it in): pending for good. */
static wps_client *client_with_held_send(recorder **r, completion *held) {
    wps_client *a = connect_client("alice", ALL_ROLES, r);
    if (!a) return NULL;
    char id[128];
    int code = 0;
    bool ok = wps_client_join_group(a, "held", NULL) == WPS_STATUS_OK && connection_id(a, id, sizeof id) &&
              ((code = emulator_post(id, ":dropAcks?count=1")) == 200 || code == 204) &&
              wps_client_send_to_group_async(a, "held", WPS_DATA_TYPE_TEXT, (const uint8_t *)"unacked", 7, 0, on_complete, held, NULL) == WPS_STATUS_OK &&
              wait_event(*r, 0, WPS_EVENT_GROUP_MESSAGE, "unacked") >= 0;
    if (ok) return a;
    free_client(a, *r);
    return NULL;
}

/* A credential callback that defers its answer: the token is answered later, from another
 * thread, or never. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    wps_credential_result *token; /* the last request's, until taken */
    int calls, freed;
    wps_status deferred, again;
} deferring_cred;

static void on_credential_deferring(void *user_data, wps_credential_result *result) {
    deferring_cred *d = user_data;
    wps_status deferred = wps_credential_result_defer(result);
    wps_status again = wps_credential_result_defer(result); /* a second deferral is refused */
    pthread_mutex_lock(&d->mu);
    d->calls++;
    d->deferred = deferred;
    d->again = again;
    d->token = result;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

static void on_deferring_free(void *user_data) {
    deferring_cred *d = user_data;
    pthread_mutex_lock(&d->mu);
    d->freed++;
    pthread_mutex_unlock(&d->mu);
}

/* The next deferred request's token (NULL after WAIT_MS). */
static wps_credential_result *take_token(deferring_cred *d) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_MS / 1000;
    pthread_mutex_lock(&d->mu);
    while (d->token == NULL && pthread_cond_timedwait(&d->cv, &d->mu, &until) == 0) {
    }
    wps_credential_result *token = d->token;
    d->token = NULL;
    pthread_mutex_unlock(&d->mu);
    return token;
}

static int deferring_freed(deferring_cred *d) {
    pthread_mutex_lock(&d->mu);
    int freed = d->freed;
    pthread_mutex_unlock(&d->mu);
    return freed;
}

/* A wps_client_start on a thread of its own. */
typedef struct {
    wps_client *client;
    pthread_t thread;
    wps_status status;
    char error[256];
} starter;

static void *run_start(void *arg) {
    starter *s = arg;
    s->status = wps_client_start(s->client);
    snprintf(s->error, sizeof s->error, "%s", wps_last_error_message());
    return NULL;
}

/* An answer given from a thread of its own: the URL, or else the error; then a second one. */
typedef struct {
    wps_credential_result *token;
    const char *url, *error;
    wps_status first, second;
} answerer;

static void *run_answer(void *arg) {
    answerer *a = arg;
    a->first = a->url ? wps_credential_result_set_url(a->token, a->url)
                      : wps_credential_result_set_error(a->token, a->error);
    a->second = wps_credential_result_set_url(a->token, "ws://127.0.0.1:1/client/hubs/x");
    return NULL;
}

static bool answer_from_another_thread(answerer *a) {
    pthread_t t;
    if (pthread_create(&t, NULL, run_answer, a) != 0) return false;
    return pthread_join(t, NULL) == 0;
}

static bool test_credential_deferred(void) {
    deferring_cred d = {.token = NULL};
    pthread_mutex_init(&d.mu, NULL);
    pthread_cond_init(&d.cv, NULL);
    wps_client *c = NULL;
    CHECK_OK(wps_client_new_with_credential(on_credential_deferring, &d, on_deferring_free, NULL, NULL, NULL, NULL, &c));
    starter st = {.client = c};

    /* answered later from another thread: connects; a second answer is refused */
    CHECK(pthread_create(&st.thread, NULL, run_start, &st) == 0);
    wps_credential_result *token = take_token(&d);
    CHECK(token != NULL && d.deferred == WPS_STATUS_OK && d.again == WPS_STATUS_ILLEGAL_STATE);
    char *url = emulator_client_url(&EMU, HUB, "dave", ALL_ROLES);
    answerer a = {.token = token, .url = url};
    CHECK(answer_from_another_thread(&a));
    free(url);
    CHECK(a.first == WPS_STATUS_OK && a.second == WPS_STATUS_ILLEGAL_STATE);
    pthread_join(st.thread, NULL);
    CHECK(st.status == WPS_STATUS_OK);
    CHECK(wps_client_state(c) == WPS_STATE_CONNECTED);
    CHECK_STATUS(wps_credential_result_defer(token), WPS_STATUS_ILLEGAL_STATE); /* outside its callback */
    CHECK_OK(wps_client_stop(c));

    /* answered with an error */
    CHECK(pthread_create(&st.thread, NULL, run_start, &st) == 0);
    token = take_token(&d);
    CHECK(token != NULL);
    a = (answerer){.token = token, .error = "denied later"};
    CHECK(answer_from_another_thread(&a));
    CHECK(a.first == WPS_STATUS_OK && a.second == WPS_STATUS_ILLEGAL_STATE);
    pthread_join(st.thread, NULL);
    CHECK(st.status == WPS_STATUS_CREDENTIAL_FAILED && strstr(st.error, "denied later") != NULL);

    /* never answered: a stop ends the wait, the token is refused after */
    CHECK(pthread_create(&st.thread, NULL, run_start, &st) == 0);
    token = take_token(&d);
    CHECK(token != NULL);
    CHECK_OK(wps_client_stop(c));
    pthread_join(st.thread, NULL);
    CHECK(st.status == WPS_STATUS_STOPPED);
    CHECK_STATUS(wps_credential_result_set_url(token, "ws://127.0.0.1:1/client/hubs/x"), WPS_STATUS_ILLEGAL_STATE);
    CHECK(deferring_freed(&d) == 0);

    /* never answered, then freed: no hang, the finalizer runs once, the token is refused */
    CHECK(pthread_create(&st.thread, NULL, run_start, &st) == 0);
    token = take_token(&d);
    CHECK(token != NULL);
    wps_client_free(c);
    pthread_join(st.thread, NULL);
    CHECK(st.status == WPS_STATUS_STOPPED);
    CHECK(deferring_freed(&d) == 1);
    CHECK_STATUS(wps_credential_result_set_error(token, "late"), WPS_STATUS_ILLEGAL_STATE);
    usleep(50000);
    CHECK(deferring_freed(&d) == 1 && d.calls == 4);
    pthread_cond_destroy(&d.cv);
    pthread_mutex_destroy(&d.mu);
    return true;
}

/* A send the service took in but never acked, ended by wps_client_stop or by
 * wps_client_free: STOPPED with its ackId, so that the caller can send it again with
 * the same one. */
static bool test_stop_reports_ack_ids(void) {
    recorder *ra;
    completion held;
    completion_init(&held);
    wps_client *a = client_with_held_send(&ra, &held);
    CHECK(a);
    CHECK_OK(wps_client_stop(a));
    CHECK(wait_completion(&held));
    CHECK(held.status == WPS_STATUS_STOPPED && held.has_ack_id && held.ack_id > 0 && held.message_set);
    CHECK(free_client(a, ra));
    completion_destroy(&held);
    completion_init(&held);
    a = client_with_held_send(&ra, &held);
    CHECK(a);
    CHECK(free_client(a, ra)); /* the completion ran before it returned */
    CHECK(held.calls == 1 && held.status == WPS_STATUS_STOPPED && held.has_ack_id && held.ack_id > 0);
    completion_destroy(&held);
    return true;
}

/* Reconnection: a dropped socket is recovered (same connection, nothing lost), a 1008
 * close loses the session: disconnected, a new connection (new credential call),
 * groups rejoined, and a rejoin refused raises rejoin-group-failed. */
static bool test_reconnection(void) {
    recorder *ra;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    cred_state cs = {.mode = 3};
    pthread_mutex_init(&cs.mu, NULL);
    recorder *rc = recorder_new();
    wps_options *o = test_options();
    wps_client *c = NULL;
    CHECK_OK(wps_client_new_with_credential(on_credential, &cs, on_credential_free, o, on_event, rc, on_user_data_free, &c));
    wps_options_free(o);
    CHECK_OK(wps_client_start(c));
    CHECK_OK(wps_client_join_group(c, "chat", NULL));
    char id1[128], id2[128], id3[128];
    CHECK(connection_id(c, id1, sizeof id1));

    int code = emulator_post(id1, ":drop");
    CHECK(code == 200 || code == 204);
    CHECK(send_text(a, "chat", "during recovery", 0));
    CHECK(wait_event(rc, 0, WPS_EVENT_GROUP_MESSAGE, "during recovery") >= 0);
    CHECK(send_text(a, "chat", "after recovery", 0));
    CHECK(wait_event(rc, 0, WPS_EVENT_GROUP_MESSAGE, "after recovery") >= 0);
    int64_t deadline = now_ms() + WAIT_MS;
    while (wps_client_state(c) != WPS_STATE_CONNECTED && now_ms() < deadline) usleep(10000);
    CHECK(connection_id(c, id2, sizeof id2));
    CHECK(strcmp(id1, id2) == 0);
    CHECK(count_kind(rc, WPS_EVENT_DISCONNECTED) == 0);
    CHECK(count_kind(rc, WPS_EVENT_CONNECTED) == 1);
    CHECK(cs.calls == 1);

    code = emulator_post(id1, ":close?code=1008&reason=policy");
    CHECK(code == 200 || code == 204);
    int d = wait_event(rc, 0, WPS_EVENT_DISCONNECTED, NULL);
    CHECK(d >= 0);
    CHECK(strcmp(rc->events[d].connection_id, id1) == 0);
    CHECK(rc->events[d].close_code == 1008);
    int cn = wait_event(rc, d, WPS_EVENT_CONNECTED, NULL);
    CHECK(cn > d);
    CHECK(strcmp(rc->events[cn].connection_id, id1) != 0);
    CHECK(connection_id(c, id3, sizeof id3) && strcmp(id3, rc->events[cn].connection_id) == 0);
    /* the second token has no roles: rejoining "chat" is refused */
    int rj = wait_event(rc, cn, WPS_EVENT_REJOIN_GROUP_FAILED, NULL);
    CHECK(rj > cn);
    CHECK(strcmp(rc->events[rj].group, "chat") == 0 && rc->events[rj].has_error_name &&
          strcmp(rc->events[rj].error_name, "Forbidden") == 0 && rc->events[rj].has_service_message);
    CHECK(strcmp(rc->events[rj].service_message, "The client does not have permission to join group 'chat'.") == 0);
    CHECK(rc->events[rj].has_ack_id && rc->events[rj].ack_id > 0);
    CHECK(rc->events[rj].status == WPS_STATUS_ACK_ERROR);
    CHECK(cs.calls == 2 && cs.null_refusals == 2);
    CHECK(wps_client_state(c) == WPS_STATE_CONNECTED);

    /* with auto-reconnect off, 1008 stops the client */
    wps_options *o2 = test_options();
    wps_options_set_auto_reconnect(o2, false);
    char *url = emulator_client_url(&EMU, HUB, "dave", ALL_ROLES);
    recorder *rd = recorder_new();
    wps_client *dc = NULL;
    CHECK_OK(wps_client_new(url, o2, on_event, rd, on_user_data_free, &dc));
    free(url);
    wps_options_free(o2);
    CHECK_OK(wps_client_start(dc));
    char idd[128];
    CHECK(connection_id(dc, idd, sizeof idd));
    code = emulator_post(idd, ":close?code=1008&reason=bye");
    CHECK(code == 200 || code == 204);
    int ds = wait_event(rd, 0, WPS_EVENT_DISCONNECTED, NULL);
    CHECK(ds >= 0 && rd->events[ds].close_code == 1008);
    int st = wait_event(rd, ds, WPS_EVENT_STOPPED, NULL);
    CHECK(st > ds);
    CHECK(rd->events[st].status == WPS_STATUS_NOT_CONNECTED && strcmp(rd->events[st].message, "not connected") == 0);
    CHECK(wps_client_state(dc) == WPS_STATE_STOPPED);
    CHECK(free_client(dc, rd));

    CHECK(free_client(c, rc));
    CHECK(cs.freed == 1);
    pthread_mutex_destroy(&cs.mu);
    CHECK(free_client(a, ra));
    return true;
}

/* The stopped event tells why the client stopped on its own: the last reconnect
 * attempt's error once the policy gave up; nothing after wps_client_stop. */
static bool test_stopped_reason(void) {
    cred_state cs = {.mode = 5};
    pthread_mutex_init(&cs.mu, NULL);
    recorder *r = recorder_new();
    wps_options *o = test_options();
    wps_options_set_reconnect_retry(o, 2, 10, 10, WPS_RETRY_FIXED);
    wps_client *c = NULL;
    CHECK_OK(wps_client_new_with_credential(on_credential, &cs, on_credential_free, o, on_event, r, on_user_data_free, &c));
    wps_options_free(o);
    CHECK_OK(wps_client_start(c));
    char id[128];
    CHECK(connection_id(c, id, sizeof id));
    int code = emulator_post(id, ":close?code=1008");
    CHECK(code == 200 || code == 204);
    int d = wait_event(r, 0, WPS_EVENT_DISCONNECTED, NULL);
    CHECK(d >= 0);
    /* the start, then one attempt and 2 retries */
    int st = wait_event(r, d, WPS_EVENT_STOPPED, NULL);
    CHECK(st > d);
    CHECK(r->events[st].status == WPS_STATUS_CREDENTIAL_FAILED);
    CHECK(r->events[st].has_message && strstr(r->events[st].message, "the token service answered 401 (call 4)") != NULL);
    CHECK(wps_client_state(c) == WPS_STATE_STOPPED);
    pthread_mutex_lock(&cs.mu);
    int calls = cs.calls;
    cs.calls = 0;
    pthread_mutex_unlock(&cs.mu);
    CHECK(calls == 4);

    CHECK_OK(wps_client_start(c));
    CHECK_OK(wps_client_stop(c));
    st = wait_event(r, st + 1, WPS_EVENT_STOPPED, NULL);
    CHECK(st > d);
    CHECK(r->events[st].status == WPS_STATUS_OK && !r->events[st].has_message);
    CHECK(free_client(c, r));
    CHECK(cs.freed == 1);
    pthread_mutex_destroy(&cs.mu);
    return true;
}

/* Many clients share a few dispatcher threads; one client's events arrive in order. */
static bool test_threads_and_order(void) {
    enum { N = 100, MSGS = 100 };
    recorder *ra;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    int base = thread_count();
    wps_client *cs[N];
    recorder *rs[N];
    for (int k = 0; k < N; k++) {
        cs[k] = connect_client("many", ALL_ROLES, &rs[k]);
        CHECK(cs[k]);
    }
    int grown = thread_count() - base;
    if (grown > 8) fprintf(stderr, "  threads grew from %d by %d for %d clients\n", base, grown, N);
    CHECK(grown <= 8);
    CHECK_OK(wps_client_join_group(cs[0], "order", NULL));
    char msg[32];
    for (int k = 0; k < MSGS; k++) {
        snprintf(msg, sizeof msg, "m%03d", k);
        CHECK(send_text(a, "order", msg, 0));
    }
    snprintf(msg, sizeof msg, "m%03d", MSGS - 1);
    CHECK(wait_event(rs[0], 0, WPS_EVENT_GROUP_MESSAGE, msg) >= 0);
    int next = 0;
    pthread_mutex_lock(&rs[0]->mu);
    for (int k = 0; k < rs[0]->count; k++) {
        event_copy *e = &rs[0]->events[k];
        if (e->kind != WPS_EVENT_GROUP_MESSAGE) continue;
        snprintf(msg, sizeof msg, "m%03d", next);
        if (e->data_len == 4 && memcmp(e->data, msg, 4) == 0) next++;
        else next = -1000;
    }
    pthread_mutex_unlock(&rs[0]->mu);
    CHECK(next == MSGS);
    for (int k = 0; k < N; k++) CHECK(free_client(cs[k], rs[k]));
    CHECK(free_client(a, ra));
    return true;
}

static void on_log_ignored(void *user_data, uint32_t level, const char *target, const char *message) {
    (void)user_data, (void)level, (void)target, (void)message;
}

/* A client used in a fork() child returns WPS_STATUS_FORKED; so does routing logs
 * there (the logging thread is the parent's), and turning them off or disabling the
 * callbacks returns at once instead of waiting for threads the child does not have. */
static bool test_fork(void) {
    recorder *ra;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    CHECK_OK(wps_set_log_callback(on_log_ignored, NULL, WPS_LOG_ERROR));
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        alarm(10); /* a wait for the parent's threads would never end: fail instead */
        int bad = 0;
        bad += wps_set_log_callback(on_log_ignored, NULL, WPS_LOG_INFO) != WPS_STATUS_FORKED;
        bad += wps_set_log_callback(NULL, NULL, 0) != WPS_STATUS_OK;
        bad += wps_callbacks_disable(5000) != WPS_STATUS_OK;
        bad += wps_client_join_group(a, "chat", NULL) != WPS_STATUS_FORKED;
        bad += wps_client_join_group_async(a, "chat", on_complete, NULL, NULL) != WPS_STATUS_FORKED;
        bad += wps_client_start(a) != WPS_STATUS_FORKED;
        bad += wps_client_state(a) != WPS_STATE_STOPPED;
        wps_client *c = NULL;
        bad += wps_client_new("ws://127.0.0.1:1/client/hubs/x", NULL, NULL, NULL, NULL, &c) != WPS_STATUS_FORKED;
        wps_client_free(a); /* left alone in the child */
        /* Leave through exec: a leak checker scanning this child would report the
         * memory of the parent's threads, which do not exist here. */
        char code[8];
        snprintf(code, sizeof code, "%d", bad);
        execl("/bin/sh", "sh", "-c", "exit \"$0\"", code, (char *)NULL);
        _exit(bad);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK_OK(wps_set_log_callback(NULL, NULL, 0));
    CHECK_OK(wps_client_join_group(a, "still-works", NULL));
    CHECK(free_client(a, ra));
    return true;
}

/* The log bridge. */
typedef struct {
    pthread_mutex_t mu;
    int calls;
    bool bad_level;
} log_state;

static void on_log(void *user_data, uint32_t level, const char *target, const char *message) {
    log_state *s = user_data;
    pthread_mutex_lock(&s->mu);
    s->calls++;
    s->bad_level |= level < WPS_LOG_ERROR || level > WPS_LOG_TRACE || !target || !message;
    pthread_mutex_unlock(&s->mu);
}

static bool test_logging(void) {
    log_state ls = {.calls = 0};
    pthread_mutex_init(&ls.mu, NULL);
    CHECK_OK(wps_set_log_callback(on_log, &ls, WPS_LOG_TRACE));
    recorder *ra;
    wps_client *a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    CHECK_OK(wps_client_join_group(a, "logged", NULL));
    CHECK(free_client(a, ra));
    CHECK_OK(wps_set_log_callback(NULL, NULL, 0));
    pthread_mutex_lock(&ls.mu);
    int calls = ls.calls;
    bool bad = ls.bad_level;
    pthread_mutex_unlock(&ls.mu);
    CHECK(calls > 0 && !bad);
    a = connect_client("alice", ALL_ROLES, &ra);
    CHECK(a);
    CHECK(free_client(a, ra));
    CHECK(ls.calls == calls);
    pthread_mutex_destroy(&ls.mu);
    return true;
}

/* The interrupt check, as a C program uses it for Ctrl-C: a SIGINT handler sets a flag
 * that the check returns. */
static volatile sig_atomic_t SIGINT_SEEN;

static void on_sigint(int sig) {
    (void)sig;
    SIGINT_SEEN = 1;
}

static int interrupt_check(void) { return SIGINT_SEEN; }

/* "Ctrl-C" 200 ms from now, sent to the thread `arg` points to (the waiting one, so
 * that the handler runs there and not on a thread of the library). */
static void *sigint_later(void *arg) {
    usleep(200000);
    pthread_kill(*(pthread_t *)arg, SIGINT);
    return NULL;
}

/* With the check set: a send and an invocation that the upstream holds ("slow") are
 * interrupted, the send with its ackId; then the client works as before. */
static bool interrupted_calls(wps_client *c, recorder *r) {
    pthread_t self = pthread_self(), timer;
    SIGINT_SEEN = 0;
    CHECK(pthread_create(&timer, NULL, sigint_later, &self) == 0);
    wps_ack_result ack = {0};
    wps_status s = wps_client_send_event(c, "slow", WPS_DATA_TYPE_TEXT, (const uint8_t *)"s", 1, 0, &ack);
    pthread_join(timer, NULL);
    CHECK_STATUS(s, WPS_STATUS_INTERRUPTED);
    CHECK(ack.has_ack_id && ack.ack_id > 0);
    SIGINT_SEEN = 0;
    CHECK(pthread_create(&timer, NULL, sigint_later, &self) == 0);
    wps_invoke_response *resp = NULL;
    s = wps_client_invoke_event(c, "slow", WPS_DATA_TYPE_TEXT, (const uint8_t *)"i", 1, 30000, &resp);
    pthread_join(timer, NULL);
    CHECK_STATUS(s, WPS_STATUS_INTERRUPTED);
    CHECK(resp == NULL);
    upstream_release(UP);
    /* the check stays set and says no: answered calls succeed */
    SIGINT_SEEN = 0;
    wps_ack_result sent = {0};
    CHECK_OK(wps_client_join_group(c, "interrupted", NULL));
    CHECK_OK(wps_client_send_to_group(c, "interrupted", WPS_DATA_TYPE_TEXT, (const uint8_t *)"after", 5, 0, &sent));
    CHECK(sent.has_ack_id && sent.ack_id > ack.ack_id);
    CHECK(wait_event(r, 0, WPS_EVENT_GROUP_MESSAGE, "after") >= 0);
    return true;
}

static bool test_interrupt_check(void) {
    CHECK_STATUS(wps_set_interrupt_check(interrupt_check, 0), WPS_STATUS_INVALID_ARGUMENT);
    recorder *r;
    wps_client *c = connect_client("interrupted", ALL_ROLES, &r);
    CHECK(c);
    struct sigaction sa = {.sa_handler = on_sigint, .sa_flags = SA_RESTART}, old;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGINT, &sa, &old) == 0);
    bool ok = wps_set_interrupt_check(interrupt_check, 20) == WPS_STATUS_OK && interrupted_calls(c, r);
    /* The check is process-wide: removed whatever happened, before the next test. */
    ok = wps_set_interrupt_check(NULL, 0) == WPS_STATUS_OK && ok;
    sigaction(SIGINT, &old, NULL);
    CHECK(ok);
    /* Removed: no longer asked, so with the flag set an invocation waits for its timeout. */
    SIGINT_SEEN = 1;
    wps_invoke_response *resp = NULL;
    CHECK_STATUS(wps_client_invoke_event(c, "slow", WPS_DATA_TYPE_TEXT, (const uint8_t *)"t", 1, 200, &resp), WPS_STATUS_TIMEOUT);
    upstream_release(UP);
    CHECK(strcmp(wps_status_str(WPS_STATUS_INTERRUPTED), "interrupted") == 0);
    CHECK(free_client(c, r));
    return true;
}

/* The copyable example runs against the emulator. */
/* Runs `bin [flag] <client url of user>` and checks that it exits with 0. */
static bool run_child(const char *bin, const char *flag, const char *user) {
    char *url = emulator_client_url(&EMU, HUB, user, ALL_ROLES);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        if (flag)
            execl(bin, bin, flag, url, (char *)NULL);
        else
            execl(bin, bin, url, (char *)NULL);
        _exit(127);
    }
    free(url);
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    return true;
}

static bool test_example(void) { return run_child(EXAMPLE_BIN, NULL, "example"); }

/* wss: refused without the test CA (TLS status), works with it as an extra root. */
static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    uint8_t *buf = malloc(65536);
    *len = fread(buf, 1, 65536, f);
    fclose(f);
    return buf;
}

static bool test_wss_with_extra_ca(void) {
    CHECK(TLS_DIR != NULL);
    char cert[512], key[512], ca[512];
    snprintf(cert, sizeof cert, "%s/cert.pem", TLS_DIR);
    snprintf(key, sizeof key, "%s/key.pem", TLS_DIR);
    snprintf(ca, sizeof ca, "%s/ca.pem", TLS_DIR);
    const char *args[] = {"--tls-cert", cert, "--tls-key", key, NULL};
    emulator tls;
    CHECK(emulator_start(&tls, EMULATOR_BIN, args) == 0);
    bool ok = tls.tls;
    char *url = emulator_client_url(&tls, HUB, "secure", ALL_ROLES);
    ok = ok && strncmp(url, "wss://", 6) == 0;
    /* without the CA: a TLS failure */
    wps_options *o = test_options();
    wps_options_set_reconnect_retry(o, 0, 10, 10, WPS_RETRY_FIXED);
    /* loading the platform's roots takes seconds under valgrind */
    wps_options_set_start_timeout_ms(o, 60000);
    wps_client *c = NULL;
    wps_status s = wps_client_new(url, o, NULL, NULL, NULL, &c);
    ok = ok && s == WPS_STATUS_OK;
    s = c ? wps_client_start(c) : s;
    if (s != WPS_STATUS_TLS) fprintf(stderr, "  wss without CA: %s: %s\n", wps_status_str(s), wps_last_error_message());
    ok = ok && s == WPS_STATUS_TLS;
    wps_client_free(c);
    /* with it: a round trip */
    size_t len = 0;
    uint8_t *pem = read_file(ca, &len);
    ok = ok && pem && wps_options_add_ca_pem(o, pem, len) == WPS_STATUS_OK;
    free(pem);
    recorder *r = recorder_new();
    c = NULL;
    ok = ok && wps_client_new(url, o, on_event, r, on_user_data_free, &c) == WPS_STATUS_OK;
    ok = ok && wps_client_start(c) == WPS_STATUS_OK;
    ok = ok && wps_client_join_group(c, "chat", NULL) == WPS_STATUS_OK;
    ok = ok && send_text(c, "chat", "over tls", 0);
    ok = ok && wait_event(r, 0, WPS_EVENT_GROUP_MESSAGE, "over tls") >= 0;
    if (c) ok = free_client(c, r) && ok;
    else recorder_delete(r);
    wps_options_free(o);
    free(url);
    ok = emulator_stop(&tls) == 0 && ok;
    CHECK(ok);
    return true;
}

/* ------------------------------------------------------------------ poll mode */

/* Polls the client's descriptor and dispatches until `done(arg)` or WAIT_MS; false on timeout. */
static bool dispatch_until(wps_client *c, bool (*done)(void *), void *arg) {
    int fd = -1;
    if (wps_client_dispatch_fd(c, &fd) != WPS_STATUS_OK || fd < 0) return false;
    int64_t deadline = now_ms() + WAIT_MS;
    while (!done(arg)) {
        int64_t left = deadline - now_ms();
        if (left <= 0) return false;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, (int)(left < 100 ? left : 100)) < 0) return false;
        size_t ran = 0;
        if (wps_client_dispatch(c, 64, &ran) != WPS_STATUS_OK) return false;
    }
    return true;
}

static bool completed(void *arg) { return ((completion *)arg)->calls > 0; }

typedef struct {
    recorder *r;
    int kind, at_least;
} kind_count;

static bool has_events(void *arg) {
    kind_count *k = arg;
    return count_kind(k->r, (uint32_t)k->kind) >= k->at_least;
}

/* Inside a dispatched callback: a nested dispatch of the same client is refused. */
typedef struct {
    completion done;
    wps_client *client;
    wps_status nested;
} nested_dispatch;

static void on_complete_nested(void *user_data, const wps_completion *done) {
    nested_dispatch *n = user_data;
    n->nested = wps_client_dispatch(n->client, 10, NULL);
    on_complete(&n->done, done);
}

static wps_client *poll_client(const char *user, recorder **rec) {
    char *url = emulator_client_url(&EMU, HUB, user, ALL_ROLES);
    wps_options *o = test_options();
    wps_client *c = NULL;
    *rec = recorder_new();
    bool ok = wps_options_set_dispatch_mode(o, WPS_DISPATCH_POLL) == WPS_STATUS_OK &&
              wps_client_new(url, o, on_event, *rec, on_user_data_free, &c) == WPS_STATUS_OK &&
              wps_client_start(c) == WPS_STATUS_OK;
    wps_options_free(o);
    free(url);
    if (!ok) fprintf(stderr, "  poll client: %s\n", wps_last_error_message());
    return ok ? c : NULL;
}

/* WPS_DISPATCH_POLL: callbacks run on the polling thread, in order, only inside
 * wps_client_dispatch; misuse gets clear errors; free runs what is left. */
static bool test_poll_mode(void) {
    wps_options *o = wps_options_new();
    CHECK_STATUS(wps_options_set_dispatch_mode(o, 7), WPS_STATUS_INVALID_ARGUMENT);
    wps_options_free(o);
    recorder *rt;
    wps_client *threaded = connect_client("threaded", ALL_ROLES, &rt);
    CHECK(threaded);
    int fd = -1;
    CHECK_STATUS(wps_client_dispatch_fd(threaded, &fd), WPS_STATUS_ILLEGAL_STATE);
    CHECK_STATUS(wps_client_dispatch(threaded, 1, NULL), WPS_STATUS_ILLEGAL_STATE);
    CHECK(strstr(wps_last_error_message(), "WPS_DISPATCH_POLL") != NULL);
    CHECK(free_client(threaded, rt));

    recorder *r;
    wps_client *c = poll_client("poller", &r);
    CHECK(c);
    CHECK_STATUS(wps_client_dispatch_fd(c, NULL), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_dispatch(NULL, 1, NULL), WPS_STATUS_NULL_ARG);
    /* Nothing runs until dispatched: the connected event waits in the queue. */
    usleep(50000);
    CHECK(event_count(r) == 0);
    kind_count connected = {r, WPS_EVENT_CONNECTED, 1};
    CHECK(dispatch_until(c, has_events, &connected));
    CHECK(pthread_equal(r->thread, pthread_self()));

    completion joined;
    completion_init(&joined);
    CHECK_OK(wps_client_join_group_async(c, "poll", on_complete, &joined, NULL));
    CHECK(dispatch_until(c, completed, &joined));
    CHECK(joined.status == WPS_STATUS_OK);
    enum { N = 300 };
    char text[16];
    for (int i = 0; i < N; i++) {
        snprintf(text, sizeof text, "m%d", i);
        CHECK(send_text(c, "poll", text, WPS_SEND_FIRE_AND_FORGET));
    }
    kind_count all = {r, WPS_EVENT_GROUP_MESSAGE, N};
    CHECK(dispatch_until(c, has_events, &all));
    /* In order, all on this thread, and `max` bounds one call. */
    int seen = 0;
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->count; i++) {
        if (r->events[i].kind != WPS_EVENT_GROUP_MESSAGE) continue;
        snprintf(text, sizeof text, "m%d", seen);
        if (strcmp(r->events[i].data, text) == 0) seen++;
    }
    bool same_thread = !r->thread_changed;
    pthread_mutex_unlock(&r->mu);
    CHECK(seen == N && same_thread);
    CHECK(send_text(c, "poll", "x", 0) && send_text(c, "poll", "y", 0));
    usleep(100000);
    /* `max` 0 takes nothing and succeeds: what is queued stays, the descriptor readable. */
    size_t ran = 99;
    CHECK_OK(wps_client_dispatch(c, 0, &ran));
    CHECK(ran == 0);
    CHECK_OK(wps_client_dispatch_fd(c, &fd));
    struct pollfd readable = {.fd = fd, .events = POLLIN};
    CHECK(poll(&readable, 1, 0) == 1);
    CHECK_OK(wps_client_dispatch(c, 1, &ran));
    CHECK(ran == 1);
    CHECK_OK(wps_client_dispatch(c, 100, &ran));
    CHECK(ran == 1);

    nested_dispatch n = {.client = c};
    completion_init(&n.done);
    CHECK_OK(wps_client_join_group_async(c, "poll2", on_complete_nested, &n, NULL));
    CHECK(dispatch_until(c, completed, &n.done));
    CHECK(n.nested == WPS_STATUS_ILLEGAL_STATE);

    /* Freed with an operation pending and callbacks queued: the pending operation
     * completes (on a library thread), a completion already queued runs with its
     * outcome, no event is delivered, the finalizer runs once, before free returns. */
    completion slow, queued;
    completion_init(&slow);
    completion_init(&queued);
    CHECK_OK(wps_client_invoke_event_async(c, "slow", WPS_DATA_TYPE_TEXT, (const uint8_t *)"p", 1, 0, on_complete, &slow, NULL));
    CHECK_OK(wps_client_join_group_async(c, "poll3", on_complete, &queued, NULL));
    /* Acked after poll3's join: that completion is queued by now. */
    CHECK_OK(wps_client_join_group(c, "poll4", NULL));
    CHECK(send_text(c, "poll", "queued", 0));
    int events_before_free = event_count(r);
    wps_client_free(c);
    CHECK(r->freed == 1 && r->in_flight == 0 && r->calls_after_free == 0 && event_count(r) == events_before_free);
    CHECK(slow.calls == 1 && slow.status == WPS_STATUS_STOPPED);
    CHECK(queued.calls == 1 && queued.status == WPS_STATUS_OK);
    upstream_release(UP);
    completion_destroy(&joined);
    completion_destroy(&n.done);
    completion_destroy(&slow);
    completion_destroy(&queued);
    recorder_delete(r);

    /* Freed from inside its own dispatched callback: the finalizer runs after it. */
    recorder *rd;
    wps_client *d = poll_client("dier", &rd);
    CHECK(d);
    completion dj;
    completion_init(&dj);
    CHECK_OK(wps_client_join_group_async(d, "poll", on_complete, &dj, NULL));
    CHECK(dispatch_until(d, completed, &dj));
    pthread_mutex_lock(&rd->mu);
    rd->self = d;
    pthread_mutex_unlock(&rd->mu);
    CHECK(send_text(d, "poll", "die", 0));
    int fd_d = -1;
    CHECK_OK(wps_client_dispatch_fd(d, &fd_d));
    int64_t deadline = now_ms() + WAIT_MS;
    while (rd->inner_calls == 0 && now_ms() < deadline) {
        struct pollfd p = {.fd = fd_d, .events = POLLIN};
        poll(&p, 1, 100);
        /* One callback per call: the handle is gone once the "die" callback ran. */
        CHECK_OK(wps_client_dispatch(d, 1, NULL));
    }
    CHECK_OK(wait_inner(rd));
    CHECK(wait_freed(rd));
    CHECK(rd->calls_after_free == 0);
    completion_destroy(&dj);
    recorder_delete(rd);
    return true;
}

/* WPS_SEND_RECORD: in poll mode a successful send comes back as a record of
 * wps_client_dispatch_records, each once, with its user data; failures, sends without
 * the flag, and what is left at free still reach their callbacks. */
static bool test_poll_records(void) {
    recorder *r;
    wps_client *c = poll_client("recorder", &r);
    CHECK(c);
    enum { N = 50 };
    completion sends[N], plain, left;
    int recorded[N] = {0};
    for (int i = 0; i < N; i++) completion_init(&sends[i]);
    completion_init(&plain);
    completion_init(&left);
    for (int i = 0; i < N; i++) {
        CHECK_OK(wps_client_send_to_group_async(c, "records", WPS_DATA_TYPE_TEXT, (const uint8_t *)"r", 1,
                                                WPS_SEND_RECORD | (i % 3 ? WPS_SEND_DEFERRED : 0), on_complete,
                                                &sends[i], NULL));
    }
    CHECK_OK(wps_client_send_to_group_async(c, "records", WPS_DATA_TYPE_TEXT, (const uint8_t *)"p", 1, 0, on_complete,
                                            &plain, NULL));
    wps_ack_record recs[8];
    size_t ran = 0, n = 0;
    CHECK_STATUS(wps_client_dispatch_records(c, 1, NULL, 8, &ran, &n), WPS_STATUS_NULL_ARG);
    CHECK_STATUS(wps_client_dispatch_records(c, 1, recs, 0, &ran, &n), WPS_STATUS_INVALID_ARGUMENT);
    int fd = -1, total = 0;
    CHECK_OK(wps_client_dispatch_fd(c, &fd));
    int64_t deadline = now_ms() + WAIT_MS;
    while ((total < N || plain.calls == 0) && now_ms() < deadline) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        poll(&p, 1, 100);
        CHECK_OK(wps_client_dispatch_records(c, 64, recs, 8, &ran, &n));
        CHECK(n <= 8);
        for (size_t k = 0; k < n; k++) {
            completion *done = recs[k].user_data;
            CHECK(done >= sends && done < sends + N && recs[k].has_ack_id && !recs[k].is_duplicated);
            recorded[done - sends]++;
            total++;
        }
    }
    CHECK(total == N && plain.calls == 1 && plain.status == WPS_STATUS_OK);
    for (int i = 0; i < N; i++) CHECK(recorded[i] == 1 && sends[i].calls == 0);
    CHECK_STATUS(wps_client_send_to_group(c, "records", WPS_DATA_TYPE_TEXT, (const uint8_t *)"b", 1, WPS_SEND_RECORD,
                                          NULL),
                 WPS_STATUS_INVALID_ARGUMENT);
    /* Deferred and never flushed when the client is freed: its callback says so. */
    CHECK_OK(wps_client_send_to_group_async(c, "records", WPS_DATA_TYPE_TEXT, (const uint8_t *)"l", 1,
                                            WPS_SEND_RECORD | WPS_SEND_DEFERRED, on_complete, &left, NULL));
    wps_client_free(c);
    CHECK(r->freed == 1 && left.calls == 1);
    for (int i = 0; i < N; i++) completion_destroy(&sends[i]);
    completion_destroy(&plain);
    completion_destroy(&left);
    recorder_delete(r);
    return true;
}

/* wps_client_dispatch_into: group messages come back as wps_message_records in the
 * caller's buffer, in order with the callbacks (a message too large for the buffer
 * takes the event callback); what is left when the client is freed is freed with it. */
static bool test_poll_message_records(void) {
    recorder *r;
    wps_client *c = poll_client("packer", &r);
    CHECK(c);
    CHECK_OK(wps_client_join_group(c, "packed", NULL));
    enum { N = 30, LARGE = 7 };
    char large[300];
    memset(large, 'L', sizeof large);
    for (int i = 0; i < N; i++) {
        char text[16];
        int len = snprintf(text, sizeof text, "k%d", i);
        const char *data = i == LARGE ? large : text;
        size_t size = i == LARGE ? sizeof large : (size_t)len;
        CHECK_OK(wps_client_send_to_group_async(c, "packed", WPS_DATA_TYPE_TEXT, (const uint8_t *)data, size,
                                                WPS_SEND_FIRE_AND_FORGET, NULL, NULL, NULL));
    }
    uint64_t messages[32]; /* 256 bytes, 8-byte aligned */
    wps_ack_record acks[4];
    wps_dispatch_buffers b = {.acks = acks, .ack_cap = 4, .messages = (uint8_t *)messages, .message_cap = 0};
    CHECK_STATUS(wps_client_dispatch_into(c, 1, NULL), WPS_STATUS_NULL_ARG);
    b.messages = (uint8_t *)messages + 4;
    CHECK_STATUS(wps_client_dispatch_into(c, 1, &b), WPS_STATUS_INVALID_ARGUMENT);
    b.messages = (uint8_t *)messages;
    b.message_cap = sizeof messages;
    int next = 0, called_before = count_kind(r, WPS_EVENT_GROUP_MESSAGE);
    int64_t deadline = now_ms() + WAIT_MS;
    while (next < N && now_ms() < deadline) {
        CHECK_OK(wps_client_dispatch_into(c, 64, &b));
        CHECK(b.message_bytes <= b.message_cap && b.acks_written == 0);
        /* a callback that ran is the large message, and it came before this call's records */
        int called = count_kind(r, WPS_EVENT_GROUP_MESSAGE) - called_before;
        if (called) {
            CHECK(called == 1 && next == LARGE);
            next++;
            called_before++;
        }
        size_t at = 0;
        for (size_t k = 0; k < b.messages_written; k++) {
            const wps_message_record *m = (const wps_message_record *)((const uint8_t *)messages + at);
            const char *bytes = (const char *)(m + 1);
            char expect[16];
            int len = snprintf(expect, sizeof expect, "k%d", next);
            CHECK(m->kind == WPS_EVENT_GROUP_MESSAGE && m->data_type == WPS_DATA_TYPE_TEXT && m->size % 8 == 0);
            CHECK(m->group_len == 6 && memcmp(bytes, "packed", 6) == 0);
            CHECK((m->flags & WPS_MESSAGE_HAS_FROM_USER_ID) && m->from_user_id_len == 6 &&
                  memcmp(bytes + 6, "packer", 6) == 0);
            CHECK(m->data_len == (uint64_t)len && memcmp(bytes + 12, expect, (size_t)len) == 0);
            at += m->size;
            next++;
        }
        CHECK(at == b.message_bytes);
        if (b.ran + b.messages_written == 0) usleep(2000);
    }
    CHECK(next == N);
    /* Queued and never dispatched: freed with the client. */
    CHECK_OK(wps_client_send_to_group_async(c, "packed", WPS_DATA_TYPE_TEXT, (const uint8_t *)"z", 1,
                                            WPS_SEND_FIRE_AND_FORGET, NULL, NULL, NULL));
    usleep(50000); /* most likely arrived and queued */
    wps_client_free(c);
    CHECK(r->freed == 1 && r->calls_after_free == 0);
    recorder_delete(r);
    return true;
}

/* ------------------------------------------------------------------ at exit */

static wps_client *AT_EXIT_CLIENT;
static int AT_EXIT_FREED;

static void on_at_exit_free(void *user_data) { *(int *)user_data += 1; }

/* Runs after the library's thread-locals of this thread were destroyed (as a C++
 * static destructor would): every call still works, with its error message. */
static void at_exit_cleanup(void) {
    int bad = 0;
    bad += wps_client_send_to_group(AT_EXIT_CLIENT, "g", WPS_DATA_TYPE_TEXT, (const uint8_t *)"bye", 3, 0, NULL) != WPS_STATUS_OK;
    bad += wps_client_join_group(AT_EXIT_CLIENT, NULL, NULL) != WPS_STATUS_NULL_ARG;
    bad += strcmp(wps_last_error_message(), "`group` is NULL") != 0;
    bad += wps_client_stop(AT_EXIT_CLIENT) != WPS_STATUS_OK;
    wps_client_free(AT_EXIT_CLIENT);
    bad += AT_EXIT_FREED != 1;
    if (bad) {
        fprintf(stderr, "  at exit: %d checks failed\n", bad);
        _exit(3);
    }
}

/* The child of test_calls_at_exit: a connected client, left to an atexit handler. */
static int at_exit_main(const char *url) {
    if (wps_client_new(url, NULL, NULL, &AT_EXIT_FREED, on_at_exit_free, &AT_EXIT_CLIENT) != WPS_STATUS_OK ||
        wps_client_start(AT_EXIT_CLIENT) != WPS_STATUS_OK || wps_client_join_group(AT_EXIT_CLIENT, "g", NULL) != WPS_STATUS_OK) {
        fprintf(stderr, "  at exit child: %s\n", wps_last_error_message());
        return 2;
    }
    atexit(at_exit_cleanup);
    return 0;
}

/* A client used and freed from an atexit handler (a child process of this harness). */
static bool test_calls_at_exit(void) { return run_child(SELF, "--at-exit", "leaver"); }

/* ------------------------------------------------------------------ main */

static int passed, failed;

static void run(const char *name, bool (*test)(void)) {
    int64_t t0 = now_ms();
    bool ok = test();
    printf("%s - %s (%lld ms)\n", ok ? "ok" : "FAIL", name, (long long)(now_ms() - t0));
    fflush(stdout);
    if (ok) passed++;
    else failed++;
}

int main(int argc, char **argv) {
    SELF = argv[0];
    if (argc == 3 && strcmp(argv[1], "--at-exit") == 0) return at_exit_main(argv[2]);
    if (argc < 4) {
        fprintf(stderr, "usage: %s EMULATOR_BIN EXAMPLE_BIN TLS_DIR\n", argv[0]);
        return 2;
    }
    EMULATOR_BIN = argv[1];
    EXAMPLE_BIN = argv[2];
    TLS_DIR = argv[3];
    UP = upstream_start();
    if (!UP) {
        fprintf(stderr, "cannot start the upstream server\n");
        return 2;
    }
    char upstream_url[64];
    snprintf(upstream_url, sizeof upstream_url, "http://127.0.0.1:%d/", upstream_port(UP));
    const char *args[] = {"--upstream", upstream_url, NULL};
    if (emulator_start(&EMU, argv[1], args) != 0) {
        fprintf(stderr, "cannot start the emulator %s\n", argv[1]);
        upstream_stop(UP);
        return 2;
    }
    run("status strings", test_status_strings);
    run("null and invalid arguments", test_null_and_invalid_arguments);
    run("options", test_options_setters);
    run("chat between two clients", test_chat);
    run("a slow consumer with a small backlog", test_slow_consumer);
    run("stop and free while the reading is paused", test_free_while_paused);
    run("async operations and upstream", test_async_and_upstream);
    run("cancel", test_cancel);
    run("completion races with cancel and free", test_completion_races);
    run("blocking call inside a callback", test_call_inside_callback);
    run("free inside a callback", test_free_inside_callback);
    run("free inside a completion callback", test_free_inside_completion);
    run("free with pending operations", test_free_with_pending);
    run("a finalizer calling into its client, freeing it again", test_finalizer_reenters_its_client);
    run("credential errors", test_credential_errors);
    run("credential answered later", test_credential_deferred);
    run("stop and free report the ackIds of pending sends", test_stop_reports_ack_ids);
    run("reconnection", test_reconnection);
    run("the stopped event tells why", test_stopped_reason);
    run("dispatcher threads and order", test_threads_and_order);
    run("fork", test_fork);
    run("logging", test_logging);
    run("interrupt check of blocking calls", test_interrupt_check);
    run("wss with an extra CA", test_wss_with_extra_ca);
    run("poll dispatch mode", test_poll_mode);
    run("poll dispatch records", test_poll_records);
    run("poll dispatch message records", test_poll_message_records);
    run("example", test_example);
    run("calls from an atexit handler", test_calls_at_exit);
    int emu = emulator_stop(&EMU);
    upstream_stop(UP);
    if (emu != 0) {
        fprintf(stderr, "the emulator did not exit cleanly (%d)\n", emu);
        failed++;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
