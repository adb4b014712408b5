/* The README's C quick start, compiled and run by scripts/run-examples.sh. */
#include "webpubsub_client.h"
#include <stdio.h>
#include <string.h>

static void on_event(void *user_data, const wps_event *e) {
    (void)user_data;  /* runs on a library thread; e is valid during this call only */
    if (e->kind == WPS_EVENT_GROUP_MESSAGE)
        printf("%s: %.*s\n", e->group, (int)e->data_len, (const char *)e->data);
}

int main(int argc, char **argv) {
    wps_client *client = NULL;
    if (argc < 2 || wps_client_new(argv[1], NULL, on_event, NULL, NULL, &client) != WPS_STATUS_OK ||
        wps_client_start(client) != WPS_STATUS_OK) {
        fprintf(stderr, "failed: %s\n", wps_last_error_message());
        return 1;
    }
    wps_client_join_group(client, "chat", NULL);
    const char *hi = "hello";
    wps_status s = wps_client_send_to_group(client, "chat", WPS_DATA_TYPE_TEXT,
                                            (const uint8_t *)hi, strlen(hi), 0, NULL);
    printf("send: %s\n", wps_status_str(s));
    wps_client_free(client);  /* stops, completes pending operations, waits for callbacks */
    return s == WPS_STATUS_OK ? 0 : 1;
}
