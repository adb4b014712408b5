/* A minimal chat with the webpubsub_client C API.
 *
 * Two clients join the group "chat"; the first says hello, the second prints what
 * arrives and answers; the program exits once both messages went around.
 *
 * Build, from the repository root after `cargo build`:
 *        cc -std=c11 examples/c/chat.c -I include -L target/debug -lwebpubsub_client -lpthread -o chat
 * Run:   LD_LIBRARY_PATH=target/debug ./chat 'ws://HOST/client/hubs/HUB?access_token=TOKEN'
 *        (a token with the roles webpubsub.joinLeaveGroup and webpubsub.sendToGroup) */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include "webpubsub_client.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

typedef struct {
    const char *name;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int received;
} chat_user;

/* Runs on a library dispatcher thread; `event` is only valid during the call. */
static void on_event(void *user_data, const wps_event *event) {
    chat_user *u = user_data;
    if (event->kind == WPS_EVENT_CONNECTED) {
        printf("[%s] connected as %s\n", u->name, event->connection_id);
    } else if (event->kind == WPS_EVENT_GROUP_MESSAGE) {
        printf("[%s] %s says: %.*s\n", u->name, event->from_user_id ? event->from_user_id : "someone",
               (int)event->data_len, (const char *)event->data);
        pthread_mutex_lock(&u->mu);
        u->received++;
        pthread_cond_signal(&u->cv);
        pthread_mutex_unlock(&u->mu);
    }
}

static int fail(const char *what, wps_status s) {
    fprintf(stderr, "%s failed: %s (%s)\n", what, wps_status_str(s), wps_last_error_message());
    return 1;
}

/* Waits until `u` received `n` messages, at most 10 seconds. */
static int wait_for(chat_user *u, int n) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 10;
    pthread_mutex_lock(&u->mu);
    while (u->received < n)
        if (pthread_cond_timedwait(&u->cv, &u->mu, &deadline) != 0) break;
    int ok = u->received >= n;
    pthread_mutex_unlock(&u->mu);
    return ok;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CLIENT_URL\n", argv[0]);
        return 2;
    }
    chat_user users[2] = {{.name = "first"}, {.name = "second"}};
    wps_client *clients[2] = {NULL, NULL};
    int rc = 1;
    for (int i = 0; i < 2; i++) {
        pthread_mutex_init(&users[i].mu, NULL);
        pthread_cond_init(&users[i].cv, NULL);
        wps_status s = wps_client_new(argv[1], NULL, on_event, &users[i], NULL, &clients[i]);
        if (s != WPS_STATUS_OK) { rc = fail("wps_client_new", s); goto done; }
        if ((s = wps_client_start(clients[i])) != WPS_STATUS_OK) { rc = fail("wps_client_start", s); goto done; }
        if ((s = wps_client_join_group(clients[i], "chat", NULL)) != WPS_STATUS_OK) { rc = fail("join", s); goto done; }
    }
    const char *hello = "hello from C";
    wps_ack_result ack;
    wps_status s = wps_client_send_to_group(clients[0], "chat", WPS_DATA_TYPE_TEXT, (const uint8_t *)hello,
                                            strlen(hello), WPS_SEND_NO_ECHO, &ack);
    if (s != WPS_STATUS_OK) { rc = fail("send", s); goto done; }
    printf("[first] sent with ackId %llu\n", (unsigned long long)ack.ack_id);
    if (!wait_for(&users[1], 1)) { fprintf(stderr, "no message arrived\n"); goto done; }
    const char *answer = "hi, C!";
    s = wps_client_send_to_group(clients[1], "chat", WPS_DATA_TYPE_TEXT, (const uint8_t *)answer, strlen(answer),
                                 WPS_SEND_NO_ECHO, NULL);
    if (s != WPS_STATUS_OK) { rc = fail("send", s); goto done; }
    if (!wait_for(&users[0], 1)) { fprintf(stderr, "no answer arrived\n"); goto done; }
    rc = 0;
done:
    /* Free stops the client and waits for its callbacks: the user data can go after it. */
    for (int i = 0; i < 2; i++) {
        wps_client_free(clients[i]);
        pthread_mutex_destroy(&users[i].mu);
        pthread_cond_destroy(&users[i].cv);
    }
    return rc;
}
