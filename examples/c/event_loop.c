/* Poll dispatch mode: the client's callbacks run on this program's own event loop
 * (a poll() loop here; epoll or libuv work the same way), not on a library thread,
 * and nothing blocks the loop: the client starts, joins and sends with the _async
 * calls, each step begun from the completion of the one before.
 *
 *   event_loop CLIENT_ACCESS_URL
 *
 * Joins "loop", sends ten messages asynchronously, and runs until all ten acks and all
 * ten echoes were handled on the main thread. Run by scripts/run-examples.sh. */
#include "webpubsub_client.h"
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

enum { MESSAGES = 10 };

typedef struct {
    wps_client *client;
    int acked, failed, received;
    bool gave_up;
} progress;

static void give_up(progress *p, const char *step, const char *why) {
    fprintf(stderr, "%s failed: %s\n", step, why ? why : wps_last_error_message());
    p->gave_up = true;
}

static void on_event(void *user_data, const wps_event *e) {
    progress *p = user_data; /* no lock: every callback runs inside wps_client_dispatch */
    if (e->kind == WPS_EVENT_GROUP_MESSAGE) {
        p->received++;
        printf("received %.*s\n", (int)e->data_len, (const char *)e->data);
    }
}

static void on_sent(void *user_data, const wps_completion *done) {
    progress *p = user_data;
    if (done->status == WPS_STATUS_OK)
        p->acked++;
    else
        p->failed++;
}

static void on_joined(void *user_data, const wps_completion *done) {
    progress *p = user_data;
    if (done->status != WPS_STATUS_OK) {
        give_up(p, "join", done->error_message);
        return;
    }
    for (int i = 0; i < MESSAGES; i++) {
        char text[32];
        int len = snprintf(text, sizeof text, "message %d", i);
        if (wps_client_send_to_group_async(p->client, "loop", WPS_DATA_TYPE_TEXT, (const uint8_t *)text,
                                           (size_t)len, 0, on_sent, p, NULL) != WPS_STATUS_OK) {
            fprintf(stderr, "send failed: %s\n", wps_last_error_message());
            p->failed++;
        }
    }
}

static void on_started(void *user_data, const wps_completion *done) {
    progress *p = user_data;
    if (done->status != WPS_STATUS_OK)
        give_up(p, "start", done->error_message);
    else if (wps_client_join_group_async(p->client, "loop", on_joined, p, NULL) != WPS_STATUS_OK)
        give_up(p, "join", NULL);
}

int main(int argc, char **argv) {
    progress p = {NULL, 0, 0, 0, false};
    wps_options *opts = wps_options_new();
    int fd = -1;
    if (argc < 2 || !opts || wps_options_set_dispatch_mode(opts, WPS_DISPATCH_POLL) != WPS_STATUS_OK ||
        wps_client_new(argv[1], opts, on_event, &p, NULL, &p.client) != WPS_STATUS_OK ||
        wps_client_dispatch_fd(p.client, &fd) != WPS_STATUS_OK ||
        wps_client_start_async(p.client, on_started, &p, NULL) != WPS_STATUS_OK) {
        fprintf(stderr, "failed: %s\n", wps_last_error_message());
        wps_options_free(opts);
        wps_client_free(p.client);
        return 1;
    }
    wps_options_free(opts);
    /* The loop: wait until the descriptor is readable, then run the queued callbacks. */
    int idle_rounds = 0;
    while (!p.gave_up && (p.acked + p.failed < MESSAGES || p.received < MESSAGES) && idle_rounds < 100) {
        struct pollfd watch = {.fd = fd, .events = POLLIN};
        int ready = poll(&watch, 1, 100);
        idle_rounds = ready > 0 ? 0 : idle_rounds + 1;
        if (ready > 0 && wps_client_dispatch(p.client, 64, NULL) != WPS_STATUS_OK) {
            fprintf(stderr, "dispatch failed: %s\n", wps_last_error_message());
            break;
        }
    }
    printf("acked %d, failed %d, received %d\n", p.acked, p.failed, p.received);
    wps_client_free(p.client); /* after this, the descriptor is closed: stop watching it first */
    return p.acked == MESSAGES && p.received == MESSAGES ? 0 : 1;
}
